"""The parts of an image-text-to-text model and what trains in each (the ``vision.*`` keys).

The parts are found from the model's own structure, not from a per-model table:

* the **vision tower** is what transformers' ``get_encoder(modality="image")`` returns (``vision_tower``,
  ``visual``, ``vision_model``, ``vision_encoder``, ``image_tower``);
* the **language model** is ``get_decoder()`` (``language_model``, ``text_model``, ...) plus the
  output embeddings (the head; tied or not);
* the **projector** is every module named like one (``multi_modal_projector``, ``connector``,
  ``merger``, ``mm_projector``, ...; Qwen2-VL keeps its ``merger`` inside the tower) and every
  parameter in neither of the other two (the glue between them, such as LLaVA-Next's
  ``image_newline``).

Parameters are matched by identity, so a peft wrapper or sftune's loss wrapper around the model
changes nothing, and LoRA adapters belong to the part of the layer they adapt. A model without an
image encoder is a text model: every ``vision.*`` key must keep its default there (refused with a
message otherwise), and nothing here changes what a text run does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from sftune.config.vision import PARTS, set_vision_keys
from sftune.errors import ConfigError

PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger", "vision_projector",
                   "projector", "embed_vision", "visual_projection")
"""Attribute names image-text-to-text models in transformers give the layers between the tower and the
language model."""


@dataclass
class Parts:
    """Where the parts of one model are: module paths (relative to the transformers model) and its
    parameters by part."""

    model: nn.Module
    modules: dict[str, list[str]]
    """Part -> the module paths it is made of (``model.vision_tower``); the language model lists its
    decoder first (LoRA adapts that one, never the head)."""
    params: dict[str, list[nn.Parameter]] = field(default_factory=dict)

    def part_of(self) -> dict[int, str]:
        """``id(parameter) -> part`` for every parameter of the model."""
        return {id(p): part for part, ps in self.params.items() for p in ps}


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside sftune's loss wrapper and a peft wrapper (adapters stay injected)."""
    model = getattr(model, "causal_lm", model)  # sftune.loss.CausalLMWithLoss
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def _path(root: nn.Module, module: nn.Module) -> str | None:
    for name, m in root.named_modules():
        if m is module:
            return name
    return None


def find_parts(model: nn.Module) -> Parts | None:
    """The vision tower, projector and language model of an image-text-to-text model; ``None`` for a
    model without an image encoder (a text model)."""
    root = hf_model(model)
    get_encoder, get_decoder = getattr(root, "get_encoder", None), getattr(root, "get_decoder", None)
    if not callable(get_encoder) or not callable(get_decoder):
        return None
    try:
        tower = get_encoder(modality="image")
    except (TypeError, ValueError, AttributeError):
        return None
    base = getattr(root, "base_model", root)
    if tower is None or tower is root or tower is base:
        return None
    decoder = get_decoder()
    tower_path, decoder_path = _path(root, tower), _path(root, decoder)
    if tower_path is None or decoder_path is None or decoder is root or decoder is base:
        return None
    modules = {"vision_tower": [tower_path], "projector": [], "language_model": [decoder_path]}
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    head_path = _path(root, head) if head is not None else None
    if head_path and not head_path.startswith(decoder_path + "."):
        modules["language_model"].append(head_path)
    for name, m in root.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in PROJECTOR_NAMES and not name.startswith(decoder_path + ".") and \
                not any(name.startswith(p + ".") for p in modules["projector"]):
            modules["projector"].append(name)
    params: dict[str, list[nn.Parameter]] = {part: [] for part in PARTS}
    seen: set[int] = set()
    for part in ("projector", "language_model", "vision_tower"):  # the projector inside a tower is the projector
        for path in modules[part]:
            for p in root.get_submodule(path).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params[part].append(p)
    params["projector"] += [p for p in root.parameters() if id(p) not in seen]  # the glue in neither part
    return Parts(root, modules, params)


def refuse_on_text_model(vision, what: str = "the model") -> None:
    """Set ``vision.*`` keys on a text model are refused (they would do nothing); a tower's
    checkpointing turned off is no request (the dashboard's form sends every key)."""
    keys = [k for k in set_vision_keys(vision) if k != "vision.gradient_checkpointing=False"]
    if keys:
        raise ConfigError(f"{', '.join(keys)}: {what} has no vision tower (it is a text-only model), so "
                          "the vision.* keys cannot apply\n  → remove them, or set model.path to an "
                          "image-text-to-text model")


def check_text_model(vision, model: nn.Module, what: str = "the model") -> Parts | None:
    """The model's parts; refuses set ``vision.*`` keys on a text model."""
    parts = find_parts(model)
    if parts is None:
        refuse_on_text_model(vision, what)
    return parts


