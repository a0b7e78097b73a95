"""The Llama-architecture model: preset sizes, Hugging Face weight layout, rotary embeddings, causality, init."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

from curry_train.checkpoint.sizes import ModelSize, model_size
from curry_train.compose import resolve
from curry_train.config import ModelConfig, config_dir
from curry_train.distributed import local_shard
from curry_train.hf_llama import HF_LLAMA_NAMES
from curry_train.model import apply_rotary, build_model, count_params, init_value, rotary_tables
from curry_train.model_shapes import parameter_shapes
from tests.conftest import compose_config

PRESETS = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def preset(name: str) -> ModelConfig:
    cfg, _ = resolve(compose_config([f"model={name}"]))
    return cfg.model


def materialised(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """The model on CPU with its initial values, the way `distributed.materialize` fills an unsharded model."""
    model = build_model(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(init_value(name, param.shape, cfg, seed))
    model.reset_rotary()
    return model.eval()


def llama_count(vocab: int, dim: int, layers: int, ffn: int, kv_dim: int | None = None) -> int:
    """Closed formula for an untied Llama: embeddings + lm_head, per-layer attention/MLP/norms, final norm."""
    kv_dim = dim if kv_dim is None else kv_dim
    attention = 2 * dim * dim + 2 * dim * kv_dim
    return vocab * dim * 2 + layers * (attention + 3 * dim * ffn + 2 * dim) + dim


# --- parameter counts, on the meta device ---------------------------------------------------------------------


def test_7b_has_llama2_7b_parameter_count_on_meta() -> None:
    model = build_model(preset("7b"))
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert llama_count(32000, 4096, 32, 11008) == 6_738_415_616
    assert count_params(model) == 6_738_415_616


def test_1b_has_tinyllama_parameter_count_on_meta() -> None:
    cfg = preset("1b")
    assert cfg.n_kv_heads == 4
    model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert llama_count(32000, 2048, 22, 5632, kv_dim=4 * 2048 // 32) == 1_100_048_384
    assert count_params(model) == 1_100_048_384


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_parameter_shapes_without_torch_match_the_built_model(name: str, n_kv_heads: int | None) -> None:
    # `curry-train plan` counts from model_shapes (no torch); the model it counts is model.Transformer.
    cfg = dataclasses.replace(preset(name), n_kv_heads=n_kv_heads) if n_kv_heads else preset(name)
    built = {name: tuple(p.shape) for name, p in build_model(cfg).named_parameters()}
    assert list(parameter_shapes(cfg).items()) == list(built.items())
    assert model_size(cfg) == ModelSize(count_params(build_model(cfg)), len(built))


@pytest.mark.parametrize(("name", "low", "high"), [("small", 50_000_000, 100_000_000), ("tiny", 1, 2_000_000)])
def test_small_presets_sizes(name: str, low: int, high: int) -> None:
    cfg = preset(name)
    model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    n = count_params(model)
    assert low <= n < high
    assert n == llama_count(cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.ffn_dim)


# --- Hugging Face weight layout ---------------------------------------------------------------------------------


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape Hugging Face's LlamaForCausalLM gives each (pattern) weight."""
    hd = cfg.dim // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    return {
        "model.embed_tokens.weight": (v, d),
        "model.layers.{i}.input_layernorm.weight": (d,),
        "model.layers.{i}.self_attn.q_proj.weight": (cfg.n_heads * hd, d),
        "model.layers.{i}.self_attn.k_proj.weight": (kv * hd, d),
        "model.layers.{i}.self_attn.v_proj.weight": (kv * hd, d),
        "model.layers.{i}.self_attn.o_proj.weight": (d, cfg.n_heads * hd),
        "model.layers.{i}.post_attention_layernorm.weight": (d,),
        "model.layers.{i}.mlp.gate_proj.weight": (f, d),
        "model.layers.{i}.mlp.up_proj.weight": (f, d),
        "model.layers.{i}.mlp.down_proj.weight": (d, f),
        "model.norm.weight": (d,),
        "lm_head.weight": (v, d),
    }


