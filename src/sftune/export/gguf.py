"""GGUF export (llama.cpp, Ollama, LM Studio) through the ``gguf`` package's ``GGUFWriter``.

One small table per family says which Hugging Face tensor becomes which GGUF tensor, and what
llama.cpp expects done to it on the way (Llama's q/k rows permuted for its interleaved RoPE, Gemma's
norms stored as ``1 + w``, GPT-2's ``Conv1D`` weights transposed). The metadata is written from the
model config; the tokenizer (byte-level BPE as ``gpt2``, SentencePiece-style as ``llama``) with its
merges, token types and special ids; and, from the run's format (the one owner of the prompt
contract), the chat template and the end-of-turn token.

Written and checked round-trip (``transformers`` loads the file back, logits compared in the
tests): GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 (text). Anything else is refused
with a :class:`~sftune.errors.ConfigError` rather than written unchecked.

What transformers 5.24's GGUF reader (its legacy path, which needs the ``gguf`` package) can check:
it loads llama, qwen2, qwen3, gemma2, gemma3 and gpt2 files, dequantizing F16/BF16/Q8_0; it has no
Gemma 1; Mistral is llama to llama.cpp, so it comes back as ``LlamaForCausalLM`` (the same
computation); it does not read Qwen3's ``key_length`` (its head_dim default, 128, is what Qwen3
models use), Gemma's attention scale or soft-capping (their defaults), nor GPT-2's context length
(it assumes 1024 positions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftune.data.formats import Format
from sftune.errors import ConfigError, SftuneError

QUANTS = ("f16", "bf16", "q8_0")

_DECODER = [  # Llama-style decoders: HF name (after the layer index) -> GGUF name
    (r"model\.embed_tokens\.", "token_embd."),
    (r"model\.norm\.", "output_norm."),
    (r"lm_head\.", "output."),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"blk.\1.attn_norm."),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.", r"blk.\1.attn_q."),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.", r"blk.\1.attn_k."),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.", r"blk.\1.attn_v."),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.", r"blk.\1.attn_output."),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.", r"blk.\1.attn_q_norm."),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.", r"blk.\1.attn_k_norm."),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.", r"blk.\1.ffn_gate."),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.", r"blk.\1.ffn_up."),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"blk.\1.ffn_down."),
]
_LLAMA = _DECODER + [(r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"blk.\1.ffn_norm.")]
_GEMMA = _DECODER + [
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"blk.\1.post_attention_norm."),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.", r"blk.\1.ffn_norm."),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.", r"blk.\1.post_ffw_norm."),
]
_GPT2 = [
    (r"transformer\.wte\.", "token_embd."),
    (r"transformer\.wpe\.", "position_embd."),
    (r"transformer\.ln_f\.", "output_norm."),
    (r"lm_head\.", "output."),
    (r"transformer\.h\.(\d+)\.ln_1\.", r"blk.\1.attn_norm."),
    (r"transformer\.h\.(\d+)\.attn\.c_attn\.", r"blk.\1.attn_qkv."),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.", r"blk.\1.attn_output."),
    (r"transformer\.h\.(\d+)\.ln_2\.", r"blk.\1.ffn_norm."),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.", r"blk.\1.ffn_up."),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.", r"blk.\1.ffn_down."),
]
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


@dataclass
class Family:
    arch: str  # llama.cpp's architecture name
    names: list[tuple[str, str]]
    permute_qk: bool = False  # llama.cpp's llama graph uses interleaved RoPE
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    transpose: tuple[str, ...] = ()  # GPT-2's Conv1D stores (in, out)
    keys: list[str] = field(default_factory=list)


FAMILIES = {
    "gpt2": Family("gpt2", _GPT2, transpose=("attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
                                             "ffn_down.weight")),
    "llama": Family("llama", _LLAMA, permute_qk=True),
    "mistral": Family("llama", _LLAMA, permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": Family("qwen2", _LLAMA),
    "qwen3": Family("qwen3", _LLAMA),
    "gemma2": Family("gemma2", _GEMMA, norm_plus_one=True),
    "gemma3_text": Family("gemma3", _GEMMA, norm_plus_one=True),
}
REFUSED = {
    "gemma": "transformers cannot load Gemma 1 GGUF files back, so the export could not be checked",
    "gemma3": "this is the multimodal Gemma 3; export a text-only Gemma3ForCausalLM",
}


def family_of(config) -> Family:
    """The family's writer, or a :class:`ConfigError` saying why this model cannot be written."""
    mt = getattr(config, "model_type", None)
    hint = (f"\n  → GGUF export supports {', '.join(sorted(FAMILIES))} (without RoPE scaling other than "
            "linear); use the Hugging Face export (--format hf) with llama.cpp's own converter otherwise")
    if mt not in FAMILIES:
        why = REFUSED.get(mt, "sftune has no GGUF tensor mapping for it")
        raise ConfigError(f"cannot write GGUF for model type '{mt}': {why}.{hint}")
    params = getattr(config.get_text_config(), "rope_parameters", None) or {}
    for rope in (params.values() if "full_attention" in params else [params]):
        kind = (rope or {}).get("rope_type", "default")
        if kind not in ("default", "linear"):
            raise ConfigError(f"cannot write GGUF for this {mt} model: its RoPE scaling '{kind}' needs metadata "
                              f"(or llama.cpp's rope_freqs tensor) that transformers cannot read back, so the "
                              f"export could not be checked.{hint}")
    return FAMILIES[mt]


