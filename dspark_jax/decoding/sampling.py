"""Temperature / top-k / top-p processing and per-request RNG.

The target's distribution is the exactly filtered one (HF's temperature, top-k, top-p).
Drafts sample from the same filter restricted to each row's largest logits
(`processed_logits(exact=False)`); the acceptance test divides by that same draft
distribution, so speculative sampling still reproduces the filtered target distribution
exactly. Greedy decoding is a static switch (`SamplingParams.greedy`): argmax, no RNG.

RNG: a row's key for a step is `fold_in(fold_in(key(seed), request_id), step)`, and
each use within a step folds in its own tag, so a request's samples depend on
(seed, request id, step) only, never on its batch neighbours.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.kernels import draw
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
    candidates: static; how many of a row's largest logits the top-k / top-p filter looks
      at first (`processed_logits`): the smallest power of two >= 16 covering every row's
      top_k when no row uses top-p (top-k 50: 64, half the cost of 256), else 0 (=
      `CANDIDATES`). At most five values, so at most five programs per filter setting.
  """

  temperature: Array
  top_k: Array
  top_p: Array
  greedy: bool = dataclasses.field(metadata=dict(static=True), default=False)
  filtered: bool = dataclasses.field(metadata=dict(static=True), default=False)
  candidates: int = dataclasses.field(metadata=dict(static=True), default=0)

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
               filtered=(not greedy) and (top_k > 0 or top_p < 1.0),
               candidates=0 if greedy else _candidates([top_k], [top_p]))

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
    sampled = t > 0  # greedy rows ignore their filter
    return cls(temperature=jnp.asarray(t, jnp.float32), top_k=jnp.asarray(k, jnp.int32),
               top_p=jnp.asarray(p, jnp.float32), greedy=False,
               filtered=bool(np.any((k > 0) | (p < 1.0))),
               candidates=_candidates(k[sampled], p[sampled]))

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


# Top-k / top-p look at the CANDIDATES largest logits of a row first (`lax.top_k`, ~50x
# cheaper than sorting a 49k-152k vocabulary on every round). Exact filtering (the target's
# distribution) falls back, only when some row's cut lies beyond them, to a bisection over
# the float order (32 masked reductions per threshold, ~15x cheaper than the sort): the
# sort's cut.
# Read when a function is traced.
CANDIDATES = 256
# Rows bisected at once when the candidates do not decide a cut: only those rows are
# gathered (usually a few of the B * (P + 1) a verify filters), in groups of this size.
FALLBACK_ROWS = 8


def _candidates(top_k, top_p) -> int:
  """`SamplingParams.candidates` for these rows' settings (0: `CANDIDATES`)."""
  top_k, top_p = np.asarray(top_k), np.asarray(top_p)
  if np.any(top_p < 1.0) or not np.any(top_k > 0):
    return 0
  c = max(16, 1 << (int(np.max(top_k)) - 1).bit_length())
  return c if c < CANDIDATES else 0


def processed_logits(logits: Array, params: SamplingParams, *, exact: bool = True,
                     candidates: int | None = None) -> Array:
  """Temperature, then top-k, then top-p (HF order); removed tokens get -inf.

  Args:
    logits: float `[..., V]`.
    exact: True: exactly HF's filter (what the target's distribution must be). False:
      top-k / top-p among each row's `candidates` largest logits only (a nucleus wider
      than that is cut to them). Drafts sample from this cheaper filter: speculative
      sampling is lossless for any draft distribution, provided the acceptance test uses
      the same one the drafts were sampled from.
    candidates: the fast path's candidate count (default: `params.candidates`, else
      `CANDIDATES`); with `exact` results do not depend on it.

  Returns:
    float32 `[..., V]` whose softmax is the sampling distribution (not used when greedy).
  """
  temp = params.per_row(logits, params.temperature)
  x = logits.astype(jnp.float32) / jnp.where(temp > 0, temp, 1.0)  # greedy rows: see sample
  if not params.filtered:
    return x
  c = candidates or params.candidates or CANDIDATES
  v = x.shape[-1]
  top_k = params.per_row(x, params.top_k)
  k = jnp.broadcast_to(jnp.where(top_k > 0, jnp.minimum(top_k, v), v), x.shape[:-1] + (1,))
  top_p = jnp.broadcast_to(params.per_row(x, params.top_p), x.shape[:-1] + (1,))
  if c >= v:  # small vocabularies: the definition, on the sorted row
    return _filter(x, -jnp.sort(-x, axis=-1), k, top_p)[0]
  fast, covered, kth = _filter(x, jax.lax.top_k(x, c)[0], k, top_p)
  if not exact:
    return fast
  return _refine_uncovered(x, fast, covered, k, top_p, kth)