@pytest.mark.parametrize("name", ["tiny", "small", "1b", "7b"])
def test_every_weight_maps_to_hugging_face_llama_with_its_shape(name: str) -> None:
    cfg = preset(name)
    model = build_model(cfg)
    shapes = hf_shapes(cfg)
    assert set(HF_LLAMA_NAMES.values()) == set(shapes)
    seen_patterns, seen_hf = set(), set()
    for param_name, param in model.named_parameters():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", param_name)
        pattern = f"layers.{{i}}.{match.group(2)}" if match else param_name
        assert pattern in HF_LLAMA_NAMES, f"{param_name} has no Hugging Face name"
        hf_pattern = HF_LLAMA_NAMES[pattern]
        assert tuple(param.shape) == shapes[hf_pattern], param_name
        seen_patterns.add(pattern)
        seen_hf.add(hf_pattern.replace("{i}", match.group(1)) if match else hf_pattern)
    assert seen_patterns == set(HF_LLAMA_NAMES)
    # One Hugging Face key per layer and pattern: the export is a bijective renaming.
    per_layer = sum("{i}" in k for k in HF_LLAMA_NAMES)
    assert len(seen_hf) == cfg.n_layers * per_layer + len(HF_LLAMA_NAMES) - per_layer


@pytest.mark.parametrize("name", ["tiny", "1b"])
def test_no_biases_and_state_dict_is_exactly_the_parameters(name: str) -> None:
    model = build_model(preset(name))
    assert not any("bias" in n for n, _ in model.named_parameters())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    # Rotary tables are not saved: a checkpoint holds Hugging Face's keys and nothing else.
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


# --- rotary embeddings -------------------------------------------------------------------------------------------


def reference_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Hugging Face's rotate-half rotary, written out: pair (j, j + hd/2) is rotated by pos * theta^(-2j/hd)."""
    x = x.double()
    hd = x.shape[-1]
    half = hd // 2
    out = torch.empty_like(x)
    for j in range(half):
        angle = positions.double() * theta ** (-2.0 * j / hd)  # (seq,)
        c, s = torch.cos(angle), torch.sin(angle)
        a, b = x[..., j], x[..., j + half]
        out[..., j] = a * c - b * s
        out[..., j + half] = b * c + a * s
    return out


@pytest.mark.parametrize(("head_dim", "theta"), [(8, 10000.0), (32, 10000.0), (16, 500000.0)])
def test_apply_rotary_matches_reference_rotate_half(head_dim: int, theta: float) -> None:
    seq = 50
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, seq, head_dim, generator=gen)
    cos, sin = rotary_tables(head_dim, 64, theta)
    assert cos.shape == sin.shape == (64, head_dim)
    got = apply_rotary(x, cos[:seq], sin[:seq])
    want = reference_rotary(x, torch.arange(seq), theta)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # A rotation: norms are preserved, and position 0 is the identity.
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, :, 0], x[:, :, 0])


def test_rotary_scores_depend_only_on_relative_position() -> None:
    head_dim = 32
    cos, sin = rotary_tables(head_dim, 256, 10000.0)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, head_dim, generator=gen, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, cos[m : m + 1].double(), sin[m : m + 1].double())
        kn = apply_rotary(k, cos[n : n + 1].double(), sin[n : n + 1].double())
        return float((qm * kn).sum())

    for m, n in [(5, 2), (3, 3), (2, 9), (0, 0)]:
        for shift in (1, 17, 100, 200):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    # ... and does depend on it.
    assert abs(score(5, 2) - score(5, 5)) > 1e-3


# --- causality and forward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_logits_at_t_do_not_depend_on_later_tokens(n_kv_heads: int | None) -> None:
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=128, vocab_size=256, max_seq_len=64)
    model = materialised(cfg)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 24), generator=gen)
    with torch.no_grad():
        base = model(tokens)
        assert base.shape == (2, 24, 256) and base.dtype == torch.float32
        assert torch.isfinite(base).all()
        for t in (0, 7, 22):
            changed = tokens.clone()
            changed[:, t + 1 :] = torch.randint(0, 256, changed[:, t + 1 :].shape, generator=gen)
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :]), "later logits must see the change"


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_attention_matches_a_reference_with_hugging_face_head_grouping(n_kv_heads: int | None) -> None:
    # Query head h attends with key/value head h // (n_heads / n_kv_heads), as Hugging Face's repeat_kv does.
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=128, vocab_size=256, max_seq_len=16)
    model = materialised(cfg, seed=1)
    attn = model.layers[0].attention
    b, t, h, hd = 2, 12, 4, 16
    kv = n_kv_heads or h
    x = torch.randn(b, t, cfg.dim, generator=torch.Generator().manual_seed(0)).double()
    pos = torch.arange(t)
    q = reference_rotary((x @ attn.wq.weight.double().T).view(b, t, h, hd).transpose(1, 2), pos, cfg.rope_theta)
    k = reference_rotary((x @ attn.wk.weight.double().T).view(b, t, kv, hd).transpose(1, 2), pos, cfg.rope_theta)
    v = (x @ attn.wv.weight.double().T).view(b, t, kv, hd).transpose(1, 2)
    future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    heads = []
    for head in range(h):
        g = head // (h // kv)
        scores = (q[:, head] @ k[:, g].transpose(-1, -2)) / math.sqrt(hd)
        heads.append(scores.masked_fill(future, float("-inf")).softmax(-1) @ v[:, g])
    want = torch.cat(heads, dim=-1) @ attn.wo.weight.double().T
    with torch.no_grad():
        got = attn(x.float(), model.rope_cos[:t], model.rope_sin[:t])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_materialised_model_is_a_function_of_the_seed() -> None:
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=256, max_seq_len=64)
    tokens = torch.arange(16).view(1, 16)
    with torch.no_grad():
        a, b, c = materialised(cfg, 3)(tokens), materialised(cfg, 3)(tokens), materialised(cfg, 4)(tokens)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_reset_rotary_restores_tables_after_to_empty() -> None:
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, ffn_dim=128, vocab_size=256, max_seq_len=32)
    model = materialised(cfg)
    cos, sin = rotary_tables(16, 32, cfg.rope_theta)
    torch.testing.assert_close(model.rope_cos, cos, atol=0, rtol=0)
    torch.testing.assert_close(model.rope_sin, sin, atol=0, rtol=0)


