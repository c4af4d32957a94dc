"""sftune: supervised fine-tuning of causal language models, correct by construction.

Python API::

    from sftune import load_config, train
    cfg = load_config("quickstart", ["train.max_steps=50"])
    result = train(cfg)

``train`` is :func:`sftune.training.train` (setup, loop, finish in :mod:`sftune.training`).

TRL-style fronts (:mod:`sftune.compat`)::

    from sftune import SFTTrainer, SFTConfig                          # TRL 1.x scripts
    from sftune import SFTTrainer, DataCollatorForCompletionOnlyLM    # TRL 0.7 scripts

``SFTConfig`` is TRL's name for TRL's arguments; sftune's own typed config is :class:`sftune.config.Config`.
"""

__version__ = "0.1.0"

_LAZY = {  # name -> module: importing sftune stays cheap, the training stack loads on first use
    "load_config": "sftune.config",
    "train": "sftune.training",
    "SFTTrainer": "sftune.compat",
    "DataCollatorForCompletionOnlyLM": "sftune.compat",
    "SFTConfig": "sftune.compat",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sftune' has no attribute {name!r}")


__all__ = ["DataCollatorForCompletionOnlyLM", "SFTConfig", "SFTTrainer", "__version__", "load_config", "train"]
