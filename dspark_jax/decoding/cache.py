"""Fixed-capacity KV cache with per-row lengths: the only code that reads or writes K/V.

Layout per cached layer: `k` of shape `[B, K, H, S]` and `v` of shape `[B, K, S, H]` (kv
heads first, so the attention dots read the cache in place: a `[B, S, K, H]` layout made XLA
transpose every layer's whole cache on every step). Keys keep slots on the minor axis because
`q.k` then is a plain `[M, H] x [H, S]` product per kv head: on XLA-CPU that read the keys
about 5x faster than contracting `[S, H]` over its minor axis, a third of a batch-64
decode step. Gemma 4 global layers have their own K and H, so the
arrays are a tuple, one per layer that owns a cache entry; KV-shared layers read their
source layer's entry. Slot s holds the token at position s (a linear cache; page tables
and ring buffers for sliding layers would change `write` and `segment`, not callers).

`lengths[b]` counts the tokens of row b whose K/V are committed. A forward call writes its
T new tokens at `lengths[b] .. lengths[b] + T - 1` and attends causally, so anything beyond
a row's committed length is stale and is simply overwritten by the next write: rejected
draft tokens never need to be erased. Rows marked invalid (finished requests, padding) do
not write at all, so a slot reused by another request is never clobbered.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax import sharding as sharding_lib
from dspark_jax.config import ModelConfig
from dspark_jax.typing import Array
from dspark_jax.kernels import attention as attn_kernels


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PendingKV:
  """K/V of a block computed but not yet written: what a forward with `defer_writes` returns.

  Writing after the fact lets a loop branch on device (`lax.cond` / `lax.switch` between
  verify shapes) without carrying the cache through the branch: XLA copies every buffer a
  conditional updates in place (twice per round inside a `while_loop`), so the branches
  only read the cache and the one write happens outside them.

  Attributes:
    k, v: per cache entry, `[B, W, K, H]` (a dense block of W slots per row).
    start: int32 `[B]` cache slot of each row's first block slot.
    valid: bool `[B, W]` slots to write.
  """

  k: tuple[Array, ...]
  v: tuple[Array, ...]
  start: Array
  valid: Array

  def pad(self, width: int) -> "PendingKV":
    """The block widened to `width` slots; the new slots are not written."""
    extra = width - self.valid.shape[1]
    if extra <= 0:
      return self
    grow = lambda x: jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    return PendingKV(tuple(map(grow, self.k)), tuple(map(grow, self.v)), self.start,
                     jnp.pad(self.valid, ((0, 0), (0, extra))))

  def take(self, cols: Array) -> "PendingKV":
    """The block re-laid as slots `cols` `[B, W']` of this one, written from `start` on: a
    token tree's accepted path becomes a contiguous block."""
    pick = lambda x: jnp.take_along_axis(x, cols.reshape(cols.shape + (1,) * (x.ndim - 2)),
                                         axis=1)
    return PendingKV(tuple(map(pick, self.k)), tuple(map(pick, self.v)), self.start,
                     pick(self.valid))

  def masked(self, keep: Array) -> "PendingKV":
    """Only slots with `keep` `[B, W]` (or rows with `keep` `[B]`) stay valid."""
    keep = keep if keep.ndim == 2 else keep[:, None]
    return dataclasses.replace(self, valid=self.valid & keep)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Attributes:
    k: per cached layer, `[B, K, H, S]` (keys transposed: slots minor).
    v: per cached layer, `[B, K, S, H]`.
    lengths: int32 `[B]` committed tokens per row.
  """

  k: tuple[Array, ...]
  v: tuple[Array, ...]
  lengths: Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "KVCache":
    """Zeros for every cache-owning layer of `cfg` (`cfg.cache_layers`)."""
    ks, vs = [], []
    for layer in cfg.cache_layers:
      kh, h = cfg.layer_kv_heads[layer], cfg.layer_head_dims[layer]
      ks.append(jnp.zeros((batch, kh, h, capacity), dtype))
      vs.append(jnp.zeros((batch, kh, capacity, h), dtype))
    return cls(tuple(ks), tuple(vs), jnp.zeros((batch,), jnp.int32))

  def shardings(self, mesh) -> "KVCache":
    """The layout of this cache on `mesh`, as a KVCache of NamedShardings: entries by
    `sharding.CACHE_AXES` / `KEY_CACHE_AXES` (rows over data, kv heads over tensor), lengths
    over the row axes. It is the layout the jitted loop hands back, so pooled and fresh
    buffers are interchangeable."""
    key = lambda x: sharding_lib.cache_sharding(mesh, x.shape, keys=True)
    value = lambda x: sharding_lib.cache_sharding(mesh, x.shape)
    return KVCache(tuple(map(key, self.k)), tuple(map(value, self.v)),
                   sharding_lib.batch_sharding(mesh, self.lengths.shape))

  def place(self, mesh) -> "KVCache":
    """This cache moved to its `shardings(mesh)`."""
    return jax.device_put(self, self.shardings(mesh))

  @property
  def capacity(self) -> int:
    return self.v[0].shape[2]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  def commit(self, lengths: Array) -> "KVCache":
    """Returns the cache with new committed lengths (advance to accept, keep to roll back)."""
    return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))

  def write(self, slot: int, k_new: Array, v_new: Array, start: Array,
            valid: Array | None = None) -> "KVCache":
    """Writes T new tokens' K/V `[B, T, K, H]` of cache entry `slot` at per-row `start` `[B]`.

    Rows with `valid[b] == False` (or tokens with `valid[b, t] == False`) write nothing. Callers size the capacity so that
    `start + T <= S`; a write past the end is dropped rather than shifted.
    """
    b, t = k_new.shape[:2]
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    if valid is not None:
      keep = valid if valid.ndim == 2 else valid[:, None]
      pos = jnp.where(keep, pos, self.capacity)  # out of range -> dropped
    rows = jnp.arange(b)[:, None]

    # Both index expressions select `[B, T, K, H]` (advanced indices split by slices go
    # first), whichever axis holds the slots.
    ks, vs = list(self.k), list(self.v)
    ks[slot] = ks[slot].at[rows, :, :, pos].set(k_new.astype(ks[slot].dtype), mode="drop")
    vs[slot] = vs[slot].at[rows, :, pos].set(v_new.astype(vs[slot].dtype), mode="drop")
    return KVCache(tuple(ks), tuple(vs), self.lengths)

  def write_pending(self, pending: PendingKV) -> "KVCache":
    """Writes a deferred block (`PendingKV`) into every entry (lengths unchanged)."""
    cache = self
    for i, (k, v) in enumerate(zip(pending.k, pending.v)):
      cache = cache.write(i, k, v, pending.start, pending.valid)
    return cache

  def segment(self, slot: int, *, span: int | None = None, causal: bool = True,
              window: int | None = None, visible_lengths: Array | None = None):
    """An attention key segment over entry `slot` (the first `span` slots, default all).

    `visible_lengths` `[B]` hides slots at or beyond it (a draft's context cache, whose
    queries are not at cache positions); causal segments hide keys after each query.
    """
    k, v = self.k[slot], self.v[slot]
    if span is not None and span < v.shape[2]:
      k, v = k[..., :span], v[:, :, :span]
    return attn_kernels.KV(k, v, lengths=visible_lengths, causal=causal, window=window)

  def attend(self, slot: int, q: Array, q_positions: Array, *, scale: float,
             softcap: float | None = None, window: int | None = None, span: int | None = None,
             extra=()) -> Array:
    """Causal attention of `q` `[B, T, N, H]` at `q_positions` `[B, T]` over entry `slot`
    (plus any `extra` segments). Returns `[B, T, N, H]`."""
    seg = self.segment(slot, span=span, window=window)
    return attn_kernels.attention(q, seg, *extra, q_positions=q_positions, scale=scale,
                                  softcap=softcap)
