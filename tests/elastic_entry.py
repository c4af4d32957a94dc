"""Test harness: ``python tests/elastic_entry.py train RECIPE key=value ...`` runs ``sftune`` under
torchrun, and on the first attempt (``TORCHELASTIC_RESTART_COUNT=0``) the rank named by
``SFTUNE_TEST_DIE_RANK`` kills itself with SIGKILL (a lost node, an OOM kill: no handler runs) when
step ``SFTUNE_TEST_DIE_STEP`` begins, or in the middle of writing the checkpoint of step
``SFTUNE_TEST_DIE_SAVING`` (its own files written, the checkpoint not yet complete).
``SFTUNE_TEST_SIGTERM_STEP`` instead sends SIGTERM to the launcher (the parent process: what a
scheduler's preemption does) when that step begins, from rank 0. On a restart, rank 0 starts 3 s
late, so rank 1 meets the launcher's store first (without a namespace per attempt it found the dead
attempt's keys there, and the restarted group never met).
Used by ``tests/test_cluster.py``.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _arm() -> None:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        if os.environ.get("RANK") == "0":  # on a restart, rank 1 reaches the rendezvous first: the order in
            time.sleep(3)  # which a store shared with the dead attempt hung the group (before sftune.cluster)
        return
    rank = os.environ.get("RANK", "0")
    die_step = os.environ.get("SFTUNE_TEST_DIE_STEP")
    term_step = os.environ.get("SFTUNE_TEST_SIGTERM_STEP")
    die_saving = os.environ.get("SFTUNE_TEST_DIE_SAVING")
    from sftune import checkpoint, training

    if die_saving is not None and rank == os.environ.get("SFTUNE_TEST_DIE_RANK", "1"):
        save = checkpoint.save_checkpoint

        def save_then_die(accelerator, output_dir, step, state, keep, **kw):
            if step != int(die_saving):
                return save(accelerator, output_dir, step, state, keep, **kw)
            original = accelerator.save_state

            def half(*a, **kw):
                original(*a, **kw)
                os.kill(os.getpid(), signal.SIGKILL)

            accelerator.save_state = half
            return save(accelerator, output_dir, step, state, keep, **kw)

        training.save_checkpoint = save_then_die

    original = training.DataPlan.__call__

    def batches(self, step):
        if die_step is not None and step == int(die_step) and rank == os.environ.get("SFTUNE_TEST_DIE_RANK", "1"):
            os.kill(os.getpid(), signal.SIGKILL)
        if term_step is not None and step == int(term_step) and rank == "0":
            os.kill(os.getppid(), signal.SIGTERM)
        return original(self, step)

    training.DataPlan.__call__ = batches


if __name__ == "__main__":
    _arm()
    from sftune.cli import main

    sys.exit(main(sys.argv[1:]))
