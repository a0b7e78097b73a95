"""The model's parameter names and shapes as arithmetic over its config, without torch.

`curry-train plan` needs only the parameter count and the number of parameter tensors; building the model on the
meta device for them imports torch and its meta kernels (2-3 s on a 2-core machine, most of what `plan` took).
`tests/test_model.py` checks this against `model.build_model` for every preset in conf/model, so the two cannot
drift apart unnoticed.
"""

from __future__ import annotations

from curry_train.config import ModelConfig


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`model.Transformer(cfg)`'s parameters in registration order: name -> shape."""
    head_dim = cfg.dim // cfg.n_heads
    kv_dim = (cfg.n_kv_heads or cfg.n_heads) * head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        layer = f"layers.{i}"
        shapes |= {
            f"{layer}.attention_norm.weight": (cfg.dim,),
            f"{layer}.attention.wq.weight": (cfg.n_heads * head_dim, cfg.dim),
            f"{layer}.attention.wk.weight": (kv_dim, cfg.dim),
            f"{layer}.attention.wv.weight": (kv_dim, cfg.dim),
            f"{layer}.attention.wo.weight": (cfg.dim, cfg.n_heads * head_dim),
            f"{layer}.ffn_norm.weight": (cfg.dim,),
            f"{layer}.feed_forward.w1.weight": (cfg.ffn_dim, cfg.dim),
            f"{layer}.feed_forward.w2.weight": (cfg.dim, cfg.ffn_dim),
            f"{layer}.feed_forward.w3.weight": (cfg.ffn_dim, cfg.dim),
        }
    shapes["norm.weight"] = (cfg.dim,)
    shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes
