"""The offline vision quickstart: generated pictures and a tiny LLaVA-style model shipped in the package.

Each picture is one shape (circle, square, triangle, cross) in one colour (red, green, blue,
yellow, white, purple) on a black background with a few dim speckles, near the centre at a
random offset and size, drawn with PIL. A row is a conversation in the Hugging Face convention:
the user sends the picture and asks for its colour or its shape, the assistant answers with one
word. The held-out pictures are drawn from another seed, none of them in the training set, so
exact match on them measures whether the model learned to *see* the colour and the shape.
``sftune train quickstart-vision`` reports it before and after training.

The model (``builtin:quickstart-vision``) is a LLaVA-style model initialised from scratch: a 2-layer
CLIP-like vision tower over 32x32 pictures in 8x8 patches (16 image tokens), a projector and a
4-layer Llama language model over the quickstart's byte-level tokenizer plus ``<image>``,
``<|im_start|>`` and ``<|im_end|>``. ``python -m sftune.quickstart_vision --write-assets``
regenerates the shipped files (config, tokenizer, image processor, processor, chat template).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
           "white": (245, 245, 245), "purple": (160, 60, 200)}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?"}
SIZE = 32
"""Pictures are SIZE x SIZE pixels: the vision tower's 4 x 4 patches of 8 pixels."""
TRAIN_ROWS = 4000
TEST_ROWS = 120
SEED = 1234
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""ChatML with image parts rendered as ``<image>`` (the processor expands it to 16 image tokens)."""


def draw(colour: str, shape: str, rng: random.Random):
    """One picture: ``shape`` in ``colour`` on black with a few dim speckles, near the centre at a
    random offset and size (a PIL image)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    d = ImageDraw.Draw(im)
    for _ in range(8):  # dim speckles: no two pictures alike
        grey = rng.randint(30, 90)
        d.point((rng.randrange(SIZE), rng.randrange(SIZE)), fill=(grey, grey, grey))
    cx, cy = SIZE // 2 + rng.randint(-4, 3), SIZE // 2 + rng.randint(-4, 3)
    r = rng.randint(8, min(13, cx, cy, SIZE - 1 - cx, SIZE - 1 - cy))
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = max(2, r // 3)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return im


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_rows(n: int, rng: random.Random, exclude: frozenset = frozenset()) -> list[dict]:
    """``n`` conversations, the tasks and every colour and shape in turn: TRL's layout (image parts in
    the messages, the pictures as PNG bytes in ``images``). Pictures in ``exclude`` are drawn again."""
    rows, colours = [], list(COLOURS)
    while len(rows) < n:
        i = len(rows)
        task = ("colour", "shape")[i % 2]
        colour, shape = colours[(i // 2) % len(colours)], SHAPES[(i // 2 // len(colours) + i) % len(SHAPES)]
        if rng.random() < 0.5:  # break the fixed cycle without losing the balance much
            colour, shape = rng.choice(colours), rng.choice(SHAPES)
        picture = _png(draw(colour, shape, rng))
        if picture in exclude:
            continue
        answer = colour if task == "colour" else shape
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[task]}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [picture], "task": task, "colour": colour, "shape": shape})
    return rows


def make_dataset(train_rows: int = TRAIN_ROWS, test_rows: int = TEST_ROWS, seed: int = SEED):
    """A ``DatasetDict`` with ``train`` and ``test`` (pictures drawn from another seed, none in train)."""
    import datasets

    train = make_rows(train_rows, random.Random(seed))
    test = make_rows(test_rows, random.Random(seed + 1), exclude=frozenset(r["images"][0] for r in train))
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                                 "test": datasets.Dataset.from_list(test)})


def write_assets(target: Path) -> None:
    """Write the model config, tokenizer, image processor, processor config and chat template."""
    from transformers import LlavaConfig, PreTrainedTokenizerFast

    from sftune.quickstart import write_assets as write_text_assets

    target.mkdir(parents=True, exist_ok=True)
    write_text_assets(target)  # the byte-level tokenizer (and a GPT-2 config, replaced below)
    tok = PreTrainedTokenizerFast.from_pretrained(str(target))
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]})
    tok.pad_token = tok.eos_token
    tok.model_max_length = 256
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(target))
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True)
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=SIZE, patch_size=8, projection_dim=64)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    config.save_pretrained(str(target))
    (target / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": SIZE},
        "do_center_crop": True, "crop_size": {"height": SIZE, "width": SIZE}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True, "resample": 3}, indent=2) + "\n")
    (target / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaProcessor", "patch_size": 8, "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1, "image_token": "<image>"}, indent=2) + "\n")
    (target / "chat_template.jinja").write_text(TEMPLATE)


if __name__ == "__main__":
    import sys

    if "--write-assets" in sys.argv:
        dest = Path(__file__).parent / "assets" / "quickstart-vision"
        write_assets(dest)
        print(f"wrote {dest}")
