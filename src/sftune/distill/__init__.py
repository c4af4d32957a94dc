"""Distillation: the student learns a teacher's next-token distribution on the trained tokens.

:mod:`.divergence` (the chunked, exact divergences), :mod:`.teacher` (the live teacher),
:mod:`.saved` (``sftune distill-prepare`` and the saved top-k read through the data seam),
:mod:`.objective` (what a run attaches to its loss model, and the logged figures).
"""

from sftune.distill.objective import Distiller, attach

__all__ = ["Distiller", "attach"]
