"""Unit tests of sftune.generation: batched greedy generation equals one prompt at a time and the
model's own generate(), cut at the first stop token; the streamer prints what generate returns."""

import io

import torch

from sftune.generation import Streamer, generate


def test_batched_equals_one_at_a_time_and_cuts_at_stops(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prompts = ["Hello world", "The quick brown fox jumps", "def add(a, b):"]
    batched = generate(model, tiny_tokenizer, prompts, max_new_tokens=8, add_bos=False)
    assert batched == [generate(model, tiny_tokenizer, [p], max_new_tokens=8, add_bos=False)[0] for p in prompts]
    ids = tiny_tokenizer(prompts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=[])[0, ids.shape[1]:]
    assert batched[0] == tiny_tokenizer.decode(new, clean_up_tokenization_spaces=False)  # no stop met in 8 tokens
    first = int(new[0])
    cut = generate(model, tiny_tokenizer, prompts[:1], max_new_tokens=8, add_bos=False, stops=[first])
    assert cut == [""]  # the first token is a stop: nothing is kept
    assert model.training is False


def test_streamer_prints_the_generated_text_without_the_prompt(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    out = io.StringIO()
    streamer = Streamer(tiny_tokenizer, {tiny_tokenizer.eos_token_id}, out=out)
    text = generate(model, tiny_tokenizer, ["Hello world"], max_new_tokens=6, add_bos=False, streamer=streamer)
    assert out.getvalue() == text[0] + "\n"
