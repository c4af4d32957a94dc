"""Image conversations per model style: ids as the processor makes them, exact masks, image-safe cuts,
M-RoPE, and packed == unpacked (loss and gradients) through the images collator."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import vision_models as vm
from sftune.config import DataConfig
from sftune.data import vision_batch
from sftune.data.packing import collate
from sftune.data.tokenize import IGNORE
from sftune.data.vision import OUTSIDE, VisionMessagesFormat, VisionTokenizer
from sftune.vision_model import load_processor

CHAT_SPECIALS = {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<end_of_utterance>"}


def conversation(assistant_image: bool = False):
    """Two images, two assistant turns (the second after the second image)."""
    answer = [{"type": "text", "text": "blue"}] + ([{"type": "image"}] if assistant_image else [])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                {"role": "user", "content": [{"type": "text", "text": "and this?"}, {"type": "image"}]},
                {"role": "assistant", "content": answer}]
    images = [vm.image((56, 56), (220, 30, 30)), vm.image((28, 56), (30, 30, 220))]
    if assistant_image:
        images.append(vm.image((28, 28), (30, 200, 30)))
    return {"messages": messages, "images": images}


def tokenize(processor, rows, max_length=512, **data):
    fmt = VisionMessagesFormat(DataConfig(**data), processor, "messages")
    tk = VisionTokenizer(fmt, max_length, "test")
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    return fmt, tk.examples(batch), tk._payloads


@pytest.fixture(params=vm.STYLES)
def style(request, vlm):
    return request.param, vlm(request.param), load_processor(str(vlm(request.param)))


def image_ids(tok) -> set[int]:
    """Every special token a model's images are written with (image, vision start/end, tile tags)."""
    return {i for i, t in tok.added_tokens_decoder.items() if t.special and t.content not in CHAT_SPECIALS}


@pytest.mark.parametrize("assistant_image", [False, True])
def test_ids_are_the_processors_and_only_assistant_text_trains(style, assistant_image):
    name, _, processor = style
    row = conversation(assistant_image)
    _, out, payloads = tokenize(processor, [row])
    (_, ex, reason), = out
    assert reason == ""
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    want = processor(text=[text], images=row["images"], return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(ex.input_ids, want)  # what the model sees at inference
    tok = processor.tokenizer
    trained = ex.labels[ex.labels != IGNORE]
    assert tok.decode(trained) == "red<|im_end|>blue<|im_end|>"
    specials = image_ids(tok)
    on_images = np.isin(ex.input_ids, list(specials))
    assert on_images.sum() >= 3 * len(row["images"]) and not (ex.labels[on_images] != IGNORE).any()
    assert not ex.weights[on_images].any()
    assert vision_batch.n_images(payloads[0]) == len(row["images"])


def test_truncation_never_splits_an_image(vlm):
    processor = load_processor(str(vlm("qwen2_vl")))
    _, whole, _ = tokenize(processor, [conversation()])
    ids = np.asarray(whole[0][1].input_ids)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    second = np.flatnonzero(ids == pad)[-1]  # a cut inside the second image
    _, out, payloads = tokenize(processor, [conversation()], max_length=int(second))
    (_, ex, reason), = out
    assert reason == "" and ex.truncated and len(ex.input_ids) < second
    assert (np.asarray(ex.input_ids) == pad).sum() == 4  # the first image whole, nothing of the second
    assert processor.tokenizer.decode(ex.labels[ex.labels != IGNORE]) == "red<|im_end|>"
    d = vision_batch.decode(payloads[0])
    assert d[vision_batch.N_IMAGES] == 1 and d["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert d["pixel_values"].shape[0] == 16 and d[vision_batch.MROPE].shape == (3, len(ex.input_ids))
    _, out, _ = tokenize(processor, [conversation()], max_length=5)  # 4 + 2 + ... image tokens > 5
    assert out[0][2] == OUTSIDE


def test_image_max_pixels_changes_tokens_per_image(vlm):
    processor = load_processor(str(vlm("qwen2_vl")))
    _, _, big = tokenize(processor, [conversation()])
    _, _, small = tokenize(processor, [conversation()], image_max_pixels=28 * 28)
    assert vision_batch.decode(big[0])[vision_batch.TOKENS].tolist() == [6, 4]  # 4 + 2 pads, each + start/end
    assert vision_batch.decode(small[0])[vision_batch.TOKENS].tolist() == [3, 3]
    with pytest.raises(Exception, match="fixed size"):
        tokenize(load_processor(str(vlm("llava"))), [conversation()], image_max_pixels=28 * 28)


def test_mrope_positions_are_the_models(vlm):
    from transformers import AutoModelForImageTextToText

    path = vlm("qwen2_vl")
    processor = load_processor(str(path))
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    row = conversation()
    _, ((_, ex, _),), payloads = tokenize(processor, [row])
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    enc = processor(text=[text], images=row["images"], return_tensors="pt")
    want, _ = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"])
    np.testing.assert_array_equal(vision_batch.decode(payloads[0])[vision_batch.MROPE], want[:, 0].numpy())


def _rows(processor, n=3):
    rows = []
    for i in range(n):
        row = conversation()
        row["messages"][1]["content"][0]["text"] = ["red", "green", "blue dot"][i % 3]
        row["images"][0] = vm.image((56, 56), list(vm.COLOURS.values())[i % 4])  # each row its own first image
        rows.append(row)
    _, out, payloads = tokenize(processor, rows)
    return [(ex.input_ids.tolist(), ex.labels.tolist(), None, {"images": p})
            for (_, ex, _), p in zip(out, payloads)], rows


def _loss_and_grads(lm, rows, flat: bool):
    lm.model.zero_grad()
    b = collate(rows, pad_id=0)
    loss = lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets, b.doc_bounds if flat else None,
              model_inputs=b.model_inputs)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}


