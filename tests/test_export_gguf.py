"""GGUF export: each family written with sftune's mapping loads back in transformers with the same
logits; tokenizers round-trip; unsupported families are refused; ``sftune export --format gguf
--verify`` end to end with lineage (the Ollama template's unit tests: test_export_ollama.py)."""

import copy
import json

import pytest
import torch

pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'sftune[gguf]')")

from sftune.cli import main  # noqa: E402
from sftune.config import DataConfig, load_config  # noqa: E402
from sftune.data.formats import MessagesFormat, format_from_identity  # noqa: E402
from sftune.data.templates import resolve_chat_template  # noqa: E402
from sftune.export.gguf import FAMILIES, gguf_tensors, write_gguf  # noqa: E402

from conftest import CORPUS, write_jsonl  # noqa: E402

Q8_0_TOL = 0.05  # max |Δlogit| / max(1, max |logit|); the tiny models below measure 0.006-0.017

DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    # transformers' GGUF reader gives GPT-2 its default 1024 positions, so the tiny model keeps them
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
    "llama": DECODER,
    "mistral": DECODER,
    "qwen2": DECODER,
    "qwen3": dict(DECODER, head_dim=128),  # the reader does not read Qwen3's head_dim: keep the default
    "gemma2": dict(DECODER, head_dim=32),
    "gemma3_text": dict(DECODER, head_dim=32),
}


def tiny_model(model_type: str, tokenizer, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **{**CONFIGS[model_type], **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases and norms away from their init, so a mapping slip shows in the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def spm_tokenizer(path):
    """A SentencePiece-style (Llama 2 / Mistral / Gemma) tokenizer: BPE with byte fallback and ▁."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            add_bos_token=True).save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def rounded(model, quant):
    """The model with its matrices rounded as the file stores them (norms and biases stay f32)."""
    ref = copy.deepcopy(model)
    dt = {"f16": torch.float16, "bf16": torch.bfloat16}[quant]
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() >= 2:
                p.copy_(p.to(dt).float())
    return ref


FAST = [(f, q) for f in CONFIGS for q in ("f16", "q8_0")] + [("llama", "bf16")]
SLOW = [(f, "bf16") for f in CONFIGS if f != "llama"]


@pytest.mark.parametrize("family,quant", FAST + [pytest.param(f, q, marks=pytest.mark.slow) for f, q in SLOW])
def test_gguf_round_trip_logits(family, quant, tiny_tokenizer, tmp_path):
    model = tiny_model(family, tiny_tokenizer)
    path = write_gguf(model, tiny_tokenizer, format_from_identity(None, tiny_tokenizer), tmp_path / "m.gguf",
                      quant=quant)
    loaded = load_gguf(path)
    ids = torch.tensor([tiny_tokenizer("The quick brown fox, héllo 日本語 🙂")["input_ids"]])
    with torch.no_grad():
        got = loaded(ids).logits
        if quant == "q8_0":
            want = model(ids).logits
            assert (got - want).abs().max() <= Q8_0_TOL * max(1.0, want.abs().max().item())
        else:  # exact up to dtype: the same rounded weights, computed in float32
            torch.testing.assert_close(got, rounded(model, quant)(ids).logits, rtol=0, atol=1e-5)


def test_mapping_agrees_with_the_gguf_package(tiny_tokenizer):
    """Our own small per-family table names every tensor as gguf-py's reference table does."""
    import gguf

    for family in CONFIGS:
        model = tiny_model(family, tiny_tokenizer)
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == FAMILIES[family].arch)
        ref = gguf.get_tensor_name_map(arch, model.config.get_text_config().num_hidden_layers)
        ours = dict(gguf_tensors(model, FAMILIES[family]))
        hf_names = [n for n in model.state_dict() if n.endswith((".weight", ".bias"))]
        expected = {ref.get_name(n.rsplit(".", 1)[0]) + "." + n.rsplit(".", 1)[1] for n in hf_names
                    if ref.get_name(n.rsplit(".", 1)[0]) and not (n.startswith("lm_head") and "output.weight" not in ours)}
        assert set(ours) == expected, family


@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_gguf_tokenizer_round_trip(style, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = copy.deepcopy(tiny_tokenizer) if style == "byte-level" else spm_tokenizer(tmp_path / "spm")  # session fixture
    tok.chat_template = resolve_chat_template("simple")[0]
    fmt = MessagesFormat(DataConfig(), tok, "messages")
    path = write_gguf(tiny_model("llama", tok), tok, fmt, tmp_path / "m.gguf")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["The quick brown fox jumps.", "Hello world! héllo 日本語 🙂", "  two spaces\n\nand lines",
                 "def add(a, b):\n    return a + b"]:
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    from transformers.integrations.gguf import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path))
    assert meta["tokenizer.ggml.model"] == ("gpt2" if style == "byte-level" else "llama")
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id