def check_writable(model, tokenizer) -> None:
    """Refuse (a :class:`ConfigError`) before anything is written: the family, its RoPE, the tokenizer."""
    family_of(model.config)
    tokenizer_metadata(tokenizer, model.get_input_embeddings().weight.shape[0])


# ----------------------------------------------------------------------------- tensors


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (per head: [x0..x(d/2), y..] -> [x0,y0,..])."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, fam: Family) -> list[tuple[str, np.ndarray]]:
    """``(gguf_name, float32 array)`` for every weight, transformed as llama.cpp expects."""
    cfg = model.config
    tied = bool(getattr(cfg.get_text_config(), "tie_word_embeddings", False))
    n_head = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    out = []
    for name, tensor in model.state_dict().items():
        if _IGNORED.search(name) or (tied and name.startswith("lm_head.")):
            continue
        new = None
        for pattern, repl in fam.names:
            if re.match(pattern, name):
                new = re.sub(pattern, repl, name, count=1)
                break
        if new is None:
            raise SftuneError(f"GGUF export: no GGUF name for the tensor '{name}' of this {fam.arch} model "
                              "(a variant sftune does not know)")
        data = tensor.detach().float().cpu().numpy()
        if fam.permute_qk and new.endswith(("attn_q.weight", "attn_q.bias")):
            data = _permute(data, n_head)
        elif fam.permute_qk and new.endswith(("attn_k.weight", "attn_k.bias")):
            data = _permute(data, n_kv)
        if fam.norm_plus_one and new.endswith("norm.weight"):
            data = data + 1.0
        if new.endswith(fam.transpose):
            data = data.T
        out.append((new, np.ascontiguousarray(data, dtype=np.float32)))
    return out


