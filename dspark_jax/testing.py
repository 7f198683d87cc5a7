"""Tiny random targets for tests, demos of the API and benchmarks of the loop overhead.

Built directly in JAX (no torch, no checkpoint): a `ModelConfig`, random weights with a
chosen scale (the default N(0, 0.02) makes tiny models nearly uniform; a larger scale
gives peaked, position-dependent distributions, which the speculative tests need).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import sharding as sharding_lib
from dspark_jax.config import FULL, SLIDING, ModelConfig, RopeConfig
from dspark_jax.models import transformer
from dspark_jax.target import Target


def tiny_config(family: str = "qwen3", *, vocab: int = 64, hidden: int = 32, layers: int = 4,
                heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                max_positions: int = 4096) -> ModelConfig:
  """A small config of `family` ("llama", "qwen3", "gemma3" with a sliding window)."""
  common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                max_position_embeddings=max_positions, eos_token_ids=(), pad_token_id=0)
  if family in ("llama", "qwen3"):
    return ModelConfig(family=family, layer_types=(FULL,) * layers,
                       rope_full=RopeConfig(theta=10000.0), qk_norm=family == "qwen3",
                       attn_scale=head_dim ** -0.5, hidden_act="silu",
                       tie_word_embeddings=family == "llama", **common)
  if family == "gemma3":
    types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(layers))
    return ModelConfig(family="gemma3", layer_types=types, rope_full=RopeConfig(theta=1e6),
                       rope_sliding=RopeConfig(theta=1e4), sliding_window=6, norm_offset=1.0,
                       qk_norm=True, sandwich_norm=True, embed_scale=True,
                       attn_scale=head_dim ** -0.5, final_logit_softcap=30.0,
                       hidden_act="gelu_tanh", tie_word_embeddings=True, **common)
  raise ValueError(f"no tiny config for family {family!r}")


def random_target(cfg: ModelConfig, *, seed: int = 0, scale: float = 1.0,
                  dtype=jnp.float32) -> Target:
  """A `Target` with random weights: N(0, 0.02 * scale) kernels/embeddings."""
  model = transformer.CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
  if scale != 1.0:
    params = nnx.state(model, nnx.Param)
    scaled = jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, params)
    nnx.update(model, scaled)
  return Target(cfg, model, tokenizer=None, mesh=sharding_lib.make_mesh(), dtype=dtype,
                path=None, stop_token_ids=cfg.eos_token_ids)