def _refine_uncovered(x: Array, fast: Array, covered: Array, k: Array, top_p: Array,
                      kth: Array) -> Array:
  """`fast` with every row the candidates did not decide replaced by `_bisect_filter`'s.

  Those rows are gathered `FALLBACK_ROWS` at a time in a while loop (none: no iteration),
  so the bisection's 32 passes over V run on them only, not on every row. The fallback
  reuses the k-th values the candidates know (top-p alone bisects once).

  Args:
    x: `[..., V]` tempered logits; fast: `_filter`'s result; covered / k / top_p / kth:
      `[..., 1]`.
  """
  shape = x.shape
  v = shape[-1]
  flat = lambda a: a.reshape(-1, a.shape[-1])
  xf, kf, pf, kthf = flat(x), flat(k), flat(top_p), flat(kth)
  rows = xf.shape[0]
  group = min(rows, FALLBACK_ROWS)

  def body(carry):
    out, todo = carry
    idx = jnp.nonzero(todo, size=group, fill_value=rows)[0]  # rows beyond R: dropped
    take = jnp.minimum(idx, rows - 1)
    sub = _bisect_filter(xf[take], kf[take], pf[take], kthf[take])
    return out.at[idx].set(sub, mode="drop"), todo.at[idx].set(False, mode="drop")

  out, _ = jax.lax.while_loop(lambda c: jnp.any(c[1]), body,
                              (flat(fast), ~covered.reshape(-1)))
  return out.reshape(shape[:-1] + (v,))


def _order_key(x: Array) -> Array:
  """uint32 keys ordered as the float32 values (sign-magnitude to unsigned order)."""
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(1 << 31))


def _order_value(key: Array) -> Array:
  u = jnp.where(key >> 31 == 1, key ^ jnp.uint32(1 << 31), ~key)
  return jax.lax.bitcast_convert_type(u, jnp.float32)


def _bisect_filter(x: Array, k: Array, top_p: Array, kth: Array | None = None) -> Array:
  """`_filter` on the whole row without a sort: both thresholds are found by bisection over
  the 2^32 float32 keys (32 steps each), each step one masked reduction over V.

  The k-th value is the largest c with #{x >= c} >= k; the top-p cut the smallest c with
  mass{x > c} < top_p (mass over the top-k survivors), which is the value whose prefix mass
  in descending order first reaches top_p: the sort's cut. `kth`, where given and not NaN,
  is each row's known k-th value; its search is skipped when every row's is known.
  """
  def search(lo, hi, pred):  # pred false at lo, true at hi, monotone: smallest true key
    def body(_, bounds):
      lo, hi = bounds
      mid = lo + (hi - lo) // 2
      ok = pred(_order_value(mid))
      return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)
    return jax.lax.fori_loop(0, 32, body, (lo, hi))[1]

  v = x.shape[-1]
  x_min = jnp.min(x, axis=-1, keepdims=True)
  x_max_key = _order_key(jnp.max(x, axis=-1, keepdims=True))

  def search_kth():  # k-th largest value: #{x >= c} < k first holds one key above it
    above_kth = search(_order_key(x_min), x_max_key + 1,
                       lambda c: jnp.sum(x >= c, axis=-1, keepdims=True) < k)
    found = jnp.where(k >= v, -jnp.inf, _order_value(above_kth - 1))
    return found if kth is None else jnp.where(jnp.isnan(kth), found, kth)

  kth = search_kth() if kth is None else jax.lax.cond(jnp.any(jnp.isnan(kth)), search_kth,
                                                      lambda: kth)
  keep = x >= kth
  log_z = jax.nn.logsumexp(jnp.where(keep, x, -jnp.inf), axis=-1, keepdims=True)
  probs = jnp.where(keep, jnp.exp(x - log_z), 0.0)
  lowest = _order_key(jnp.maximum(kth, x_min))
  cutoff = _order_value(search(
      lowest - 1, x_max_key,
      lambda c: jnp.sum(jnp.where(x > c, probs, 0.0), axis=-1, keepdims=True) < top_p))
  cutoff = jnp.where(top_p >= 1.0, -jnp.inf, cutoff)
  return jnp.where(keep & (x >= cutoff), x, -jnp.inf)


