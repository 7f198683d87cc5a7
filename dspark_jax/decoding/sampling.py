"""Temperature / top-k / top-p processing and per-request RNG.

The same `processed_logits` is applied to target and draft logits, so speculative
sampling reproduces exactly the *filtered* target distribution. Greedy decoding is
a static switch (`SamplingParams.greedy`): argmax, no RNG.

RNG: a row's key for a step is `fold_in(fold_in(key(seed), request_id), step)`, and
each use within a step folds in its own tag, so a request's samples depend on
(seed, request id, step) only, never on its batch neighbours.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.typing import Array

# fold_in tags for the independent random streams within one decoding step.
TAG_SAMPLE = 0  # target sample (AR) / bonus or residual token (speculative)
TAG_DRAFT = 1  # draft token sampling
TAG_ACCEPT = 2  # acceptance uniforms


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Attributes:
    temperature: float32 scalar (> 0 unless greedy), or `[B]` per row where 0 means that
      row decodes greedily (see `for_rows`).
    top_k: int32 scalar or `[B]`, 0 = off.
    top_p: float32 scalar or `[B]`, 1 = off.
    greedy: static; every row argmax decoding.
    filtered: static; whether top-k/top-p are applied (they need a vocab sort).
  """

  temperature: Array
  top_k: Array
  top_p: Array
  greedy: bool = dataclasses.field(metadata=dict(static=True), default=False)
  filtered: bool = dataclasses.field(metadata=dict(static=True), default=False)

  @classmethod
  def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "SamplingParams":
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    greedy = temperature == 0.0
    return cls(temperature=jnp.float32(max(temperature, 1e-6)), top_k=jnp.int32(top_k),
               top_p=jnp.float32(top_p), greedy=greedy,
               filtered=(not greedy) and (top_k > 0 or top_p < 1.0))

  @classmethod
  def for_rows(cls, temperature, top_k, top_p) -> "SamplingParams":
    """Per-row settings `[B]` (a server's batch mixes requests): temperature 0 = greedy row.

    A greedy row samples from one-hot distributions, so exact speculative sampling
    reduces to greedy acceptance for it (same tokens as the static greedy path).
    """
    t, k, p = (np.asarray(x) for x in (temperature, top_k, top_p))
    if t.ndim != 1 or t.shape != k.shape or t.shape != p.shape:
      raise ValueError(f"per-row sampling params must be equal-length vectors, got shapes "
                       f"{t.shape}, {k.shape}, {p.shape}")
    for ti, ki, pi in zip(t.tolist(), k.tolist(), p.tolist()):
      cls.make(ti, ki, pi)  # same validation and messages as the batch-wide form
    if np.all(t == 0):
      return cls.make(0.0)
    return cls(temperature=jnp.asarray(t, jnp.float32), top_k=jnp.asarray(k, jnp.int32),
               top_p=jnp.asarray(p, jnp.float32), greedy=False,
               filtered=bool(np.any((k > 0) | (p < 1.0))))

  def per_row(self, x: Array, value: Array) -> Array:
    """A scalar or `[B]` setting shaped to broadcast against `x` `[B, ..., V]`."""
    value = jnp.asarray(value)
    if value.ndim == 0:
      return value
    return value.reshape(value.shape + (1,) * (x.ndim - 1))

  def greedy_rows(self, x: Array) -> Array | None:
    """bool broadcastable to `x` `[B, ..., V]`: rows decoded greedily (None: none can be)."""
    if jnp.ndim(self.temperature) == 0:
      return None
    return self.per_row(x, self.temperature) <= 0


def processed_logits(logits: Array, params: SamplingParams) -> Array:
  """Temperature, then top-k, then top-p (HF order); removed tokens get -inf.

  Args:
    logits: float `[..., V]`.

  Returns:
    float32 `[..., V]` whose softmax is the sampling distribution (not used when greedy).
  """
  temp = params.per_row(logits, params.temperature)
  x = logits.astype(jnp.float32) / jnp.where(temp > 0, temp, 1.0)  # greedy rows: see sample
  if not params.filtered:
    return x
  v = x.shape[-1]
  desc = -jnp.sort(-x, axis=-1)
  top_k = params.per_row(x, params.top_k)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, desc.shape[:-1] + (1,)), axis=-1)
  keep = x >= kth  # ties at the threshold are kept, as in HF's TopKLogitsWarper
  desc = jnp.where(desc >= kth, desc, -jnp.inf)
  probs = jax.nn.softmax(desc, axis=-1)
  # A token survives top-p if the mass strictly before it (in descending order) is < top_p;
  # the first token always survives.
  before = jnp.cumsum(probs, axis=-1) - probs
  survive = before < params.per_row(x, params.top_p)
  n_keep = jnp.maximum(jnp.sum(survive, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
  keep &= x >= cutoff
  return jnp.where(keep, x, -jnp.inf)


def probabilities(logits: Array, params: SamplingParams) -> Array:
  """The sampling distribution `[..., V]` (one-hot argmax when greedy)."""
  one_hot = lambda: jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1],
                                   dtype=jnp.float32)
  if params.greedy:
    return one_hot()
  probs = jax.nn.softmax(processed_logits(logits, params), axis=-1)
  greedy = params.greedy_rows(logits)
  return probs if greedy is None else jnp.where(greedy, one_hot(), probs)


def sample(keys: Array, logits: Array, params: SamplingParams) -> Array:
  """One token per row.

  Args:
    keys: `[B]` PRNG keys (ignored when greedy).
    logits: `[B, V]`.

  Returns:
    int32 `[B]`.
  """
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = processed_logits(logits, params)
  tok = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
  greedy = params.greedy_rows(logits)
  if greedy is None:
    return tok
  return jnp.where(greedy[:, 0], jnp.argmax(logits, axis=-1).astype(jnp.int32), tok)


def sample_from_probs(keys: Array, probs: Array) -> Array:
  """Samples `[B]` tokens from explicit probabilities `[B, V]` (rows need not be normalised)."""
  logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
  return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


def row_keys(seed_key: Array, request_ids: Array, step: Array, tag: int) -> Array:
  """`[B]` keys for (request, step, tag): independent of batch composition.

  `step` is a scalar or one step counter per row `[B]` (rows admitted at different times).
  """
  step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), request_ids.shape)

  def one(rid, st):
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(seed_key, rid), st), tag)
  return jax.vmap(one)(request_ids, step)
