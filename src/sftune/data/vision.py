"""Image conversations for vision-language models: rendered, expanded, masked and cut as the processor sees them.

**Rendering.** :class:`VisionMessagesFormat` is the messages format (:mod:`sftune.data.chat`: the
same turn rule, the same trained spans) with images: a row's images (:mod:`sftune.data.images`)
sit in its messages as markers, and the template is given list-of-parts contents
(``{"type": "text"}`` / ``{"type": "image"}``), so the processor's chat template writes each image
as it does at inference (``<|vision_start|><|image_pad|><|vision_end|>``, ``<image>``, ...).

**Expansion.** Each sequence's text and its images go through the processor itself
(``processor(text=..., images=...)``), which replaces each image token by what the image becomes
(Qwen2-VL: one ``<|image_pad|>`` per merged patch; LLaVA: one ``<image>`` per patch; Idefics3:
tiles with ``<row_i_col_j>`` tags and a global view). The expanded text is tokenized by sftune's
one tokenization (:class:`~sftune.data.tokenize.SequenceEncoder`), the trained spans shifted with
it, and the ids must equal the processor's (checked per sequence): what trains is what the model
sees at inference.

**Masks.** Only assistant turns train (the text-chat rule); every token an image expands into,
and the template's tokens around it (vision start/end), is never trained, whatever the template.

**Truncation never splits an image.** Only text is cut: a cut that would fall inside an image
moves to before it, and the images after the cut are dropped with their pixels. A row whose image
tokens alone exceed ``max_length`` is skipped, counted with the reason.

**Payload.** Each example's processed images ride beside its tokens as the extras kind
``"images"`` (:mod:`sftune.data.vision_batch`), with Qwen2-VL's M-RoPE positions computed here.
"""

from __future__ import annotations

import hashlib
import json

import datasets
import numpy as np
import pyarrow as pa
from transformers import ProcessorMixin

import sftune.data.vision_batch as vision_batch
from sftune.data.chat import MessagesFormat
from sftune.data.contract import BadRow, Rendered, Sequence, Turn
from sftune.data.images import IMAGE, base_dir, conversation, load_image
from sftune.data.tokenize import IGNORE, Example, RowTokenizer, truncate
from sftune.errors import ConfigError, RowSkip

MROPE_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")
"""Processors of models with M-RoPE positions computed by :func:`~sftune.data.vision_batch.mrope_positions`."""

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "text_replacement_offsets",
             "offset_mapping")
EXTRA_COLUMN = "extra_" + vision_batch.KIND
OUTSIDE = "its images alone exceed max_length"


def image_kwargs(cfg, processor) -> dict:
    """``data.image_min_pixels`` / ``data.image_max_pixels`` as the processor's image arguments."""
    if cfg.image_max_pixels is None and cfg.image_min_pixels is None:
        return {}
    ip = processor.image_processor
    size = dict(getattr(ip, "size", None) or {})
    if not ("shortest_edge" in size and "longest_edge" in size and hasattr(ip, "merge_size")):
        raise ConfigError(f"data.image_min_pixels / data.image_max_pixels set, but {type(ip).__name__} resizes images "
                          "to a fixed size (only dynamic-resolution processors such as Qwen2-VL's take a pixel range); "
                          "leave them unset for this model")
    return {"size": {"shortest_edge": cfg.image_min_pixels or size["shortest_edge"],
                     "longest_edge": cfg.image_max_pixels or size["longest_edge"]}}


def _parts(text: str) -> list[dict]:
    out = []
    for k, piece in enumerate(text.split(IMAGE)):
        if k:
            out.append({"type": "image"})
        if piece:
            out.append({"type": "text", "text": piece})
    return out