def freeze_parts(vision, parts: Parts) -> list[str]:
    """``vision.freeze_*``: no gradient for a frozen part's parameters. Returns the frozen parts."""
    frozen = [part for part in PARTS if getattr(vision, f"freeze_{part}")]
    for part in frozen:
        for p in parts.params[part]:
            p.requires_grad_(False)
    if frozen and not any(p.requires_grad for p in parts.model.parameters()):
        raise ConfigError(f"nothing left to train: {', '.join(f'vision.freeze_{p}=true' for p in frozen)} "
                          "freezes every trainable parameter\n  → unfreeze a part")
    return frozen


def checkpoint_tower(vision, parts: Parts) -> bool | None:
    """``vision.gradient_checkpointing``: turn the vision tower's layer checkpointing on or off,
    whatever the language model does. Returns the tower's setting (None: it follows the model)."""
    want = vision.gradient_checkpointing
    if want is None:
        return None
    func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    found = False
    for path in parts.modules["vision_tower"]:
        for m in parts.model.get_submodule(path).modules():
            if hasattr(m, "gradient_checkpointing"):
                m._gradient_checkpointing_func = func
                m.gradient_checkpointing = want
                found = True
    if not found and want:
        raise ConfigError(f"vision.gradient_checkpointing=true: the vision tower ({parts.modules['vision_tower'][0]}, "
                          f"{type(parts.model).__name__}) has no layers transformers can checkpoint\n  → unset it")
    return want


def prepare_parts(cfg, model: nn.Module, say=None) -> Parts | None:
    """Before the optimizer: refuse ``vision.*`` keys on a text model, freeze parts, set the vision
    tower's checkpointing, and say what was done (``say``: a console, or None)."""
    parts = check_text_model(cfg.vision, model)
    if parts is None:
        return None
    frozen = freeze_parts(cfg.vision, parts)
    tower_ckpt = checkpoint_tower(cfg.vision, parts)
    if say is not None:
        counts = {part: sum(p.numel() for p in parts.params[part] if p.requires_grad) for part in PARTS}
        line = ", ".join(f"{part.replace('_', ' ')} {counts[part]:,}" + (" (frozen)" if part in frozen else "")
                         for part in PARTS)
        say.print(f"vision-language model: trainable parameters: {line}")
        if tower_ckpt is not None:
            say.print(f"vision tower gradient checkpointing: {'on' if tower_ckpt else 'off'}")
    return parts


def part_groups(groups: list[dict], vision, model: nn.Module) -> list[dict]:
    """Optimizer parameter groups with ``vision.lr_*``: each group split by part where a part has
    its own learning rate (the others keep ``train.lr``). Unchanged without those keys."""
    lrs = {part: getattr(vision, f"lr_{part}", None) for part in PARTS}
    if all(v is None for v in lrs.values()):
        return groups
    parts = find_parts(model)
    if parts is None:
        return groups  # refused earlier by check_text_model
    part_of = parts.part_of()
    out = []
    for group in groups:
        rest = dict(group, params=[p for p in group["params"] if lrs.get(part_of.get(id(p))) is None])
        out.append(rest)
        for part, lr in lrs.items():
            if lr is not None:
                out.append(dict(group, params=[p for p in group["params"] if part_of.get(id(p)) == part], lr=lr,
                                part=part))
    return out


def lora_targets(cfg, model: nn.Module, linear_types: tuple = (nn.Linear,)) -> list[str] | None:
    """``lora.target_modules`` restricted to ``vision.lora_parts`` on an image-text-to-text model: the
    full names of the layers that get adapters (exact: peft matches a listed full name only), the linear
    layers of those parts (``all-linear``) or those whose last name is listed, never the output head.
    ``None``: a text model, peft takes ``lora.target_modules`` as given."""
    parts = check_text_model(cfg.vision, model)
    if parts is None:
        return None
    target = cfg.lora.target_modules
    wanted = None if target == "all-linear" else ({target} if isinstance(target, str) else set(target))
    chosen = cfg.vision.lora_parts
    roots = [(part, path) for part in chosen
             for path in (parts.modules[part][:1] if part == "language_model" else parts.modules[part])]
    # a part nested in another's module (Qwen2-VL's merger inside the tower) belongs to itself only
    nested = [path for part in PARTS if part not in chosen for path in parts.modules[part]]
    names = set()
    for _, root in roots:
        for name, m in parts.model.get_submodule(root).named_modules(prefix=root):
            if isinstance(m, linear_types) and not any(name.startswith(n + ".") for n in nested) and \
                    (wanted is None or name.rsplit(".", 1)[-1] in wanted):
                names.add(name)
    if not names:
        raise ConfigError(f"lora.target_modules={target} matches no linear layer in vision.lora_parts="
                          f"{chosen}\n  → name layers of those parts, or use all-linear")
    return sorted(names)
