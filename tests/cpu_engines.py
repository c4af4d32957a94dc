"""Test harness: ``python tests/cpu_engines.py train RECIPE key=value ...`` runs ``sftune`` with
accelerate's FSDP2 (or DeepSpeed, when installed) on CPU ranks over gloo. Launched by torchrun in
``tests/test_fsdp.py``.

Why a test-only switch, and why here: accelerate builds its FSDP plugin from the launch's
environment (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_*``, what ``accelerate launch
--config_file configs/accelerate/fsdp.yaml`` exports) and hands it to ``AcceleratorState``, which
switches ``distributed_type`` to ``FSDP`` only inside its branch for accelerator process groups
(MULTI_GPU, MULTI_XPU, ...). On a machine without GPUs the state is ``MULTI_CPU`` and the plugin is
dropped, so the run silently becomes plain data parallel. DeepSpeed is the same story: its branch
requires ``cpu=False``. Nothing after that decision needs a GPU: ``fully_shard`` works on CPU
tensors, DeepSpeed has a CPU accelerator, and gloo has every collective they use.

The patch below does, for ``MULTI_CPU``, exactly the assignments accelerate's own branch does for
GPUs (``distributed_type`` and the plugin), and nothing more. Everything after it is the code a
GPU run executes: accelerate's ``fsdp2_prepare_model`` / ``_prepare_deepspeed``, its state-dict
and checkpoint helpers, and sftune's sharded branches (``sftune.distributed``). It lives in the
test harness, not in sftune, because sharding on CPU is not a product feature (DDP is faster
there); it only makes the GPU code paths executable in CI, and an env var alone could not do it
(accelerate reads no variable that selects FSDP for CPU ranks). If accelerate ever selects these
engines for MULTI_CPU itself, the patch is a no-op.
"""

from __future__ import annotations

import os
import sys


def enable_engines_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_sftune_cpu_engines", False):
        return

    def __init__(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if deepspeed_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # the same assignments as accelerate's DeepSpeed branch (which requires cpu=False)
            self.distributed_type = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
            self._mixed_precision = "no"
            PartialState._shared_state["distributed_type"] = self.distributed_type
            if self.is_main_process:
                print(f"cpu_engines: distributed_type={self.distributed_type.value} over {self.backend}, "
                      f"zero_stage={deepspeed_plugin.zero_stage}", file=sys.stderr, flush=True)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # the same assignments as accelerate's branch for MULTI_GPU & co.
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type
            if self.is_main_process:  # the tests look for this line
                print(f"cpu_engines: distributed_type={self.distributed_type.value} over {self.backend}, "
                      f"fsdp_version={fsdp_plugin.fsdp_version}", file=sys.stderr, flush=True)

    __init__._sftune_cpu_engines = True
    AcceleratorState.__init__ = __init__


def leave(code: int) -> None:
    """Exit with ``code`` without the interpreter's teardown. On these CPU stand-in ranks, gloo's
    threads behind FSDP2's device-mesh groups now and then abort the process while Python tears
    down (``terminate called without an active exception``, SIGABRT), after the run had trained,
    saved and written its report: the run's result was complete, only the exit status lied. That
    was seen while accelerate's ``end_training`` destroyed the groups before the model was freed,
    which also hung DDP runs now and then; ``sftune.cluster.end_distributed`` now frees the model
    first, and this exit stays as a guard. Nothing of sftune's is left running by then
    (``train()`` returns after every save has finished)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    enable_engines_on_cpu()
    from sftune.cli import main

    leave(main(sys.argv[1:]) or 0)
