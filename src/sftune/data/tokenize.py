"""Tokenize: rendered sequences -> ``input_ids``, ``labels`` and per-token loss ``weights``.

**Labels from one tokenization.** Each sequence's text is tokenized once, whole, and a token is
trained when its first character (fast tokenizers' offset mapping) lies in a trained span of the
format; its weight is that span's weight. So the ids are exactly what the model sees when the
same text is tokenized at inference, and SentencePiece-style tokenizers add no spurious ``▁`` at
a segment boundary (a segment is never tokenized alone).

**The inference side wins.** For every trained turn, the ids before it must equal the inference
prompt ``text[:context]`` tokenized alone (plus the BOS rule of the format). When a token
straddles that boundary (a reply that starts with ``\\n`` after a prompt ending in ``\\n``, say):

* a chat turn inside a shared conversation is trained in a sequence of its own
  (``Turn.standalone``) so the other turns keep the whole-conversation tokenization;
* otherwise the sequence is cut there: the prompt is tokenized alone and the rest is tokenized as
  a *continuation* (after a special token that is then dropped, so no ``▁`` or other start-of-text
  marker is added). The example is counted as ``straddled`` in the data report.

A tokenizer without offsets (a Python "slow" tokenizer) is cut at every span boundary instead, each
piece tokenized as a continuation: contexts stay exact, and labels follow the pieces.

Labels are *not* shifted here (``labels[i]`` is the token at position ``i``); the batching stage
shifts them per example. Truncation cuts only the tail; an example whose first trained token does
not fit is skipped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sftune.data.contract import BadRow, Format, Sequence
from sftune.errors import DataError, RowSkip

IGNORE = -100
STRADDLE = "a token straddles the prompt/completion boundary"


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before a text when asked to add special tokens (BOS, or nothing)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    weights: list[float]
    truncated: bool = False
    straddled: bool = False
    extra: bool = False
    note: str = ""


_PROBES = ["Hello world", " a  b\t\n\nc ", "\n", "x\n\n", "émoji 🙂 字 ﬁ", "don't 'll 123 4.5", "A\u00a0B\r\n"]


def plain_backend(tokenizer):
    """A copy of a fast tokenizer's Rust backend that encodes exactly as
    ``tokenizer(texts, add_special_tokens=False)`` (no truncation, no padding, special tokens split
    or not as the tokenizer says), or ``None`` when that cannot be had or a probe differs.

    Calling it directly skips transformers' per-text conversion to Python dicts, and lets the
    inference prompts be tokenized without offsets (``encode_batch_fast``): the same ids, less work.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    try:
        own = copy.deepcopy(backend)
        own.no_truncation()
        own.no_padding()
        own.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        probes = _PROBES + [t + p for t in tokenizer.all_special_tokens for p in ("x", " y\n")]
        want = tokenizer(probes, add_special_tokens=False, return_offsets_mapping=True)
        got = own.encode_batch(probes, add_special_tokens=False)
        fast = own.encode_batch_fast(probes, add_special_tokens=False)
    except Exception:  # an unusual backend: the transformers call it is
        return None
    same = all(e.ids == ids == f.ids and [tuple(o) for o in e.offsets] == [tuple(o) for o in offs]
               for e, f, ids, offs in zip(got, fast, want["input_ids"], want["offset_mapping"]))
    return own if same else None


