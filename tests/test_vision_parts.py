"""The vision.* training controls on the three tiny styles: parts found by the model's own structure,
frozen parts get no gradient and stay out of the optimizer, per-part learning rates reach the optimizer,
LoRA adapts the language model only by default, the vision tower's checkpointing; text models unchanged."""

from __future__ import annotations

import pytest
import torch

import vision_models as vm
from sftune.config import load_config
from sftune.errors import ConfigError
from sftune.vision_parts import find_parts, lora_targets, part_groups, prepare_parts

EXPECTED = {"qwen2_vl": ("model.visual", "model.visual.merger", "model.language_model"),
            "llava": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
            "idefics3": ("model.vision_model", "model.connector", "model.text_model")}


@pytest.fixture(params=vm.STYLES)
def vlm_dir(request, vlm):
    return vlm(request.param), request.param


def _model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path))


def _loss(path, model):
    from sftune.vision_model import load_processor

    processor = load_processor(str(path))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    enc = processor(text=[processor.apply_chat_template(messages, tokenize=False)], images=[vm.image()],
                    return_tensors="pt")
    return model(**enc, labels=enc["input_ids"]).loss


def _cfg(**over):
    return load_config(None, {"train.lr": 1e-3, **over})


def test_parts_are_found_from_the_models_own_attributes_and_cover_every_parameter(vlm_dir):
    path, style = vlm_dir
    model = _model(path)
    parts = find_parts(model)
    tower, projector, language = EXPECTED[style]
    assert parts.modules["vision_tower"] == [tower] and parts.modules["projector"] == [projector]
    assert parts.modules["language_model"] == [language, "lm_head"]
    assert all(parts.params[p] for p in ("vision_tower", "projector", "language_model"))
    assert sorted(map(id, model.parameters())) == sorted(parts.part_of())  # each parameter in exactly one part


@pytest.mark.parametrize("frozen", ["vision_tower", "projector", "language_model"])
def test_a_frozen_part_gets_no_gradient_and_is_not_in_the_optimizer(vlm_dir, frozen):
    from sftune.optim import make_optimizer

    path, _ = vlm_dir
    model = _model(path)
    parts = prepare_parts(_cfg(**{f"vision.freeze_{frozen}": True}), model)
    _loss(path, model).backward()
    part_of = parts.part_of()
    for name, p in model.named_parameters():
        if part_of[id(p)] == frozen:
            assert not p.requires_grad and p.grad is None, name
    for part in {"vision_tower", "projector", "language_model"} - {frozen}:  # the others still learn
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parts.params[part]), part
    in_optimizer = {id(p) for g in make_optimizer(_cfg(), model, torch.device("cpu")).param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if part_of[id(p)] != frozen}


def test_freezing_everything_is_refused(vlm_dir):
    path, _ = vlm_dir
    keys = {f"vision.freeze_{p}": True for p in ("vision_tower", "projector", "language_model")}
    with pytest.raises(ConfigError, match="nothing left to train"):
        prepare_parts(_cfg(**keys), _model(path))


def test_per_part_learning_rates_reach_the_optimizer_and_follow_the_schedule(vlm_dir):
    from sftune.optim import make_optimizer, make_scheduler

    path, _ = vlm_dir
    model = _model(path)
    cfg = _cfg(**{"vision.lr_vision_tower": 1e-5, "vision.lr_projector": 2e-4, "train.warmup_steps": 2,
                  "train.weight_decay": 0.1})
    optimizer = make_optimizer(cfg, model, torch.device("cpu"))
    want = {"vision_tower": 1e-5, "projector": 2e-4, "language_model": 1e-3}
    part_of = find_parts(model).part_of()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert sorted(lr_of) == sorted(map(id, model.parameters()))
    assert all(lr_of[id(p)] == want[part_of[id(p)]] for p in model.parameters())
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert {decay[id(p)] for p in find_parts(model).params["vision_tower"]} == {0.0, 0.1}  # decay rule kept
    scheduler = make_scheduler(cfg, optimizer, total_steps=10)
    optimizer.step()
    scheduler.step()  # warmup: every part at half its own peak
    assert all(g["lr"] == pytest.approx(g["initial_lr"] / 2) for g in optimizer.param_groups)
    assert {g["initial_lr"] for g in optimizer.param_groups} == set(want.values())


