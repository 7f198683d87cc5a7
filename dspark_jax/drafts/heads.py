"""DSpark's sequential heads (vanilla / gated Markov, RNN) and the confidence head.

All heads share one interface so the proposal loop and the trainer need not know
which one is in use:

  state = head.init_state(B)
  bias, w1_prev, state = head.step(h_k, prev_k, state)   # one block position

`bias` `[B, V]` is added to the backbone's base logits U_k; `w1_prev` `[B, R]`
(the Markov embedding of the previous token) also feeds the confidence head.
Training runs `head.teacher_forced(h, prev)` over all P positions at once. With a reduced
draft vocabulary both take `vocab_ids` `[N]` and return only those columns `[B, N]` (the
previous token stays a target id: W1 keeps all V rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.models import layers
from dspark_jax.typing import Array


class MarkovHead(nnx.Module):
  """Vanilla first-order Markov bias `B(x_{k-1}, .) = W1[x_{k-1}] W2` (low rank R)."""

  kind = "vanilla"

  def __init__(self, vocab: int, rank: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.markov_w1 = layers.Embed(vocab, rank, dtype=dtype, rngs=rngs, axes=("vocab", None))
    self.markov_w2 = layers.Linear("...R,RV->...V", (rank, vocab), (None, "vocab"), dtype=dtype,
                                   rngs=rngs)
    self.rank = rank

  def init_state(self, batch: int, dtype=jnp.float32) -> Array:
    return jnp.zeros((batch, 0), dtype)

  def embed_prev(self, prev: Array, dtype) -> Array:
    return self.markov_w1(prev).astype(dtype)

  def _w2(self, x: Array, vocab_ids: Array | None) -> Array:
    """`x` `[..., R]` -> float32 `[..., V]` (or `[..., N]`: only the `vocab_ids` columns)."""
    if vocab_ids is None:
      return self.markov_w2(x).astype(jnp.float32)
    w = jnp.take(self.markov_w2.kernel[...], vocab_ids, axis=1)
    return jnp.einsum("...R,RN->...N", x, w.astype(x.dtype),
                      preferred_element_type=jnp.float32)

  def _bias(self, h: Array, e: Array, state: Array, vocab_ids: Array | None = None):
    return self._w2(e, vocab_ids), state

  def step(self, h: Array, prev: Array, state: Array, vocab_ids: Array | None = None):
    e = self.embed_prev(prev, h.dtype)
    bias, state = self._bias(h, e, state, vocab_ids)
    return bias, e, state

  def teacher_forced(self, h: Array, prev: Array, vocab_ids: Array | None = None):
    """`h` `[..., P, D]`, `prev` `[..., P]` -> (bias `[..., P, V]`, w1_prev `[..., P, R]`)."""
    e = self.embed_prev(prev, h.dtype)
    return self._w2(e, vocab_ids), e


class GatedMarkovHead(MarkovHead):
  """`B = W2(sigmoid(gate_proj([h ; W1[prev]])) * W1[prev])`."""

  kind = "gated"

  def __init__(self, vocab: int, rank: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    super().__init__(vocab, rank, hidden, dtype=dtype, rngs=rngs)
    self.gate_proj = layers.Linear("...I,IR->...R", (hidden + rank, rank), ("embed", None),
                                   bias_shape=(rank,), bias_axes=(None,), dtype=dtype, rngs=rngs)

  def _bias(self, h: Array, e: Array, state: Array, vocab_ids: Array | None = None):
    g = jax.nn.sigmoid(self.gate_proj(jnp.concatenate([h, e], axis=-1)))
    return self._w2(g * e, vocab_ids), state

  def teacher_forced(self, h: Array, prev: Array, vocab_ids: Array | None = None):
    e = self.embed_prev(prev, h.dtype)
    bias, _ = self._bias(h, e, None, vocab_ids)
    return bias, e


class RNNHead(MarkovHead):
  """The paper's RNN head: a gated recurrent state over the block.

  z_k = [s_{k-1} ; W1[x_{k-1}] ; h_k];  (g, c, o) = split(joint_proj(z_k));
  s_k = sigma(g) * s_{k-1} + (1 - sigma(g)) * tanh(c);  B_k = W2 tanh(o).
  """

  kind = "rnn"

  def __init__(self, vocab: int, rank: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    super().__init__(vocab, rank, hidden, dtype=dtype, rngs=rngs)
    self.joint_proj = layers.Linear("...I,IR->...R", (2 * rank + hidden, 3 * rank),
                                    ("embed", None), bias_shape=(3 * rank,), bias_axes=(None,),
                                    dtype=dtype, rngs=rngs)

  def init_state(self, batch: int, dtype=jnp.float32) -> Array:
    return jnp.zeros((batch, self.rank), dtype)

  def _bias(self, h: Array, e: Array, state: Array, vocab_ids: Array | None = None):
    z = self.joint_proj(jnp.concatenate([state.astype(h.dtype), e, h], axis=-1))
    g, c, o = jnp.split(z, 3, axis=-1)
    g = jax.nn.sigmoid(g)
    new_state = g * state.astype(h.dtype) + (1 - g) * jnp.tanh(c)
    return self._w2(jnp.tanh(o), vocab_ids), new_state

  def teacher_forced(self, h: Array, prev: Array, vocab_ids: Array | None = None):
    """Unrolls the recurrence over the block axis (-2) with teacher-forced `prev`."""
    e = self.embed_prev(prev, h.dtype)
    lead = h.shape[:-2]
    state = jnp.zeros(lead + (self.rank,), h.dtype)
    biases = []
    for k in range(h.shape[-2]):  # P is small (<= 16): unrolled
      b, state = self._bias(h[..., k, :], e[..., k, :], state, vocab_ids)
      biases.append(b)
    return jnp.stack(biases, axis=-2), e


HEADS = {"vanilla": MarkovHead, "gated": GatedMarkovHead, "rnn": RNNHead}


class ConfidenceHead(nnx.Module):
  """`c_k = sigmoid(proj([h_k ; W1[x_{k-1}]]))`: P(slot k accepted | prefix accepted)."""

  def __init__(self, in_dim: int, *, dtype, rngs: nnx.Rngs):
    self.proj = layers.Linear("...I,IO->...O", (in_dim, 1), ("embed", None), bias_shape=(1,),
                              bias_axes=(None,), dtype=dtype, rngs=rngs)

  def __call__(self, h: Array, w1_prev: Array | None) -> Array:
    """Returns float32 logits `[...]` (apply sigmoid for the confidence)."""
    x = h if w1_prev is None else jnp.concatenate([h, w1_prev.astype(h.dtype)], axis=-1)
    return self.proj(x)[..., 0].astype(jnp.float32)