class SequenceEncoder:
    """Tokenizes :class:`Sequence` objects by the rules of the module docstring.

    ``fast=False`` tokenizes through the transformers call only (the reference the fast path is
    tested against)."""

    def __init__(self, tokenizer, *, add_bos: bool, fast: bool = True):
        self.tok = tokenizer
        self.prefix = special_prefix(tokenizer) if add_bos else []
        self.offsets = bool(getattr(tokenizer, "is_fast", False))
        self.backend = plain_backend(tokenizer) if fast and self.offsets else None
        self.eos_id = tokenizer.eos_token_id
        self.anchor = tokenizer.eos_token or tokenizer.bos_token
        self._anchor_len = len(tokenizer(self.anchor, add_special_tokens=False)["input_ids"]) if self.anchor else 0

    # -- tokenizer calls
    def batch(self, texts: list[str]) -> list[tuple[list[int], np.ndarray | None]]:
        """Ids and each token's start character (``None`` without offsets) of each text."""
        if not texts:
            return []
        if self.backend is not None:
            return [(e.ids, np.asarray([s for s, _ in e.offsets], dtype=np.int64))
                    for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=self.offsets)
        if self.offsets:
            return [(ids, np.asarray([s for s, _ in offs], dtype=np.int64).reshape(-1))
                    for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]
        return [(ids, None) for ids in enc["input_ids"]]

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Ids only (the inference prompts: compared, never labelled)."""
        if not texts:
            return []
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def continuation(self, text: str) -> tuple[list[int], np.ndarray | None]:
        """``text`` tokenized as it continues an earlier text: after a special token, then dropped."""
        if self.anchor and self.offsets:
            ids, starts = self.batch([self.anchor + text])[0]
            k = self._anchor_len
            if ids[k:] and int(starts[k]) == len(self.anchor):
                return ids[k:], starts[k:] - len(self.anchor)
        elif self.anchor:
            ids = self.tok(self.anchor + text, add_special_tokens=False)["input_ids"]
            if ids[:self._anchor_len] == self.tok(self.anchor, add_special_tokens=False)["input_ids"]:
                return ids[self._anchor_len:], None
        return self.batch([text])[0]

    def pieces(self, text: str, cuts: list[int]) -> tuple[list[int], np.ndarray]:
        """Ids of ``text`` cut at ``cuts``: the first piece plainly, the rest as continuations.
        Returns ids and each token's start character (a piece's start where offsets are missing)."""
        bounds = [0] + sorted(set(c for c in cuts if 0 < c < len(text))) + [len(text)]
        ids, starts = [], []
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if k == 0:
                piece_ids, piece_starts = self.batch([text[a:b]])[0]
            else:
                piece_ids, piece_starts = self.continuation(text[a:b])
                if not self._continues(ids, piece_ids, text[a:b]):  # e.g. a marker prepended after every special
                    plain = self.batch([text[a:b]])[0]
                    if self._continues(ids, plain[0], text[a:b]):
                        piece_ids, piece_starts = plain
            ids += piece_ids
            starts.append(np.full(len(piece_ids), a, dtype=np.int64) if piece_starts is None else piece_starts + a)
        return ids, (np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64))

    def _continues(self, before: list[int], piece: list[int], text: str) -> bool:
        decode = lambda ids: self.tok.decode(ids, skip_special_tokens=False,  # noqa: E731
                                             clean_up_tokenization_spaces=False)
        return decode(list(before) + list(piece)) == decode(list(before)) + text

    # -- one sequence
    def encode(self, seq: Sequence, full=None, contexts=None) -> list[Example]:
        """``full``: ``seq.text`` already tokenized (:meth:`batch`); ``contexts``: each turn's
        prompt's ids (:meth:`ids`)."""
        out = self.encode_arrays(seq, full, contexts)
        for ex in out:
            ex.input_ids, ex.labels, ex.weights = ex.input_ids.tolist(), ex.labels.tolist(), ex.weights.tolist()
        return out

    def encode_arrays(self, seq: Sequence, full=None, contexts=None) -> list[Example]:
        """:meth:`encode` with numpy arrays in the examples: ids and labels int64, weights float64
        (each span's weight as float32, as the cache stores it; an EOS's weight as given)."""
        text, turns = seq.text, seq.turns
        if full is None:
            full = self.batch([text])[0]
        if contexts is None:
            contexts = self.ids([text[:t.context] for t in turns])
        out: list[Example] = []
        keep, cuts, straddled = [], [], False
        for t, ctx_ids in zip(turns, contexts):
            aligned = t.context == 0 or full[0][:len(ctx_ids)] == ctx_ids
            if aligned:
                keep.append(t)
            elif t.standalone is not None:  # train it apart; the rest keeps the whole tokenization
                for ex in self.encode_arrays(t.standalone):
                    ex.extra, ex.note = True, ex.note or STRADDLE
                    out.append(ex)
            else:
                keep.append(t)
                cuts.append(t.context)
                straddled = True
        if not keep:
            return out
        if not self.offsets:  # no offsets: cut at every span boundary so labels follow the pieces
            cuts += [c for t in keep for s, e, _ in t.spans for c in (s, e)] + [t.context for t in keep]
        if cuts:
            ids, starts = self.pieces(text, cuts)
        else:
            ids, starts = full[0], full[1]
        body = np.zeros(len(ids), dtype=np.float32)
        for t in keep:
            for s, e, w in t.spans:
                body[(starts >= s) & (starts < e)] = w
        eos = next((t.eos for t in reversed(keep) if t.eos is not None), None)
        with_eos = eos is not None and self.eos_id is not None
        p, n = len(self.prefix), len(ids)
        all_ids = np.empty(p + n + with_eos, dtype=np.int64)
        weights = np.zeros(p + n + with_eos, dtype=np.float64)
        all_ids[:p], all_ids[p:p + n], weights[p:p + n] = self.prefix, ids, body
        if with_eos:
            all_ids[-1], weights[-1] = self.eos_id, float(eos)
        labels = np.where(weights > 0, all_ids, IGNORE)
        out.insert(0, Example(all_ids, labels, weights, straddled=straddled, note=STRADDLE if straddled else ""))
        return out