def test_lora_adapts_the_language_model_only_unless_told(vlm_dir):
    from sftune.model import add_lora

    path, style = vlm_dir
    tower, projector, language = EXPECTED[style]

    def adapted(**over):
        model = add_lora(_cfg(**{"lora.enabled": True, **over}), _model(path))
        return {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
                for n, _ in model.named_modules() if n.endswith("lora_A")}

    default = adapted()
    assert default and all(n.startswith(language + ".") for n in default)
    every = adapted(**{"vision.lora_parts": ["vision_tower", "projector", "language_model"]})
    for prefix in (tower, projector, language):
        assert any(n.startswith(prefix + ".") for n in every), prefix
    assert not any(n.startswith("lm_head") for n in every)
    tower_only = adapted(**{"vision.lora_parts": ["vision_tower"], "lora.target_modules": ["fc1", "fc2"]})
    assert tower_only and all(n.startswith(tower + ".") and not n.startswith(projector + ".") for n in tower_only)


def test_the_vision_tower_is_checkpointed_on_its_own(vlm_dir):
    path, _ = vlm_dir
    model = _model(path)
    parts = prepare_parts(_cfg(**{"vision.gradient_checkpointing": True}), model)
    flags = {n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")}
    tower = parts.modules["vision_tower"][0]
    assert any(v for n, v in flags.items() if n.startswith(tower))
    assert not any(v for n, v in flags.items() if not n.startswith(tower))
    model.train()
    calls = []
    for n, m in model.named_modules():
        if getattr(m, "gradient_checkpointing", False):
            m._gradient_checkpointing_func = lambda f, *a, _f=m._gradient_checkpointing_func, **k: \
                calls.append(1) or _f(f, *a, **k)
    _loss(path, model).backward()
    assert calls  # the tower's layers ran under checkpoint


def test_text_models_are_unchanged_and_refuse_vision_keys(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert find_parts(model) is None
    cfg = _cfg()
    assert prepare_parts(cfg, model) is None and lora_targets(cfg, model) is None
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    assert part_groups(groups, cfg.vision, model) is groups
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match=r"vision.freeze_vision_tower=True: the model has no vision tower"):
        prepare_parts(_cfg(**{"vision.freeze_vision_tower": True}), model)
    from sftune.model import load_tokenizer

    with pytest.raises(ConfigError, match="vision.lr_projector=0.1: the model .* has no vision tower"):  # before the data
        load_tokenizer(_cfg(**{"model.path": str(tiny_model_dir), "vision.lr_projector": 0.1}))


def test_training_freezes_the_tower_and_adapts_only_the_language_model(vlm, tmp_path, no_plots):
    import json

    from transformers import AutoModelForImageTextToText

    from conftest import train_config
    from sftune.training import train

    path, data = vlm("qwen2_vl"), vm.write_data(tmp_path / "data", n=8)
    base = {"data.template": None, "data.max_length": 256, "train.max_steps": 2, "train.batch_size": 4}
    out = tmp_path / "frozen"
    train(train_config(path, data, out, **base, **{"vision.freeze_vision_tower": True, "vision.lr_projector": 1e-2}))
    before = AutoModelForImageTextToText.from_pretrained(str(path)).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(str(out)).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not {k for k in changed if k.startswith("model.visual.") and ".merger." not in k}
    assert any(".merger." in k for k in changed) and any(k.startswith("model.language_model.") for k in changed)
    out = tmp_path / "lora"
    train(train_config(path, data, out, **base, **{"lora.enabled": True}))
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    from sftune.data.images import IMAGE
    from sftune.inference import load_for_inference

    loaded = load_for_inference(str(out), device="cpu")  # the adapter over its image-text-to-text base
    assert isinstance(loaded.generate([loaded.prompt_from_text(IMAGE + "hi")], images=[[vm.image()]],
                                      max_new_tokens=2)[0], str)
