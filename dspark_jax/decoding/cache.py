"""Fixed-capacity KV cache with per-row lengths; rollback is "don't advance the length".

Layout per cached layer: `k`, `v` of shape `[B, S, K, H]` (Gemma 4 global layers
have their own K and H, so the arrays are a tuple, one per layer that owns a
cache entry; KV-shared layers read their source layer's entry).

`lengths[b]` counts the tokens of row b whose K/V are committed. A forward call
writes its T new tokens at `lengths[b] .. lengths[b] + T - 1` and attends causally,
so anything beyond a row's committed length is stale and is simply overwritten by
the next write: rejected draft tokens never need to be erased.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.config import ModelConfig
from dspark_jax.typing import Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Attributes:
    k: per cached layer, `[B, S, K, H]`.
    v: per cached layer, `[B, S, K, H]`.
    lengths: int32 `[B]` committed tokens per row.
  """

  k: tuple[Array, ...]
  v: tuple[Array, ...]
  lengths: Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "KVCache":
    ks, vs = [], []
    for layer in cfg.cache_layers:
      shape = (batch, capacity, cfg.layer_kv_heads[layer], cfg.layer_head_dims[layer])
      ks.append(jnp.zeros(shape, dtype))
      vs.append(jnp.zeros(shape, dtype))
    return cls(tuple(ks), tuple(vs), jnp.zeros((batch,), jnp.int32))

  @property
  def capacity(self) -> int:
    return self.k[0].shape[1]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  def commit(self, lengths: Array) -> "KVCache":
    """Returns the cache with new committed lengths (advance to accept, keep to roll back)."""
    return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))


def write_rows(buf: Array, new: Array, start: Array) -> Array:
  """Writes `new` `[B, T, ...]` into `buf` `[B, S, ...]` at per-row offsets `start` `[B]`.

  Callers guarantee `start + T <= S` (capacity is sized for it); `dynamic_update_slice`
  would otherwise clamp the offset and silently shift the write.
  """
  def one(b, n, s):
    return jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), s, axis=0)
  return jax.vmap(one)(buf, new, start)
