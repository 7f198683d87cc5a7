"""Load model: verify budget and tokens/s against concurrency from a profile and rollouts.

Paper Fig. 8 (verify budget per request shrinking as concurrency grows, and the throughput
that buys) needs concurrencies this machine cannot run for real. This replays *recorded*
rounds instead: each of `R` simulated requests walks one recorded trajectory (the raw
confidence logits of every block and how many drafts the target accepted when all `P` were
verified), the scheduler under test picks verify lengths with the same functions the jitted
loop uses (numpy path), acceptance is the recorded count cut at the chosen length (exact for
chain verification: the first `l` verdicts do not depend on `l`), and a round costs
`propose_cost + 1 / sps[n]` (a plain decode step: `1 / sps[R]`) from the profiled curve.

Dimensions: R simulated requests, P draft positions, N verify tokens of a step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dspark_jax.scheduling.scheduler import (NEVER_PROPOSED, calibrate_confidence, propose_pays,
                                             schedule_verify)

LOAD_POLICIES = ("ar", "fixed", "early_stop")


def simulate(trajectories: Sequence[tuple[np.ndarray, np.ndarray]], sps: np.ndarray,
             propose_cost: float, concurrency: int, *, policy: str,
             temperatures: np.ndarray | None = None, rounds: int = 256, probe_every: int = 8,
             max_probe_level: int = 3, prior: np.ndarray | None = None, seed: int = 0) -> dict:
  """Replays `rounds` steps of `concurrency` requests under one policy.

  Args:
    trajectories: per recorded request, (raw confidence logits `[T, P]`, accepted drafts
      `[T]` under full-length verification), T rounds each (T >= 1).
    sps: `[N+1]` verify steps/s by total verify tokens (must cover `R * (P + 1)` for
      "fixed"; other policies are held to the table).
    propose_cost: seconds per propose call at this batch.
    concurrency: R.
    policy: "ar" (plain decoding), "fixed" (all P drafts every round) or "early_stop"
      (Algorithm 1 with the plain-step fallback and backed-off probes of `Scheduler`).
    temperatures: `[P]` STS temperatures or None.
    prior: `[P]` calibrated confidences assumed for a request without a block (see
      `Scheduler.prior`), or None.
    rounds: simulated steps.
    seed: picks each request's trajectory and starting round.

  Returns:
    dict: tokens_per_s (all requests), per_user_tokens_per_s, verify_per_request (mean
    `1 + l` over proposing rounds; 1 for plain steps), proposed_share, tau.
  """
  if policy not in LOAD_POLICIES:
    raise ValueError(f"policy must be one of {LOAD_POLICIES}, got {policy!r}")
  sps = np.asarray(sps, np.float64)
  r_count = int(concurrency)
  p = np.asarray(trajectories[0][0]).shape[1]
  if r_count >= len(sps):
    raise ValueError(f"the SPS table ({len(sps) - 1} tokens) does not cover {r_count} requests")
  if policy == "fixed" and r_count * (p + 1) >= len(sps):
    raise ValueError(f"the SPS table ({len(sps) - 1} tokens) does not cover {r_count} x "
                     f"{p + 1} verify tokens")
  rng = np.random.default_rng(seed)
  pick = rng.integers(len(trajectories), size=r_count)
  conf = [np.asarray(trajectories[i][0], np.float64) for i in pick]
  acc = [np.asarray(trajectories[i][1], np.int64) for i in pick]
  cursor = np.array([rng.integers(len(a)) for a in acc])
  stale = np.full((r_count, p), -np.inf)
  # As `Scheduler.wants_proposal`: with a prior, the rollouts it came from stand in for
  # probes, so the first forced probe waits the longest gap.
  since_probe, level = (NEVER_PROPOSED, 0) if prior is None else (0, max_probe_level)
  tokens = seconds = 0.0
  verified, proposing = [], 0
  for _ in range(rounds):
    z = np.stack([c[t % len(c)] for c, t in zip(conf, cursor)])
    a = np.array([x[t % len(x)] for x, t in zip(acc, cursor)])
    cursor += 1
    if policy == "ar":
      tokens += r_count
      seconds += 1.0 / sps[r_count]
      continue
    propose = True
    if policy == "early_stop":
      c = calibrate_confidence(stale, temperatures)
      if prior is not None:
        c = np.where(np.isneginf(stale[:, :1]), np.asarray(prior, np.float64)[None], c)
      pays = bool(propose_pays(c, sps, propose_cost))
      gap = probe_every * (1 << level)
      probe = not pays and since_probe >= gap
      level = 0 if pays else (min(level + 1, max_probe_level) if probe else level)
      propose = pays or probe
    if not propose:  # a plain decode step
      since_probe += 1
      tokens += r_count
      seconds += 1.0 / sps[r_count]
      continue
    since_probe = 0
    proposing += 1
    if policy == "fixed":
      ell = np.full(r_count, p)
    else:
      ell = np.asarray(schedule_verify(calibrate_confidence(z, temperatures), sps,
                                       policy="early_stop"))
    stale = z
    n = int(np.sum(1 + ell))
    tokens += float(np.sum(np.minimum(a, ell) + 1))
    seconds += propose_cost + 1.0 / sps[n]
    verified.append(n / r_count)
  return {"tokens_per_s": tokens / seconds, "per_user_tokens_per_s": tokens / seconds / r_count,
          "verify_per_request": float(np.mean(verified)) if verified else 1.0,
          "proposed_share": proposing / rounds, "tau": tokens / (rounds * r_count)}


def trajectories_from_stats(confidence_logits, accept_lengths, verify_lengths,
                            num_draft: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Rollouts of a fixed-length run (`GenerationStats` fields) as `simulate` trajectories.

  Rounds that did not verify all `num_draft` drafts, and each row's last round (cut short
  by the token limit or a stop), are dropped: their acceptance is not fully observed.
  """
  out = []
  for z, acc, ver in zip(confidence_logits, accept_lengths, verify_lengths):
    keep = [i for i in range(len(acc) - 1) if ver[i] == num_draft]
    if keep:
      out.append((np.asarray(z, np.float64)[keep], np.asarray(acc)[keep] - 1))
  return out
