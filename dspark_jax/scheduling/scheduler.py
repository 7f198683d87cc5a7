"""DSpark's verify-length scheduler (paper §3.2.2 Algorithm 1, §5.2) as pure array functions.

Every function here is written once against an array module `xp` (`numpy` or `jax.numpy`):
numpy inputs give numpy outputs with float64 math, jax inputs (or tracers inside `jax.jit`) give
jax outputs with float32 math, static shapes and no Python loop over data-dependent values.

Shapes: `R` requests (the rows, `B` in the project legend of `dspark_jax.typing`), `P` draft
positions per block; the paper's 1-based position `k` is the 0-based slot `k - 1` here.

The scheduler's inputs are *conditional* confidences `c[r, k]` (already calibrated by STS, see
`calibrate_confidence`); everything it ranks is the cumulative survival `a = cumprod(c, axis=1)`.
A verify length `l_r` in `[0, P]` means verifying `1 + l_r` tokens (anchor plus `l_r` drafts);
the step verifies `n = sum_r (1 + l_r)` tokens and `sps[n]` is the engine's steps/s at `n`.

Algorithm 1 over the candidates `{(r, j): a[r, j] > 0}` sorted by `a` descending (stable: ties keep
the r-major, j-minor order so that `(r, j)` precedes `(r, j + 1)`): the prefix of length `m` of that
list has objective `Theta_m = (R + sum_{i<m} a_(i)) * sps[R + m]` (`Theta_0 = R * sps[R]`, all
lengths 0). `Theta_m = -inf` where `R + m` lies beyond the table, beyond `max_tokens` (for `m > 0`)
or past the last candidate. The chosen prefix `m*` gives `l_r` = how many of its items belong to
row `r`, which is a prefix of row `r` because of the stable order.

Policies:
  "fixed":      `l = P`.
  "threshold":  DeepSpec's static rule on the conditional confidence: `l` = first 0-based slot with
                `c < threshold` (strict), else `P`; `l` can be 0.
  "early_stop": Algorithm 1 with its break: walk the sorted list while `Theta` strictly improves,
                `m*` = the first `m` with `Theta_{m+1} <= Theta_m`. Lossless on fresh confidences.
  "global":     no early stop: `m* = argmax_m Theta_m` (first maximum, i.e. the smallest batch on
                ties). Not lossless on the current block's confidences (Appendix A): use it only on
                stale ones (the "async" policy does).
  "async":      §5.2: the capacity `K` is the global-search `m*` on `stale_confidence` (the
                previous block's confidences), then the top-`K` candidates of the *fresh* survival
                are admitted (same stable order). Choices the paper leaves open, pinned here:
                - a row whose stale confidences are all zero (e.g. a request new this round)
                  contributes only its anchor to the batch and no candidate to `K`;
                - if fewer than `K` fresh candidates have `a > 0`, only those are admitted (the
                  batch shrinks, it is never padded);
                - `K` is at most `R * P` (it counts stale candidates) and obeys the SPS table
                  length and `max_tokens` like the other searches.
                Neither choice looks at the current block's tokens, so the policy stays lossless.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.typing import Array

POLICIES = ("fixed", "threshold", "early_stop", "global", "async")
SPS_POLICIES = ("early_stop", "global", "async")
# `since_probe` of a loop that has not proposed yet: any probe gap has passed.
NEVER_PROPOSED = 1 << 20


# ---------------------------------------------------------------------------------------------
# array-module helpers
# ---------------------------------------------------------------------------------------------
def _array_module(*arrays: Any):
  """`jax.numpy` if any argument is a jax array (or tracer), else `numpy`."""
  return jnp if any(isinstance(x, jax.Array) for x in arrays) else np


def _float_dtype(xp):
  return np.float64 if xp is np else jnp.float32


def _concrete(x: Any) -> np.ndarray | None:
  """`x` as a float64 numpy array if its value is known now (not a tracer), else None."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError):
    return None


def _check_threshold(threshold: Any) -> None:
  value = _concrete(threshold)
  if value is not None and not np.all((value >= 0.0) & (value <= 1.0)):
    raise ValueError(f"threshold must lie in [0, 1], got {value.tolist()}")


