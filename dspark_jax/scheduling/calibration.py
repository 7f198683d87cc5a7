"""Confidence-head calibration: DeepSpec's metrics and Sequential Temperature Scaling (STS).

Everything is numpy (float64). All metrics score the *cumulative* product `a_k = prod_{i<=k} c_i`
of the (raw or STS-calibrated) conditional confidences against the realised prefix bit
`y_k = 1[draft tokens 1..k all accepted]`, pooled over every round in which position k was
proposed (also rounds where an earlier token was rejected, label 0).

Binning (DeepSpec `confidence_head.py`): `p` is clipped to `[1e-8, 1 - 1e-8]`, coarse bin
`floor(20 p)` clamped to 19 (equal width), AUROC from a 1000-bin histogram counting the pairs
within a bin as 1/2.

Shapes: `N` rounds (samples), `P` draft positions; position k of the paper is column `k - 1`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from dspark_jax.scheduling.scheduler import calibrate_confidence

EPS = 1e-8
NUM_BINS = 20
NUM_FINE_BINS = 1000
DEFAULT_STS_GRID = np.round(np.arange(50, 501) / 100.0, 2)  # 0.50, 0.51, ..., 5.00 (451 values)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def _clip(p: np.ndarray) -> np.ndarray:
  return np.clip(np.asarray(p, np.float64), EPS, 1.0 - EPS)


def _binned_sums(p: np.ndarray, weights: np.ndarray, bins: int) -> np.ndarray:
  """Sums of `weights` per (column, equal-width bin of `p`).

  Args:
    p: `[n, G]` clipped predictions (G candidate calibrations of the same n samples).
    weights: `[n, G]` values to sum.
    bins: bin `floor(bins * p)` clamped to `bins - 1`.

  Returns:
    `[G, bins]` sums.
  """
  n, g = p.shape
  idx = np.minimum(np.floor(p * bins).astype(np.int64), bins - 1) + bins * np.arange(g)[None, :]
  return np.bincount(idx.ravel(), weights=weights.ravel(), minlength=g * bins).reshape(g, bins)


def _ece_columns(p: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
  """ECE of every column of `p` `[n, G]` against `y` `[n]`; `[G]` (NaN when n = 0)."""
  if p.shape[0] == 0:
    return np.full((p.shape[1],), np.nan)
  p = _clip(p)
  # sum_b (n_b / n) |mean_b(p) - mean_b(y)| = sum_b |sum_b(p - y)| / n
  gap = _binned_sums(p, p - np.asarray(y, np.float64).reshape(-1, 1), bins)
  return np.abs(gap).sum(axis=1) / p.shape[0]


def ece(p: np.ndarray, y: np.ndarray, bins: int = NUM_BINS) -> float:
  """Expected calibration error with equal-width bins.

  Args:
    p: `[n]` predicted probabilities (clipped to `[1e-8, 1 - 1e-8]`).
    y: `[n]` labels in {0, 1}.
    bins: number of equal-width bins; bin `floor(bins * p)` clamped to `bins - 1`.

  Returns:
    `sum_b (n_b / n) |mean_b(p) - mean_b(y)|` (NaN for n = 0).
  """
  return float(_ece_columns(np.asarray(p, np.float64).reshape(-1, 1), np.ravel(y), bins)[0])


def auroc(p: np.ndarray, y: np.ndarray, fine_bins: int = NUM_FINE_BINS) -> float:
  """ROC-AUC from a `fine_bins`-bin histogram; pairs in the same bin count 1/2.

  Args:
    p: `[n]` scores (clipped to `[1e-8, 1 - 1e-8]`).
    y: `[n]` labels in {0, 1}.
    fine_bins: histogram resolution.

  Returns:
    `(sum_b pos_b * sum_{b'<b} neg_b' + 1/2 sum_b pos_b neg_b) / (#pos * #neg)`; NaN without both
    classes.
  """
  p = _clip(p).ravel()
  y = np.asarray(y).ravel().astype(bool)
  idx = np.minimum(np.floor(p * fine_bins).astype(np.int64), fine_bins - 1)
  pos = np.bincount(idx[y], minlength=fine_bins).astype(np.float64)
  neg = np.bincount(idx[~y], minlength=fine_bins).astype(np.float64)
  num_pos, num_neg = pos.sum(), neg.sum()
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  neg_below = np.cumsum(neg) - neg
  return float((pos @ neg_below + 0.5 * pos @ neg) / (num_pos * num_neg))


def brier(p: np.ndarray, y: np.ndarray) -> float:
  """Mean squared error `mean (p - y)^2` of the clipped predictions `[n]` (NaN for n = 0)."""
  p = _clip(p).ravel()
  y = np.asarray(y, np.float64).ravel()
  return float(np.mean((p - y) ** 2)) if p.size else float("nan")


# ---------------------------------------------------------------------------------------------
# data preparation
# ---------------------------------------------------------------------------------------------
def prefix_labels(accepted: np.ndarray, n_eff: np.ndarray | None, num_positions: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Per-round accepted-draft counts -> realised prefix bits and the observed-position mask.

  Args:
    accepted: int `[N]` accepted draft tokens per round (the bonus token excluded).
    n_eff: int `[N]` effective proposal length per round (drafts verified, truncated at an
      accepted EOS), or None for `num_positions` everywhere.
    num_positions: P.

  Returns:
    labels: bool `[N, P]`, `labels[i, k] = k < accepted[i]` (prefix 1..k+1 all accepted).
    valid: bool `[N, P]`, `valid[i, k] = k < n_eff[i]` (position k was proposed and verified).
  """
  accepted = np.asarray(accepted, np.int64).ravel()
  n_eff = (np.full_like(accepted, num_positions) if n_eff is None
           else np.asarray(n_eff, np.int64).ravel())
  if n_eff.shape != accepted.shape:
    raise ValueError(f"n_eff shape {n_eff.shape} does not match accepted {accepted.shape}")
  if np.any(accepted < 0) or np.any(accepted > n_eff) or np.any(n_eff > num_positions):
    raise ValueError("need 0 <= accepted <= n_eff <= num_positions for every round")
  k = np.arange(num_positions)[None, :]
  return k < accepted[:, None], k < n_eff[:, None]