def _qtype(name: str, data: np.ndarray, quant: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim < 2:
        return Q.F32  # norms and biases stay full precision, as in llama.cpp
    if quant == "q8_0":
        return Q.Q8_0 if data.shape[-1] % 32 == 0 else Q.F16  # Q8_0 packs rows in blocks of 32
    return Q.BF16 if quant == "bf16" else Q.F16


# ----------------------------------------------------------------------------- metadata


def _model_metadata(w, fam: Family, cfg) -> None:
    c = cfg.get_text_config()
    if fam.arch == "gpt2":
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        return
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads or c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    params = getattr(c, "rope_parameters", None) or {}
    rope = params.get("full_attention", params) if isinstance(params, dict) else {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    w.add_rope_freq_base(float(theta))
    if isinstance(params, dict) and "sliding_attention" in params:  # Gemma 3's local layers
        w.add_rope_freq_base_swa(float(params["sliding_attention"].get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear" and rope.get("factor"):
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if fam.arch == "llama":
        w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if fam.arch in ("gemma2", "gemma3") and getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    if fam.arch == "gemma2":
        if c.attn_logit_softcapping:
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        if c.final_logit_softcapping:
            w.add_final_logit_softcapping(c.final_logit_softcapping)


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer's split regex (matched against the names transformers knows)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre else []
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and isinstance(p.get("pattern"), dict)]
    if not splits:
        return "gpt-2"  # ByteLevel's own regex
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # pragma: no cover - older transformers
        GGUF_PRE_TOKENIZER_SPLITS = {}
    for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o", *GGUF_PRE_TOKENIZER_SPLITS):
        if GGUF_PRE_TOKENIZER_SPLITS.get(name) == splits[0]:
            return name
    from sftune.console import console

    console.print("[yellow]warning:[/] GGUF export: the tokenizer's split regex is not one llama.cpp names; "
                  "writing pre='default', so llama.cpp may split text differently")
    return "default"


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """The ``tokenizer.ggml.*`` values for a fast tokenizer: model, pre, tokens, types, scores, merges."""
    import json

    import gguf

    T = gguf.TokenType
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast (tokenizers) tokenizer; this one is a Python tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export: tokenizer model '{model.get('type')}' is not supported (BPE only)")
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    byte_level = "ByteLevel" in text
    if not byte_level and "Metaspace" not in text and not model.get("byte_fallback"):
        raise ConfigError("GGUF export: the tokenizer is neither byte-level BPE nor SentencePiece-style BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= {t for t in tokenizer.all_special_tokens if t}
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            scores.append(-1e9)
            continue
        tokens.append(t)
        scores.append(-float(rank[t]) if t in rank else 0.0)
        if t == model.get("unk_token"):
            types.append(T.UNKNOWN)
        elif t in specials:
            types.append(T.CONTROL)
        elif t in added:
            types.append(T.USER_DEFINED)
        elif not byte_level and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    meta = {"model": "gpt2" if byte_level else "llama", "tokens": tokens, "types": types, "merges": merges}
    if byte_level:
        meta["pre"] = _pre_tokenizer_name(spec)
    else:
        meta["scores"] = scores
        pre, norm = json.dumps(spec.get("pre_tokenizer")), json.dumps(spec.get("normalizer"))
        meta["add_space_prefix"] = ("Metaspace" in pre and '"never"' not in pre) or "Prepend" in norm
    return meta


# ----------------------------------------------------------------------------- writing


def write_gguf(model, tokenizer, fmt: Format, path: Path, *, quant: str = "f16", name: str = "model") -> Path:
    """Write ``model`` (plain weights, LoRA merged) with its tokenizer and the run's prompt format."""
    try:
        import gguf
    except ImportError:
        raise SftuneError("GGUF export needs the gguf package\n  → pip install 'sftune[gguf]'") from None
    from sftune.data.tokenize import special_prefix

    if quant not in QUANTS:
        raise ConfigError(f"GGUF export: unknown quantization '{quant}'; use one of {', '.join(QUANTS)}")
    fam = family_of(model.config)
    tensors = gguf_tensors(model, fam)
    vocab_size = dict(tensors)["token_embd.weight"].shape[0]
    tok = tokenizer_metadata(tokenizer, vocab_size)

    path = Path(path)
    w = gguf.GGUFWriter(str(path), fam.arch)
    w.add_name(name)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _model_metadata(w, fam, model.config)
    w.add_vocab_size(vocab_size)
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
        w.add_add_space_prefix(bool(tok["add_space_prefix"]))
    if tok["merges"]:
        w.add_token_merges(tok["merges"])
    ids = gguf_special_ids(tokenizer, fmt)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                     ("unk", w.add_unk_token_id), ("eot", w.add_eot_token_id)):
        if ids.get(key) is not None:
            add(ids[key])
    add_bos = bool(fmt.add_bos and special_prefix(tokenizer))
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    template = fmt.export_chat_template(tokenizer)
    if template and add_bos and template.startswith("{{ bos_token }}"):  # llama.cpp and Ollama add BOS
        template = template[len("{{ bos_token }}"):]  # themselves (add_bos_token), and the space prefix
        template = template[1:] if template.startswith(" ") else template
    if template:
        w.add_chat_template(template)
    for tname, data in tensors:
        qtype = _qtype(tname, data, quant)
        if qtype in (gguf.GGMLQuantizationType.F32,):
            w.add_tensor(tname, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(tname, data.astype(np.float16))
        else:
            w.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_special_ids(tokenizer, fmt: Format) -> dict:
    """bos/eos/pad/unk ids, and ``eot``: the format's end-of-turn token when it is not EOS."""
    eos = tokenizer.eos_token_id
    stops = [s for s in fmt.stop_ids(tokenizer) if s != eos]
    template = fmt.export_chat_template(tokenizer) or ""
    written = [s for s in stops if tokenizer.convert_ids_to_tokens(s) in template]
    eot = (written or stops or [None])[0]
    return {"bos": tokenizer.bos_token_id, "eos": eos, "pad": tokenizer.pad_token_id,
            "unk": tokenizer.unk_token_id, "eot": eot}
