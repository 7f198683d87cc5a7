"""Grouped-query attention with causal / sliding-window masks over a ragged cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.typing import Array

# Finite, so a fully masked row (padding queries, dummy draft blocks) softmaxes to a
# uniform row instead of NaN; any unmasked key dwarfs it to an exact 0 weight.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal_mask(q_positions: Array, k_positions: Array, window: int | None = None) -> Array:
  """Boolean `[B, T, S]` mask: key visible iff `k <= q` (and `q - k < window` if sliding).

  Example (window 3), q at position 5 sees keys 3, 4, 5: `5 - 3 = 2 < 3`.

  Args:
    q_positions: int `[B, T]`.
    k_positions: int `[B, S]` or `[S]`.
    window: sliding window size or None for full attention.
  """
  if k_positions.ndim == 1:
    k_positions = jnp.broadcast_to(k_positions, (q_positions.shape[0], k_positions.shape[0]))
  q = q_positions[:, :, None]
  k = k_positions[:, None, :]
  mask = k <= q
  if window is not None:
    mask &= (q - k) < window
  return mask


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
                          logit_softcap: float | None = None) -> Array:
  """Softmax attention with GQA.

  Args:
    q: `[B, T, N, H]`.
    k: `[B, S, K, H]`.
    v: `[B, S, K, H]`.
    mask: bool `[B, T, S]` (True = visible).
    scale: multiplier on q.k.
    logit_softcap: Gemma's tanh cap on attention logits.

  Returns:
    `[B, T, N, H]` in q's dtype; logits and softmax are float32.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  if logit_softcap is not None:
    logits = jnp.tanh(logits / logit_softcap) * logit_softcap
  logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, v.shape[-1]).astype(q.dtype)
