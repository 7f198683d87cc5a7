"""Measured costs of the loop's pieces: the verify SPS curve, propose time, round split.

The loop runs as one `lax.while_loop`, so its parts cannot be timed from the host. Instead
each piece is jitted alone in a `fori_loop` of `rounds` calls on a prefilled batch of the
same shapes, timed, and divided by `rounds`. Each iteration's input depends on the previous
one so XLA can neither hoist nor merge the calls.

`sps_profile` is what the scheduler reads: steps/s of the packed verify forward for every
total verify-token count n (the cost of the compiled budget that holds n), plus the
propose time per round. Profiles are cached under the user cache dir, keyed by target,
draft geometry, device, dtype, batch bucket, block and context bucket.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.decoding import loop as loop_lib
from dspark_jax.decoding import sampling
from dspark_jax.decoding import speculative
from dspark_jax.decoding.state import Batch
from dspark_jax.engine import Engine, bucket


def median_time(fn, repeats: int):
  """Runs `fn` `repeats` times; returns (median seconds, the last result)."""
  times, res = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    res = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), res


@functools.partial(jax.jit, static_argnames=("tgraph", "dgraph", "runtime"))
def _setup(tgraph, tparams, dgraph, dparams, runtime, batch, cache, dstate):
  tmodel, draft = nnx.merge(tgraph, tparams), nnx.merge(dgraph, dparams)
  cache, logits, ptaps = loop_lib.prefill(tmodel, batch, cache, runtime.target_taps(draft))
  first = logits.argmax(-1).astype(jnp.int32)
  dstate = runtime.prefill(draft, tmodel, dstate, ptaps, batch, first)
  return cache, dstate, first


@functools.partial(jax.jit,
                   static_argnames=("tgraph", "dgraph", "runtime", "num_draft", "rounds"))
def _propose_loop(tgraph, tparams, dgraph, dparams, runtime, dstate, cache_lengths, anchor, key,
                  params, *, num_draft: int, rounds: int):
  tmodel, draft = nnx.merge(tgraph, tparams), nnx.merge(dgraph, dparams)

  def body(i, acc):
    keys = jax.random.split(jax.random.fold_in(key, i), anchor.shape[0])
    # The anchor depends on the previous iteration so XLA cannot hoist or merge the calls.
    prop = runtime.propose(draft, tmodel, dstate, (anchor + acc) % 7, cache_lengths, keys,
                           params, num_draft)
    return acc + prop.tokens[:, -1]

  return jax.lax.fori_loop(0, rounds, body, anchor * 0)


@functools.partial(jax.jit, static_argnames=("tgraph", "taps", "rounds", "budget"))
def _verify_loop(tgraph, tparams, cache, anchor, drafts, verify_len, *, taps, rounds: int,
                 budget: int | None):
  """`rounds` verify calls; dense when `budget` is None, else packed into `budget` tokens."""
  tmodel = nnx.merge(tgraph, tparams)
  live = jnp.ones(anchor.shape, bool)

  def body(i, carry):
    c, acc = carry
    a = (anchor + acc) % 7
    if budget is None:
      logits, _, pending = speculative.verify(tmodel, c, a, drafts, taps)
    else:
      logits, _, pending = speculative.verify_packed(tmodel, c, a, drafts, verify_len, live,
                                                     taps, (budget,))
    return c.write_pending(pending).commit(cache.lengths), acc + logits[:, 0].argmax(-1).astype(acc.dtype)

  return jax.lax.fori_loop(0, rounds, body, (cache, anchor * 0))[1]


class _Prepared:
  """A prefilled batch of `generate`'s shapes, for timing loop pieces alone."""

  def __init__(self, target, draft, prompts, num_draft: int):
    b = bucket(len(prompts), minimum=1)
    tp = bucket(max(len(p) for p in prompts))
    tokens = np.zeros((b, tp), np.int32)
    lengths = np.ones((b,), np.int32)
    for j in range(b):
      ids = prompts[j % len(prompts)]
      tokens[j, :len(ids)] = ids
      lengths[j] = len(ids)
    batch = Batch(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                  max_new=jnp.full((b,), 1, jnp.int32),
                  stop_tokens=jnp.full((b, 1), -1, jnp.int32),
                  request_ids=jnp.arange(b, dtype=jnp.int32))
    engine = Engine.for_target(target)
    capacity = tp + 2 * (num_draft + 1)
    _, cache = engine._cache(b, capacity)
    _, dstate = engine._draft_state(draft, b, capacity)
    self.common = (target.graphdef, target.params, draft.graphdef, draft.params, draft.runtime)
    self.cache, self.dstate, self.anchor = _setup(*self.common, batch, cache, dstate)
    self.target, self.draft, self.b, self.tp, self.p = target, draft, b, tp, num_draft
    self.taps = draft.runtime.target_taps(draft.module)

  def propose_ms(self, rounds: int, repeats: int) -> float:
    params = sampling.SamplingParams.make(0.0, 0, 1.0)
    lengths = jnp.array(self.cache.lengths)

    def run():
      return jax.block_until_ready(_propose_loop(*self.common, self.dstate, lengths, self.anchor,
                                                 jax.random.key(0), params, num_draft=self.p,
                                                 rounds=rounds))
    run()  # compile
    return 1e3 * median_time(run, repeats)[0] / rounds

  def verify_ms(self, rounds: int, repeats: int, tokens: int | None = None) -> float:
    """ms per verify call; `tokens` packs that many verify tokens (else dense B(P+1))."""
    drafts = jnp.zeros((self.b, self.p), jnp.int32) + self.anchor[:, None]
    if tokens is None:
      ell = np.full((self.b,), self.p, np.int32)
    else:  # spread tokens - B drafts over the rows, anchors first
      extra = max(0, tokens - self.b)
      ell = np.array([min(self.p, extra // self.b + (r < extra % self.b))
                      for r in range(self.b)], np.int32)

    def run():
      return jax.block_until_ready(_verify_loop(
          self.target.graphdef, self.target.params, self.cache, self.anchor, drafts,
          jnp.asarray(ell), taps=self.taps, rounds=rounds, budget=tokens))
    run()  # compile
    return 1e3 * median_time(run, repeats)[0] / rounds


def round_split(target, draft, prompts, rounds: int = 16, repeats: int = 3,
                num_draft: int | None = None) -> dict:
  """Milliseconds per call of the draft's propose and the target's dense verify, alone.

  Args:
    prompts: token id lists (a batch of `generate`'s shapes: bucketed the same way).
    rounds: calls per timed loop.
    num_draft: draft tokens per round (default: the draft's trained block).

  Returns:
    {"propose_ms", "verify_ms", "rounds_timed"}.
  """
  prep = _Prepared(target, draft, prompts, num_draft or draft.config.block_size)
  return {"propose_ms": prep.propose_ms(rounds, repeats),
          "verify_ms": prep.verify_ms(rounds, repeats), "rounds_timed": rounds}


# ---------------------------------------------------------------------------------------------
# SPS profiles
# ---------------------------------------------------------------------------------------------
def _profile_key(target, draft, batch: int, num_draft: int, context: int) -> dict:
  dev = jax.devices()[0]
  return {"target": target.path or repr(target.config), "target_config": repr(target.config),
          "draft_config": repr(draft.config), "device": dev.device_kind,
          "backend": jax.default_backend(), "dtype": jnp.dtype(target.dtype).name,
          "batch": batch, "num_draft": num_draft, "context": context,
          "budgets": list(speculative.token_budgets(batch, num_draft))}


def profile_path(key: dict) -> str:
  from dspark_jax.demo.models import cache_root  # the user cache dir (not the checkout)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(str(cache_root()), "profiles", f"sps-{digest}.json")


def sps_profile(target, draft, *, batch: int, num_draft: int | None = None, context: int = 128,
                rounds: int = 8, repeats: int = 3, measure: bool = True,
                refresh: bool = False) -> dict | None:
  """The verify steps/s curve and propose cost for (target, draft, device, dtype, batch bucket).

  Args:
    batch: rows per call (bucketed to a power of two).
    num_draft: P (default the draft's block).
    context: prompt length of the timed batch (bucketed: CPU costs grow with it).
    measure: measure when no cached profile exists (else return None).
    refresh: re-measure even if cached.

  Returns:
    {"sps": [N+1] steps/s indexed by verify tokens (index 0 = index 1), "propose_s",
     "budgets", "verify_ms" per budget, "dense_verify_ms", "key"} or None.
  """
  p = num_draft or draft.config.block_size
  b = bucket(batch, minimum=1)
  ctx = bucket(context)
  key = _profile_key(target, draft, b, p, ctx)
  path = profile_path(key)
  if os.path.exists(path) and not refresh:
    with open(path) as f:
      return json.load(f)
  if not measure:
    return None
  prompts = [[(7 * i + 3) % max(2, target.config.vocab_size - 1) + 1 for i in range(ctx - 1)]]
  prep = _Prepared(target, draft, prompts * b, p)
  budgets = speculative.token_budgets(b, p)
  ms = {n: prep.verify_ms(rounds, repeats, tokens=n) for n in budgets}
  sps = np.zeros((b * (p + 1) + 1,), np.float64)
  for n in range(1, sps.shape[0]):
    fit = min(k for k in budgets if k >= n)
    sps[n] = 1e3 / ms[fit]
  sps[0] = sps[1]
  prof = {"sps": sps.tolist(), "propose_s": prep.propose_ms(rounds, repeats) / 1e3,
          "budgets": list(budgets), "verify_ms": {str(k): v for k, v in ms.items()},
          "dense_verify_ms": prep.verify_ms(rounds, repeats), "key": key}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(prof, f, indent=1)
  os.replace(tmp, path)
  return prof


def resolve_scheduler(spec, target, draft, *, batch: int, num_draft: int):
  """`generate(..., scheduler=spec)` -> a `Scheduler` or None (fixed length, dense verify).

  A `Scheduler` is used as given. A policy name gets the cached SPS profile (measured now
  if missing) and the draft's STS temperatures and prior. None / "auto" means "early_stop" when the
  draft has a confidence head and a profile is cached, else fixed.
  """
  from dspark_jax.scheduling import POLICIES, Scheduler
  if isinstance(spec, Scheduler):
    if spec.policy != "fixed" and not getattr(draft.config, "confidence_head", False):
      raise ValueError(f"scheduler policy {spec.policy!r} needs a draft with a confidence "
                       f"head; this {draft.algorithm} draft has none (use 'fixed')")
    return None if spec.policy == "fixed" else spec
  auto = spec in (None, "auto")
  if not auto and spec not in POLICIES:
    raise ValueError(f"unknown scheduler {spec!r}; use one of {('auto',) + POLICIES} or a "
                     "dspark_jax.Scheduler")
  if spec == "fixed":
    return None
  if spec == "threshold":
    raise ValueError("the 'threshold' policy needs a value: pass "
                     "dspark_jax.Scheduler(policy='threshold', threshold=...)")
  has_conf = bool(getattr(draft.config, "confidence_head", False))
  if not has_conf:
    if auto:
      return None
    raise ValueError(f"scheduler {spec!r} needs a draft with a confidence head; this "
                     f"{draft.algorithm} draft has none (use 'fixed')")
  prof = sps_profile(target, draft, batch=batch, num_draft=num_draft, measure=not auto)
  if prof is None:
    return None
  temps = getattr(draft.config, "sts_temperatures", None)
  prior = getattr(draft.config, "sts_prior", None)
  if temps is not None and len(temps) < num_draft:
    temps = prior = None
  return Scheduler(policy="early_stop" if auto else spec, sps=np.asarray(prof["sps"]),
                   temperatures=None if temps is None else np.asarray(temps[:num_draft]),
                   propose_cost=prof["propose_s"],
                   prior=None if prior is None else np.asarray(prior[:num_draft]))
