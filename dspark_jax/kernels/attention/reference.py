"""Multi-segment softmax attention in pure jnp: the specification every kernel must match.

A query attends over the union of one or more key segments; each segment is softmaxed
separately and the partial results are merged by their log-sum-exp, so callers never
concatenate key buffers or build a dense mask:

  * `KV`: keys at absolute positions (a cache: slot s holds position s), visible to a query
    at position p when `s < lengths` (per row, or per query), if `causal`, `pos(s) <= p`
    and `p - pos(s) < window`, and, with a `mask`, where it is True (a token tree's own
    keys: each node sees its ancestors only, which positions alone cannot say);
  * `Block`: keys in the queries' own index space, split into groups of `group`
    consecutive queries; a query sees every key of its own group (bidirectional blocks:
    the DSpark/DFlash draft block; `group=1` pairs each query with the key at its own
    index, as Eagle3's training-time test needs).

Dimensions: B batch, T queries, N query heads, K kv heads (N = K * G), H head dim,
S keys of a `KV` segment, J groups of a `Block` segment (T = J * Q).
Logits, softmax and the merge are float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

# Finite, so a fully masked query softmaxes to a uniform row instead of NaN; any visible key
# dwarfs it to an exact 0 weight.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Key segments of at most this many keys are computed as broadcast sums instead of dots.
SMALL_SEGMENT = 16


@dataclasses.dataclass(frozen=True)
class KV:
  """Keys `[B, K, H, S]` (transposed: slots minor) and values `[B, K, S, H]` at positions
  `positions` (`[B, S]`; default slot index).

  Attributes:
    lengths: int `[B]` or `[B, T]`: keys at slot `>= lengths` are invisible (None: all).
    causal: hide keys whose position is after the query's.
    window: sliding window (keys with `q_pos - k_pos >= window` hidden); needs `causal`.
    mask: bool `[T, S]` or `[B, T, S]`: keys hidden where False (None: none hidden).
  """

  k: Array
  v: Array
  positions: Array | None = None
  lengths: Array | None = None
  causal: bool = True
  window: int | None = None
  mask: Array | None = None


@dataclasses.dataclass(frozen=True)
class Block:
  """Keys/values `[B, T, K, H]` aligned with the queries, visible within groups of `group`.

  Attributes:
    valid: bool `[B, T // group]`: a whole group's keys hidden where False (None: all).
  """

  k: Array
  v: Array
  group: int
  valid: Array | None = None


def _softcap(x: Array, cap: float | None) -> Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


def _partial(logits: Array, visible: Array, v: Array, eqn: str, view=None, small=False):
  """(max, sum exp, unnormalised output) of one segment; reduces the last logits axis.

  `view`: the shape in which `visible` broadcasts against `logits` (a free reshape).
  `small`: the `BKMS,BKSH->BKMH` product as a broadcast sum (few keys)."""
  if view is not None:
    logits = jnp.where(visible, logits.reshape(view), MASK_VALUE).reshape(logits.shape)
  else:
    logits = jnp.where(visible, logits, MASK_VALUE)
  m = jnp.max(logits, axis=-1)
  p = jnp.exp(logits - m[..., None])
  if small:
    o = jnp.sum(p[..., None] * v[:, :, None].astype(jnp.float32), axis=3)
  else:
    o = jnp.einsum(eqn, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return m, jnp.sum(p, axis=-1), o


def _kv_partial(qg: Array, seg: KV, q_positions: Array, scale: float, softcap):
  """qg `[B, K, T, G, H]` -> partials with shapes `[B, K, T, G]` and `[B, K, T, G, H]`."""
  b, kh, t, g, h = qg.shape
  s = seg.v.shape[2]
  # Queries and heads of a group folded into one row axis M = T * G: a dot with a single
  # free axis per side. The 5-D einsum ran 1.5-2.5x slower on XLA-CPU (a decode step is
  # bound by reading the cache, and this reads it once per kv head at full speed).
  if s <= SMALL_SEGMENT:
    # A few keys (a verify block's own K/V): broadcast products fuse into one elementwise
    # loop, where a dot per layer would cost more in call overhead than in arithmetic.
    logits = jnp.sum(qg.reshape(b, kh, t * g, h, 1).astype(jnp.float32)
                     * seg.k[:, :, None].astype(jnp.float32), axis=3).reshape(b, kh, t, g, s)
  else:
    logits = jnp.einsum("BKMH,BKHS->BKMS", qg.reshape(b, kh, t * g, h), seg.k,
                        preferred_element_type=jnp.float32).reshape(b, kh, t, g, s)
  logits = _softcap(logits * scale, softcap)
  slot = jnp.arange(s, dtype=jnp.int32)
  visible = jnp.ones((b, t, s), bool)
  if seg.lengths is not None:
    lim = seg.lengths if seg.lengths.ndim == 2 else seg.lengths[:, None]
    visible &= slot[None, None, :] < lim[:, :, None]
  if seg.causal:
    kpos = slot[None, :] if seg.positions is None else seg.positions
    kpos = jnp.broadcast_to(kpos, (b, s))[:, None, :]
    qpos = q_positions[:, :, None]
    visible &= kpos <= qpos
    if seg.window is not None:
      visible &= (qpos - kpos) < seg.window
  if seg.mask is not None:
    visible &= jnp.broadcast_to(seg.mask, (b, t, s))
  m, l, o = _partial(logits.reshape(b, kh, t * g, s), visible[:, None, :, None, :], seg.v,
                     "BKMS,BKSH->BKMH", view=(b, kh, t, g, s), small=s <= SMALL_SEGMENT)
  return m.reshape(b, kh, t, g), l.reshape(b, kh, t, g), o.reshape(b, kh, t, g, -1)


def _block_partial(qg: Array, seg: Block, scale: float, softcap):
  b, kh, t, g, h = qg.shape
  q = seg.group
  j = t // q
  qb = qg.reshape(b, kh, j, q, g, h)
  kb = seg.k.reshape(b, j, q, kh, h)
  vb = seg.v.reshape(b, j, q, kh, seg.v.shape[-1])
  logits = jnp.einsum("BKJQGH,BJRKH->BKJQGR", qb, kb, preferred_element_type=jnp.float32)
  logits = _softcap(logits * scale, softcap)
  visible = jnp.ones((b, 1, j, 1, 1, 1), bool)
  if seg.valid is not None:
    visible = seg.valid[:, None, :, None, None, None]
  m, l, o = _partial(logits, visible, vb, "BKJQGR,BJRKH->BKJQGH")
  return m.reshape(b, kh, t, g), l.reshape(b, kh, t, g), o.reshape(b, kh, t, g, -1)


def attention(q: Array, *segments, q_positions: Array | None = None, scale: float,
              softcap: float | None = None) -> Array:
  """Softmax attention of `q` `[B, T, N, H]` over the union of `segments` (GQA).

  Args:
    q: queries.
    segments: `KV` / `Block` segments (at least one).
    q_positions: int `[B, T]` absolute query positions (needed by causal `KV` segments).
    scale: multiplier on q.k.
    softcap: Gemma's tanh cap on attention logits.

  Returns:
    `[B, T, N, Hv]` in q's dtype.
  """
  if not segments:
    raise ValueError("attention needs at least one key segment")
  b, t, n, h = q.shape
  kh = segments[0].k.shape[1] if isinstance(segments[0], KV) else segments[0].k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, H]
  parts = []
  for seg in segments:
    if isinstance(seg, KV):
      parts.append(_kv_partial(qg, seg, q_positions, scale, softcap))
    elif isinstance(seg, Block):
      parts.append(_block_partial(qg, seg, scale, softcap))
    else:
      raise TypeError(f"unknown attention segment {type(seg).__name__}")
  m = parts[0][0]
  for p in parts[1:]:
    m = jnp.maximum(m, p[0])
  den = 0.0
  num = 0.0
  for mi, li, oi in parts:
    w = jnp.exp(mi - m)
    den = den + li * w
    num = num + oi * w[..., None]
  out = num / den[..., None]  # [B, K, T, G, Hv]
  return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, -1).astype(q.dtype)


def ragged_attention(q: Array, cache: KV, k: Array | None = None, v: Array | None = None, *,
                     rows: Array, cols: Array, start: Array, width: int, scale: float,
                     softcap: float | None = None, mask: Array | None = None) -> Array:
  """Packed-verify attention: flat queries over their rows' caches and own new keys.

  The flat tokens are a `Pack`'s (`decoding.state`): token i sits in dense row `rows[i]`
  (`== B`: padding), column `cols[i]`, at position `start[row] + col`. This is the dense
  path spelled out: scatter to `[B, W]` (`Pack.to_dense`), `attention`, gather back
  (`Pack.to_flat`: padding tokens read row B-1's column 0).

  Args:
    q: `[N, Nh, H]` flat queries (N tokens, Nh = K * G query heads).
    cache: each row's cache segment (`k` `[B, K, H, S]`, with its lengths, positions,
      causal, window; `lengths` `[B, W]` and `mask` `[W, S]` / `[B, W, S]` are per dense query).
    k, v: `[N, K, H]` the tokens' own keys/values (None: the cache holds them already); a
      second, causal segment over each row's own tokens (hidden at columns `>=` the row's
      token count), with the cache's window.
    rows, cols: int32 `[N]` dense coordinates.
    start: int32 `[B]` position of each row's column 0.
    width: W, the dense block width.
    scale, softcap: as in `attention`.
    mask: bool `[W, W]` or `[B, W, W]` on the own keys (a token tree's ancestors).

  Returns:
    `[N, Nh, Hv]` in q's dtype.
  """
  b = start.shape[0]

  def dense(x):
    return jnp.zeros((b, width) + x.shape[1:], x.dtype).at[rows, cols].set(x, mode="drop")

  positions = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
  segments = [cache]
  if k is not None:
    counts = jnp.zeros((b,), jnp.int32).at[rows].add(1, mode="drop")
    segments.append(KV(dense(k).transpose(0, 2, 3, 1), dense(v).transpose(0, 2, 1, 3),
                       positions=positions, lengths=counts, window=cache.window, mask=mask))
  out = attention(dense(q), *segments, q_positions=positions, scale=scale, softcap=softcap)
  return out[jnp.minimum(rows, b - 1), cols]
