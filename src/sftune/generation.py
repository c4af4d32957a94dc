"""Generation, below evaluation and inference: batched ``generate``, stop tokens, streaming.

Everything that turns prompts into text goes through :func:`generate`, so training-time samples,
``sftune eval``, ``sftune generate`` and ``sftune chat`` prompt and stop the same way. Prompts come
from the run's format (:mod:`sftune.data.formats`), the one owner of the prompt contract.
"""

from __future__ import annotations

import sys

import torch

from sftune.data.formats import Format, end_of_turn_ids
from sftune.data.tokenize import special_prefix
from sftune.model import model_max_positions


def generate_with(fmt: Format, model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """:func:`generate` with ``fmt``'s BOS rule and stop tokens."""
    return generate(model, tokenizer, prompts, add_bos=fmt.add_bos, stops=fmt.stop_ids(tokenizer), **kwargs)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, add_bos: bool = True, streamer=None,
             synced: bool = False, stops: list[int] | None = None) -> list[str]:
    """Generate a completion for each prompt (batched, left-padded), cut at the first stop token.

    Prompts are tokenized as training built its contexts: the format's BOS rule (``add_bos``) and
    no other special tokens (:func:`sftune.data.tokenize.encode_prompt`). ``stops``: the format's
    stop ids (:meth:`~sftune.data.formats.Format.stop_ids`); EOS and the usual end-of-turn tokens
    when not given.

    ``synced`` keeps every rank generating until all are done (sharded models: FSDP, ZeRO-3).
    """
    device = next(model.parameters()).device
    prefix = special_prefix(tokenizer) if add_bos else []
    stops = sorted(stops) if stops else sorted(end_of_turn_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    max_positions = model_max_positions(model.config)
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        encoded = tokenizer([prompts[i] for i in idx], add_special_tokens=False)["input_ids"]
        encoded = [prefix + e for e in encoded]
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for r, e in enumerate(encoded):
            input_ids[r, width - len(e):] = torch.as_tensor(e)
            attention[r, width - len(e):] = 1
        budget = max_new_tokens if max_positions is None else min(max_new_tokens, max_positions - width)
        if budget <= 0:
            continue  # the prompt alone fills the model's context
        kwargs = dict(max_new_tokens=budget, eos_token_id=stops, pad_token_id=pad)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if synced:
            kwargs["synced_gpus"] = True
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             streamer=streamer, **kwargs)
        for r, i in enumerate(idx):
            new = out[r, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            outputs[i] = tokenizer.decode(new[:cut], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    model.train(was_training)
    return outputs



class Streamer:
    """Prints new text as it is generated (stdout), cutting at stop tokens."""

    def __init__(self, tokenizer, stops: set[int], out=sys.stdout):
        self.tokenizer, self.stops, self.out = tokenizer, stops, out
        self.ids: list[int] = []
        self.printed = 0
        self.first = True
        self.stopped = False

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        for t in value.reshape(-1).tolist():
            if self.stopped or t in self.stops:
                self.stopped = True
                return
            self.ids.append(t)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()
