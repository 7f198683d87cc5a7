"""The Markov head's sequential block sampler in pure jnp: the specification of the kernel.

DSpark's vanilla Markov head corrects the backbone's base logits U_k of block position k
with a low-rank bigram term of the previous token:

  e_k = W1[x_{k-1}]  (x_{-1}: the anchor; e_0 is given),
  Z_k = U_k + (e_k W2),
  x_k = argmax_v Z_k[v]                                        (greedy row), or
  x_k = argmax_v (Z_k[v] / t + G_k[v])                         (sampled row),

with G the Gumbel noise of `jax.random.categorical`, passed in so that this reference, the
kernel and `dspark_jax.drafts.runtime.sequential_sample` see the same randomness and agree
token for token. Top-k / top-p filtering is not part of the op (it needs a vocabulary sort
per position); callers with filters keep the unfused path.

Dimensions: B rows, P block positions, N (draft) vocabulary, R Markov rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def bias(e: Array, w2: Array) -> Array:
  """The Markov term `e W2` `[B, N]` float32, rounded like the head's own projection.

  `layers.Linear` evaluates `einsum(e, W2)` in the operands' (promoted) dtype and the head
  casts to float32 afterwards; bf16 weights therefore give a bf16-rounded bias, which
  the kernel reproduces.
  """
  return jnp.einsum("BR,RN->BN", e, w2).astype(jnp.float32)


def score(z: Array, noise: Array | None, temperature: Array | None,
          greedy_rows: Array | None) -> Array:
  """The quantity whose argmax is the token: `z` `[B, N]` (or z / t + G for sampled rows).

  `temperature` `[B]` is used as `where(t > 0, t, 1)`, as `sampling.processed_logits` does.
  """
  if noise is None:
    return z
  t = temperature[:, None]
  s = noise + z / jnp.where(t > 0, t, 1.0)  # categorical adds the Gumbel noise first
  return s if greedy_rows is None else jnp.where(greedy_rows[:, None], z, s)


def markov_sample(base: Array, e0: Array, w1: Array, w2: Array, *, noise: Array | None = None,
                  temperature: Array | None = None,
                  greedy_rows: Array | None = None) -> tuple[Array, Array]:
  """Samples the block left to right.

  Args:
    base: U, float32 `[B, P, N]`.
    e0: `[B, R]` Markov embedding of the anchor, in the dtype the head computes in (the
      backbone's hidden dtype); every later e_k is `w1[x_{k-1}]` cast to this dtype.
    w1: `[N, R]` Markov embedding rows of the N candidate tokens.
    w2: `[R, N]` Markov output projection over the N candidate tokens.
    noise: float32 `[B, P, N]` Gumbel noise, or None for greedy decoding of every row.
    temperature: float32 `[B]` (with noise).
    greedy_rows: bool `[B]` rows decoded greedily despite the noise, or None.

  Returns:
    (tokens int32 `[B, P]` indices into N, Z float32 `[B, P, N]`).
  """
  if noise is not None and temperature is None:
    raise ValueError("sampling (noise given) needs a temperature per row")

  def step(e, xs):
    u_k, g_k = xs
    z = u_k + bias(e, w2)
    tok = jnp.argmax(score(z, g_k, temperature, greedy_rows), axis=-1).astype(jnp.int32)
    return jnp.take(w1, tok, axis=0).astype(e0.dtype), (tok, z)

  g = None if noise is None else jnp.swapaxes(noise, 0, 1)
  _, (toks, z) = jax.lax.scan(step, e0, (jnp.swapaxes(base, 0, 1), g))
  return jnp.swapaxes(toks, 0, 1), jnp.swapaxes(z, 0, 1)