class VisionMessagesFormat(MessagesFormat):
    """The messages format for an image-text-to-text model's processor (see the module docstring)."""

    def __init__(self, cfg, processor, column: str, tools_column: str | None = None):
        tok = processor.tokenizer
        if getattr(processor, "chat_template", None) and not getattr(tok, "chat_template", None):
            tok.chat_template = processor.chat_template
        super().__init__(cfg, tok, column, tools_column)
        self.processor = processor
        self.images_column = cfg.images_column
        self.base = base_dir(cfg.path)
        self.image_kwargs = image_kwargs(cfg, processor)
        self.image_token = getattr(processor, "image_token", None)
        if not self.image_token or type(processor).replace_image_token is ProcessorMixin.replace_image_token:
            raise ConfigError(f"{type(processor).__name__} does not say how it writes an image into the text "
                              "(no image_token / replace_image_token), so sftune cannot train images with it")
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        self.mrope = type(processor).__name__ in MROPE_PROCESSORS
        self.merge = int(getattr(processor.image_processor, "merge_size", 1) or 1)
        self.on_bad_row = cfg.on_bad_row
        self.columns = [column]
        self._around: tuple[str, str] | None = None

    def extra_features(self, columns: list[str]) -> dict:
        """The ``extra_<kind>`` columns this format fills (:func:`sftune.data.one_source.tokenize_split`)."""
        return {EXTRA_COLUMN: datasets.Value("binary")}

    # -- the template sees list-of-parts contents, images where the markers are
    def public_messages(self, messages: list[dict]) -> list[dict]:
        out = super().public_messages(messages)
        for m in out:
            if isinstance(m.get("content"), str) and m.get("role") != "tool":
                m["content"] = _parts(m["content"])
        return out

    def cache_key(self) -> str:
        ip = self.processor.image_processor
        extra = json.dumps([super().cache_key(), vision_batch.VERSION, type(self.processor).__name__, ip.to_json_string(), self.image_kwargs,
                            self.images_column, str(self.base)], sort_keys=True, default=str)
        return hashlib.sha256(extra.encode()).hexdigest()[:16]

    def identity(self) -> dict:
        out = super().identity()
        if self.images_column != "images":
            out["images_column"] = self.images_column
        return out

    def around_image(self) -> tuple[str, str]:
        """What the template writes before and after the image token for one image part
        (``<|vision_start|>`` / ``<|vision_end|>`` for Qwen2-VL; nothing for LLaVA)."""
        if self._around is None:
            self._around = ("", "")
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": [{"type": "text", "text": "\ue001"}, {"type": "image"},
                                                  {"type": "text", "text": "\ue001"}]}], tokenize=False)
                inner = text.split("\ue001")[1]
                if inner.count(self.image_token) == 1:
                    self._around = tuple(inner.split(self.image_token))
            except Exception:  # noqa: BLE001 - a template that cannot render the probe: the token alone
                pass
        return self._around

    def messages_of(self, row: dict, *, need_assistant: bool = True) -> tuple[list[dict], int]:
        """The row's messages with an image marker where each image goes (list-of-parts contents,
        ``<image>`` placeholders), for training and inference prompts alike."""
        converted, _ = conversation(row, self.column, self.images_column)
        return super().messages_of(converted, need_assistant=need_assistant)

    def reference(self, row: dict) -> str | None:
        try:
            converted, _ = conversation(row, self.column, self.images_column)
        except BadRow:
            return None
        ref = super().reference(converted)
        return ref.replace(IMAGE, "") if ref is not None else None

    def images_of(self, row: dict) -> list:
        """The row's images (PIL, RGB), in the order its messages place them."""
        _, values = conversation(row, self.column, self.images_column)
        return [load_image(v, self.base, self.images_column, k) for k, v in enumerate(values)]

    def render(self, row: dict) -> Rendered:
        """The messages format's sequences; ``.images`` holds the row's images (PIL, in order)."""
        rendered = super().render(row)
        for seq in rendered.sequences:
            for t in seq.turns:
                t.standalone = None  # a straddled turn is cut in place (each sequence carries its own images)
        rendered.images = self.images_of(row)
        messages, _ = self.messages_of(row)
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        placed = sum(m["content"].count(IMAGE) for m in messages[:last + 1])
        written = max(seq.text.count(self.image_token) for seq in rendered.sequences)
        if written < placed:
            raise BadRow(f"the chat template wrote {written} of the {placed} images of this conversation (as "
                         f"{self.image_token})", self.column, "use the model's own chat template, which renders "
                         "{'type': 'image'} parts (leave data.chat_template unset)")
        return rendered

    def row_tokenizer(self, max_length: int, source: str) -> "VisionTokenizer":
        return VisionTokenizer(self, max_length, source)

    def map_function(self, tokenizer, max_length: int, source: str):
        return VisionTokenizer(self, max_length, source).table


def _shift(pos: int, reps: list[tuple[int, int, int]]) -> int:
    """A character position of the text -> its position in the expanded text."""
    return pos + sum(delta for start, _, delta in reps if start < pos)