def test_packed_equals_unpacked_and_the_models_own_forward(style):
    from transformers import AutoModelForImageTextToText

    from sftune.attention import disable_varlen, enable_varlen
    from sftune.capabilities import capabilities
    from sftune.loss import CausalLMWithLoss

    name, path, processor = style
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)
    examples, rows = _rows(processor)
    # the reference: each conversation through the processor and the model's own forward (its own M-RoPE)
    ref = 0.0
    for ex, row in zip(examples, rows):
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        enc = processor(text=[text], images=row["images"], return_tensors="pt")
        assert enc["input_ids"][0].tolist() == ex[0]
        labels = torch.tensor([ex[1]])
        with torch.no_grad():
            logits = model(**enc).logits[0, :-1]
        ref += float(torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE, reduction="sum"))
    lm = CausalLMWithLoss(model, fused=True)
    one, g_one = _loss_and_grads(lm, [[e] for e in examples], flat=False)  # one example per row
    assert one == pytest.approx(ref, rel=1e-5)
    assert enable_varlen(model)
    try:
        packed, g_packed = _loss_and_grads(lm, [examples], flat=True)  # one flat row, per-example attention
    finally:
        disable_varlen(model)
    assert packed == pytest.approx(one, rel=1e-5)
    assert g_one.keys() == g_packed.keys() and any("visual" in k or "vision" in k for k in g_one)
    for k in g_one:
        torch.testing.assert_close(g_packed[k], g_one[k], rtol=1e-4, atol=1e-6, msg=k)
    if "rows" in capabilities(model).layouts:  # several examples in a row, masks from the restarting positions
        rows, g_rows = _loss_and_grads(lm, [examples[:2], examples[2:]], flat=False)
        assert rows == pytest.approx(one, rel=1e-5)
        for k in g_one:
            torch.testing.assert_close(g_rows[k], g_one[k], rtol=1e-4, atol=1e-6, msg=k)


def vlm_tokenizer(path):
    from transformers import AutoTokenizer

    from sftune.model import ready_tokenizer
    from sftune.vision_model import attach_processor

    tok = AutoTokenizer.from_pretrained(str(path))
    ready_tokenizer(tok)
    assert attach_processor(str(path), tok)
    return tok


