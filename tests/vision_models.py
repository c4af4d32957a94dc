"""Tiny random-weight image-text-to-text models, built offline, each saved with a working processor.

Three styles, each loadable from its directory with ``AutoModelForImageTextToText`` and
:func:`sftune.vision_model.load_processor` (``AutoProcessor`` itself where the installed
transformers can build it: Qwen2-VL's asks for a video processor that needs torchvision, which
these machines do not have, so the loader assembles the image-only processor instead):

* ``qwen2_vl``: Qwen2-VL (M-RoPE, dynamic resolution; patch 14, merge 2, so a 56x56 image is
  4 image tokens between ``<|vision_start|>`` and ``<|vision_end|>``);
* ``llava``: LLaVA (a tiny CLIP vision tower, a projector, a llama text model; 28x28 input, 4
  image tokens per image whatever its size);
* ``idefics3``: Idefics3 / SmolVLM (a tiny SigLIP-like tower, pixel shuffle, image splitting: an
  image becomes tiles with ``<row_i_col_j>`` tags and a global view, ``image_seq_len`` = 4 tokens
  per tile).

Every tokenizer is conftest's byte-level BPE plus the model's special tokens, with a ChatML-like
chat template that renders ``{"type": "image"}`` parts as the model's image placeholder.
"""

from __future__ import annotations

import json
from pathlib import Path

STYLES = ("qwen2_vl", "llava", "idefics3")

_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False)


def _template(image: str) -> str:
    """A ChatML-like template: string or list-of-parts content; image parts render as ``image``."""
    return ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image +
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(path: Path, specials: list[str], template: str):
    from conftest import build_tokenizer

    tok = build_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *specials]})
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = template
    return tok


def _save(path: Path, model, image_processor, tok, processor_class: str, extra: dict) -> Path:
    """Model, image processor, tokenizer (with the chat template) and processor_config.json."""
    model.save_pretrained(str(path))
    image_processor.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    (path / "chat_template.jinja").write_text(tok.chat_template)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, **extra}, indent=2))
    return path


def build_qwen2_vl(path: Path) -> Path:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(path, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                     _template("<|vision_start|><|image_pad|><|vision_end|>"))
    tid = tok.convert_tokens_to_ids
    text = dict(_TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    cfg = Qwen2VLConfig(text_config=text,
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg)
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    return _save(path, model, ip, tok, "Qwen2VLProcessor", {})


def build_llava(path: Path) -> Path:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(path, ["<image>"], _template("<image>"))
    text = dict(_TEXT, model_type="llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1,
                      projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return _save(path, model, ip, tok, "LlavaProcessor",
                 {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
                  "image_token": "<image>"})


def build_idefics3(path: Path) -> Path:
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    tags = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tags += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = _tokenizer(path, tags, _template("<image>"))
    text = dict(_TEXT, model_type="llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=56, patch_size=14)
    cfg = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(cfg)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56},
                                   do_image_splitting=True)
    return _save(path, model, ip, tok, "Idefics3Processor", {"image_seq_len": 4})


BUILDERS = {"qwen2_vl": build_qwen2_vl, "llava": build_llava, "idefics3": build_idefics3}


def build(style: str, path: Path) -> Path:
    """Build the tiny model of ``style`` (one of :data:`STYLES`) into ``path``."""
    return BUILDERS[style](Path(path))


def image(size=(56, 56), colour=(255, 0, 0)):
    """A plain RGB PIL image (tiny: the models' patch is 14 pixels)."""
    from PIL import Image

    return Image.new("RGB", size, colour)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


def write_data(path: Path, n: int = 12, *, layout: str = "trl", sizes=((56, 56), (28, 56), (56, 28))) -> Path:
    """A JSONL of ``n`` image conversations ("what colour is this?") beside its PNG images.

    ``layout``: ``trl`` (``{"type": "image"}`` parts and an ``images`` column of relative paths),
    ``inline`` (``{"type": "image", "image": path}`` parts) or ``sharegpt`` (``conversations``
    with ``<image>`` placeholders and an ``images`` column). Every third row has two images."""
    path = Path(path)
    (path / "img").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    lines = []
    for i in range(n):
        k = 2 if i % 3 == 2 else 1
        files = []
        for j in range(k):
            colour = names[(i + j) % len(names)]
            rel = f"img/{i}_{j}.png"
            image(sizes[(i + j) % len(sizes)], COLOURS[colour]).save(path / rel)
            files.append((rel, colour))
        answer = " and ".join(c for _, c in files)
        question = "What colour is this?" if k == 1 else "What colours are these?"
        if layout == "sharegpt":
            row = {"conversations": [{"from": "human", "value": "<image>" * k + question},
                                     {"from": "gpt", "value": answer}], "images": [f for f, _ in files]}
        else:
            parts = [{"type": "image", **({"image": f} if layout == "inline" else {})} for f, _ in files]
            row = {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": question}]},
                                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
            if layout == "trl":
                row["images"] = [f for f, _ in files]
        lines.append(json.dumps(row))
    out = path / "data.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out
