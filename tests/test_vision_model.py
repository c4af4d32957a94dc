"""The vision model helpers: which configs are image-text-to-text, the processor with or without video."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import vision_models as vm
from sftune.vision_model import is_vision_config, load_processor


@pytest.fixture(params=vm.STYLES)
def vlm_dir(request, vlm):
    return vlm(request.param), request.param


def test_each_tiny_style_loads_and_runs_from_its_directory(vlm_dir):
    from transformers import AutoConfig, AutoModelForImageTextToText

    path, style = vlm_dir
    processor = load_processor(str(path))
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    assert is_vision_config(AutoConfig.from_pretrained(str(path)))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    enc = processor(text=[text], images=[vm.image()], return_tensors="pt")
    out = model(**enc, labels=enc["input_ids"])
    assert out.loss.isfinite()
    image_id = model.config.image_token_id
    assert int((enc["input_ids"] == image_id).sum()) >= 4


def test_text_models_are_not_vision(tiny_model_dir):
    from transformers import AutoConfig

    assert not is_vision_config(AutoConfig.from_pretrained(str(tiny_model_dir)))


def test_qwen2_vl_processor_loads_without_torchvision(vlm):
    """transformers 5.x's AutoProcessor wants a video processor (torchvision); the image-only one is built."""
    import importlib.util

    path = vlm("qwen2_vl")
    processor = load_processor(str(path), size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28})
    assert type(processor).__name__ == "Qwen2VLProcessor"
    if importlib.util.find_spec("torchvision") is None:
        assert getattr(processor, "video_processor", None) is None
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[vm.image()], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 2, 2]]  # 28x28 at most: one merged token


def test_models_sftune_cannot_lay_out_are_refused(vlm):
    """Bidirectional image attention (Gemma 3) and M-RoPE sftune does not compute: clear errors."""
    from transformers import AutoConfig, AutoTokenizer

    from sftune.errors import ConfigError
    from sftune.vision_model import _check_positions, attach_processor

    path = vlm("qwen2_vl")
    config = AutoConfig.from_pretrained(str(path))
    processor = load_processor(str(path))
    _check_positions(config, processor)  # Qwen2-VL: computed by sftune
    with pytest.raises(ConfigError, match="bidirectionally"):
        _check_positions(SimpleNamespace(model_type="gemma3", text_config=config.text_config), processor)
    with pytest.raises(ConfigError, match="M-RoPE"):  # a processor sftune computes no M-RoPE for
        _check_positions(SimpleNamespace(model_type="qwen3_vl", text_config=config.text_config),
                         type("Qwen3VLProcessor", (), {})())
    assert not attach_processor(str(path.parent / "nowhere"), AutoTokenizer.from_pretrained(str(path)))
