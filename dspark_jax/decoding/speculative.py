"""The draft-verify loop: schedule -> propose -> verify -> accept -> commit.

Per round, for every row b with committed length L_b (tokens whose K/V are in the
target cache) and anchor a_b (the newest token, at position L_b, not yet in the cache):

  schedule decide, from the previous block's confidences only, whether the draft pays
           this round at all (else the round is a plain decode step: verify l = 0);
  propose  the draft proposes P tokens x_1..x_P with distributions q_1..q_P and
           confidence logits (the runtime of the draft's algorithm does this);
  schedule the verify length l_b in [0, P] of every row from the calibrated confidences
           (`dspark_jax.scheduling`): the admission of x_k depends on x_<k only;
  verify   one target call on [a, x_1..x_l] at positions L..L+l gives p_0..p_l and the
           tapped features of those positions; with token buckets the rows' tokens are
           packed into a flat batch of the smallest compiled budget that holds them, so
           the call costs what it verifies;
  accept   exact speculative sampling over the first l_b drafts: x_k is accepted with
           probability min(1, p_{k-1}(x_k) / q_k(x_k)); at the first rejection a token is
           drawn from norm(max(0, p_{k-1} - q_k)); if all l_b pass, a bonus token is drawn
           from p_{l_b}. Greedy is the temperature-0 limit: token equality;
  commit   L_b += accepted + 1 (the anchor and accepted drafts were written by verify),
           the draft ingests the features of those positions, and the new token becomes
           the anchor. Nothing is rolled back: stale cache slots are overwritten later.

Indices below are 0-based: draft token k (k = 0..P-1) is checked against target row k.
`spec_init` / `spec_rounds` are the pieces a server interleaves with admissions;
`spec_generate` fuses them into one program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.decoding import commit as commit_lib
from dspark_jax.decoding import sampling
from dspark_jax.decoding.cache import KVCache
from dspark_jax.decoding.loop import count_trace, first_token, prefill
from dspark_jax.decoding.state import Batch, Pack, Proposal, Rows, SpecState, TreeProposal
from dspark_jax.scheduling.scheduler import NEVER_PROPOSED
from dspark_jax.typing import Array
from dspark_jax.kernels import draw
from dspark_jax.kernels import prefix_accept as accept_kernels
from dspark_jax.kernels import tree_accept as tree_kernels
from dspark_jax.kernels.tree_accept import TreeShape


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------
def verify(target_model, cache: KVCache, anchor: Array, drafts: Array, taps=(),
           write_mask: Array | None = None):
  """One dense target call over `[anchor, drafts]` at each row's own offset.

  The cache is only read; the new K/V come back to be written by the caller
  (`cache.write_pending`), so this can run inside a device-side branch without XLA copying
  the cache (see `PendingKV`).

  Args:
    cache: target cache; lengths[b] = position of row b's anchor.
    anchor: int32 `[B]`.
    drafts: int32 `[B, P]`.
    write_mask: bool `[B]` rows whose K/V are to be written (finished rows are not).

  Returns:
    (logits float32 `[B, P+1, V]`, taps `[B, P+1, C]` or None, `PendingKV` of width P+1).
  """
  tokens = jnp.concatenate([anchor[:, None], drafts], axis=1)
  positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  out = target_model(tokens, positions, cache=cache, taps=taps, write_mask=write_mask,
                     defer_writes=True)
  return out.logits, out.taps, out.pending


def verify_packed(target_model, cache: KVCache, anchor: Array, drafts: Array, verify_len: Array,
                  live: Array, taps, budgets: tuple[int, ...]):
  """`verify` that computes only the scheduled tokens, in the smallest fitting budget.

  The tokens `[a, x_1..x_l]` of the live rows are packed into a flat batch of the smallest
  of `budgets` (static, ascending; the last must hold B * (P + 1)) that fits, chosen on
  device with `lax.switch`; one program per budget is compiled into the loop, plus a plain
  decode step for rounds that verify no draft.

  Returns:
    as `verify`: dense `[B, P+1, ...]` logits and taps (slots beyond `l` hold zeros) and the
    `PendingKV` of the verified slots.
  """
  tokens = jnp.concatenate([anchor[:, None], drafts], axis=1)
  b, w = tokens.shape
  ell = jnp.where(live, verify_len, 0)
  need = jnp.sum(jnp.where(live, ell + 1, 0))
  index = jnp.sum(need > jnp.asarray(budgets[:-1], jnp.int32)) if len(budgets) > 1 else 0
  # A round that verifies no draft (the scheduler's plain-step fallback) is exactly a decode
  # step: one token per row in the dense layout, no packing and no attention over empty
  # block slots.
  index = jnp.where(jnp.all(ell == 0), 0, 1 + index)

  def plain(cache):
    logits, tap, pending = verify(target_model, cache, anchor, drafts[:, :0], taps, live)
    pad = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, w - 1), (0, 0)))
    return pad(logits), pad(tap), pending.pad(w)

  def run(budget, cache):
    valid = (jnp.arange(w)[None, :] <= verify_len[:, None]) & live[:, None]
    flat, pack = Pack.build(tokens, valid, cache.lengths, budget)
    out = target_model(flat[None], pack.to_flat(pack.positions), cache=cache, taps=taps,
                       pack=pack, defer_writes=True)
    logits = pack.to_dense(out.logits)
    tap = None if out.taps is None else pack.to_dense(out.taps)
    return logits, tap, out.pending

  branches = [plain] + [functools.partial(run, n) for n in budgets]
  return jax.lax.switch(index, branches, cache)


def verify_tree(target_model, cache: KVCache, tokens: Array, shape: TreeShape, taps=(),
                live: Array | None = None):
  """One target call over a token tree: node i at position L + depth(i), seeing the
  committed cache and its own ancestors only (`TreeShape.mask`).

  Args:
    tokens: int32 `[B, W]` (the root is the anchor).

  Returns:
    (logits float32 `[B, W, V]`, taps `[B, W, C]` or None, `PendingKV` of the W nodes, to be
     re-laid along the accepted path with `PendingKV.take`).
  """
  positions = cache.lengths[:, None] + jnp.asarray(shape.depth)[None, :]
  out = target_model(tokens, positions, cache=cache, taps=taps, write_mask=live,
                     defer_writes=True, tree_mask=jnp.asarray(shape.mask))
  return out.logits, out.taps, out.pending


def token_budgets(batch: int, num_draft: int, count: int = 4) -> tuple[int, ...]:
  """Default verify-token buckets for B rows and block P: B, then evenly up to B(P+1)."""
  top = batch * (num_draft + 1)
  picks = {batch, top}
  for i in range(1, count - 1):
    picks.add(batch + (top - batch) * i // (count - 1))
  return tuple(sorted(picks))


# ---------------------------------------------------------------------------------------------
# accept
# ---------------------------------------------------------------------------------------------
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
  kernel = accept_kernels.choose()  # DSPARK_KERNELS=pallas: the fused kernel, same results
  if params.greedy:
    if kernel.pallas:
      return accept_kernels.greedy_accept(target_logits, drafts, verify_len, choice=kernel)
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, P+1]
    ok = (drafts == best[:, :p]) & in_window
    n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    return n_acc, best[rows, n_acc]

  pt = sampling.probabilities(target_logits, params)  # [B, P+1, V]
  qd = (proposal.probs if proposal.probs is not None  # [B, P, V], as drafted
        else sampling.probabilities(proposal.logits, params, exact=False))
  p_x = jnp.take_along_axis(pt[:, :p], drafts[..., None], axis=-1)[..., 0]
  q_x = jnp.take_along_axis(qd, drafts[..., None], axis=-1)[..., 0]
  u = jax.vmap(lambda k: jax.random.uniform(k, (p,)))(keys_accept)
  if kernel.pallas:  # the uniform `sample_from_probs` would draw, drawn up front
    return accept_kernels.prefix_accept(pt, qd, drafts, verify_len, u,
                                        draw.uniforms(keys_sample), choice=kernel)
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


def accept_tree(target_logits: Array, proposal: TreeProposal, keys_accept: Array,
                keys_sample: Array, params: sampling.SamplingParams,
                shape: TreeShape) -> tuple[Array, Array, Array]:
  """Exact acceptance over a token tree (`kernels.tree_accept`): greedy walks the target's
  argmax; sampled runs recursive rejection over each node's i.i.d. children.

  Args:
    target_logits: `[B, W, V]` from `verify_tree`.
    proposal: the tree and the logits each node was drawn from.
    keys_accept: `[B]` keys for the W acceptance uniforms.
    keys_sample: `[B]` keys for the emitted token.

  Returns:
    (n_accepted int32 `[B]` in [0, P], next token int32 `[B]`, deepest accepted node `[B]`).
  """
  kernel = tree_kernels.choose()
  if params.greedy:
    return tree_kernels.greedy_tree_accept(target_logits, proposal.tokens, shape=shape,
                                           choice=kernel)
  pt = sampling.probabilities(target_logits, params)
  qd = sampling.probabilities(proposal.logits, params, exact=False)  # as drafted
  u = jax.vmap(lambda k: jax.random.uniform(k, (shape.width,)))(keys_accept)
  # The uniform `sample_from_probs` draws the emitted token with.
  return tree_kernels.tree_accept(pt, qd, proposal.tokens, u, draw.uniforms(keys_sample),
                                  shape=shape, choice=kernel)


# Acceptance rules by name (`generate(..., acceptance=...)`), for chains and for trees. Only
# "exact" is lossless; tests register deliberately broken rules here to show the
# distribution tests can fail.
ACCEPT_RULES = {"exact": accept}
TREE_ACCEPT_RULES = {"exact": accept_tree}


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------
def schedule(scheduler, prop: Proposal, stale: Array, live: Array, cap: Array) -> Array:
  """Verify lengths `[B]` in `[0, cap]` for live rows (0 for finished ones)."""
  p = prop.tokens.shape[1]
  if scheduler is None or scheduler.policy == "fixed":
    ell = jnp.full(live.shape, p, jnp.int32)
  else:
    ell = scheduler(prop.confidence, stale=stale, live=live)
  return jnp.where(live, jnp.clip(jnp.minimum(ell, cap), 0, p), 0).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """Static settings of a speculative loop (hashable: part of the compilation key).

  Attributes:
    runtime: the draft algorithm's runtime (static methods).
    num_draft: P, drafts per round.
    budgets: verify-token buckets for packed verification, or () for dense verify.
    accept_fn: the acceptance rule (a `TREE_ACCEPT_RULES` one with `tree`).
    tree: verify a token tree of this shape instead of a chain of `num_draft` (its depth).
  """

  runtime: Any
  num_draft: int
  budgets: tuple[int, ...] = ()
  accept_fn: Any = accept
  tree: TreeShape | None = None


def spec_init(tmodel, draft, loop: LoopSpec, batch: Batch, cache: KVCache, draft_state,
              seed_key, params, *, out_len: int, max_rounds: int,
              prefill_budget: int | None = None) -> SpecState:
  """Prefill of target and draft, the first token, and an empty round record."""
  b = batch.lengths.shape[0]
  p = loop.num_draft
  taps = loop.runtime.target_taps(draft)
  cache, logits, prompt_taps = prefill(tmodel, batch, cache, taps, budget=prefill_budget)
  first, done = first_token(logits, batch, seed_key, params)
  draft_state = loop.runtime.prefill(draft, tmodel, draft_state, prompt_taps, batch, first)
  zeros_r = jnp.zeros((b, max_rounds), jnp.int32)
  return SpecState(
      cache=cache, draft_state=draft_state, rows=Rows.of(batch), anchor=first,
      out=jnp.full((b, out_len), -1, jnp.int32).at[:, 0].set(first),
      num_out=jnp.ones((b,), jnp.int32), done=done, steps=jnp.zeros((b,), jnp.int32),
      accept_lens=zeros_r, verify_lens=zeros_r, proposed=jnp.zeros((b, max_rounds), bool),
      confidence=jnp.zeros((b, max_rounds, p), jnp.float32),
      stale=jnp.full((b, p), -jnp.inf, jnp.float32), since_probe=jnp.int32(NEVER_PROPOSED),
      probe_level=jnp.int32(0),
      pos_hits=jnp.zeros((b, p), jnp.int32), pos_tries=jnp.zeros((b, p), jnp.int32))


def _run_if(pred: Array, fn, s):
  """`fn(s)` if `pred` else `s`, as a while loop of zero or one trips.

  A `lax.cond` copies every buffer a branch updates in place (twice per round inside the
  decode loop); a while loop's carry is updated in place, so each kind of round can write
  its own K/V at its own width.
  """
  return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.asarray(False), fn(c[1])),
                            (pred, s))[1]


def spec_round(tmodel, draft, loop: LoopSpec, s: SpecState, seed_key, params, scheduler,
               verify_cap: Array) -> SpecState:
  """One round for every live row: a draft-verify round, or a plain decode step when the
  scheduler's estimate from past rounds says the draft does not pay.

  The verify budgets inside a draft round are device-side branches that only read the
  caches; what they produce (new K/V, the accepted tokens) is written after them, once (see
  `PendingKV`). The choice between the two kinds of round is made by `_run_if`, so each
  writes in place at its own width.
  """
  runtime, p = loop.runtime, loop.num_draft
  live = ~s.done
  b = live.shape[0]
  step = s.steps + 1  # step 0 was the prefill sample
  rid = s.rows.request_ids
  k_draft = sampling.row_keys(seed_key, rid, step, sampling.TAG_DRAFT)
  k_acc = sampling.row_keys(seed_key, rid, step, sampling.TAG_ACCEPT)
  k_samp = sampling.row_keys(seed_key, rid, step, sampling.TAG_SAMPLE)
  taps = runtime.target_taps(draft)
  # Runtimes that can compute their context update without writing it (`context_pending`)
  # do so inside the branch, on just the tokens the round verified.
  deferred = hasattr(runtime, "context_pending")

  def context_pending(s, t):
    return runtime.context_pending(draft, t, s.cache.lengths) if deferred else None

  def propose(s):
    return runtime.propose(draft, tmodel, s.draft_state, s.anchor, s.cache.lengths, k_draft,
                           params, p)

  if loop.tree is not None:  # the whole tree is verified: nothing to schedule
    return _finish(runtime, draft, tmodel, s,
                   tree_round(tmodel, draft, loop, s, k_draft, k_acc, k_samp, params, taps,
                              functools.partial(context_pending, s)),
                   jnp.asarray(True), s.probe_level)

  def draft_round(s):
    prop = propose(s)
    ell = schedule(scheduler, prop, s.stale, live, verify_cap)
    if loop.budgets:
      t_logits, v_taps, pending = verify_packed(tmodel, s.cache, s.anchor, prop.tokens, ell,
                                                live, taps, loop.budgets)
    else:
      t_logits, v_taps, pending = verify(tmodel, s.cache, s.anchor, prop.tokens, taps, live)
    n_acc, nxt = loop.accept_fn(t_logits, prop, ell, k_acc, k_samp, params)
    conf = (prop.confidence if prop.confidence is not None
            else jnp.zeros(prop.tokens.shape, jnp.float32))
    return Outcome(pending, v_taps, prop.tokens, n_acc, nxt, ell, conf,
                   context_pending(s, v_taps))

  has_conf = jax.eval_shape(propose, s).confidence is not None
  if scheduler is None or not has_conf:  # nothing to judge a skip by
    return _finish(runtime, draft, tmodel, s, draft_round(s), jnp.asarray(True), s.probe_level)

  def plain_round(s):
    # Exactly what a round verifying l = 0 drafts computes (the bonus token from p_0),
    # without the block's width: one target token per row, written before it attends, as
    # in the plain decode loop (inside `_run_if` the write is in place).
    fwd = tmodel(s.anchor[:, None], s.cache.lengths[:, None], cache=s.cache, taps=taps,
                 write_mask=live)
    if params.greedy:
      nxt = jnp.argmax(fwd.logits[:, 0], axis=-1).astype(jnp.int32)
    else:
      nxt = sampling.sample_from_probs(k_samp, sampling.probabilities(fwd.logits, params)[:, 0])
    zeros = jnp.zeros((b,), jnp.int32)
    v_taps = fwd.taps
    ctx = context_pending(s, v_taps)
    if ctx is None and v_taps is not None:  # `runtime.commit` reads taps at the block's width
      v_taps = jnp.pad(v_taps, ((0, 0), (0, p), (0, 0)))
    return Outcome(None, v_taps, jnp.zeros((b, p), jnp.int32), zeros, nxt, zeros,
                   jnp.zeros((b, p), jnp.float32), ctx, cache=fwd.cache)

  # Decided from past rounds only (the stale block), so it never looks at this round.
  do_propose, level = scheduler.wants_proposal(s.stale, live, s.since_probe, s.probe_level)
  s = _run_if(do_propose, lambda s: _finish(runtime, draft, tmodel, s, draft_round(s),
                                            jnp.asarray(True), level), s)
  return _run_if(~do_propose, lambda s: _finish(runtime, draft, tmodel, s, plain_round(s),
                                                jnp.asarray(False), level), s)


def tree_round(tmodel, draft, loop: LoopSpec, s: SpecState, k_draft, k_acc, k_samp, params,
               taps, context_pending) -> "Outcome":
  """Propose a tree, verify every node in one pass, accept the longest lossless path, and
  re-lay that path's K/V and features as the contiguous block a chain round would give."""
  shape = loop.tree
  live = ~s.done
  prop = loop.runtime.propose_tree(draft, tmodel, s.draft_state, s.anchor, s.cache.lengths,
                                   k_draft, params, shape)
  logits, v_taps, pending = verify_tree(tmodel, s.cache, prop.tokens, shape, taps, live)
  n_acc, nxt, leaf = loop.accept_fn(logits, prop, k_acc, k_samp, params, shape)
  path = jnp.asarray(shape.ancestors)[leaf]  # [B, P+1]: root .. leaf, then the leaf again
  v_taps = None if v_taps is None else jnp.take_along_axis(v_taps, path[..., None], axis=1)
  b, p = path.shape[0], shape.num_draft
  return Outcome(pending.take(path), v_taps,
                 jnp.take_along_axis(prop.tokens, path[:, 1:], axis=1), n_acc, nxt,
                 jnp.where(live, p, 0).astype(jnp.int32), jnp.zeros((b, p), jnp.float32),
                 context_pending(v_taps))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Outcome:
  """What a round's verify + accept produced, before anything is written.

  Attributes:
    pending: the verified block's target K/V (`PendingKV`, width P+1).
    taps: `[B, P+1, C]` tapped target features of the block (zeros where not verified).
    drafts: int32 `[B, P]` proposed tokens (zeros in a plain step).
    n_acc: int32 `[B]` accepted drafts; nxt: int32 `[B]` the token sampled after them.
    ell: int32 `[B]` drafts verified; conf: float32 `[B, P]` raw confidence logits.
    context: the draft's context update (`PendingKV`) for runtimes with
      `context_pending`, else None (their `commit` runs on `taps` after the branch).
    cache: the target cache with the round's K/V already written (then `pending` is None).
  """

  pending: Any
  taps: Array | None
  drafts: Array
  n_acc: Array
  nxt: Array
  ell: Array
  conf: Array
  context: Any = None
  cache: Any = None