def test_prepared_data_carries_images_and_reports_them(vlm, tmp_path):
    from sftune.data.one_source import prepare_data

    data = vm.write_data(tmp_path, n=6)
    tok = vlm_tokenizer(vlm("llava"))
    prepared = prepare_data(DataConfig(path=str(data)), tok, 256)
    assert prepared.train.has_extras and len(prepared.train) == 6
    d = vision_batch.decode(prepared.train.extras(2)["images"])  # every third row has two images
    assert d["pixel_values"].shape == (2, 3, 28, 28)
    assert prepared.report.images == {"images": 8, "examples": 6, "image_tokens": 32,
                                      "tokens_per_image": {"min": 4, "mean": 4.0, "max": 4}}


def test_image_rows_in_a_mixture(vlm, tmp_path):
    """data.sources: each source's images relative to its own file, ShareGPT beside TRL's layout."""
    from sftune.config import load_config
    from sftune.data.chain import prepare

    trl = vm.write_data(tmp_path / "a", n=4)
    share = vm.write_data(tmp_path / "b", n=3, layout="sharegpt")
    inline = vm.write_data(tmp_path / "c", n=3, layout="inline")
    tok = vlm_tokenizer(vlm("qwen2_vl"))
    cfg = load_config(None, {"model.path": str(vlm("qwen2_vl")), "data.sources": [
        {"path": str(trl), "weight": 1}, {"path": str(share), "weight": 1}, {"path": str(inline), "weight": 1}]})
    data = prepare(cfg.data, tok, 256, seed=0)
    assert data.train.has_extras and len(data.train) == 10
    counts = [vision_batch.n_images(data.train.extras(i)["images"]) for i in range(len(data.train))]
    assert sorted(counts) == [1] * 7 + [2] * 3
    assert data.report.images["images"] == 13 and data.report.images["examples"] == 10


def test_a_stream_of_image_rows_gives_the_in_memory_examples(vlm, tmp_path):
    """data.streaming: each source's rows through the format's own row tokenizer (images relative to
    its own file) give the in-memory examples (ids, labels, payload); the payload survives the
    position's pickle, and the report counts the images trained."""
    import pickle

    from sftune.config import load_config
    from sftune.data.chain import plan, prepare
    from sftune.data.one_source import prepare_data

    files = [vm.write_data(tmp_path / "a", n=4), vm.write_data(tmp_path / "b", n=3, layout="sharegpt")]
    tok = vlm_tokenizer(vlm("qwen2_vl"))
    cfg = load_config(None, {"model.path": str(vlm("qwen2_vl")), "data.streaming": True, "data.shuffle_buffer": 1,
                             "train.max_steps": 2, "train.batch_size": 2, "data.pack_buffer": 4,
                             "data.sources": [{"path": str(f), "weight": 1} for f in files]})
    data = prepare(cfg.data, tok, 256, seed=0)
    memory = []
    for f in files:
        t = prepare_data(DataConfig(path=str(f), on_bad_row="error"), tok, 256).train
        memory.append({int(t.rows[i]): (*t.example(i), t.extras(i)) for i in range(len(t))})
    stream = data.stream()
    examples = [stream.next_example() for _ in range(10)]
    assert {e.source for e in examples} == {0, 1}
    for e in examples:
        ids, labels, extras = memory[e.source][e.row]
        np.testing.assert_array_equal(e.ids, ids)
        np.testing.assert_array_equal(e.labels, labels)
        a, b = vision_batch.decode(e.extras["images"]), vision_batch.decode(extras["images"])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    state = pickle.loads(pickle.dumps(stream.state_dict()))  # what a checkpoint saves
    ahead = [stream.next_example() for _ in range(6)]
    again = data.stream()
    again.load_state_dict(state)
    for x, y in zip(ahead, [again.next_example() for _ in range(6)]):
        assert (x.source, x.row) == (y.source, y.row) and x.extras == y.extras and np.array_equal(x.ids, y.ids)
    feed = plan(cfg, data, tok.pad_token_id)
    trained = [feed.rows(step)[0] for step in range(2)]
    n = sum(vision_batch.n_images(d.extras(i)["images"]) for d in trained for i in range(len(d)))
    sources = feed.finish()
    assert feed.report.images["images"] == n == sum(s["images_trained"] for s in sources) and n > 0
    assert feed.report.images["tokens_per_image"]["max"] >= feed.report.images["tokens_per_image"]["min"] > 0


