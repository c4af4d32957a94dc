"""Test harness: ``python tests/cpu_fsdp.py train RECIPE key=value ...`` runs ``sftune`` with
accelerate's FSDP2 on CPU ranks over gloo. Launched by torchrun in ``tests/test_fsdp.py``.

Why a test-only switch, and why here: accelerate builds its FSDP plugin from the launch's
environment (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_*``, what ``accelerate launch
--config_file configs/accelerate/fsdp.yaml`` exports) and hands it to ``AcceleratorState``, which
switches ``distributed_type`` to ``FSDP`` only inside its branch for accelerator process groups
(MULTI_GPU, MULTI_XPU, ...). On a machine without GPUs the state is ``MULTI_CPU`` and the plugin is
dropped, so the run silently becomes plain data parallel. Nothing else in accelerate's FSDP2 path
needs a GPU: ``fully_shard`` works on CPU tensors and gloo has every collective it uses.

The patch below does, for ``MULTI_CPU``, exactly what that branch does for GPUs (set
``distributed_type`` and ``fsdp_plugin``), and nothing more. Everything after it is the code a GPU
run executes: accelerate's ``fsdp2_prepare_model``, its FSDP2 state-dict and checkpoint helpers,
and sftune's sharded branches (``is_sharded``). It lives in the test harness, not in sftune,
because FSDP on CPU is not a product feature (it is slower than DDP there); it only makes the GPU
code paths executable in CI. If accelerate ever selects FSDP for MULTI_CPU itself, the patch is a
no-op.
"""

from __future__ import annotations

import sys


def enable_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_sftune_cpu_fsdp", False):
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
                print(f"cpu_fsdp: distributed_type={self.distributed_type.value} over {self.backend}, "
                      f"zero_stage={deepspeed_plugin.zero_stage}", file=sys.stderr, flush=True)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # the same assignments as accelerate's branch for MULTI_GPU & co.
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type
            if self.is_main_process:  # the tests look for this line
                print(f"cpu_fsdp: distributed_type={self.distributed_type.value} over {self.backend}, "
                      f"fsdp_version={fsdp_plugin.fsdp_version}", file=sys.stderr, flush=True)

    __init__._sftune_cpu_fsdp = True
    AcceleratorState.__init__ = __init__


if __name__ == "__main__":
    enable_fsdp_on_cpu()
    from sftune.cli import main

    sys.exit(main(sys.argv[1:]))
