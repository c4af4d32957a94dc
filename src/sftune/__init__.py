"""sftune: supervised fine-tuning of causal language models, correct by construction.

Python API::

    from sftune import load_config, train
    cfg = load_config("quickstart", ["train.max_steps=50"])
    result = train(cfg)

``train`` is :func:`sftune.training.train` (setup, loop, finish in :mod:`sftune.training`).

TRL-style fronts (:mod:`sftune.compat`)::

    from sftune import SFTTrainer, DataCollatorForCompletionOnlyLM
"""

__version__ = "0.1.0"

_LAZY = {  # name -> module: importing sftune stays cheap, the training stack loads on first use
    "load_config": "sftune.config",
    "train": "sftune.training",
    "SFTTrainer": "sftune.compat",
    "DataCollatorForCompletionOnlyLM": "sftune.compat",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sftune' has no attribute {name!r}")


__all__ = ["DataCollatorForCompletionOnlyLM", "SFTTrainer", "__version__", "load_config", "train"]