def _check_policy(policy: str, *, sps: Any, threshold: Any) -> None:
  if policy not in POLICIES:
    raise ValueError(f"unknown scheduler policy {policy!r}; expected one of {POLICIES}")
  if policy == "threshold" and threshold is None:
    raise ValueError("policy 'threshold' needs a threshold in [0, 1]")
  if policy in SPS_POLICIES and sps is None:
    raise ValueError(f"policy {policy!r} needs an sps table (steps/s indexed by verify tokens)")
  _check_threshold(threshold)


def calibrate_confidence(logits: Array, temperatures: Array | None = None) -> Array:
  """STS-calibrated conditional confidences `sigmoid(z / T)`.

  Args:
    logits: `[..., P]` raw confidence-head logits `z`.
    temperatures: `[P]` per-position temperatures (> 0), or None for `T = 1`.

  Returns:
    `[..., P]` conditional confidences in `[0, 1]` (float64 for numpy, float32 for jax).
  """
  xp = _array_module(logits, temperatures)
  z = xp.asarray(logits, dtype=_float_dtype(xp))
  if temperatures is not None:
    t = xp.asarray(temperatures, dtype=z.dtype)
    if t.shape != z.shape[-1:]:
      raise ValueError(f"temperatures must have shape {z.shape[-1:]}, got {t.shape}")
    z = z / xp.reshape(t, (1,) * (z.ndim - 1) + t.shape)
  if xp is jnp:
    return jax.nn.sigmoid(z)
  with np.errstate(over="ignore"):  # exp(-z) = inf for z < -709 gives the right limit 0
    return 1.0 / (1.0 + np.exp(-z))


def survival(confidence: Array) -> Array:
  """Cumulative survival `a[r, j] = prod_{i<=j} c[r, i]`, `[R, P]` -> `[R, P]`."""
  return _array_module(confidence).cumprod(confidence, axis=1)


# ---------------------------------------------------------------------------------------------
# the shared search
# ---------------------------------------------------------------------------------------------
def _sorted_candidates(a: Array, xp) -> tuple[Array, Array]:
  """Stable descending order of the flattened survival and the sorted values.

  Args:
    a: `[R, P]` survival; entries that are not > 0 (zero, NaN) become 0, i.e. no candidate.

  Returns:
    order: int `[R*P]`, flat indices `r * P + j` best first; equal values keep r-major/j-minor.
    values: `[R*P]` the survival in that order (candidates first, then the zeros).
  """
  flat = xp.reshape(a, (-1,))
  flat = xp.where(flat > 0, flat, xp.zeros((), flat.dtype))
  order = xp.argsort(-flat, stable=True)
  return order, flat[order]


def _objective(values: Array, num_rows: int, sps: Array, max_tokens: Any, xp) -> Array:
  """`Theta_m`, `m = 0..R*P`, for the prefixes of the sorted list; -inf where not allowed.

  Args:
    values: `[R*P]` sorted survival from `_sorted_candidates`.
    num_rows: R.
    sps: `[N+1]` steps/s indexed by verify tokens.
    max_tokens: optional cap on the verify tokens `R + m` (ignored for `m = 0`).

  Returns:
    `[R*P + 1]` objective.
  """
  dtype = values.dtype
  m = xp.arange(values.shape[0] + 1)
  n = num_rows + m
  # Sequential accumulation R + a_(0) + a_(1) + ... (numpy's cumsum is left to right), as in
  # the spec's loop, so float64 ties resolve identically.
  tau = xp.cumsum(xp.concatenate([xp.full((1,), num_rows, dtype), values]))
  table = xp.asarray(sps, dtype=dtype)
  rate = table[xp.minimum(n, table.shape[0] - 1)]
  allowed = (n < table.shape[0]) & xp.concatenate([xp.ones((1,), bool), values > 0])
  if max_tokens is not None:
    allowed = allowed & ((n <= max_tokens) | (m == 0))
  return xp.where(allowed, tau * rate, xp.full((), -xp.inf, dtype))


def _early_stop_prefix(theta: Array, xp) -> Array:
  """First `m` whose successor does not strictly improve (Algorithm 1's break)."""
  stop = xp.concatenate([~(theta[1:] > theta[:-1]), xp.ones((1,), bool)])
  return xp.argmax(stop)


