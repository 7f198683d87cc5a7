"""Chain rejection sampling (speculative decoding's accept step) in pure jnp: the spec.

Row b verified l_b of its P drafts x_0..x_{P-1} (0-based; draft k is checked against target
row k). With target distributions p `[P+1, V]`, draft distributions q `[P, V]` and one
uniform u_k per draft:

  accept x_k  iff  k < l_b and u_k q_k(x_k) < p_k(x_k)   (u < min(1, p/q) without a division),
  n          = the number of leading accepted drafts,
  next token ~ norm(max(p_n - q_n, 0))   if n < l_b (a rejection; p_n if that has no mass,
                                          which only rounding can cause),
             ~ p_n                       otherwise (the bonus token),

drawn by inverse CDF (`kernels.draw`) with one given uniform, exactly as
`sampling.sample_from_probs` draws it. Greedy decoding is the limit of one-hot p and q: accept
while x_k equals argmax of the target logits, then emit that argmax at n.

This is `dspark_jax.decoding.speculative.accept` with its randomness passed in. Dimensions:
B rows, P drafts, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.kernels import draw

Array = jax.Array

RESIDUAL_MIN_MASS = 1e-12  # below it a residual is rounding noise and p_n is used instead


def leading_accepted(ok: Array) -> Array:
  """int32 `[B]`: how many leading entries of bool `[B, P]` are True."""
  return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)


def prefix_accept(p: Array, q: Array, drafts: Array, verify_len: Array, uniforms: Array,
                  sample_uniform: Array) -> tuple[Array, Array]:
  """Sampled chain acceptance.

  Args:
    p: float32 `[B, P+1, V]` target probabilities.
    q: float32 `[B, P, V]` draft probabilities.
    drafts: int32 `[B, P]` draft tokens.
    verify_len: int32 `[B]` l_b in [0, P].
    uniforms: float32 `[B, P]` in [0, 1).
    sample_uniform: float32 `[B]` in [0, 1), the residual / bonus token's draw.

  Returns:
    (n_accepted int32 `[B]`, next token int32 `[B]`).
  """
  b, n_draft = drafts.shape
  in_window = jnp.arange(n_draft)[None, :] < verify_len[:, None]
  p_x = jnp.take_along_axis(p[:, :n_draft], drafts[..., None], axis=-1)[..., 0]
  q_x = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  n_acc = leading_accepted((uniforms * q_x < p_x) & in_window)
  rows = jnp.arange(b)
  p_n = p[rows, n_acc]
  residual = jnp.maximum(p_n - q[rows, jnp.minimum(n_acc, n_draft - 1)], 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  rejected = (n_acc < verify_len)[:, None]
  dist = jnp.where(rejected & (mass > RESIDUAL_MIN_MASS), residual, p_n)
  return n_acc, draw.inverse_cdf(sample_uniform, dist)


def greedy_accept(target_logits: Array, drafts: Array, verify_len: Array) -> tuple[Array, Array]:
  """Greedy chain acceptance: `target_logits` `[B, P+1, V]`, drafts `[B, P]`, l `[B]`."""
  b, n_draft = drafts.shape
  best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
  ok = (drafts == best[:, :n_draft]) & (jnp.arange(n_draft)[None, :] < verify_len[:, None])
  n_acc = leading_accepted(ok)
  return n_acc, best[jnp.arange(b), n_acc]
