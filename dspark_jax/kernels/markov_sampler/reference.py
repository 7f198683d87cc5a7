"""The Markov head's sequential block sampler in pure jnp: the specification of the kernel.

DSpark's vanilla Markov head corrects the backbone's base logits U_k of block position k
with a low-rank bigram term of the previous token:

  e_k = W1[x_{k-1}]  (x_{-1}: the anchor; e_0 is given),
  Z_k = U_k + (e_k W2),
  x_k = argmax_v Z_k[v]                                        (greedy row), or
  x_k = inverse_cdf(u_k, softmax(Z_k / t))                     (sampled row),

with u_k the position's uniform (`kernels.draw`), passed in so that this reference, the
kernel and `dspark_jax.drafts.runtime.sequential_sample` see the same randomness and agree
token for token (up to float rounding at a draw's boundaries). Top-k / top-p filtering is not part of the op (it needs a vocabulary sort
per position); callers with filters keep the unfused path.

Dimensions: B rows, P block positions, N (draft) vocabulary, R Markov rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.kernels import draw

Array = jax.Array


def bias(e: Array, w2: Array) -> Array:
  """The Markov term `e W2` `[B, N]` float32, rounded like the head's own projection.

  `layers.Linear` evaluates `einsum(e, W2)` in the operands' (promoted) dtype and the head
  casts to float32 afterwards; bf16 weights therefore give a bf16-rounded bias, which
  the kernel reproduces.
  """
  return jnp.einsum("BR,RN->BN", e, w2).astype(jnp.float32)


def tempered(z: Array, temperature: Array) -> Array:
  """`z` `[B, N]` divided by `where(t > 0, t, 1)` per row, as `sampling.processed_logits`."""
  t = temperature[:, None]
  return z / jnp.where(t > 0, t, 1.0)


def choose_token(z: Array, u: Array | None, temperature: Array | None,
                 greedy_rows: Array | None) -> Array:
  """int32 `[B]`: argmax of `z` `[B, N]`, or (sampled rows) its inverse-CDF draw with `u`."""
  best = jnp.argmax(z, axis=-1).astype(jnp.int32)
  if u is None:
    return best
  tok = draw.inverse_cdf(u, jax.nn.softmax(tempered(z, temperature), axis=-1))
  return tok if greedy_rows is None else jnp.where(greedy_rows, best, tok)


def markov_sample(base: Array, e0: Array, w1: Array, w2: Array, *,
                  uniforms: Array | None = None, temperature: Array | None = None,
                  greedy_rows: Array | None = None) -> tuple[Array, Array]:
  """Samples the block left to right.

  Args:
    base: U, float32 `[B, P, N]`.
    e0: `[B, R]` Markov embedding of the anchor, in the dtype the head computes in (the
      backbone's hidden dtype); every later e_k is `w1[x_{k-1}]` cast to this dtype.
    w1: `[N, R]` Markov embedding rows of the N candidate tokens.
    w2: `[R, N]` Markov output projection over the N candidate tokens.
    uniforms: float32 `[B, P]` in [0, 1), one per position, or None for greedy decoding
      of every row.
    temperature: float32 `[B]` (with uniforms).
    greedy_rows: bool `[B]` rows decoded greedily despite the uniforms, or None.

  Returns:
    (tokens int32 `[B, P]` indices into N, Z float32 `[B, P, N]`).
  """
  if uniforms is not None and temperature is None:
    raise ValueError("sampling (uniforms given) needs a temperature per row")

  def step(e, xs):
    base_k, uni_k = xs
    z = base_k + bias(e, w2)
    tok = choose_token(z, uni_k, temperature, greedy_rows)
    return jnp.take(w1, tok, axis=0).astype(e0.dtype), (tok, z)

  g = None if uniforms is None else jnp.swapaxes(uniforms, 0, 1)
  _, (toks, z) = jax.lax.scan(step, e0, (jnp.swapaxes(base, 0, 1), g))
  return jnp.swapaxes(toks, 0, 1), jnp.swapaxes(z, 0, 1)