def _lengths_of_prefix(order: Array, prefix: Array, shape: tuple[int, int], xp) -> Array:
  """`l_r` = number of the first `prefix` sorted items that belong to row r; int32 `[R]`."""
  rank = xp.argsort(order)  # inverse permutation: sorted position of every flat item
  admitted = xp.reshape(rank < prefix, shape)
  return xp.sum(admitted, axis=1).astype(np.int32)


def schedule_verify(confidence: Array, sps: Array | None, *, policy: str = "early_stop",
                    threshold: Any = None, stale_confidence: Array | None = None,
                    max_tokens: Any = None, live: Array | None = None) -> Array:
  """Verify lengths per request for one round (see the module docstring for the policies).

  Args:
    confidence: `[R, P]` calibrated conditional confidences `c[r, k]` in `[0, 1]` of the block about
      to be verified.
    sps: `[N+1]` engine steps/s indexed by the total verify tokens `n = sum_r (1 + l_r)` (index 0
      unused); prefixes needing `n > N` are never chosen. Needed by "early_stop", "global", "async".
    policy: one of `POLICIES` (static under jit).
    threshold: scalar in `[0, 1]` for "threshold".
    stale_confidence: `[R, P]` the previous block's calibrated confidences, for "async" (all-zero
      rows contribute no candidate to the capacity `K`).
    max_tokens: optional cap on `n` (python int or int scalar array).
    live: bool `[R]` rows that take part (default all): a slot whose request has finished
      verifies nothing, gets length 0 and does not count towards R.

  Returns:
    int32 `[R]` verify lengths `l_r` in `[0, P]` (numpy for numpy inputs, else jax).
  """
  _check_policy(policy, sps=sps, threshold=threshold)
  xp = _array_module(confidence, sps, stale_confidence, threshold, max_tokens, live)
  c = xp.asarray(confidence, dtype=_float_dtype(xp))
  if c.ndim != 2:
    raise ValueError(f"confidence must be [R, P], got shape {c.shape}")
  shape = c.shape
  num_rows: Any = shape[0]
  if live is not None:
    live = xp.asarray(live, dtype=bool)
    c = xp.where(live[:, None], c, xp.zeros((), c.dtype))
    num_rows = xp.sum(live.astype(np.int32))
    if stale_confidence is not None:
      stale_confidence = xp.where(live[:, None], xp.asarray(stale_confidence, dtype=c.dtype),
                                  xp.zeros((), c.dtype))
  gate = (lambda l: l) if live is None else (lambda l: xp.where(live, l, 0).astype(np.int32))
  if policy == "fixed":
    return gate(xp.full((shape[0],), shape[1], np.int32))
  if policy == "threshold":
    keep = ~(c < xp.reshape(xp.asarray(threshold, dtype=c.dtype), ()))
    return gate(xp.sum(xp.cumprod(keep.astype(np.int32), axis=1), axis=1).astype(np.int32))
  if np.ndim(sps) != 1 or np.shape(sps)[0] < 1:
    raise ValueError(f"sps must be a non-empty 1-D table, got shape {np.shape(sps)}")
  order, values = _sorted_candidates(survival(c), xp)
  theta = _objective(values, num_rows, sps, max_tokens, xp)
  if policy == "early_stop":
    prefix = _early_stop_prefix(theta, xp)
  elif policy == "global":
    prefix = xp.argmax(theta)  # first maximum: the smallest batch on ties
  else:  # async
    if stale_confidence is None:
      raise ValueError("policy 'async' needs stale_confidence [R, P] (the previous block)")
    stale = xp.asarray(stale_confidence, dtype=c.dtype)
    if stale.shape != shape:
      raise ValueError(f"stale_confidence must have shape {shape}, got {stale.shape}")
    _, stale_values = _sorted_candidates(survival(stale), xp)
    capacity = xp.argmax(_objective(stale_values, num_rows, sps, max_tokens, xp))
    prefix = xp.minimum(capacity, xp.sum(values > 0))
  return _lengths_of_prefix(order, prefix, shape, xp)


