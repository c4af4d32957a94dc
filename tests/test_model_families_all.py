"""Every causal-LM family the installed transformers offers: exact or refused with a message.

``test_model_families.py`` names the families people fine-tune, with hand-written configs. This
suite takes every entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` instead, builds it as a tiny random
model from its config class (sizes shrunk generically: hidden 64, 2 layers, 4 heads, vocab 300, ...)
and holds sftune to one claim: the start-up probe picks a row layout and loss (or refuses with a
message, never a traceback), and one training step's loss and gradient through that layout equal
plain transformers run one example at a time with eager attention. A family that plain
transformers cannot build or run tiny on CPU is skipped with its reason (every skip is listed by
``-rs``). It also checks that the loss wrapper finds every family's body (``last_hidden_state``).

Slow (a few minutes on 2 cores) and opt-in, so the default suite keeps its time: it runs when
selected with ``-m slow`` or ``-k families_all`` (``python -m pytest -m slow -k families_all -rs``),
and is otherwise skipped with that hint.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from test_model_families import examples, probe, reference, run_layout

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, INTER, POSITIONS, WINDOW = 64, 2, 4, 2, 16, 300, 128, 128, 8
MAX_PARAMS = 8_000_000
"""A shrunk model larger than this kept a size this scan does not know: skipped (named in the reason)."""

SIZES = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "hidden_dim", "model_dim", "n_embed",
                     "word_embed_proj_dim", "d_embed", "emb_dim", "embedding_size"), HIDDEN),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "encoder_ffn_dim",
                     "decoder_ffn_dim", "d_inner", "dff", "mlp_dim", "inner_hidden_size", "hidden_act_size",
                     "ffn_hidden_dim", "d_intermediate", "mlp_hidden_size"), INTER),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
                     "num_decoder_layers", "n_layers_decoder", "num_layers_per_stack"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "num_attention_heads_per_layer"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_kv_heads",
                     "num_key_value_groups"), KV_HEADS),
    **dict.fromkeys(("head_dim", "attention_head_dim", "v_head_dim", "kv_channels", "head_size"), HEAD_DIM),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
                     "seq_length", "max_seq_length"), POSITIONS),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_ffn_hidden_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size",
                     "expert_hidden_size", "ffn_hidden_size_moe"), 32),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                     "n_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_k", "top_k", "num_selected_experts",
                     "num_experts_per_token"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group", "topk_group",
                     "first_k_dense_replace"), 1),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 32),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim"), 8),
    **dict.fromkeys(("vocab_size", "n_vocab", "text_vocab_size"), VOCAB),
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size", "d_state", "linear_key_head_dim",
                     "linear_value_head_dim", "mamba_d_head", "time_step_rank", "mamba_dt_rank"), 8),
    **dict.fromkeys(("mamba_n_heads", "linear_num_value_heads", "linear_num_key_heads", "mamba_num_heads"), 4),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 16),
    "linear_head_dim": HEAD_DIM, "linear_num_heads": HEADS, "index_num_heads": 2, "index_topk": 8,
    "index_num_local_tokens": 4, "index_num_sink_tokens": 2, "index_pool_size": 64, "index_compression": 4,
    "rotary_dim": 8, "sliding_window": WINDOW, "initializer_range": 0.2, "init_std": 0.2,
}
"""Config keys shrunk by name, wherever they appear (sub-configs included)."""

TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
             "sep_token_id": 2, "cls_token_id": 1, "mask_token_id": 3, "unk_token_id": 0}


def _families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _per_layer(value, layers: int):
    """A per-layer list (or pattern string) cut to ``LAYERS`` entries, keeping two kinds when it has two."""
    items = list(value)
    if len(items) != layers or layers <= LAYERS:
        return value
    first = items[0]
    other = next((x for x in items if x != first), first)
    cut = [first, other]
    return "".join(cut) if isinstance(value, str) else cut


def _consistent(d: dict) -> None:
    """Sizes that other sizes determine: rotary and multi-head-latent head sizes, Mamba's inner width."""
    if "qk_rope_head_dim" in d:
        d["head_dim"] = d["qk_rope_head_dim"]
        if "qk_head_dim" in d:
            d["qk_head_dim"] = d["qk_rope_head_dim"] + d.get("qk_nope_head_dim", 0)
    hidden = d.get("hidden_size", HIDDEN)
    expand = d.get("mamba_expand", d.get("expand"))
    if isinstance(expand, int):
        inner = expand * hidden
        for heads, head in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim"),
                            ("n_mamba_heads", "mamba_headdim"), ("num_heads", "head_dim")):
            if isinstance(d.get(heads), int) and head in d:
                d[head] = inner // d[heads]
        if "mamba_d_ssm" in d and d["mamba_d_ssm"]:
            d["mamba_d_ssm"] = inner
        for k in ("n_groups", "mamba_n_groups", "mamba_ngroups"):
            if k in d:
                d[k] = 1
    if "kv_lora_rank" in d and "num_key_value_heads" in d:  # latent attention: one key/value head per query head
        d["num_key_value_heads"] = d.get("num_attention_heads", HEADS)
    if "d_head" in d:
        d["d_head"] = hidden // d.get("n_head", d.get("num_attention_heads", HEADS))
    if all(isinstance(d.get(k), int) for k in ("n_input_layers", "n_recurrent_layers", "n_output_layers")):
        d.update(n_input_layers=1, n_recurrent_layers=0, n_output_layers=1)
    if "attention_hidden_size" in d:
        d["attention_hidden_size"] = 2 * hidden
        if "attention_head_dim" in d:
            d["attention_head_dim"] = 2 * hidden // d.get("num_attention_heads", HEADS)


