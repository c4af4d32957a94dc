"""Images in data rows: where they are (path, bytes, a ``datasets`` Image) and where they go in a conversation.

**Values.** An image is a file path (relative to the data file's directory, or absolute), raw
bytes, a ``datasets`` Image value (``{"bytes": ..., "path": ...}``, what Parquet datasets store;
or the decoded PIL image ``datasets`` hands over), or a PIL image. A URL is refused with what to
do (sftune reads no network while training): download the images and give local paths.

**Layouts.** A row's conversation, in the Hugging Face convention:

* ``messages`` whose ``content`` is a list of parts, ``{"type": "text", "text": ...}`` and
  ``{"type": "image"}``, the images in the ``images`` column in order of appearance (TRL's layout);
* or parts that carry their image, ``{"type": "image", "image": <value>}``;
* ShareGPT / LLaVA rows (``conversations`` of ``{"from", "value"}``) or plain-string contents with
  ``<image>`` placeholders in the text and an ``images`` column (LLaMA-Factory's layout).

:func:`conversation` turns any of these into text-chat messages whose content is a string with
one :data:`IMAGE` marker per image, plus the row's image values in marker order; the number of
images given must equal the number of places for them, or the row is bad (a clear error naming
the counts).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from sftune.data.contract import BadRow

IMAGE = "\ue000"
"""Where an image sits in a message's text (a private-use character no text uses)."""

PLACEHOLDER = "<image>"
"""The placeholder of ShareGPT / LLaVA rows."""


def base_dir(path: str | None) -> Path | None:
    """The directory relative image paths are read from: the data file's, or the data directory."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return p.parent
    if p.is_dir():
        return p
    parent = p.parent  # a glob such as data/*.jsonl
    return parent if parent.is_dir() else None


def _is_url(value: str) -> bool:
    return value.split("://", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs", "hf") and "://" in value


def load_image(value: Any, base: Path | None, column: str, index: int):
    """The PIL image (RGB) of one image value; :class:`BadRow` naming the column and image otherwise."""
    from PIL import Image, UnidentifiedImageError

    where = f"image {index}"
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):  # a datasets Image value
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise BadRow(f"{where} is an object with neither 'bytes' nor 'path'", column,
                         "give a file path, bytes, or a datasets Image value")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(value))) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise BadRow(f"{where}: its bytes are not an image PIL can read ({e})", column) from None
    if not isinstance(value, str) or not value:
        raise BadRow(f"{where} is {type(value).__name__} {str(value)[:60]!r}; expected a file path, bytes or a "
                     "datasets Image value", column)
    if _is_url(value):
        raise BadRow(f"{where} is a URL ({value[:80]}); sftune does not download images while training", column,
                     "download the images and give their local paths (relative to the data file)")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise BadRow(f"{where}: no such file {str(path)!r}", column,
                     "image paths are relative to the data file's directory (or absolute)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise BadRow(f"{where}: {str(path)!r} is not an image PIL can read ({e})", column) from None


def _parts_text(parts: list, i: int, column: str, inline: list) -> str:
    """A list of content parts -> text with an :data:`IMAGE` marker per image part."""
    out = []
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(part, str):
            out.append(part)
        elif kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRow(f"message {i} part {k} is a text part without a string 'text'", column)
            out.append(text)
        elif kind in ("image", "image_url"):
            value = part.get("image", part.get("image_url", part.get("url", part.get("path"))))
            if isinstance(value, dict) and "url" in value and kind == "image_url":
                value = value["url"]
            inline.append(value)
            out.append(IMAGE)
        else:
            raise BadRow(f"message {i} part {k} has type {kind!r}; sftune trains text and image parts", column,
                         "use {'type': 'text', 'text': ...} and {'type': 'image'} parts")
    return "".join(out)


def conversation(row: dict, column: str, images_column: str) -> tuple[dict, list]:
    """The row with its messages' contents as strings (one :data:`IMAGE` per image) and its images.

    Returns ``(row with column rewritten, image values in order)``."""
    messages = row.get(column)
    if not isinstance(messages, list):
        return row, []  # the messages format reports it
    inline: list = []
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        key = "content" if "content" in m or "role" in m else "value"
        content = m.get(key)
        if isinstance(content, list):
            m = {**m, key: _parts_text(content, i, column, inline)}
        elif isinstance(content, str) and (PLACEHOLDER in content or IMAGE in content):
            if IMAGE in content:
                raise BadRow(f"message {i} contains the private-use character U+E000 that marks images", column)
            m = {**m, key: content.replace(PLACEHOLDER, IMAGE)}
        out.append(m)
    listed = row.get(images_column)
    if listed is None:
        listed = []
    elif not isinstance(listed, (list, tuple)):
        listed = [listed]
    places = sum(m.get("content", m.get("value", "")).count(IMAGE) for m in out
                 if isinstance(m, dict) and isinstance(m.get("content", m.get("value")), str))
    given = [v for v in inline if v is not None]
    if given and listed:
        raise BadRow(f"the row gives images both inside its message parts ({len(given)}) and in the "
                     f"'{images_column}' column ({len(listed)})", column, "give each image once")
    images = given or list(listed)
    if given and len(given) != len(inline):
        raise BadRow(f"{len(inline) - len(given)} of the {len(inline)} image parts carry no image and "
                     f"{len(given)} do", column, "give every image inside its part, or all in the images column")
    if places != len(images):
        raise BadRow(f"the conversation has {places} image place(s) ({{'type': 'image'}} parts or <image> "
                     f"placeholders) but {len(images)} image(s) are given", images_column if listed else column,
                     "give one image per place, in order of appearance")
    return {**row, column: out}, images
