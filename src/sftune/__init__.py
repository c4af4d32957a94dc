"""sftune: supervised fine-tuning of causal language models, correct by construction.

Python API::

    from sftune import load_config, train
    cfg = load_config("quickstart", ["train.max_steps=50"])
    result = train(cfg)

TRL-0.7-style front (``sftune.compat``)::

    from sftune import SFTTrainer, DataCollatorForCompletionOnlyLM
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing sftune stays cheap
    if name == "load_config":
        from sftune.config import load_config

        return load_config
    if name == "train":
        from sftune.train import train

        return train
    if name in ("SFTTrainer", "DataCollatorForCompletionOnlyLM"):
        from sftune import compat

        return getattr(compat, name)
    raise AttributeError(f"module 'sftune' has no attribute {name!r}")


__all__ = ["DataCollatorForCompletionOnlyLM", "SFTTrainer", "__version__", "load_config", "train"]