def _filter(x: Array, desc: Array, k: Array, top_p: Array) -> tuple[Array, Array, Array]:
  """Top-k then top-p on `x` `[..., V]` from `desc` `[..., C]`, its C largest values sorted
  descending (C = V: the whole sorted row).

  Returns the filtered logits; per row, whether the C values decide the cut exactly (always
  true when C = V): the k-th value is among them, and so is the top-p cut; and the k-th
  value where the C values determine it (NaN where they do not).
  """
  c, v = desc.shape[-1], x.shape[-1]
  kth = jnp.take_along_axis(desc, jnp.minimum(k, c) - 1, axis=-1)
  kth = jnp.where(k >= v, -jnp.inf, kth)  # top-k off (or k >= V): keep every token
  keep = x >= kth  # ties at the threshold are kept, as in HF's TopKLogitsWarper
  # The k-th value must be among the C (ties beyond them are still kept: `keep` and the
  # normaliser below read the whole row).
  covered_k = (k >= v) | (k <= c)
  # Top-p renormalises over the top-k survivors: their log-normaliser over the whole row.
  log_z = jax.nn.logsumexp(jnp.where(keep, x, -jnp.inf), axis=-1, keepdims=True)
  probs = jnp.where(desc >= kth, jnp.exp(desc - log_z), 0.0)
  # A token survives top-p if the mass strictly before it (in descending order) is < top_p;
  # the first token always survives.
  before = jnp.cumsum(probs, axis=-1) - probs
  survive = before < top_p
  n_keep = jnp.maximum(jnp.sum(survive, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
  # Exact when the C-th value's prefix mass already reaches top_p (or top-p is off).
  covered_p = (top_p >= 1.0) | (c == v) | ~survive[..., -1:]
  cutoff = jnp.where(top_p >= 1.0, -jnp.inf, cutoff)
  keep &= x >= cutoff
  return jnp.where(keep, x, -jnp.inf), covered_k & covered_p, jnp.where(covered_k, kth, jnp.nan)


def probabilities(logits: Array, params: SamplingParams, *, exact: bool = True) -> Array:
  """The sampling distribution `[..., V]` (one-hot argmax when greedy); `exact=False`: the
  draft's cheaper filter (see `processed_logits`)."""
  one_hot = lambda: jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1],
                                   dtype=jnp.float32)
  if params.greedy:
    return one_hot()
  probs = jax.nn.softmax(processed_logits(logits, params, exact=exact), axis=-1)
  greedy = params.greedy_rows(logits)
  return probs if greedy is None else jnp.where(greedy, one_hot(), probs)


def sample(keys: Array, logits: Array, params: SamplingParams, *, exact: bool = True) -> Array:
  """One token per row.

  Args:
    keys: `[B]` PRNG keys (ignored when greedy).
    logits: `[B, V]`.
    exact: False for draft tokens (see `processed_logits`).

  Returns:
    int32 `[B]`.
  """
  return sample_with_probs(keys, logits, params, exact=exact)[0]


def sample_with_probs(keys: Array, logits: Array, params: SamplingParams, *,
                      exact: bool = True) -> tuple[Array, Array | None]:
  """One token per row and the distribution it was drawn from (`probabilities`, computed
  once): a draft keeps it for the acceptance test instead of filtering its logits again.

  Returns:
    (int32 `[B]`, float32 `[B, V]` probabilities, or None when greedy).
  """
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
  x = processed_logits(logits, params, exact=exact)
  probs = jax.nn.softmax(x, axis=-1)
  tok = sample_from_probs(keys, probs)
  greedy = params.greedy_rows(logits)
  if greedy is None:
    return tok, probs
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  one_hot = jax.nn.one_hot(best, logits.shape[-1], dtype=jnp.float32)
  return jnp.where(greedy[:, 0], best, tok), jnp.where(greedy, one_hot, probs)


def sample_from_probs(keys: Array, probs: Array) -> Array:
  """Samples `[B]` tokens from explicit probabilities `[B, V]` (rows need not be normalised).

  One uniform per row and an inverse-CDF search (`kernels.draw`), not V Gumbel variates:
  the random bits of `jax.random.categorical` were most of a sampled round's extra cost.
  """
  return draw.inverse_cdf(draw.uniforms(keys), probs)


def row_keys(seed_key: Array, request_ids: Array, step: Array, tag: int) -> Array:
  """`[B]` keys for (request, step, tag): independent of batch composition.

  `step` is a scalar or one step counter per row `[B]` (rows admitted at different times).
  """
  step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), request_ids.shape)

  def one(rid, st):
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(seed_key, rid), st), tag)
  return jax.vmap(one)(request_ids, step)
