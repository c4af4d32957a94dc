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
            raise SftuneError(f"{what} {p}: {e.message}") from None
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
    """A data row and its images (PIL, in the order its messages place them); ``(row, [])`` for a
    format without images. The row is returned as given (the vision format reads image parts and
    placeholders itself). ``base``: where relative paths are read from (default: the format's, the
    training data's directory)."""
    if not has_images(fmt):
        return row, []
    _, values = conversation(row, fmt.column, fmt.images_column)
    base = base if base is not None else fmt.base
    return row, [load_image(v, base, fmt.images_column, k) for k, v in enumerate(values)]


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
    present = [a for a in type(processor).get_attributes() if getattr(processor, a, None) is not None]
    processor.get_attributes = lambda: present  # an image-only processor has no video processor to save
    try:
        processor.save_pretrained(str(out_dir))
    finally:
        del processor.get_attributes
    return True


def decode_images(items, what: str = "images") -> list:
    """Images sent as base64 (``data:image/png;base64,...`` or the bare base64 of the file's bytes),
    as the dashboard's chat API takes them."""
    import base64
    import binascii

    out = []
    for k, item in enumerate(items or []):
        if not isinstance(item, str):
            raise SftuneError(f"{what}[{k}] is {type(item).__name__}; send each image as a base64 string")
        data = item.split(",", 1)[1] if item.startswith("data:") else item
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise SftuneError(f"{what}[{k}] is not base64 data") from None
        try:
            out.append(load_image(raw, None, what, k))
        except BadRow as e:
            raise SftuneError(f"{what}[{k}]: {e.message}") from None
    return out


def first_message_shows(message: str, history: list[dict], n: int) -> tuple[str, list[dict]]:
    """The images of a chat go with its first user message: ``(message, history)`` with ``n`` image
    markers there (history messages are plain text, as the chat clients send them)."""
    if not n:
        return message, history
    first = next((k for k, m in enumerate(history) if m.get("role") == "user"), None)
    if first is None:
        return with_images(message, n), history
    history = [dict(m) for m in history]
    history[first]["content"] = with_images(str(history[first]["content"]), n)
    return message, history


def probe_image():
    """A picture for checks when the run's rows give none: a red square on grey."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), (128, 128, 128))
    ImageDraw.Draw(im).rectangle((16, 16, 47, 47), fill=(220, 30, 30))
    return im


def verify_image_generation(loaded, out: Path, rows: list[dict], max_new_tokens: int = 8) -> tuple[bool, list[str]]:
    """``export --verify`` for an image-text-to-text model: the exported directory, loaded with
    transformers alone (``AutoModelForImageTextToText`` and its processor), gives the same prompt ids
    and the same greedy generation from an image as the run does in sftune. The image and question
    come from the first of ``rows`` with an image, else a probe picture."""
    import torch
    from transformers import AutoModelForImageTextToText

    from sftune.vision_model import load_processor

    fmt = loaded.fmt
    image, text, where = probe_image(), "Describe the picture.", "a probe picture"
    for k, row in enumerate(rows):
        try:
            _, images = row_and_images(fmt, row)
            messages, _ = fmt.messages_of(row, need_assistant=False)
            content = next(m for m in messages if m.get("role") == "user").get("content")
        except (BadRow, StopIteration, TypeError, AttributeError, KeyError):
            continue
        if images and isinstance(content, str):
            image, text, where = images[0], content.replace(IMAGE, ""), f"row {k}'s first image"
            break
    processor = load_processor(str(out))
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[rendered], images=[[image]], return_tensors="pt", add_special_tokens=False,
                    **getattr(fmt, "image_kwargs", {}))
    ours = encode(loaded.tokenizer.sftune_processor, [fmt.prompt_from_text(with_images(text, 1))], [[image]],
                  getattr(fmt, "image_kwargs", {}))
    lines = []
    same_ids = enc["input_ids"][0].tolist() == ours["input_ids"][0].tolist()
    lines.append(f"  {'PASS' if same_ids else 'FAIL'} image prompt ({where}): {enc['input_ids'].shape[1]} tokens "
                 f"{'equal' if same_ids else 'differ from the run: ' + str(ours['input_ids'].shape[1])}")
    stops = fmt.stop_ids(loaded.tokenizer)
    with torch.no_grad():
        new = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=loaded.tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    exported = processor.tokenizer.decode(new, skip_special_tokens=False)
    run = loaded.generate([fmt.prompt_from_text(with_images(text, 1))], images=[[image]],
                          max_new_tokens=max_new_tokens, batch_size=1)[0]
    same_text = exported == run
    lines.append(f"  {'PASS' if same_text else 'FAIL'} generation from the image: exported {exported!r}"
                 + ("" if same_text else f" vs the run {run!r}"))
    return same_ids and same_text, lines
