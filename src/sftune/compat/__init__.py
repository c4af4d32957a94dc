"""The TRL fronts: argument mapping onto sftune's one config and one training loop, no second engine.

* :mod:`.trainer`: the one ``SFTTrainer`` (TRL 0.7 and TRL 1.x calls, the Trainer surface).
* :mod:`.trl07`: TRL 0.7's arguments with ``TrainingArguments`` and ``DataCollatorForCompletionOnlyLM``
  (the tutorials' code runs with one changed import).
* :mod:`.trl1`: TRL 1.x's ``SFTConfig`` and the mapping of its fields and dataset types.
"""

from sftune.compat.trainer import SFTTrainer
from sftune.compat.trl07 import DataCollatorForCompletionOnlyLM
from sftune.compat.trl1 import SFTConfig

__all__ = ["DataCollatorForCompletionOnlyLM", "SFTConfig", "SFTTrainer"]
