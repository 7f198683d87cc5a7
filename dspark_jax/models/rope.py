"""Rotary position embeddings (rotate-half convention, `[freqs, freqs]` layout)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dspark_jax.config import RopeConfig
from dspark_jax.typing import Array


def rope_tables(rope: RopeConfig, head_dim: int, positions: Array) -> tuple[Array, Array]:
  """cos/sin tables for `positions`.

  Args:
    rope: rotary parameters of the layer type.
    head_dim: H.
    positions: int `[B, T]` absolute positions.

  Returns:
    (cos, sin), each float32 `[B, T, H]`.
  """
  inv_freq = jnp.asarray(rope.inv_freq(head_dim), jnp.float32)  # [H/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  scale = rope.attention_scaling
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates `x` `[B, T, heads, H]` by per-position tables `[B, T, H]` (math in float32)."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def inv_freq_np(rope: RopeConfig, head_dim: int) -> np.ndarray:
  return rope.inv_freq(head_dim)
