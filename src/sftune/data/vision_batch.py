"""The ``images`` kind of the extras seam: an example's processed images, stored and collated.

**Payload.** What the processor gave for an example's images (``pixel_values`` and the size
tensors its model takes: ``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``), as one
``.npz`` blob (no pickle), plus for M-RoPE models (Qwen2-VL, Qwen2.5-VL) the example's 3-D
positions ``[3, length]``, computed at tokenization by :func:`mrope_positions` (a pure function of
the ids and the image grids, restarting at 0 for every example: what packing needs).

**Collate.** :func:`collate_images` (registered for the kind ``"images"``) concatenates every key
in batch order (row, then offset: the order the model's placeholder mask meets the image tokens in
the flattened ``input_ids``), re-adds the processor's batch dimension for per-sample keys
(Idefics3's ``[1, tiles, 3, H, W]``) and, for M-RoPE, places each example's positions into
``position_ids`` ``[4, rows, T]``: row 0 the 1-D positions of the batch (restarting per example,
from which transformers builds the per-example masks), rows 1..3 the M-RoPE positions (a text-only
example's are its 1-D positions, as the model computes them).
"""

from __future__ import annotations

import io

import numpy as np
import torch

import sftune.data.extras as extras

KIND = "images"
VERSION = 3
"""The payload layout's version: part of the tokenization cache key (``VisionMessagesFormat.cache_key``)."""
MROPE = "__mrope__"
BATCHED = "__batched__"  # keys whose leading (per-sample) dimension was dropped
N_IMAGES = "__n_images__"
TOKENS = "__image_tokens__"  # tokens per image (its expansion and the template's tokens around it)
SPANS = "__image_spans__"  # each image's [start, end) token range in the example
SIZES = "__image_sizes__"  # each image's (width, height) as given


def encode(arrays: dict[str, np.ndarray], *, mrope: np.ndarray | None = None, spans=(), sizes=()) -> bytes:
    """One example's payload: the processor's image arrays (a leading sample dimension of 1 on
    5-D arrays is dropped and restored at collate), the optional M-RoPE positions, and for reports
    and previews each image's token range ``spans`` and ``(width, height)`` ``sizes``."""
    per_sample = np.ndim(arrays.get("pixel_values")) == 5 and np.shape(arrays["pixel_values"])[0] == 1
    out, batched = {}, []
    for k, v in arrays.items():
        v = np.asarray(v)
        if per_sample and k in ("pixel_values", "pixel_attention_mask") and v.shape[:1] == (1,):
            v = v[0]
            batched.append(k)
        out[k] = v
    if mrope is not None:
        out[MROPE] = np.asarray(mrope, dtype=np.int32)
    out[BATCHED] = np.asarray(batched, dtype=str)
    spans = np.asarray(list(spans), dtype=np.int64).reshape(-1, 2)
    out[N_IMAGES] = np.asarray(len(spans), dtype=np.int64)
    out[TOKENS] = spans[:, 1] - spans[:, 0]
    out[SPANS] = spans
    out[SIZES] = np.asarray(list(sizes), dtype=np.int64).reshape(-1, 2)
    buf = io.BytesIO()
    np.savez(buf, **out)
    return buf.getvalue()


