"""Hugging Face Llama's names and config, both ways: what `export` writes and what `+init_from` reads.

`model.Transformer` has exactly `LlamaForCausalLM`'s architecture and weight shapes ("rotate half" rotary layout
included), so moving weights between the two is a renaming of keys through `HF_LLAMA_NAMES`, never a permutation.
No torch here: the pre-flight check of a source reads config.json and file headers before any process starts.
"""

from __future__ import annotations

import re
from typing import Any

# Our parameter name pattern -> Hugging Face Llama's. `{i}` is the layer index.
HF_LLAMA_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
EMBEDDING, HEAD = "tok_embeddings.weight", "output.weight"

# The model.* keys a Llama config decides, in the order a mismatch is reported.
ARCH_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "rope_theta", "norm_eps")


def _patterns(table: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


_TO_HF = _patterns(HF_LLAMA_NAMES)
_FROM_HF = _patterns({theirs: ours for ours, theirs in HF_LLAMA_NAMES.items()})


def _rename(name: str, patterns: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in patterns:
        if match := pattern.match(name):
            return target.format(i=match.group(1)) if match.groups() else target
    return None


def hf_name(name: str) -> str:
    """Our parameter name as Hugging Face Llama's (`layers.3.attention.wq.weight` -> `model.layers.3...q_proj...`)."""
    theirs = _rename(name, _TO_HF)
    if theirs is None:
        raise ValueError(f"parameter {name!r} has no Hugging Face Llama name (known patterns: HF_LLAMA_NAMES)")
    return theirs


def our_name(theirs: str) -> str | None:
    """Hugging Face Llama's parameter name as ours, or None for a name outside the table."""
    return _rename(theirs, _FROM_HF)


def hf_llama_config(model: dict[str, Any], dtype: str) -> dict[str, Any]:
    """curry-train's `model` config as the fields of transformers' LlamaConfig (`dtype`: `float32`, ...)."""
    missing = [k for k in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size") if k not in model]
    if missing:
        raise ValueError(f"the run's model config lacks {', '.join(missing)}: cannot write config.json")
    rope_theta = float(model.get("rope_theta", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model["vocab_size"],
        "hidden_size": model["dim"],
        "intermediate_size": model["ffn_dim"],
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model.get("n_kv_heads") or model["n_heads"],
        "head_dim": model["dim"] // model["n_heads"],
        "max_position_embeddings": model.get("max_seq_len", 2048),
        "rms_norm_eps": model.get("norm_eps", 1e-5),
        # Both spellings: transformers < 5 reads rope_theta, 5 reads rope_parameters.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": model.get("init_std", 0.02),
        "torch_dtype": dtype,
        "use_cache": True,
    }


def _rope(config: dict[str, Any]) -> tuple[float, str]:
    """(rope_theta, rope type): transformers 5 writes `rope_parameters`, older versions `rope_theta` and
    `rope_scaling` at the top level."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), str(kind)


def model_of_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face Llama `config.json` as the model.* values that reproduce it; ValueError naming the first
    feature curry-train's model does not have (another architecture, biases, scaled rotary embeddings, ...)."""
    kind = config.get("model_type")
    if kind != "llama":
        raise ValueError(f"config.json has model_type {kind!r}; only Llama (model_type 'llama') is supported")
    theta, rope_type = _rope(config)
    unsupported = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(config.get("attention_bias", False)), False),
        "mlp_bias": (bool(config.get("mlp_bias", False)), False),
        "rope type": (rope_type, "default"),
    }
    for key, (value, allowed) in unsupported.items():
        if value != allowed:
            raise ValueError(f"config.json has {key} {value!r}; curry-train's Llama supports only {allowed!r}")
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise ValueError(
            f"config.json has head_dim {head_dim} with {heads} heads and hidden_size {dim}; curry-train's Llama "
            "needs head_dim = hidden_size / num_attention_heads"
        )
    return {
        "dim": dim,
        "n_layers": int(config["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or heads),
        "ffn_dim": int(config["intermediate_size"]),
        "vocab_size": int(config["vocab_size"]),
        "rope_theta": theta,
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
    }
