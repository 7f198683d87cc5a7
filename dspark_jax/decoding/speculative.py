"""The draft-verify loop: propose -> verify -> accept -> commit, in one `lax.while_loop`.

Per round, for every row b with committed length L_b (tokens whose K/V are in the
target cache) and anchor a_b (the newest token, at position L_b, not yet in the cache):

  propose  the draft proposes P tokens x_1..x_P with distributions q_1..q_P;
  verify   one target call on [a, x_1..x_P] at positions L..L+P gives p_0..p_P and the
           tapped features of those positions;
  accept   exact speculative sampling over the first l_b <= P drafts: x_k is accepted
           with probability min(1, p_{k-1}(x_k) / q_k(x_k)); at the first rejection a token
           is drawn from norm(max(0, p_{k-1} - q_k)); if all l_b pass, a bonus token is
           drawn from p_{l_b}. Greedy is the temperature-0 limit: token equality;
  commit   L_b += accepted + 1 (the anchor and accepted drafts were written by verify),
           the draft ingests the features of those positions, and the new token becomes
           the anchor. Nothing is rolled back: stale cache slots are overwritten later.

Indices below are 0-based: draft token k (k = 0..P-1) is checked against target row k.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import sharding as sharding_lib
from dspark_jax.decoding import loop as loop_lib
from dspark_jax.decoding import sampling
from dspark_jax.decoding.cache import KVCache
from dspark_jax.typing import Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Proposal:
  """Attributes:
    tokens: int32 `[B, P]` draft tokens.
    logits: float32 `[B, P, V]` logits the tokens were sampled from (after the sequential
      head, before temperature/top-k/top-p, which `sampling` applies identically to both
      models).
    confidence: float32 `[B, P]` confidence logits (sigmoid -> P(accept | prefix)), or None.
  """

  tokens: Array
  logits: Array
  confidence: Array | None


# ---------------------------------------------------------------------------------------------
# verify / accept: draft-agnostic
# ---------------------------------------------------------------------------------------------
def verify(target_model, cache: KVCache, anchor: Array, drafts: Array, taps=()):
  """One target call over `[anchor, drafts]` at each row's own offset.

  Args:
    cache: target cache; lengths[b] = position of row b's anchor.
    anchor: int32 `[B]`.
    drafts: int32 `[B, P]`.

  Returns:
    (logits float32 `[B, P+1, V]`, taps `[B, P+1, C]` or None, cache with K/V written).
  """
  tokens = jnp.concatenate([anchor[:, None], drafts], axis=1)
  positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  out = target_model(tokens, positions, cache=cache, taps=taps)
  return out.logits, out.taps, out.cache


def accept(target_logits: Array, proposal: Proposal, verify_len: Array, keys_accept: Array,
           keys_sample: Array, params: sampling.SamplingParams) -> tuple[Array, Array]:
  """Exact speculative sampling (Leviathan et al.; chain verification).

  Args:
    target_logits: `[B, P+1, V]` from `verify`.
    proposal: the drafts and their logits.
    verify_len: int32 `[B]`, l_b in [0, P]: drafts beyond it are not considered.
    keys_accept: `[B]` keys for the acceptance uniforms.
    keys_sample: `[B]` keys for the residual / bonus token.

  Returns:
    (n_accepted int32 `[B]` in [0, l_b], next token int32 `[B]`).
  """
  drafts = proposal.tokens
  b, p = drafts.shape
  slot = jnp.arange(p)[None, :]
  in_window = slot < verify_len[:, None]
  rows = jnp.arange(b)
  if params.greedy:
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, P+1]
    ok = (drafts == best[:, :p]) & in_window
    n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    return n_acc, best[rows, n_acc]

  pt = sampling.probabilities(target_logits, params)  # [B, P+1, V]
  qd = sampling.probabilities(proposal.logits, params)  # [B, P, V]
  p_x = jnp.take_along_axis(pt[:, :p], drafts[..., None], axis=-1)[..., 0]
  q_x = jnp.take_along_axis(qd, drafts[..., None], axis=-1)[..., 0]
  u = jax.vmap(lambda k: jax.random.uniform(k, (p,)))(keys_accept)
  # accept iff u < min(1, p/q)  <=>  u * q < p  (q > 0 for a sampled token; no division)
  ok = (u * q_x < p_x) & in_window
  n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
  p_n = pt[rows, n_acc]  # [B, V]
  q_n = qd[rows, jnp.minimum(n_acc, p - 1)]
  residual = jnp.maximum(p_n - q_n, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  rejected = (n_acc < verify_len)[:, None]
  # All accepted -> bonus from p_n. Rejected -> residual (p_n itself if the residual has no
  # mass, which only rounding can cause: rejection implies p(x) < q(x) somewhere).
  dist = jnp.where(rejected & (mass > 1e-12), residual, p_n)
  return n_acc, sampling.sample_from_probs(keys_sample, dist)


# Acceptance rules by name (`generate(..., acceptance=...)`). Only "exact" is lossless; tests
# register deliberately broken rules here to show the distribution tests can fail.
ACCEPT_RULES = {"exact": accept}


def committed_tokens(drafts: Array, n_acc: Array, next_token: Array,
                     stop_tokens: Array) -> tuple[Array, Array, Array]:
  """Tokens a round commits: `[x_1..x_n, next]`, cut after an accepted stop token.

  Returns:
    (tokens `[B, P+1]`, n_commit `[B]`, hit_stop bool `[B]`)
  """
  b, p = drafts.shape
  slot = jnp.arange(p + 1)[None, :]
  padded = jnp.concatenate([drafts, next_token[:, None]], axis=1)
  tokens = jnp.where(slot < n_acc[:, None], padded, next_token[:, None])
  n_commit = n_acc + 1
  stop = loop_lib.is_stop(tokens, stop_tokens) & (slot < n_commit[:, None])
  first_stop = jnp.argmax(stop, axis=1)
  hit = jnp.any(stop, axis=1)
  return tokens, jnp.where(hit, first_stop + 1, n_commit), hit


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
  """Loop carry.

  Attributes:
    cache: target cache (lengths = committed tokens, the anchor excluded).
    draft_state: the draft runtime's state (context cache, ...).
    anchor: int32 `[B]`.
    out, num_out, done: as in plain decoding.
    round: int32 scalar.
    accept_lens: int32 `[B, R]` tokens committed per round (0 = no round).
    verify_lens: int32 `[B, R]` drafts verified per round.
    pos_hits / pos_tries: int32 `[B, P]` accepted / verified counts per draft position,
      where a position counts as tried only if every earlier position was accepted.
  """

  cache: KVCache
  draft_state: Any
  anchor: Array
  out: Array
  num_out: Array
  done: Array
  round: Array
  accept_lens: Array
  verify_lens: Array
  pos_hits: Array
  pos_tries: Array


def spec_generate_impl(tgraph, tparams, dgraph, dparams, runtime, batch: loop_lib.Batch,
                       cache: KVCache, draft_state, seed_key, params, verify_len: Array, *,
                       max_steps: int, num_draft: int, scheduler=None, accept_fn=accept):
  """Prefill + draft-verify rounds on device (called inside `jax.jit`)."""
  tmodel = nnx.merge(tgraph, tparams)
  draft = nnx.merge(dgraph, dparams)
  b = batch.lengths.shape[0]
  p = num_draft
  taps = runtime.target_taps(draft)
  cache, logits, prompt_taps = loop_lib.prefill(tmodel, batch, cache, taps)
  keys = sampling.row_keys(seed_key, batch.request_ids, jnp.int32(0), sampling.TAG_SAMPLE)
  first = sampling.sample(keys, logits, params)
  draft_state = runtime.prefill(draft, tmodel, draft_state, prompt_taps, batch, first)
  out = jnp.full((b, max_steps + p + 1), -1, jnp.int32).at[:, 0].set(first)
  num_out = jnp.ones((b,), jnp.int32)
  done = loop_lib.is_stop(first, batch.stop_tokens) | (num_out >= batch.max_new)
  zeros_r = jnp.zeros((b, max_steps), jnp.int32)
  state = SpecState(cache=cache, draft_state=draft_state, anchor=first, out=out, num_out=num_out,
                    done=done, round=jnp.int32(0), accept_lens=zeros_r, verify_lens=zeros_r,
                    pos_hits=jnp.zeros((b, p), jnp.int32), pos_tries=jnp.zeros((b, p), jnp.int32))

  def cond(s: SpecState):
    return (s.round < max_steps) & ~jnp.all(s.done)

  def body(s: SpecState):
    step = s.round + 1  # step 0 was the prefill sample
    k_draft = sampling.row_keys(seed_key, batch.request_ids, step, sampling.TAG_DRAFT)
    k_acc = sampling.row_keys(seed_key, batch.request_ids, step, sampling.TAG_ACCEPT)
    k_samp = sampling.row_keys(seed_key, batch.request_ids, step, sampling.TAG_SAMPLE)
    prop = runtime.propose(draft, tmodel, s.draft_state, s.anchor, s.cache.lengths, k_draft,
                           params, p)
    ell = verify_len if scheduler is None else scheduler(prop, verify_len)
    ell = jnp.clip(ell, 0, p)
    t_logits, v_taps, cache = verify(tmodel, s.cache, s.anchor, prop.tokens, taps)
    n_acc, nxt = accept_fn(t_logits, prop, ell, k_acc, k_samp, params)
    tokens, n_commit, hit_stop = committed_tokens(prop.tokens, n_acc, nxt, batch.stop_tokens)
    live = ~s.done
    room = batch.max_new - s.num_out
    n_rec = jnp.minimum(n_commit, room)
    out = loop_lib._record(s.out, s.num_out, s.done, tokens, n_rec)
    num_out = s.num_out + jnp.where(live, n_rec, 0)
    done = s.done | (live & (hit_stop | (num_out >= batch.max_new)))
    new_len = s.cache.lengths + jnp.where(live, n_acc + 1, 0)
    cache = cache.commit(new_len)
    verify_tokens = jnp.concatenate([s.anchor[:, None], prop.tokens], axis=1)
    dstate = runtime.commit(draft, tmodel, s.draft_state, v_taps, verify_tokens, n_acc, nxt,
                            s.cache.lengths, new_len)
    slot = jnp.arange(p)[None, :]
    hits = live[:, None] & (slot < n_acc[:, None])
    tries = live[:, None] & (slot <= n_acc[:, None]) & (slot < ell[:, None])
    r = s.round
    return SpecState(
        cache=cache, draft_state=dstate, anchor=jnp.where(live, nxt, s.anchor), out=out,
        num_out=num_out, done=done, round=r + 1,
        accept_lens=s.accept_lens.at[:, r].set(jnp.where(live, n_commit, 0)),
        verify_lens=s.verify_lens.at[:, r].set(jnp.where(live, ell, 0)),
        pos_hits=s.pos_hits + hits, pos_tries=s.pos_tries + tries)

  state = jax.lax.while_loop(cond, body, state)
  return dict(out=state.out, num_out=state.num_out, rounds=state.round,
              accept_lens=state.accept_lens, verify_lens=state.verify_lens,
              pos_hits=state.pos_hits, pos_tries=state.pos_tries), state.cache, state.draft_state


@functools.partial(jax.jit, static_argnames=("tgraph", "dgraph", "runtime", "max_steps",
                                             "num_draft", "scheduler", "accept_fn"),
                   donate_argnames=("cache", "draft_state"))
def spec_generate(tgraph, tparams, dgraph, dparams, runtime, batch, cache, draft_state, seed_key,
                  params, verify_len, *, max_steps: int, num_draft: int, scheduler=None,
                  accept_fn=accept):
  """Jitted speculative generation of one batch; one compilation per (bucket, P)."""
  loop_lib._count_trace("spec_generate")
  return spec_generate_impl(tgraph, tparams, dgraph, dparams, runtime, batch, cache, draft_state,
                            seed_key, params, verify_len, max_steps=max_steps,
                            num_draft=num_draft, scheduler=scheduler, accept_fn=accept_fn)


# ---------------------------------------------------------------------------------------------
# host-side glue used by `generation.generate`
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SpecBatchResult:
  out: np.ndarray
  num_out: np.ndarray
  rounds: np.ndarray
  accept_lengths: list[list[int]]
  verify_lengths: list[list[int]]
  pos_hits: np.ndarray
  pos_tries: np.ndarray

  def position_counts(self, nrows: int):
    return self.pos_hits[:nrows].sum(0), self.pos_tries[:nrows].sum(0)


@dataclasses.dataclass
class SpecSetup:
  """Validated speculative settings for one `generate` call."""

  block: int  # P used per round
  verify_lengths: list[int]
  runtime: Any
  accept_fn: Any = accept

  @classmethod
  def make(cls, target, draft, num_draft_tokens, verify_lengths, n,
           acceptance: str = "exact") -> "SpecSetup":
    if acceptance not in ACCEPT_RULES:
      raise ValueError(f"unknown acceptance rule {acceptance!r}; known: {sorted(ACCEPT_RULES)}")
    dcfg = draft.config
    dcfg.check_target(target.config)
    p = dcfg.block_size if num_draft_tokens is None else int(num_draft_tokens)
    dcfg.check_block(p)
    if verify_lengths is None:
      ver = [p] * n
    else:
      ver = [int(v) for v in (verify_lengths if isinstance(verify_lengths, (list, tuple))
                              else [verify_lengths] * n)]
      if len(ver) != n or any(not 0 <= v <= p for v in ver):
        raise ValueError(f"verify_lengths must be {n} values in [0, {p}]")
    return cls(block=p, verify_lengths=ver, runtime=draft.runtime,
               accept_fn=ACCEPT_RULES[acceptance])

  @property
  def extra_capacity(self) -> int:
    return self.block + 1  # verify writes up to P+1 slots past the committed length

  def run(self, target, draft, batch, rows, seed_key, params, tp, steps) -> SpecBatchResult:
    from dspark_jax import generation  # cache pool helpers
    b = batch.lengths.shape[0]
    capacity = tp + steps + self.extra_capacity
    cache = generation._get_cache(target, b, capacity)
    pool = target.__dict__.setdefault("_cache_pool", {})
    dkey = ("draft", draft.algorithm, id(draft.graphdef), b, capacity)
    dstate = pool.pop(dkey, None)
    if dstate is None:
      dstate = jax.device_put(self.runtime.init_state(draft.config, b, capacity, draft.dtype),
                              sharding_lib.replicated(target.mesh))
    ver = np.zeros((b,), np.int32)
    for j, i in enumerate(rows):
      ver[j] = self.verify_lengths[i]
    res, cache, dstate = spec_generate(target.graphdef, target.params, draft.graphdef, draft.params,
                                  self.runtime, batch, cache, dstate, seed_key, params,
                                  jnp.asarray(ver), max_steps=steps, num_draft=self.block,
                                  accept_fn=self.accept_fn)
    res = jax.device_get(res)
    generation._return_cache(target, cache)
    pool[dkey] = dstate
    nrounds = np.asarray(res["accept_lens"] > 0).sum(1)
    acc = [[int(x) for x in res["accept_lens"][j, :nrounds[j]]] for j in range(b)]
    vl = [[int(x) for x in res["verify_lens"][j, :nrounds[j]]] for j in range(b)]
    return SpecBatchResult(out=res["out"], num_out=res["num_out"], rounds=nrounds,
                           accept_lengths=acc, verify_lengths=vl, pos_hits=res["pos_hits"],
                           pos_tries=res["pos_tries"])