def decode(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def n_images(payload: bytes) -> int:
    return int(decode(payload)[N_IMAGES])


def images_of(payload: bytes | None) -> list[dict]:
    """Each image of an example: ``{"start", "tokens", "size": [width, height]}`` (previews)."""
    if not payload:
        return []
    d = decode(payload)
    return [{"start": int(s), "tokens": int(e - s), "size": [int(w), int(h)]}
            for (s, e), (w, h) in zip(d[SPANS].tolist(), d[SIZES].tolist())]


def summary(column, kept) -> dict:
    """The data report's image figures over the kept examples' payloads (an Arrow binary column):
    images, examples with images, image tokens, tokens per image (min / mean / max)."""
    per_image: list[int] = []
    examples = 0
    i = 0
    for chunk in getattr(column, "chunks", [column]):
        for value in chunk:
            if kept[i] and value.is_valid:
                with np.load(io.BytesIO(value.as_py()), allow_pickle=False) as z:
                    per_image += z[TOKENS].tolist()
                examples += 1
            i += 1
    hist: dict[int, int] = {}
    for t in per_image:
        hist[t] = hist.get(t, 0) + 1
    return merged([{"examples": examples, "per_image": hist}])


def combined(figures: list[dict]) -> dict:
    """Several reports' image figures (:func:`summary`) as one (a mixture's report)."""
    figures = [f for f in figures if f]
    if not figures:
        return {}
    images, tokens = sum(f["images"] for f in figures), sum(f["image_tokens"] for f in figures)
    return {"images": images, "examples": sum(f["examples"] for f in figures), "image_tokens": tokens,
            "tokens_per_image": {"min": min(f["tokens_per_image"]["min"] for f in figures),
                                 "mean": round(tokens / images, 1),
                                 "max": max(f["tokens_per_image"]["max"] for f in figures)}}


def count(acc: dict, payload: bytes) -> None:
    """Add one example's images to ``acc`` (``{"examples", "per_image": {tokens: images}}``, a
    stream's per-source count): what :func:`merged` turns into the report's figures."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        tokens = z[TOKENS].tolist()
    acc["examples"] = acc.get("examples", 0) + 1
    per = acc.setdefault("per_image", {})
    for t in tokens:
        per[t] = per.get(t, 0) + 1


def merged(counts: list[dict]) -> dict:
    """The report's image figures (as :func:`summary`) over counts made by :func:`count`; {} without images."""
    per: dict[int, int] = {}
    for c in counts:
        for t, n in c.get("per_image", {}).items():
            per[t] = per.get(t, 0) + n
    images = sum(per.values())
    if not images:
        return {}
    tokens = sum(t * n for t, n in per.items())
    return {"images": images, "examples": sum(c.get("examples", 0) for c in counts), "image_tokens": int(tokens),
            "tokens_per_image": {"min": min(per), "mean": round(tokens / images, 1), "max": max(per)}}


def mrope_positions(ids, image_token_id: int, grids, merge: int) -> np.ndarray:
    """Qwen2-VL's 3-D rotary positions ``[3, len(ids)]`` of one example (``get_rope_index`` for
    images): text tokens count up on all three axes; an image's tokens (one run of
    ``image_token_id``) take ``start + (t, h, w)`` over its merged grid, and the text after it
    goes on from ``start + max(h, w)``."""
    ids = np.asarray(ids)
    out = np.zeros((3, len(ids)), dtype=np.int64)
    is_image = ids == image_token_id
    grids = [tuple(int(x) for x in g) for g in np.asarray(grids).reshape(-1, 3)] if len(grids) else []
    pos, i, k = 0, 0, 0
    while i < len(ids):
        if not is_image[i]:
            j = i
            while j < len(ids) and not is_image[j]:
                j += 1
            out[:, i:j] = np.arange(pos, pos + j - i)
            pos += j - i
            i = j
            continue
        if k >= len(grids):
            raise ValueError(f"more image-token runs than image grids ({len(grids)})")
        t, h, w = grids[k][0], grids[k][1] // merge, grids[k][2] // merge
        n = t * h * w
        if not is_image[i:i + n].all() or (i + n < len(ids) and is_image[i + n]):
            raise ValueError(f"image {k}: expected a run of {n} image tokens for grid {grids[k]}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        out[0, i:i + n], out[1, i:i + n], out[2, i:i + n] = tt.ravel() + pos, hh.ravel() + pos, ww.ravel() + pos
        pos += max(h, w)
        i += n
        k += 1
    if k != len(grids):
        raise ValueError(f"{len(grids)} image grids but {k} image-token runs")
    return out


def collate_images(placed: list[extras.Placed], batch) -> None:
    """Fill ``batch.model_inputs`` from the placed payloads (see the module docstring)."""
    decoded = [(p, decode(p.payload)) for p in placed]
    keys: list[str] = []
    for _, d in decoded:
        keys += [k for k in d if not k.startswith("__") and k not in keys]
    batched = set()
    for _, d in decoded:
        batched |= set(d[BATCHED].tolist())
    for k in keys:
        parts = [torch.from_numpy(np.ascontiguousarray(d[k])) for _, d in decoded if k in d and len(d[k])]
        if not parts:
            continue
        value = torch.cat(parts, dim=0)
        batch.model_inputs[k] = value.unsqueeze(0) if k in batched else value
    if any(MROPE in d for _, d in decoded):
        flat = batch.position_ids
        pos = flat.unsqueeze(0).repeat(4, 1, 1)
        for p, d in decoded:
            if MROPE in d:
                pos[1:, p.row, p.offset:p.offset + p.length] = torch.from_numpy(d[MROPE].astype(np.int64))
        batch.model_inputs["position_ids"] = pos


extras.register(KIND, collate_images)