# --- init_value --------------------------------------------------------------------------------------------------

CFG = ModelConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=512, init_std=0.02)
SHAPE = torch.Size((256, 256))


def test_init_value_is_deterministic_per_seed_and_name() -> None:
    name = "layers.1.attention.wq.weight"
    a = init_value(name, SHAPE, CFG, 7)
    torch.manual_seed(123)  # the global RNG plays no part
    torch.rand(5)
    b = init_value(name, SHAPE, CFG, 7)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, init_value("layers.2.attention.wq.weight", SHAPE, CFG, 7))
    assert not torch.equal(a, init_value("layers.1.attention.wk.weight", SHAPE, CFG, 7))
    assert not torch.equal(a, init_value(name, SHAPE, CFG, 8))


@pytest.mark.parametrize("name", ["norm.weight", "layers.0.attention_norm.weight", "layers.3.ffn_norm.weight"])
def test_init_value_norms_are_ones(name: str) -> None:
    for seed in (0, 1):
        torch.testing.assert_close(init_value(name, torch.Size((256,)), CFG, seed), torch.ones(256))


def test_init_value_residual_projections_are_scaled_down_by_depth() -> None:
    std = CFG.init_std
    scaled = std / math.sqrt(2 * CFG.n_layers)
    for name in ("layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight", "tok_embeddings.weight"):
        v = init_value(name, SHAPE, CFG, 0)
        assert v.std().item() == pytest.approx(std, rel=0.03), name
        assert abs(v.mean().item()) < 3 * std / math.sqrt(v.numel())
    for name in ("layers.0.attention.wo.weight", "layers.2.feed_forward.w2.weight"):
        v = init_value(name, SHAPE, CFG, 0)
        assert v.std().item() == pytest.approx(scaled, rel=0.03), name


# --- local_shard (FSDP2's dim-0 sharding) ------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dim0", [1, 3, 8, 10])
def test_local_shards_concatenate_to_the_full_tensor(world: int, dim0: int) -> None:
    full = torch.arange(dim0 * 6, dtype=torch.float32).view(dim0, 6)
    shards = [local_shard(full, world, r) for r in range(world)]
    assert all(s.shape[1:] == full.shape[1:] for s in shards)
    torch.testing.assert_close(torch.cat(shards), full, atol=0, rtol=0)
    # torch.chunk sizes: equal leading chunks of ceil(dim0 / world) rows, the rest possibly short or empty.
    size = math.ceil(dim0 / world)
    assert [s.shape[0] for s in shards] == [max(0, min(size, dim0 - r * size)) for r in range(world)]


def test_local_shard_of_three_rows_on_five_ranks_leaves_two_empty() -> None:
    full = torch.randn(3, 4)
    shards = [local_shard(full, 5, r) for r in range(5)]
    assert [tuple(s.shape) for s in shards] == [(1, 4), (1, 4), (1, 4), (0, 4), (0, 4)]
    assert all(s.dtype == full.dtype for s in shards)
    torch.testing.assert_close(torch.cat(shards), full, atol=0, rtol=0)


def test_local_shard_of_a_vector() -> None:
    full = torch.arange(7.0)
    torch.testing.assert_close(torch.cat([local_shard(full, 4, r) for r in range(4)]), full, atol=0, rtol=0)