def propose_pays(stale_confidence: Array, sps: Array, propose_cost: Any, *,
                 live: Array | None = None, max_tokens: Any = None) -> Array:
  """Whether a draft-verify round is expected to beat a plain decode step.

  Decided from the previous block's (stale) confidences only, so skipping the draft for a
  round never looks at anything the round itself produces (lossless). A proposing round
  that verifies `n = R + m` tokens is worth `(R + sum of the m best a) / (propose_cost +
  1 / sps[n])` tokens/s (the best m, global search: the confidences are stale); a plain
  step is worth `R * sps[R]`.

  Args:
    stale_confidence: `[R, P]` calibrated conditional confidences of the previous block
      (rows without one hold 0: they count their anchor only).
    sps: `[N+1]` verify steps/s by tokens.
    propose_cost: seconds one propose call costs (scalar).
    live: bool `[R]` rows taking part (default all).
    max_tokens: optional cap on `n`.

  Returns:
    bool scalar.
  """
  xp = _array_module(stale_confidence, sps, propose_cost, live)
  c = xp.asarray(stale_confidence, dtype=_float_dtype(xp))
  num_rows: Any = c.shape[0]
  if live is not None:
    live = xp.asarray(live, dtype=bool)
    c = xp.where(live[:, None], c, xp.zeros((), c.dtype))
    num_rows = xp.sum(live.astype(np.int32))
  _, values = _sorted_candidates(survival(c), xp)
  theta = _objective(values, num_rows, sps, max_tokens, xp)  # tau * sps, -inf where barred
  m = xp.arange(theta.shape[0])
  table = xp.asarray(sps, dtype=c.dtype)
  rate = table[xp.minimum(num_rows + m, table.shape[0] - 1)]
  tau = theta / xp.maximum(rate, xp.asarray(1e-30, c.dtype))
  cost = xp.asarray(propose_cost, dtype=c.dtype)
  spec = xp.where(xp.isfinite(theta), tau / (cost + 1.0 / xp.maximum(rate, 1e-30)), -xp.inf)
  plain = num_rows * table[xp.minimum(num_rows, table.shape[0] - 1)]
  return xp.max(spec) > plain