def _shrunk(values: dict) -> dict:
    """A config's ``to_dict()`` with every size this scan knows shrunk, sub-configs included."""
    layers = next((values[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                   if isinstance(values.get(k), int)), 0)
    out = {}
    for key, value in values.items():
        new = value
        if isinstance(value, dict) and ("model_type" in value or key.endswith("config")):
            new = _shrunk(value)
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            new = min(value, SIZES[key])
        elif key in ("initializer_range", "init_std") and isinstance(value, float):
            new = SIZES[key]
        elif key in TOKEN_IDS and isinstance(value, int) and value >= VOCAB:
            new = TOKEN_IDS[key]
        elif key in TOKEN_IDS and isinstance(value, list):
            new = [TOKEN_IDS[key]]
        elif ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            new = 0.0
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # per-layer overrides
            new = {k: v for k, v in value.items() if int(k) < LAYERS}
        elif "layer" in key and isinstance(value, list) and value and all(type(x) is int for x in value) \
                and max(value) >= LAYERS and len(value) != layers:  # layer indices
            new = [x for x in value if x < LAYERS] or [LAYERS - 1]
        elif isinstance(value, (list, str)) and layers > LAYERS and key not in ("model_type", "architectures"):
            new = _per_layer(value, layers)
        out[key] = new
    _consistent(out)
    return out


def tiny_config(name: str):
    """The family's default config with its sizes shrunk, rebuilt so derived fields follow."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(name)
    values = _shrunk(default.to_dict())
    for k in ("model_type", "transformers_version", "architectures", "_name_or_path"):
        values.pop(k, None)
    cfg = type(default)(**values)
    if hasattr(cfg, "is_decoder"):
        cfg.is_decoder = True  # encoder families run as decoders in their *ForCausalLM class
    return cfg


def build_tiny(name: str):
    """The family as a tiny fp32 model in eval mode, or ``(None, reason)``."""
    from transformers import AutoModelForCausalLM

    try:
        cfg = tiny_config(name)
        with torch.device("meta"):  # counted before any memory is spent
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
        if n > MAX_PARAMS:
            return None, f"{n / 1e6:.0f}M parameters after shrinking (a size key this scan does not know)"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a family transformers cannot build tiny on CPU
        return None, f"does not construct tiny on CPU: {type(e).__name__}: {str(e)[:160]}"
    return model.eval(), ""


def _grad_error(grads, ref_grads) -> tuple[str, float]:
    scale = max((float(g.abs().max()) for g in ref_grads.values()), default=0.0)
    worst = ("", 0.0)
    for n, g in ref_grads.items():
        if n not in grads:
            return n, math.inf
        err = float((grads[n] - g).abs().max()) / max(float(g.abs().max()), 1e-2 * scale, 1e-12)
        worst = max(worst, (n, err), key=lambda x: x[1])
    return worst


def check_one(name: str) -> tuple[str, str]:
    """``(outcome, detail)``: outcome is exact, refused or skipped; anything else raises."""
    from sftune.errors import ConfigError
    from sftune.loss import CausalLMWithLoss

    model, why = build_tiny(name)
    if model is None:
        return "skipped", why
    exs = examples()
    try:
        ref_logits, ref_loss, ref_grads = reference(model, exs)
    except Exception as e:  # noqa: BLE001 - plain transformers cannot run it: nothing to compare with
        return "skipped", f"plain transformers fails on it: {type(e).__name__}: {str(e)[:160]}"
    if not torch.isfinite(ref_loss) or not ref_grads:
        return "skipped", "plain transformers gives a non-finite loss or no gradients on it tiny"
    # the body lookup: the loss wrapper reaches last_hidden_state on every family
    lm = CausalLMWithLoss(copy.deepcopy(model))
    ids = torch.tensor([exs[0][0]])
    hidden = lm.hidden_states(ids, torch.arange(ids.shape[1])[None])
    assert hidden.ndim == 3 and hidden.shape[:2] == ids.shape, (name, hidden.shape)
    try:
        choice = probe(model)
    except ConfigError as e:
        assert "model check" in str(e), (name, str(e))
        return "refused", str(e)[:200]
    _, loss, grads = run_layout(model, choice.layout, exs, choice.fused)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4, msg=f"{name} {choice.line}")  # the probe's fp32 tolerance
    param, err = _grad_error(grads, ref_grads)
    assert err < 1e-4, (name, choice.line, param, err)
    return "exact", choice.line


@pytest.fixture(autouse=True)
def _opt_in(request):
    option = request.config.option
    if "slow" not in (getattr(option, "markexpr", "") or "") and "families_all" not in (option.keyword or ""):
        pytest.skip("opt-in, several minutes: python -m pytest -m slow -k families_all")


@pytest.mark.slow
@pytest.mark.parametrize("name", _families())
def test_model_families_all(name):
    """One family of the installed transformers: exact or refused with a message (a family that
    plain transformers cannot build or run tiny is skipped with the reason)."""
    outcome, detail = check_one(name)
    if outcome == "skipped":
        pytest.skip(f"{name}: {detail}")
    print(f"{name}: {outcome}: {detail}")