class VisionTokenizer(RowTokenizer):
    """The tokenizer's ``datasets.map`` function for image conversations: the text path's columns
    plus ``extra_images`` (the payload per example, null for an example without images)."""

    def __init__(self, fmt: VisionMessagesFormat, max_length: int, source: str):
        super().__init__(fmt, fmt.tokenizer, max_length, on_bad_row=fmt.on_bad_row, source=source)
        self._payloads: list = []

    def _process(self, text: str, images: list) -> dict:
        try:
            # no special tokens added: the chat template writes its own (as apply_chat_template tokenizes)
            return self.fmt.processor(text=[text], images=images, return_text_replacement_offsets=True,
                                      return_tensors="np", add_special_tokens=False, **self.fmt.image_kwargs)
        except (ValueError, TypeError, OSError) as e:
            raise BadRow(f"the processor refused this conversation's images: {str(e).splitlines()[0]}",
                         self.fmt.images_column) from None

    def encode(self, seq: Sequence, images: list) -> tuple[Example, bytes | None]:
        """One sequence -> its example (expanded, masked, cut) and its images' payload."""
        fmt = self.fmt
        n = seq.text.count(fmt.image_token)
        if n == 0:
            return truncate(self.encoder.encode_arrays(seq)[0], self.max_length), None
        if n > len(images):
            raise BadRow(f"the rendered conversation has {n} image tokens ({fmt.image_token}) but the row gives "
                         f"{len(images)} images; its text contains the image token itself", fmt.column)
        enc = self._process(seq.text, images[:n])
        if "text_replacement_offsets" not in enc:
            raise ConfigError(f"{type(fmt.processor).__name__} does not report where it expands each image "
                              "(text_replacement_offsets), so sftune cannot train images with it yet")
        offsets = enc["text_replacement_offsets"][0]
        reps = [(o["span"][0], o["span"][1], len(o["replacement"]) - (o["span"][1] - o["span"][0])) for o in offsets]
        text, last = [], 0
        for o in offsets:
            text += [seq.text[last:o["span"][0]], o["replacement"]]
            last = o["span"][1]
        expanded = "".join(text) + seq.text[last:]
        turns = [Turn(_shift(t.context, reps), [(_shift(s, reps), _shift(e, reps), w) for s, e, w in t.spans], t.eos)
                 for t in seq.turns]
        full = self.encoder.batch([expanded])[0]
        ex = self.encoder.encode_arrays(Sequence(expanded, turns), full)[0]
        if ex.straddled:
            raise RowSkip("a token straddles a turn boundary in an image conversation")
        ids = np.asarray(ex.input_ids)
        if not np.array_equal(ids[:len(full[0])], np.asarray(enc["input_ids"][0])):
            raise BadRow("the processor tokenizes this conversation differently from its text tokenizer", fmt.column,
                         "report this model to sftune; set data.on_bad_row=skip to skip such rows")
        # each image's tokens: its expansion and what the template writes around it
        before, after = fmt.around_image()
        starts, ranges = full[1], []
        for o in offsets:
            a, b = o["new_span"]
            a -= len(before) if expanded[:a].endswith(before) else 0
            b += len(after) if expanded[b:].startswith(after) else 0
            hit = np.flatnonzero((starts >= a) & (starts < b))
            ranges.append((int(hit[0]), int(hit[-1]) + 1))
        for s, e in ranges:  # never trained
            ex.weights[s:e] = 0.0
            ex.labels[s:e] = IGNORE
        image_tokens = sum(e - s for s, e in ranges)
        if image_tokens > self.max_length:
            raise RowSkip(OUTSIDE)
        cut = self.max_length
        for s, e in ranges:
            if s < cut < e:
                cut = s
        ex = truncate(ex, cut)
        kept = sum(1 for _, e in ranges if e <= len(ex.input_ids))
        if kept == 0:
            return ex, None
        if kept < n:  # the images after the cut go, with their pixels
            enc = self._process(seq.text[:offsets[kept]["span"][0]], images[:kept])
        arrays = {k: v for k, v in enc.items() if k not in TEXT_KEYS}
        mrope = None
        if fmt.mrope:
            mrope = vision_batch.mrope_positions(ex.input_ids, fmt.image_token_id, arrays["image_grid_thw"], fmt.merge)
        return ex, vision_batch.encode(arrays, mrope=mrope, spans=ranges[:kept],
                                       sizes=[im.size for im in images[:kept]])

    def examples(self, batch: dict[str, list]) -> list[tuple[int, Example, str]]:
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        indices = batch.get("__row__", list(range(n)))
        out, self._payloads = [], []
        for i in range(n):
            row = {k: batch[k][i] for k in keys}
            rendered, reason = self._render(row, indices[i])
            kept = []
            for seq in (rendered.sequences if rendered else []):
                try:
                    kept.append(self._encode_row(seq, rendered.images, indices[i]))
                except RowSkip as s:
                    reason = reason or s.reason
            kept = [k for k in kept if k is not None]
            if not kept:
                empty = np.zeros(0, dtype=np.int64)
                out.append((int(indices[i]), Example(empty, empty, empty.astype(np.float64)),
                            reason or "no trained tokens"))
                self._payloads.append(None)
            for k, (ex, payload) in enumerate(kept):
                if k > 0:
                    ex.extra, ex.note = True, ex.note or rendered.why or "expanded"
                out.append((int(indices[i]), ex, ""))
                self._payloads.append(payload)
            if rendered is not None and rendered.note and kept:
                kept[0][0].note = rendered.note
        return out

    def _encode_row(self, seq: Sequence, images: list, index: int):
        try:
            return self.encode(seq, images)
        except BadRow as b:
            if self.on_bad_row == "skip":
                raise RowSkip(f"bad row: {b.message}") from None
            from sftune.errors import DataError

            raise DataError(b.message, source=self.source, row=index, column=b.column, hint=b.hint) from None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """The text path's columns plus ``extra_images`` (for readers of the dict form, such as streams)."""
        out = super().__call__(batch)
        out[EXTRA_COLUMN] = list(self._payloads)
        return out

    def table(self, batch: dict[str, list]) -> pa.Table:
        t = super().table(batch)
        return t.append_column(EXTRA_COLUMN, pa.array(self._payloads, type=pa.binary()))