# ---------------------------------------------------------------------------------------------
# the pytree wrapper
# ---------------------------------------------------------------------------------------------
def _as_array(x: Any) -> Any:
  """Python scalars / sequences become float64 numpy arrays; arrays and tracers are kept."""
  return np.asarray(x, dtype=np.float64) if isinstance(x, (int, float, list, tuple)) else x


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scheduler:
  """A verify-length policy with its tables, passable to `jax.jit` as an argument.

  Only `policy` is static: new `sps` / `temperatures` / `threshold` arrays of the same shapes do not
  recompile a jitted function that takes the scheduler.

  Attributes:
    policy: static; one of `POLICIES`.
    sps: `[N+1]` steps/s indexed by verify tokens (needed by "early_stop", "global", "async").
    temperatures: `[P]` STS temperatures (> 0), or None for raw `sigmoid(z)`.
    threshold: scalar in `[0, 1]` for "threshold"; it applies to the calibrated conditional
      confidence (DeepSpec's rule exactly when `temperatures` is None).
    propose_cost: seconds per propose call; with `sps`, rounds whose stale estimate says no
      verify length pays for the draft run a plain decode step instead (`propose_pays`),
      and a forced probe proposes anyway to refresh the estimate: `probe_every` rounds after
      the last proposal, doubling after every probe that finds the draft still not paying
      (up to `probe_every * 2**max_probe_level`), back to `probe_every` once it pays. None:
      always propose.
    probe_every: static; see `propose_cost`.
    max_probe_level: static; see `propose_cost`.
    prior: `[P]` calibrated conditional confidences a row without a proposed block is
      assumed to have (the draft's mean per-position acceptance on its calibration rollouts,
      `sts.json`'s "prior"), or None. Without it such a row counts its anchor only and a loop
      that has not proposed yet probes at once; with it the first round proposes only if the
      prior pays, and otherwise the first probe waits the longest gap
      (`probe_every * 2**max_probe_level` rounds), as if the calibration rollouts had been
      probes that found the draft not paying. Draft-side history only, so still lossless.
  """

  policy: str = dataclasses.field(metadata=dict(static=True), default="early_stop")
  sps: Array | None = None
  temperatures: Array | None = None
  threshold: Array | None = None
  propose_cost: Array | None = None
  probe_every: int = dataclasses.field(metadata=dict(static=True), default=8)
  max_probe_level: int = dataclasses.field(metadata=dict(static=True), default=3)
  prior: Array | None = None

  def __post_init__(self):
    for name in ("sps", "temperatures", "threshold", "propose_cost", "prior"):
      object.__setattr__(self, name, _as_array(getattr(self, name)))
    # Values are checked when known; tracers (inside jit) and tree placeholders pass through.
    _check_policy(self.policy, sps=self.sps, threshold=self.threshold)
    temps = _concrete(self.temperatures)
    if temps is not None and not np.all(temps > 0):
      raise ValueError(f"temperatures must all be > 0, got {temps.tolist()}")
    prior = _concrete(self.prior)
    if prior is not None and not (prior.ndim == 1 and np.all((prior >= 0) & (prior <= 1))):
      raise ValueError(f"prior must be a [P] vector of confidences in [0, 1], got "
                       f"{prior.tolist()}")
    if self.probe_every < 1 or self.max_probe_level < 0:
      raise ValueError(f"need probe_every >= 1 and max_probe_level >= 0, got "
                       f"{self.probe_every} and {self.max_probe_level}")

  def calibrate(self, logits: Array) -> Array:
    """`[R, P]` raw logits -> `[R, P]` conditional confidences `sigmoid(z / T)`."""
    return calibrate_confidence(logits, self.temperatures)

  def wants_proposal(self, stale_logits: Array, live: Array, since_probe: Array,
                     probe_level: Array) -> tuple[Array, Array]:
    """Whether to propose this round, from past rounds only.

    Args:
      stale_logits: `[R, P]` raw confidence logits of each row's latest proposed block
        (`-inf` for a row that has none yet).
      live: bool `[R]`.
      since_probe: int32 scalar, rounds since the last proposing round (`NEVER_PROPOSED` +
        rounds before the loop's first proposal).
      probe_level: int32 scalar, forced probes in a row that found the draft not paying.

    Returns:
      (propose bool scalar, the next round's probe_level int32 scalar). Always True
      without `propose_cost` / `sps`.
    """
    if self.propose_cost is None or self.sps is None:
      return jnp.asarray(True), jnp.zeros((), jnp.int32)
    stale = self.calibrate(stale_logits)
    if self.prior is not None:
      no_block = jnp.isneginf(stale_logits[:, :1])
      stale = jnp.where(no_block, jnp.asarray(self.prior, stale.dtype)[None], stale)
      fresh = since_probe >= NEVER_PROPOSED
      since_probe = jnp.where(fresh, since_probe - NEVER_PROPOSED, since_probe)
      probe_level = jnp.where(fresh, self.max_probe_level, probe_level)
    pays = propose_pays(stale, self.sps, self.propose_cost, live=live)
    gap = self.probe_every * jnp.left_shift(1, probe_level)
    probe = ~pays & (since_probe >= gap)
    level = jnp.where(pays, 0, jnp.where(probe, jnp.minimum(probe_level + 1,
                                                             self.max_probe_level),
                                         probe_level))
    return pays | probe, level.astype(jnp.int32)

  def __call__(self, confidence_logits: Array, *, stale: Array | None = None,
               max_tokens: Any = None, live: Array | None = None) -> Array:
    """Verify lengths for one round.

    Args:
      confidence_logits: `[R, P]` raw confidence-head logits of the block about to be verified.
      stale: `[R, P]` raw logits of the previous block, for "async"; a row without a previous
        block should hold `-inf` (confidence 0: no candidate towards the capacity `K`).
      max_tokens: optional cap on the verify tokens `sum_r (1 + l_r)`.

    Returns:
      int32 `[R]` lengths in `[0, P]`.
    """
    stale_confidence = None if stale is None else self.calibrate(stale)
    return schedule_verify(self.calibrate(confidence_logits), self.sps, policy=self.policy,
                           threshold=self.threshold, stale_confidence=stale_confidence,
                           max_tokens=max_tokens, live=live)
