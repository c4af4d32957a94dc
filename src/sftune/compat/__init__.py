"""The TRL fronts: argument mapping onto sftune's one config and one training loop, no second engine.

* :mod:`.trl07`: TRL 0.7's ``SFTTrainer`` with ``TrainingArguments`` and
  ``DataCollatorForCompletionOnlyLM`` (the tutorials' code runs with one changed import).
"""

from sftune.compat.trl07 import DataCollatorForCompletionOnlyLM, SFTTrainer

__all__ = ["DataCollatorForCompletionOnlyLM", "SFTTrainer"]
