"""Generation, below evaluation and inference: batched ``generate``, stop tokens, streaming.

Everything that turns prompts into text goes through :func:`generate`, so training-time samples,
``sftune eval``, ``sftune generate`` and ``sftune chat`` prompt and stop the same way. Prompts come
from the run's format (:mod:`sftune.data.formats`), the one owner of the prompt contract.
"""

from __future__ import annotations

import sys

import torch

from sftune import vision_inference
from sftune.data.formats import Format, end_of_turn_ids
from sftune.data.tokenize import special_prefix
from sftune.model import model_max_positions


def generate_with(fmt: Format, model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """:func:`generate` with ``fmt``'s BOS rule, stop tokens and image settings."""
    if getattr(fmt, "image_kwargs", None):  # data.image_max_pixels / image_min_pixels (sftune.data.vision)
        kwargs.setdefault("image_kwargs", fmt.image_kwargs)
    return generate(model, tokenizer, prompts, add_bos=fmt.add_bos, stops=fmt.stop_ids(tokenizer), **kwargs)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, add_bos: bool = True, streamer=None,
             synced: bool = False, stops: list[int] | None = None, images: list[list] | None = None,
             image_kwargs: dict | None = None) -> list[str]:
    """Generate a completion for each prompt (batched, left-padded), cut at the first stop token.

    Prompts are tokenized as training built its contexts: the format's BOS rule (``add_bos``) and
    no other special tokens (:func:`sftune.data.tokenize.encode_prompt`). ``stops``: the format's
    stop ids (:meth:`~sftune.data.formats.Format.stop_ids`); EOS and the usual end-of-turn tokens
    when not given.

    ``synced`` keeps every rank generating until all are done (sharded models: FSDP, ZeRO-3).
    ``images``: a list of images per prompt, for an image-text-to-text model (its processor encodes
    them: :mod:`sftune.vision_inference`).
    """
    device = next(model.parameters()).device
    prefix = special_prefix(tokenizer) if add_bos else []
    stops = sorted(stops) if stops else sorted(end_of_turn_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    max_positions = model_max_positions(model.config)
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (bool(images and images[i]), len(prompts[i])))  # less padding
    for idx in vision_inference.batches(order, batch_size, images):
        if images and images[idx[0]]:  # the processor expands the images (sftune.vision_inference)
            head = tokenizer.decode(prefix) if prefix else ""
            inputs = vision_inference.encode(tokenizer.sftune_processor, [head + prompts[i] for i in idx],
                                              [images[i] for i in idx], image_kwargs)
            width = inputs["input_ids"].shape[1]
        else:
            encoded = [prefix + e for e in tokenizer([prompts[i] for i in idx], add_special_tokens=False)["input_ids"]]
            width = max(len(e) for e in encoded)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for r, e in enumerate(encoded):
                input_ids[r, width - len(e):] = torch.as_tensor(e)
                attention[r, width - len(e):] = 1
            inputs = {"input_ids": input_ids, "attention_mask": attention}
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
        dtype = next(model.parameters()).dtype  # pixel values in the weights' dtype
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
        out = model.generate(**inputs, streamer=streamer, **kwargs)
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