def _finish(runtime, draft, tmodel, s: SpecState, o: Outcome, proposed: Array,
            probe_level: Array) -> SpecState:
  """Commit and record: the block's K/V written, `n_acc + 1` tokens committed, the draft's
  context advanced, the round recorded."""
  live = ~s.done
  p = s.stale.shape[1]
  tokens, n_commit, hit_stop = commit_lib.round_tokens(o.drafts, o.n_acc, o.nxt,
                                                       s.rows.stop_tokens)
  out, num_out, done, _ = commit_lib.advance(s.out, s.num_out, s.done, tokens, n_commit,
                                             hit_stop, s.rows.max_new)
  new_len = s.cache.lengths + jnp.where(live, o.n_acc + 1, 0)
  cache = o.cache if o.pending is None else s.cache.write_pending(o.pending.masked(live))
  cache = cache.commit(new_len)
  if o.context is not None:
    dstate = runtime.commit_pending(s.draft_state, o.context.masked(live), new_len)
  else:
    verify_tokens = jnp.concatenate([s.anchor[:, None], o.drafts], axis=1)
    dstate = runtime.commit(draft, tmodel, s.draft_state, o.taps, verify_tokens, o.n_acc,
                            o.nxt, s.cache.lengths, new_len)
  slot = jnp.arange(p)[None, :]
  hits = live[:, None] & (slot < o.n_acc[:, None])
  tries = live[:, None] & (slot <= o.n_acc[:, None]) & (slot < o.ell[:, None])
  rows = jnp.arange(live.shape[0])
  r = jnp.where(live, s.steps, s.accept_lens.shape[1])  # finished rows record nothing
  fresh = live & proposed
  return SpecState(
      cache=cache, draft_state=dstate, rows=s.rows,
      anchor=jnp.where(live, o.nxt, s.anchor), out=out, num_out=num_out, done=done,
      steps=s.steps + live,
      accept_lens=s.accept_lens.at[rows, r].set(n_commit, mode="drop"),
      verify_lens=s.verify_lens.at[rows, r].set(o.ell, mode="drop"),
      proposed=s.proposed.at[rows, r].set(jnp.broadcast_to(proposed, live.shape), mode="drop"),
      confidence=s.confidence.at[rows, r].set(o.conf, mode="drop"),
      stale=jnp.where(fresh[:, None], o.conf, s.stale),
      since_probe=jnp.where(proposed, 0, s.since_probe + 1).astype(jnp.int32),
      probe_level=probe_level,
      pos_hits=s.pos_hits + hits, pos_tries=s.pos_tries + tries)