def test_parquet_with_datasets_images_and_bad_image_rows(vlm, tmp_path):
    """Parquet keeps images as datasets Image values; a row whose image is missing is a clear error
    naming the row and column, or with data.on_bad_row=skip a counted skip."""
    import io
    import json

    import datasets

    from sftune.data.one_source import prepare_data
    from sftune.errors import DataError

    rows = []
    for colour in ("red", "blue"):
        buf = io.BytesIO()
        vm.image((56, 56), vm.COLOURS[colour]).save(buf, format="PNG")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                               {"type": "text", "text": "Colour?"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": colour}]}],
                     "images": [{"bytes": buf.getvalue(), "path": None}]})
    ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    tok = vlm_tokenizer(vlm("qwen2_vl"))
    prepared = prepare_data(DataConfig(path=str(tmp_path / "train.parquet")), tok, 256)
    assert prepared.report.images["images"] == 2 and len(prepared.train) == 2

    data = vm.write_data(tmp_path / "j", n=3)
    lines = data.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["images"] = ["img/nowhere.png"]
    data.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(data)), tok, 256)
    assert "row 1" in str(e.value) and "images" in str(e.value) and "nowhere.png" in str(e.value)
    skipped = prepare_data(DataConfig(path=str(data), on_bad_row="skip"), tok, 256)
    assert len(skipped.train) == 2 and sum(skipped.report.skipped.values()) == 1


def test_inference_prompt_and_reference_of_an_image_row(vlm):
    """prompt(row): the template's text up to the last assistant turn, each image as the template
    writes it (the processor expands it at generation); reference(row): the reply's text."""
    processor = load_processor(str(vlm("qwen2_vl")))
    fmt = VisionMessagesFormat(DataConfig(), processor, "messages")
    row = conversation()
    prompt = fmt.prompt(row)
    want = processor.apply_chat_template(row["messages"][:3], tokenize=False, add_generation_prompt=True)
    assert prompt == want and prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert fmt.reference(row) == "blue" and len(fmt.images_of(row)) == 2


def test_dict_form_carries_the_payloads(vlm):
    """The ``datasets.map`` dict form (what streams read) has ``extra_images`` beside each example."""
    processor = load_processor(str(vlm("llava")))
    fmt = VisionMessagesFormat(DataConfig(), processor, "messages")
    text_only = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "images": []}
    out = VisionTokenizer(fmt, 512, "t")({k: [conversation()[k], text_only[k]] for k in ("messages", "images")})
    assert len(out["extra_images"]) == len(out["input_ids"]) == 2
    assert vision_batch.n_images(out["extra_images"][0]) == 2 and out["extra_images"][1] is None


def test_max_length_below_every_prompt_counts_image_tokens(vlm, tmp_path):
    """Every example skipped for its prompt: the error's numbers count the expanded image tokens."""
    from sftune.data.one_source import prepare_data
    from sftune.errors import DataError

    data = vm.write_data(tmp_path, n=3)
    tok = vlm_tokenizer(vlm("idefics3"))
    with pytest.raises(DataError, match=r"shortest prompt is (\d+) tokens") as e:
        prepare_data(DataConfig(path=str(data)), tok, 40)
    shortest = int(re.search(r"shortest prompt is (\d+) tokens", str(e.value)).group(1))
    assert shortest > 40  # an image alone is several tiles of 4 tokens with their tags


def test_a_template_that_drops_images_is_a_bad_row(vlm):
    """A chat template that does not write image parts (a text template set by hand) would train the
    row without its images: a clear bad row instead."""
    processor = load_processor(str(vlm("llava")))
    processor.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\\n{% for p in m['content'] %}"
                                         "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>\\n"
                                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")
    try:
        _, out, _ = tokenize(processor, [conversation()], on_bad_row="skip")
        assert "chat template wrote 0 of the 2 images" in out[0][2]
    finally:
        processor.tokenizer.chat_template = processor.chat_template