def _as_inputs(logits, prefix_accepted, valid):
  z = np.asarray(logits, np.float64)
  y = np.asarray(prefix_accepted, np.float64)
  if z.ndim != 2 or y.shape != z.shape:
    raise ValueError(f"need logits and prefix_accepted of one [N, P] shape, got {z.shape}, "
                     f"{y.shape}")
  mask = np.ones(z.shape, bool) if valid is None else np.asarray(valid, bool)
  if mask.shape != z.shape:
    raise ValueError(f"valid must have shape {z.shape}, got {mask.shape}")
  return z, y, mask


# ---------------------------------------------------------------------------------------------
# STS
# ---------------------------------------------------------------------------------------------
def fit_sts(logits: np.ndarray, prefix_accepted: np.ndarray, *, grid: Sequence[float] | None = None,
            bins: int = NUM_BINS, valid: np.ndarray | None = None,
            chunk: int = 64) -> np.ndarray:
  """Sequential Temperature Scaling: one temperature per position, fitted left to right.

  At position k the temperature `T_k` minimises (1-D grid search; on ties the smallest T) the
  `bins`-bin ECE of `prefix * sigmoid(z_k / T_k)` against `prefix_accepted[:, k]`, where `prefix`
  is the product of the already-calibrated positions `< k` (frozen).

  Args:
    logits: `[N, P]` raw confidence-head logits `z` (held-out, fixed-length rollouts).
    prefix_accepted: `[N, P]` realised prefix bits (non-increasing along P).
    grid: candidate temperatures (> 0; searched in ascending order), default `DEFAULT_STS_GRID`
      (0.50..5.00 step 0.01).
    bins: ECE bins.
    valid: optional bool `[N, P]`, rows used for position k (`n_eff > k`); default all.
    chunk: grid values evaluated at once (memory: `N * chunk` floats).

  Returns:
    float64 `[P]` temperatures (1.0 at a position without any valid row). Warns when a fitted
    temperature lies on an edge of the grid (widen the grid then).
  """
  z, y, mask = _as_inputs(logits, prefix_accepted, valid)
  grid = DEFAULT_STS_GRID if grid is None else np.unique(np.asarray(grid, np.float64))  # sorted
  if grid.size == 0 or np.any(grid <= 0):
    raise ValueError("the STS grid must be a non-empty set of temperatures > 0")
  temps = np.ones(z.shape[1])
  prefix = np.ones(z.shape[0])
  for k in range(z.shape[1]):
    rows = mask[:, k]
    if not np.any(rows):
      warnings.warn(f"STS: position {k} has no valid rows; keeping T = 1", stacklevel=2)
      continue
    zk, base = z[rows, k][:, None], prefix[rows][:, None]
    err = np.concatenate([
        _ece_columns(base * calibrate_confidence(zk / grid[None, i:i + chunk]), y[rows, k], bins)
        for i in range(0, grid.size, chunk)])
    best = int(np.argmin(err))
    temps[k] = grid[best]
    if grid.size > 1 and best in (0, grid.size - 1):
      warnings.warn(f"STS: position {k} temperature {temps[k]:.2f} sits on the grid edge "
                    f"[{grid[0]:.2f}, {grid[-1]:.2f}]; widen the grid", stacklevel=2)
    prefix = prefix * calibrate_confidence(z[:, k] / temps[k])
  return temps


def prior_confidence(prefix_accepted: np.ndarray, valid: np.ndarray | None = None
                     ) -> np.ndarray:
  """Mean conditional acceptance per position: `P(x_k accepted | x_<k accepted)`.

  Args:
    prefix_accepted: `[N, P]` realised prefix bits of fixed-length rounds.
    valid: optional bool `[N, P]`, rounds observed at position k.

  Returns:
    float64 `[P]` in `[0, 1]` (0 where no valid round reached position k).
  """
  y, mask = _as_inputs(prefix_accepted, prefix_accepted, valid)[1:]
  reached = np.concatenate([np.ones((y.shape[0], 1)), y[:, :-1]], axis=1) * mask
  hits = (y * mask).sum(axis=0)
  tries = reached.sum(axis=0)
  return np.where(tries > 0, hits / np.maximum(tries, 1), 0.0)