def spec_rounds(tmodel, draft, loop: LoopSpec, state: SpecState, seed_key, params, scheduler,
                verify_cap: Array, num_rounds, stop_on_finish=False) -> SpecState:
  """Up to `num_rounds` rounds (fewer once every row is done or its record is full; with
  `stop_on_finish`, a bool that may be traced, also after the round in which a row
  finishes, so a server can fill the freed slot at once)."""
  limit = state.accept_lens.shape[1]
  done0 = jnp.sum(state.done)

  def cond(c):
    i, s = c
    return ((i < num_rounds) & ~jnp.all(s.done | (s.steps >= limit))
            & ~(jnp.asarray(stop_on_finish) & (jnp.sum(s.done) > done0)))

  def body(c):
    i, s = c
    return i + 1, spec_round(tmodel, draft, loop, s, seed_key, params, scheduler, verify_cap)

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


@functools.partial(jax.jit, static_argnames=("tgraph", "dgraph", "loop", "max_steps",
                                             "prefill_budget"),
                   donate_argnames=("cache", "draft_state"))
def spec_generate(tgraph, tparams, dgraph, dparams, batch: Batch, cache: KVCache, draft_state,
                  seed_key, params, verify_cap: Array, scheduler=None, *, loop: LoopSpec,
                  max_steps: int, prefill_budget: int | None = None):
  """Jitted speculative generation of one batch: prefill + all rounds in one program.

  One compilation per (bucket, loop spec, scheduler policy); the scheduler's tables are
  arguments, so new SPS tables or temperatures do not recompile.

  Returns:
    (final SpecState without its caches' ownership: the caches are returned separately
     for reuse, the rest is the result record)
  """
  count_trace("spec_generate")
  tmodel = nnx.merge(tgraph, tparams)
  draft = nnx.merge(dgraph, dparams)
  state = spec_init(tmodel, draft, loop, batch, cache, draft_state, seed_key, params,
                    out_len=max_steps + loop.num_draft + 1, max_rounds=max_steps,
                    prefill_budget=prefill_budget)
  return spec_rounds(tmodel, draft, loop, state, seed_key, params, scheduler, verify_cap,
                     max_steps)
