"""Distillation: the student learns a teacher's next-token distribution on the trained tokens.

:mod:`.divergence` (the chunked, exact divergences), :mod:`.teacher` (the live teacher),
:mod:`.saved` (``sftune distill-prepare`` and the saved top-k read through the data seam),
:mod:`.objective` (what a run attaches to its loss model, and the logged figures), :mod:`.on_policy`
(on a share of the steps the student writes the completions the teacher scores).
"""

from sftune.distill.objective import Distiller, attach
from sftune.distill.on_policy import step_batches

__all__ = ["Distiller", "attach", "step_batches"]
