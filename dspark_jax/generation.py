"""`generate`: batch generation, plain or speculative, over bucketed static shapes.

Host work per batch: tokenize, pad to a (batch, prompt, output) bucket, one jitted
call that runs prefill and the whole decode loop on device, one download. Buckets
are powers of two so a serving run compiles a handful of programs, each once.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding import sampling
from dspark_jax.decoding.state import Batch
from dspark_jax.engine import Engine, bucket
from dspark_jax.engine import profile
from dspark_jax.engine.batcher import ContinuousBatcher, Request
from dspark_jax.engine.spec_setup import SpecSetup


class PromptTooLongError(ValueError):
  """A prompt plus its generation budget does not fit the cache limit."""


@dataclasses.dataclass
class GenerationStats:
  """Per-row and overall statistics.

  Attributes:
    num_tokens: new tokens per row.
    finish_reasons: "stop" or "length" per row.
    wall_time_s: total device + host time of all batches (compilation included on a
      first call; benchmarks warm up first).
    tokens_per_second: sum(num_tokens) / wall_time_s.
    rounds: draft-verify rounds per row (speculative only, else decode steps).
    accept_lengths: per row, tokens committed per round (accepted drafts + 1).
    tau: mean tokens per round over all rounds of all rows (DeepSpec's acceptance length).
    position_acceptance: conditional acceptance per draft position k (P entries):
      P(accept k | accepted k-1 and k was verified); None where k was never reached
      (None, not NaN, so stats serialise as strict JSON).
    position_hits / position_tries: the counts behind it (to pool over runs).
    accept_histogram: count of rounds per committed length 1..P+1.
    verify_lengths: per row, drafts verified per round (the verify call checked 1 + l).
    proposed: per row, whether each round proposed (False: the scheduler ran a plain
      decode step because the draft was not expected to pay).
    confidence_logits: per row, per round, the raw confidence logits `[P]` of the block
      (zeros without a confidence head): with `accept_lengths` these are STS rollouts.
    scheduler: the verify-length policy used.
    verify_tokens_per_round: mean target tokens verified per request and round (1 + l).
    draft_time_s / verify_time_s: with `generate(..., time_split=True)`, the time the
      run's rounds spent in the draft's propose and the target's verify: rounds run times
      the per-call times measured alone on the first batch's shapes (`engine.profile`).
  """

  num_tokens: list[int]
  finish_reasons: list[str]
  wall_time_s: float
  tokens_per_second: float
  rounds: list[int]
  accept_lengths: list[list[int]] | None = None
  tau: float | None = None
  position_acceptance: list[float] | None = None
  accept_histogram: list[int] | None = None
  position_hits: list[int] | None = None
  position_tries: list[int] | None = None
  verify_lengths: list[list[int]] | None = None
  proposed: list[list[bool]] | None = None
  confidence_logits: list | None = None
  scheduler: str | None = None
  verify_tokens_per_round: float | None = None
  draft_time_s: float | None = None
  verify_time_s: float | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def row(self, i: int) -> dict[str, Any]:
    d = {"num_tokens": self.num_tokens[i], "finish_reason": self.finish_reasons[i],
         "rounds": self.rounds[i]}
    if self.accept_lengths is not None:
      acc = self.accept_lengths[i]
      d["accept_lengths"] = acc
      d["tau"] = float(np.mean(acc)) if acc else None
    return d


@dataclasses.dataclass
class GenerationResult:
  """Attributes:
    tokens: new token ids per prompt (a generated stop token is included).
    texts: decoded new text per prompt (None without a tokenizer).
    prompt_tokens: the prompt ids actually used.
    stats: GenerationStats.
  """

  tokens: list[list[int]]
  texts: list[str] | None
  prompt_tokens: list[list[int]]
  stats: GenerationStats


def encode_prompts(target, prompts) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
    raise TypeError("prompts must be a list of strings or a list of token-id lists")
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if target.tokenizer is None:
        raise ValueError("string prompts need a tokenizer; this target has none "
                         "(pass token ids instead)")
      ids = target.tokenizer.encode(p)
    else:
      ids = [int(t) for t in p]
    if not ids:
      raise ValueError(f"prompt {i} is empty")
    target.check_token_ids(ids)
    out.append(ids)
  return out


def _per_row(value, n: int, name: str):
  if isinstance(value, (list, tuple, np.ndarray)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
    return list(value)
  return [value] * n


def _stop_lists(target, stop_tokens, n: int) -> list[list[int]]:
  if stop_tokens is None:
    return [list(target.stop_token_ids)] * n
  if len(stop_tokens) and isinstance(stop_tokens[0], (list, tuple)):
    if len(stop_tokens) != n:
      raise ValueError(f"stop_tokens has {len(stop_tokens)} lists for {n} prompts")
    return [list(map(int, s)) for s in stop_tokens]
  return [list(map(int, stop_tokens))] * n


def generate(target, prompts: Sequence, *, draft=None, max_new_tokens: int | Sequence[int] = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens=None, batch_size: int | None = None,
             request_ids: Sequence[int] | None = None, max_cache_len: int | None = None,
             num_draft_tokens: int | None = None, verify_lengths=None,
             acceptance: str = "exact", scheduler=None, tree=None, progress: bool = False,
             time_split: bool = False, batching: str = "static") -> GenerationResult:
  """Generates continuations for a list of prompts.

  Args:
    target: a `Target` from `load_target`.
    prompts: strings (tokenized with the target tokenizer) or lists of token ids.
    draft: a draft from `load_draft` for speculative decoding, or None (plain decoding).
    max_new_tokens: limit per prompt (int or one per prompt).
    temperature: 0 = greedy.
    top_k: 0 = off.
    top_p: 1 = off.
    seed: sampling seed; a row's randomness depends on (seed, request id, step) only.
    stop_tokens: None (the model's eos ids), a list of ids, or one list per prompt.
    batch_size: rows per device batch (default min(#prompts, 8)).
    request_ids: RNG stream id per prompt (default: its index).
    max_cache_len: refuse prompts whose prompt + max_new_tokens exceeds this
      (default: the model's max_position_embeddings).
    num_draft_tokens: draft block P used per round (default: the draft's trained block).
    verify_lengths: optional per-prompt verify length <= P (speculative only).
    acceptance: name of the acceptance rule ("exact" speculative sampling).
    scheduler: (speculative) verify-length policy: a `dspark_jax.Scheduler`, a policy name
      ("fixed", "threshold", "early_stop", "global", "async"; tables from the cached
      profile and the draft's `sts.json`), or None/"auto": "early_stop" when the draft
      has a confidence head and an SPS profile of this target, device and batch bucket is
      cached (`python -m dspark_jax.profile`), else "fixed".
    tree: (speculative, DSpark/DFlash drafts) verify a token tree instead of a chain:
      children per node at each depth, e.g. "2,2,1" or (2, 2, 1) (its depth is P). Greedy
      children are the draft's top-k, sampled ones i.i.d. draws accepted by multi-draft
      rejection sampling (lossless); every node is verified in one target pass.
    progress: show a progress bar over batches.
    time_split: (speculative) also measure per-call propose / verify times and fill
      `stats.draft_time_s` / `verify_time_s` (costs two extra compilations).
    batching: "static": the prompts run in padded batches of `batch_size` rows, each until
      its slowest row ends (one device call per batch). "continuous": `batch_size` slots of
      the continuous batcher (`engine.batcher`); a prompt takes the next free slot as soon
      as a row ends, so short answers do not wait for long ones (a host round trip per
      finished row and a prefill per admission; not with `verify_lengths`/`time_split`).
      Both give every prompt the same tokens.

  Returns:
    GenerationResult.
  """
  ids = encode_prompts(target, prompts)
  n = len(ids)
  if n == 0:
    raise ValueError("no prompts")
  max_new = [int(m) for m in _per_row(max_new_tokens, n, "max_new_tokens")]
  if any(m < 1 for m in max_new):
    raise ValueError("max_new_tokens must be >= 1")
  stops = _stop_lists(target, stop_tokens, n)
  rids = list(range(n)) if request_ids is None else [int(r) for r in request_ids]
  if len(rids) != n:
    raise ValueError(f"request_ids has {len(rids)} entries for {n} prompts")
  limit = max_cache_len or target.config.max_position_embeddings
  bs = batch_size or min(n, 8)
  if bs < 1:
    raise ValueError(f"batch_size must be >= 1, got {bs}")
  if batching not in ("static", "continuous"):
    raise ValueError(f"batching must be 'static' or 'continuous', got {batching!r}")
  if batching == "continuous" and (verify_lengths is not None or time_split):
    raise ValueError("verify_lengths and time_split need batching='static'")
  spec = None
  if draft is not None:
    spec = SpecSetup.make(target, draft, num_draft_tokens, verify_lengths, n, acceptance,
                          scheduler, batch_size=bucket(min(bs, n), minimum=1), tree=tree)
  extra = spec.extra_capacity if spec else 0
  for i, (p, m) in enumerate(zip(ids, max_new)):
    if len(p) + m + extra > limit:
      raise PromptTooLongError(
          f"prompt {i} has {len(p)} tokens; with max_new_tokens={m} it needs {len(p) + m + extra} "
          f"cache positions but the limit is {limit} (max_cache_len / max_position_embeddings)")

  params = sampling.SamplingParams.make(temperature, top_k, top_p)
  if batching == "continuous":
    return _generate_continuous(target, draft, ids, max_new, stops, rids, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, slots=bs,
                                num_draft_tokens=num_draft_tokens, acceptance=acceptance,
                                scheduler=scheduler, tree=tree, progress=progress)
  seed_key = jax.random.key(seed)
  engine = Engine.for_target(target)
  order = sorted(range(n), key=lambda i: -len(ids[i]))
  batches = [order[i:i + bs] for i in range(0, n, bs)]
  out_tokens: list[list[int]] = [[] for _ in range(n)]
  finish = ["length"] * n
  rounds = [0] * n
  accept_lengths: list[list[int]] | None = [[] for _ in range(n)] if spec else None
  verify_used: list[list[int]] | None = [[] for _ in range(n)] if spec else None
  proposed: list[list[bool]] | None = [[] for _ in range(n)] if spec else None
  conf_logits: list | None = [[] for _ in range(n)] if spec else None
  pos_hits = pos_tries = None
  wall = 0.0
  loop_iters = 0  # while_loop iterations over all batches (= rounds of the longest row)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc="generate", unit="prompt")
  for rows in batches:
    b = bucket(len(rows), minimum=1)
    tp = bucket(max(len(ids[i]) for i in rows))
    steps = bucket(max(max_new[i] for i in rows))
    m_stop = max(1, max(len(stops[i]) for i in rows))
    tokens = np.zeros((b, tp), np.int32)
    lengths = np.ones((b,), np.int32)
    mx = np.ones((b,), np.int32)
    stop_arr = np.full((b, m_stop), -1, np.int32)
    rid = np.zeros((b,), np.int32)
    for j, i in enumerate(rows):
      tokens[j, :len(ids[i])] = ids[i]
      lengths[j] = len(ids[i])
      mx[j] = max_new[i]
      stop_arr[j, :len(stops[i])] = stops[i]
      rid[j] = rids[i]
    batch = Batch(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                  max_new=jnp.asarray(mx), stop_tokens=jnp.asarray(stop_arr),
                  request_ids=jnp.asarray(rid))
    t0 = time.perf_counter()
    if spec is None:
      res = engine.run(batch, seed_key, params, steps=steps)
    else:
      cap = np.zeros((b,), np.int32)
      for j, i in enumerate(rows):
        cap[j] = spec.verify_lengths[i]
      res = engine.run(batch, seed_key, params, steps=steps, draft=draft, loop=spec.loop,
                       scheduler=spec.scheduler, verify_cap=cap)
    wall += time.perf_counter() - t0
    loop_iters += int(np.max(res.rounds))
    for j, i in enumerate(rows):
      toks = [int(t) for t in res.out[j, :res.num_out[j]]]
      out_tokens[i] = toks
      finish[i] = "stop" if toks and toks[-1] in stops[i] else "length"
      rounds[i] = int(res.rounds[j])
      if res.record is not None:
        rec, nr = res.record, int(res.rounds[j])
        accept_lengths[i] = [int(x) for x in rec["accept_lens"][j, :nr]]
        verify_used[i] = [int(x) for x in rec["verify_lens"][j, :nr]]
        proposed[i] = [bool(x) for x in rec["proposed"][j, :nr]]
        conf_logits[i] = rec["confidence"][j, :nr].tolist()
    if res.record is not None:
      hits = res.record["pos_hits"][:len(rows)].sum(0)
      tries = res.record["pos_tries"][:len(rows)].sum(0)
      pos_hits = hits if pos_hits is None else pos_hits + hits
      pos_tries = tries if pos_tries is None else pos_tries + tries
    if bar is not None:
      bar.update(len(rows))
  if bar is not None:
    bar.close()

  stats = _stats(out_tokens, finish, wall, rounds, spec, accept_lengths, verify_used, proposed,
                 conf_logits, pos_hits, pos_tries)
  if spec is not None and time_split:
    split = profile.round_split(target, draft, [ids[i] for i in batches[0]],
                                num_draft=spec.block)
    stats.draft_time_s = split["propose_ms"] * loop_iters / 1e3
    stats.verify_time_s = split["verify_ms"] * loop_iters / 1e3
    stats.extra["round_split_ms"] = split
  return _result(target, out_tokens, ids, stats)


def _result(target, out_tokens, ids, stats) -> GenerationResult:
  texts = None
  if target.tokenizer is not None:
    texts = [target.tokenizer.decode(t) for t in out_tokens]
  return GenerationResult(tokens=out_tokens, texts=texts, prompt_tokens=ids, stats=stats)


def _stats(out_tokens, finish, wall, rounds, spec, accept_lengths, verify_used, proposed,
           conf_logits, pos_hits, pos_tries) -> GenerationStats:
  total = sum(len(t) for t in out_tokens)
  stats = GenerationStats(num_tokens=[len(t) for t in out_tokens], finish_reasons=finish,
                          wall_time_s=wall, tokens_per_second=total / max(wall, 1e-9),
                          rounds=rounds)
  if spec is None:
    return stats
  flat = [a for row in accept_lengths for a in row]
  stats.accept_lengths = accept_lengths
  stats.verify_lengths = verify_used
  stats.proposed = proposed
  stats.confidence_logits = conf_logits
  stats.scheduler = spec.scheduler.policy if spec.scheduler is not None else "fixed"
  n_rounds = sum(len(r) for r in verify_used)
  stats.verify_tokens_per_round = (
      sum(v + 1 for r in verify_used for v in r) / n_rounds if n_rounds else None)
  stats.tau = float(np.mean(flat)) if flat else None
  stats.position_acceptance = [float(h / t) if t else None for h, t in zip(pos_hits, pos_tries)]
  stats.position_hits = [int(h) for h in pos_hits]
  stats.position_tries = [int(t) for t in pos_tries]
  hist = np.bincount(np.asarray(flat, np.int64), minlength=spec.block + 2)[1:]
  stats.accept_histogram = [int(x) for x in hist]
  return stats


def _generate_continuous(target, draft, ids, max_new, stops, rids, *, temperature, top_k, top_p,
                         seed, slots, num_draft_tokens, acceptance, scheduler, tree,
                         progress) -> GenerationResult:
  """`generate(batching="continuous")`: the prompts through a `ContinuousBatcher` of
  `slots` rows (inputs validated by `generate`)."""
  n = len(ids)
  b = ContinuousBatcher(target, draft, slots=min(slots, n), max_new_tokens=max(max_new),
                        max_prompt_len=max(len(p) for p in ids), seed=seed,
                        num_draft_tokens=num_draft_tokens, scheduler=scheduler, tree=tree,
                        acceptance=acceptance, max_stop_tokens=max(len(s) for s in stops))
  reqs = [Request(prompt=ids[i], max_new_tokens=max_new[i], temperature=temperature,
                  top_k=top_k, top_p=top_p, stop_tokens=stops[i], request_id=rids[i], id=i)
          for i in range(n)]
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc="generate", unit="prompt")

  def on_step(touched):
    if bar is not None:
      bar.update(sum(r.done for r in touched))

  t0 = time.perf_counter()
  b.run(reqs, progress=on_step)
  wall = time.perf_counter() - t0
  if bar is not None:
    bar.close()
  out_tokens = [r.tokens for r in reqs]
  finish = [r.finish_reason for r in reqs]
  spec = b.spec
  stats = _stats(out_tokens, finish, wall, [r.rounds for r in reqs], spec,
                 [r.accept_lengths for r in reqs] if spec else None,
                 [r.verify_lengths for r in reqs] if spec else None,
                 [r.proposed for r in reqs] if spec else None,
                 [r.confidence_logits for r in reqs] if spec else None,
                 b.counters.position_hits, b.counters.position_tries)
  stats.extra["batching"] = "continuous"
  return _result(target, out_tokens, ids, stats)
