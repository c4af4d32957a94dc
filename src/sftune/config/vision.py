"""The ``vision`` config section: what trains in an image-text-to-text model, part by part.

A vision-language model has three parts (found by :mod:`sftune.vision_parts`): the vision tower
(the image encoder), the projector (what maps image features into the language model: LLaVA's
``multi_modal_projector``, Idefics3's ``connector``, Qwen2-VL's ``merger``) and the language model
(with its embeddings and output head). These keys freeze each part, give it its own learning rate,
choose where LoRA adapters go and checkpoint the vision tower. On a text-only model every key must
keep its default: a set key is refused with a message (it would silently do nothing).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator

from sftune.config.roles import Section

PARTS = ("vision_tower", "projector", "language_model")
"""The parts of an image-text-to-text model, in the order images flow through them."""


class VisionConfig(Section):
    freeze_vision_tower: bool = False
    """Train no weight of the vision tower (image encoder): no gradient, not in the optimizer. The
    usual choice for a pretrained tower and little data; saves its gradients and optimizer states."""

    freeze_projector: bool = False
    """Train no weight of the projector (the layers between the vision tower and the language
    model)."""

    freeze_language_model: bool = False
    """Train no weight of the language model (its embeddings and output head included): with
    ``freeze_vision_tower`` this trains the projector alone (LLaVA's first stage)."""

    lr_vision_tower: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Peak learning rate of the vision tower (follows ``train.scheduler``). ``None``: ``train.lr``.
    A pretrained tower usually wants a smaller one (``train.lr / 10``)."""

    lr_projector: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Peak learning rate of the projector. ``None``: ``train.lr``."""

    lora_parts: list[Literal["vision_tower", "projector", "language_model"]] = ["language_model"]
    """With ``lora.enabled``: the parts whose layers (those ``lora.target_modules`` names, or every
    linear layer for ``all-linear``) get adapters. The default adapts the language model only,
    never the output head; add ``vision_tower`` or ``projector`` to adapt them too. To train the
    projector in full beside a LoRA language model, name it in ``lora.modules_to_save``."""

    gradient_checkpointing: Union[bool, None] = None
    """Recompute the vision tower's activations in the backward pass (its layers only). ``None``
    follows ``model.gradient_checkpointing``; ``true`` checkpoints the tower even when the language
    model is not; ``false`` leaves the tower out when the language model is checkpointed."""

    @field_validator("lora_parts")
    @classmethod
    def _some_parts(cls, v):
        if not v:
            raise ValueError("vision.lora_parts is empty: name at least one of vision_tower, projector, "
                             "language_model (default: [language_model])")
        return list(dict.fromkeys(v))


def set_vision_keys(vision: VisionConfig) -> list[str]:
    """The ``vision.*`` keys that differ from their defaults (``vision.freeze_projector=True``)."""
    default = VisionConfig()
    return [f"vision.{k}={getattr(vision, k)}" for k in VisionConfig.model_fields
            if getattr(vision, k) != getattr(default, k)]