def cumulative_confidence(logits: np.ndarray, temperatures: np.ndarray | None = None
                          ) -> np.ndarray:
  """`[N, P]` logits -> `[N, P]` cumulative product of `sigmoid(z / T)` (raw if T is None)."""
  return np.cumprod(calibrate_confidence(np.asarray(logits, np.float64), temperatures), axis=1)


def _weighted_mean(values: Sequence[float], counts: Sequence[int]) -> float:
  v, w = np.asarray(values, np.float64), np.asarray(counts, np.float64)
  keep = np.isfinite(v) & (w > 0)
  return float(np.sum(v[keep] * w[keep]) / np.sum(w[keep])) if np.any(keep) else float("nan")


def calibration_report(logits: np.ndarray, prefix_accepted: np.ndarray,
                       temperatures: np.ndarray | None = None,
                       valid: np.ndarray | None = None) -> dict:
  """Per-position ECE / AUROC / Brier of the cumulative product (raw or calibrated).

  Args:
    logits: `[N, P]` raw confidence logits.
    prefix_accepted: `[N, P]` realised prefix bits.
    temperatures: `[P]` STS temperatures, or None for the raw head. Call once with and once without
      to report raw and calibrated AUROC (they may differ at k >= 2).
    valid: optional bool `[N, P]` observed positions.

  Returns:
    dict with lists of length P under "ece", "auroc", "brier", "count", and "summary": the
    count-weighted means {"ece", "auroc", "brier"} over positions (positions with an undefined
    metric, e.g. AUROC with a single class, are left out of that mean).
  """
  z, y, mask = _as_inputs(logits, prefix_accepted, valid)
  a = cumulative_confidence(z, temperatures)
  report = dict(ece=[], auroc=[], brier=[], count=[])
  for k in range(z.shape[1]):
    rows = mask[:, k]
    report["ece"].append(ece(a[rows, k], y[rows, k]))
    report["auroc"].append(auroc(a[rows, k], y[rows, k]))
    report["brier"].append(brier(a[rows, k], y[rows, k]))
    report["count"].append(int(rows.sum()))
  report["summary"] = {name: _weighted_mean(report[name], report["count"])
                       for name in ("ece", "auroc", "brier")}
  return report


def reliability_diagram(logits: np.ndarray, prefix_accepted: np.ndarray,
                        temperatures: np.ndarray, path, positions: Sequence[int] | None = None,
                        *, valid: np.ndarray | None = None, bins: int = NUM_BINS):
  """Writes a PNG like the paper's Fig. 6: per position, reliability before and after STS.

  Each panel plots, per non-empty bin, the mean predicted prefix acceptance against the observed
  rate, for the raw head and for the STS-calibrated one, with the diagonal and a histogram of the
  calibrated predictions (fraction of samples per bin, right axis).

  Args:
    logits: `[N, P]` raw confidence logits.
    prefix_accepted: `[N, P]` realised prefix bits.
    temperatures: `[P]` STS temperatures.
    path: output PNG path.
    positions: 0-based positions to plot (default all).
    valid: optional bool `[N, P]` observed positions.
    bins: reliability bins.

  Returns:
    `path`.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  z, y, mask = _as_inputs(logits, prefix_accepted, valid)
  positions = list(range(z.shape[1])) if positions is None else list(positions)
  curves = dict(raw=cumulative_confidence(z), sts=cumulative_confidence(z, temperatures))
  fig, axes = plt.subplots(1, len(positions), figsize=(3.6 * len(positions), 3.6), squeeze=False)
  for ax, k in zip(axes[0], positions):
    rows = mask[:, k]
    hist = ax.twinx()
    for name, style in (("raw", "o-"), ("sts", "s-")):
      p = curves[name][rows, k]
      pc, yk = _clip(p)[:, None], y[rows, k][:, None]
      count, sum_p, sum_y = (_binned_sums(pc, w, bins)[0] for w in (np.ones_like(pc), pc, yk))
      seen = count > 0
      ax.plot(sum_p[seen] / count[seen], sum_y[seen] / count[seen], style, ms=3,
              label=f"{'raw' if name == 'raw' else 'STS'} (ECE {100 * ece(p, y[rows, k]):.1f}%)")
      if name == "sts":
        hist.bar((np.arange(bins) + 0.5) / bins, count / max(count.sum(), 1), width=1.0 / bins,
                 alpha=0.2, color="gray")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), title=f"Position {k + 1} (T = {temperatures[k]:.2f})",
           xlabel="Predicted prefix acceptance", ylabel="Observed prefix acceptance")
    hist.set(ylim=(0, 1), yticks=[])
    ax.legend(loc="upper left", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
