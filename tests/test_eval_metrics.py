"""Unit tests of sftune.eval_metrics: exact and contains match, prompts and references as trained, and
the eval loss as a token-weighted mean that does not depend on the batch size."""

import pytest

from sftune.config import DataConfig
from sftune.data.formats import PromptCompletionFormat
from sftune.eval_metrics import eval_loss, generation_examples, generation_metrics, normalize, prompt_and_reference


def test_match_metrics():
    assert normalize("  Paris, FRANCE!  ") == "paris france"
    m = generation_metrics([" 42", "It is Paris.", "no"], ["42", "paris", "yes"])
    assert m == {"exact_match": pytest.approx(1 / 3), "contains_match": pytest.approx(2 / 3), "n": 3}
    assert generation_metrics([], [])["exact_match"] == 0.0


def test_prompt_and_reference_follow_the_format():
    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    ex = prompt_and_reference(fmt, {"instruction": "2+2?", "output": "4"})
    assert ex.prompt == "### Question: 2+2?\n ### Answer:" and ex.reference == " 4"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": None, "output": "x"}, {"instruction": "c", "output": "d"}]
    assert [e.prompt for e in generation_examples(fmt, rows, limit=5)] == [
        "### Question: a\n ### Answer:", "### Question: c\n ### Answer:"]  # a row that does not format is left out
    assert len(generation_examples(fmt, rows, limit=1)) == 1


def test_eval_loss_is_the_token_mean_whatever_the_batch_size(tiny_model_dir, qa_rows_file):
    import torch

    from sftune.config import load_config
    from sftune.data.one_source import prepare_data
    from sftune.loss import CausalLMWithLoss
    from sftune.model import load_model, load_tokenizer

    cfg = load_config(None, {"model.path": str(tiny_model_dir), "data.path": str(qa_rows_file), "data.template": "qa"})
    tok, _ = load_tokenizer(cfg)  # with the pad rule
    data = prepare_data(cfg.data, tok, 128)
    lm = CausalLMWithLoss(load_model(cfg, tok))
    kw = dict(max_length=128, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    one, eight = eval_loss(lm, data.train, batch_size=1, **kw), eval_loss(lm, data.train, batch_size=8, **kw)
    assert one["eval_tokens"] == eight["eval_tokens"] == int(sum((data.train.example(i)[1] != -100).sum()
                                                                for i in range(len(data.train))))
    assert one["eval_loss"] == pytest.approx(eight["eval_loss"], rel=1e-5)
    assert one["eval_ppl"] == pytest.approx(torch.tensor(one["eval_loss"]).exp().item(), rel=1e-6)
