"""sftune: supervised fine-tuning of causal language models, correct by construction.

Python API::

    from sftune import load_config, train
    cfg = load_config("quickstart", ["train.max_steps=50"])
    result = train(cfg)

TRL-0.7-style front (``sftune.compat``)::

    from sftune import SFTTrainer, DataCollatorForCompletionOnlyLM
"""

import sys
import types

__version__ = "0.1.0"


class _TrainModule(types.ModuleType):
    """``sftune.train`` is both the module (``sftune.train.Batches``, ``import sftune.train``) and the
    function: calling the module calls :func:`sftune.train.train`, so ``from sftune import train``
    gives a callable whichever way the submodule was imported first."""

    def __call__(self, *args, **kwargs):
        return self.__dict__["train"](*args, **kwargs)

    def __repr__(self):
        return "<function sftune.train (sftune.train.train)>"

    @property
    def __wrapped__(self):  # inspect.signature(train) and help() show the function's
        return self.__dict__["train"]


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # the import system sets ``sftune.train = <module sftune.train>`` once the submodule is loaded
        if name == "train" and type(value) is types.ModuleType:
            value.__class__ = _TrainModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):  # lazy: importing sftune stays cheap
    if name == "load_config":
        from sftune.config import load_config

        return load_config
    if name == "train":
        import sftune.train

        return sys.modules["sftune.train"]
    if name in ("SFTTrainer", "DataCollatorForCompletionOnlyLM"):
        from sftune import compat

        return getattr(compat, name)
    raise AttributeError(f"module 'sftune' has no attribute {name!r}")


__all__ = ["DataCollatorForCompletionOnlyLM", "SFTTrainer", "__version__", "load_config", "train"]