def test_unsupported_family_is_a_clear_error(tiny_tokenizer, tmp_path, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    src = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(str(src))
    tiny_tokenizer.save_pretrained(str(src))
    assert main(["export", str(src), "--out", str(tmp_path / "out"), "--format", "gguf"]) == 2
    out = capsys.readouterr()
    assert "cannot write GGUF for model type 'gpt_neox'" in out.out + out.err
    assert "Traceback" not in out.out + out.err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_rope_scaling_that_cannot_be_checked_is_refused():
    from transformers import LlamaConfig

    from sftune.errors import ConfigError
    from sftune.export.gguf import family_of

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    with pytest.raises(ConfigError, match="RoPE scaling 'llama3'"):
        family_of(LlamaConfig(rope_parameters=rope))
    assert family_of(LlamaConfig()).arch == "llama"


@pytest.fixture(scope="module")
def spm_llama_run(tmp_path_factory):
    """A LoRA run on a tiny Llama with a SentencePiece-style tokenizer that adds BOS, qa format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftune.training import train

    root = tmp_path_factory.mktemp("spm-run")
    tok = spm_tokenizer(root / "base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 **DECODER)).save_pretrained(str(root / "base"))
    data = write_jsonl(root / "qa.jsonl", [{"instruction": f"question {i}", "output": f"answer {i} " * 3}
                                           for i in range(12)])
    train(load_config(None, {"model.path": str(root / "base"), "data.path": str(data), "data.template": "qa",
                             "train.output_dir": str(root / "run"), "train.max_steps": 2, "train.lr": 1e-2,
                             "lora.enabled": True, "lora.r": 4}))
    return root


def test_export_gguf_verify_end_to_end(spm_llama_run, tmp_path, capsys):
    run, out = spm_llama_run / "run", tmp_path / "out"
    assert main(["export", str(run), "--out", str(out), "--format", "gguf", "--quant", "q8_0", "--verify"]) == 0
    cap = capsys.readouterr()
    printed = cap.out + cap.err
    assert "verify: PASS" in printed and "PASS GGUF logits (q8_0)" in printed and "FAIL" not in printed
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile
    assert 'TEMPLATE """### Question: {{ .Prompt }}\n ### Answer:{{ .Response }}"""' in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile
    lineage = json.loads((out / "sftune_lineage.json").read_text())
    assert lineage["base_model"] == str(spm_llama_run / "base") and lineage["lora"] is True
    assert lineage["format"]["identity"]["template"] == "qa" and len(lineage["format"]["hash"]) == 64
    assert lineage["data"]["sha256"] and lineage["gguf"] == {"file": "model-q8_0.gguf", "quant": "q8_0"}
    assert lineage["sftune_version"]
    assert json.loads((run / "sftune_lineage.json").read_text())["format"]["hash"] == lineage["format"]["hash"]
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert set(lineage["stop_ids"]) <= set(eos)


def test_verify_fails_when_the_exported_template_drifts(spm_llama_run, tmp_path):
    from sftune.export.hf import export_run
    from sftune.export.verify import verify_export

    out = export_run(str(spm_llama_run / "run"), str(tmp_path / "out"))
    assert verify_export(str(spm_llama_run / "run"), out).ok
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg.get("chat_template", "").replace("{{ bos_token }}", "")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    if (out / "chat_template.jinja").exists():  # where transformers 5 keeps it
        (out / "chat_template.jinja").write_text((out / "chat_template.jinja").read_text().replace("{{ bos_token }}", ""))
    result = verify_export(str(spm_llama_run / "run"), out)
    assert not result.ok
    assert any("FAIL row 0 (chat template): token 0 differs" in line for line in result.lines)


def test_chat_run_export_gguf_verify(tiny_model_dir, tmp_path, capsys):
    """A chatml run on the tiny GPT-2: the Modelfile is a per-role Go template, stops include <|im_end|>."""
    from sftune.training import train

    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                               {"role": "assistant", "content": f"hello {i}"}]}
                                                 for i in range(8)])
    run, out = tmp_path / "run", tmp_path / "out"
    train(load_config(None, {"model.path": str(tiny_model_dir), "data.path": str(data), "data.chat_template": "chatml",
                             "train.output_dir": str(run), "train.max_steps": 1}))
    assert main(["export", str(run), "--out", str(out), "--format", "gguf", "--verify"]) == 0
    cap = capsys.readouterr()
    assert "verify: PASS" in cap.out + cap.err
    assert "SKIP GGUF logits" in cap.out + cap.err  # this GPT-2 has 256 positions; transformers assumes 1024
    modelfile = (out / "Modelfile").read_text()
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    from transformers.integrations.gguf import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(out / "model-f16.gguf"))
    assert meta["tokenizer.ggml.eot_token_id"] == json.loads((out / "sftune_lineage.json").read_text())["stop_ids"][-1]