def truncate(ex: Example, max_length: int) -> Example:
    """Cut the tail at ``max_length``. Raises :class:`RowSkip` when no trained token fits."""
    trained = np.flatnonzero(np.asarray(ex.labels) != IGNORE)
    if not len(trained):
        raise RowSkip("no trained tokens")
    if trained[0] >= max_length:
        raise RowSkip("prompt longer than max_length")
    if len(ex.input_ids) > max_length:
        ex.input_ids, ex.labels, ex.weights = (ex.input_ids[:max_length], ex.labels[:max_length],
                                               ex.weights[:max_length])
        ex.truncated = True
    return ex


COLUMNS = ("input_ids", "labels", "weights", "length", "n_loss", "w_loss", "truncated", "eos_trained", "skip", "row",
           "extra", "straddled", "note")


class RowTokenizer:
    """The ``datasets.map`` function: a batch of rows -> one output row per training sequence.

    A row can give several sequences (a chat template that is not prefix-stable) or none (a
    counted skip, with ``skip`` holding the reason). Columns: ``input_ids``, ``labels``,
    ``weights`` (per-token loss weights, 0 where untrained), ``length``, ``n_loss`` (labelled
    tokens), ``w_loss`` (their summed weight), ``truncated``, ``eos_trained``, ``skip``, ``row``,
    ``extra`` (a sequence beyond the row's first), ``straddled``, ``note``.
    """

    def __init__(self, fmt: Format, tokenizer, max_length: int, *, on_bad_row: str, source: str):
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.on_bad_row = on_bad_row
        self.source = source
        self.encoder = SequenceEncoder(tokenizer, add_bos=fmt.add_bos)
        self.end_ids = set(fmt.stop_ids(tokenizer))

    def _render(self, row: dict, index: int):
        try:
            return self.fmt.render(row), ""
        except RowSkip as s:
            return None, s.reason
        except BadRow as b:
            if self.on_bad_row == "skip":
                return None, f"bad row: {b.message}"
            raise DataError(b.message, source=self.source, row=index, column=b.column, hint=b.hint) from None
        except DataError as e:
            if e.row is None:
                e = DataError(e.reason, source=self.source, row=index, column=e.column, hint=e.hint)
            raise e from None

    def examples(self, batch: dict[str, list]) -> list[tuple[int, Example, str]]:
        """``(row, example, skip reason)`` for each output row of a batch, examples as numpy arrays
        (a skipped row gives one empty example with its reason)."""
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        rows = [{k: batch[k][i] for k in keys} for i in range(n)]
        indices = batch.get("__row__", list(range(n)))
        rendered = [self._render(r, idx) for r, idx in zip(rows, indices)]

        # two tokenizer calls for the batch: every sequence text (with offsets), every inference prompt (ids)
        texts, prompts = [], []
        for r, _ in rendered:
            for seq in (r.sequences if r else []):
                texts.append(seq.text)
                prompts += [seq.text[:t.context] for t in seq.turns]
        full_iter, prompt_iter = iter(self.encoder.batch(texts)), iter(self.encoder.ids(prompts))

        out = []
        for i, (r, reason) in enumerate(rendered):
            examples: list[Example] = []
            if r is not None:
                for k, seq in enumerate(r.sequences):
                    full = next(full_iter)
                    contexts = [next(prompt_iter) for _ in seq.turns]
                    for ex in self.encoder.encode_arrays(seq, full, contexts):
                        if k > 0:
                            ex.extra, ex.note = True, ex.note or r.why or "expanded"
                        examples.append(ex)
                if r.note and examples:
                    examples[0].note = r.note
            kept = []
            for ex in examples:
                try:
                    kept.append(truncate(ex, self.max_length))
                except RowSkip as s:
                    reason = reason or s.reason
            if not kept:
                empty = np.zeros(0, dtype=np.int64)
                out.append((int(indices[i]), Example(empty, empty, empty.astype(np.float64)),
                            reason or "no trained tokens"))
            else:
                out += [(int(indices[i]), ex, "") for ex in kept]
        return out

    def _stats(self, examples: list[tuple[int, Example, str]]) -> dict[str, list]:
        """The per-example columns other than the token arrays."""
        cols = {k: [] for k in COLUMNS[3:]}
        for row, ex, reason in examples:
            trained = ex.labels[ex.labels != IGNORE]
            cols["length"].append(len(ex.input_ids))
            cols["n_loss"].append(len(trained))
            cols["w_loss"].append(float(sum(ex.weights.tolist())))
            cols["truncated"].append(ex.truncated)
            cols["eos_trained"].append(bool(len(trained)) and int(trained[-1]) in self.end_ids)
            cols["skip"].append(reason)
            cols["row"].append(row)
            cols["extra"].append(ex.extra)
            cols["straddled"].append(ex.straddled)
            cols["note"].append(ex.note)
        return cols

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        examples = self.examples(batch)
        return {"input_ids": [ex.input_ids.tolist() for _, ex, _ in examples],
                "labels": [ex.labels.tolist() for _, ex, _ in examples],
                "weights": [ex.weights.tolist() for _, ex, _ in examples], **self._stats(examples)}

    def table(self, batch: dict[str, list]) -> pa.Table:
        """:meth:`__call__` as an Arrow table (what ``datasets.map`` writes, without Python lists)."""
        examples = self.examples(batch)
        lengths = np.fromiter((len(ex.input_ids) for _, ex, _ in examples), dtype=np.int64, count=len(examples))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

        def flat(name: str, dtype, pa_type) -> pa.ListArray:
            parts = [getattr(ex, name) for _, ex, _ in examples]
            values = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
            return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa_type))

        cols = {"input_ids": flat("input_ids", np.int32, pa.int32()), "labels": flat("labels", np.int32, pa.int32()),
                "weights": flat("weights", np.float32, pa.float32())}
        return pa.table({**cols, **self._stats(examples)})


Tokenizer = RowTokenizer
"""The earlier name (it tokenizes rows; it is not a tokenizer): kept for code written against it."""


def row_tokenizer(fmt: Format, tokenizer, max_length: int, *, on_bad_row: str, source: str):
    """The function that tokenizes a batch of ``fmt``'s rows (a dict of lists): the format's own
    (image conversations: :meth:`sftune.data.vision.VisionMessagesFormat.row_tokenizer`, which
    follows its own ``data.on_bad_row``), else a :class:`RowTokenizer`."""
    own = getattr(fmt, "row_tokenizer", None)
    return own(max_length, source) if own else RowTokenizer(fmt, tokenizer, max_length, on_bad_row=on_bad_row,
                                                             source=source)
