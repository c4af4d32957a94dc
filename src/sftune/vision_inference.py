"""Images at inference: the images of a prompt, image files from the command line, prompts with
images encoded by the model's processor.

Generation (:mod:`sftune.generation`) takes ``images``: one list per prompt (empty for a prompt
without one). A prompt's images are written in its text as the chat template writes them (the
processor's image token, e.g. ``<image>`` or ``<|vision_start|><|image_pad|><|vision_end|>``), and
the processor expands each into the image's tokens exactly as training did
(:mod:`sftune.data.vision`), with the pixel tensors the model takes. Batches hold prompts with
images or prompts without, never both (the processors' batching needs one or the other).

Where images come from: a data row (eval prompts, ``sftune generate --file``: its ``images`` column
or image parts, paths relative to the file), ``--image FILE`` (``sftune generate`` and ``sftune
chat``: the first user message carries the images) or the dashboard chat (uploaded files).
"""

from __future__ import annotations

from pathlib import Path

from sftune.data.contract import BadRow
from sftune.data.images import IMAGE, conversation, load_image
from sftune.errors import SftuneError


def has_images(fmt) -> bool:
    """Whether ``fmt`` renders images (an image-text-to-text model's messages format)."""
    return hasattr(fmt, "images_column") and hasattr(fmt, "processor")


def load_image_files(paths: list[str] | None, what: str = "--image") -> list:
    """The PIL images of ``--image`` files, or an error naming the file."""
    out = []
    for k, p in enumerate(paths or []):
        try:
            out.append(load_image(str(Path(p).expanduser().resolve()), None, what, k))
        except BadRow as e:
            raise SftuneError(f"{what} {p}: {e.message}" + (f"\n  → {e.hint}" if e.hint else "")) from None
    return out


def need_images_model(fmt, path: str, images: list) -> None:
    """Refuses images for a model that cannot see them."""
    if images and not has_images(fmt):
        raise SftuneError(f"--image given, but {path} is not an image-text-to-text model (it prompts with the "
                          f"{fmt.name} format)\n  → give a vision-language run or model, or leave out --image")


def with_images(text: str, n: int) -> str:
    """A user message carrying ``n`` images before its text (where the chat template puts them)."""
    return IMAGE * n + text


def row_and_images(fmt, row: dict, base: Path | None = None) -> tuple[dict, list]:
    """A data row as the text formats read it (image parts as markers) and its images (PIL, in
    order); ``(row, [])`` for a format without images. ``base``: where relative paths are read from
    (default: the format's, the training data's directory)."""
    if not has_images(fmt):
        return row, []
    converted, values = conversation(row, fmt.column, fmt.images_column)
    base = base if base is not None else fmt.base
    return converted, [load_image(v, base, fmt.images_column, k) for k, v in enumerate(values)]


def prompt_images(fmt, prompt: str, images: list) -> list:
    """The images of ``prompt`` (the row's first images, as many as its text has image tokens)."""
    if not images:
        return []
    n = prompt.count(fmt.image_token)
    if n > len(images):
        raise BadRow(f"the prompt has {n} images but its row gives {len(images)}", fmt.images_column)
    return images[:n]


def encode(processor, prompts: list[str], images: list[list], image_kwargs: dict | None = None) -> dict:
    """Prompts with images -> the model's inputs, left-padded (``input_ids``, ``attention_mask``,
    ``pixel_values`` and the size tensors). The prompts' own text holds every special token."""
    tok = processor.tokenizer
    side = tok.padding_side
    try:
        return dict(processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt",
                              add_special_tokens=False, **(image_kwargs or {})))
    except (ValueError, TypeError, OSError) as e:
        raise SftuneError(f"the processor refused these images: {str(e).strip().splitlines()[0]}") from None
    finally:
        tok.padding_side = side


def batches(order: list[int], batch_size: int, images: list[list] | None) -> list[list[int]]:
    """``order`` cut into batches of at most ``batch_size`` that hold prompts with images or
    prompts without, never both."""
    out: list[list[int]] = []
    for i in order:
        seen = bool(images and images[i])
        if out and len(out[-1]) < batch_size and bool(images and images[out[-1][0]]) == seen:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def load_vision_model(path: str, tokenizer, dtype, init_seed: int | None = None):
    """An image-text-to-text model saved at ``path`` (a full model, a LoRA adapter over one, or with
    ``init_seed`` its from-scratch initialisation), its processor hung on ``tokenizer``
    (``sftune_processor``, :func:`sftune.vision_model.attach_processor`). ``None``: not one."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from sftune.vision_model import attach_processor, is_vision_config

    p = Path(path)
    adapter = p / "adapter_config.json"
    base = json.loads(adapter.read_text()).get("base_model_name_or_path") if adapter.is_file() else None
    if not is_vision_config(AutoConfig.from_pretrained(base or path)):
        return None
    attach_processor(path if (p / "preprocessor_config.json").is_file() or base is None else base, tokenizer)
    if base is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=dtype), path)
    if init_seed is not None:
        torch.manual_seed(init_seed)  # as load_model does for model.from_scratch
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)


def save_processor(tokenizer, out_dir: Path) -> bool:
    """Save the processor of an image-text-to-text model beside its tokenizer (image processor,
    processor settings, the tokenizer's chat template), so the saved directory loads with
    ``AutoProcessor``. Call before ``tokenizer.save_pretrained``. False for a text model."""
    processor = getattr(tokenizer, "sftune_processor", None)
    if processor is None:
        return False
    processor.tokenizer = tokenizer
    if getattr(tokenizer, "chat_template", None):
        processor.chat_template = tokenizer.chat_template
    processor.save_pretrained(str(out_dir))
    return True
