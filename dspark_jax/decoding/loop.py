"""Prefill and plain autoregressive decoding as pure functions over `ARState`.

`ar_init` (prefill + first token) and `ar_rounds` (up to n decode steps in one
`lax.while_loop`) are what a server calls between admissions; `ar_generate` fuses both
into one program for `generate`. Everything between the prompt upload and the result
download runs on device; the cache is donated so XLA updates it in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.decoding import commit, sampling
from dspark_jax.decoding.cache import KVCache
from dspark_jax.decoding.state import ARState, Batch, Pack, Rows

# Incremented at trace time: tests assert one compilation per (bucket, ...) key.
TRACE_COUNTS: dict[str, int] = {}


def count_trace(name: str):
  TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


def prefill(model, batch: Batch, cache: KVCache, taps=(), budget: int | None = None):
  """Runs the prompts through the target, filling the cache.

  `budget` (static): run the projections and MLPs on the prompts' real tokens only, packed
  into a flat batch of `budget` >= sum(lengths) tokens (`Pack`), instead of on all B * Tp
  padded slots; same results. What the engine picks: `packed_prefill_budget`.

  Returns:
    (cache with lengths = prompt lengths, last-position logits float32 `[B, V]`,
     taps `[B, Tp, C]` (zeros beyond each prompt when packed) or None)
  """
  tp = batch.tokens.shape[1]
  empty = cache.commit(jnp.zeros_like(batch.lengths))
  if budget is None:
    out = model(batch.tokens, cache=empty, attend_len=tp, taps=taps, compute_logits=False)
    hidden, tap_out = out.hidden, out.taps
  else:
    valid = jnp.arange(tp)[None, :] < batch.lengths[:, None]
    flat, pack = Pack.build(batch.tokens, valid, jnp.zeros_like(batch.lengths), budget)
    pos = pack.to_flat(pack.positions)
    out = model(flat[None], pos, cache=empty, attend_len=tp, taps=taps, compute_logits=False,
                pack=pack)
    hidden = pack.to_dense(out.hidden)
    tap_out = None if out.taps is None else pack.to_dense(out.taps)
  last_hidden = jnp.take_along_axis(hidden, (batch.lengths - 1)[:, None, None], axis=1)[:, 0]
  logits = model.logits_from_hidden(last_hidden)
  return out.cache.commit(batch.lengths), logits, tap_out


# Packed prefill pays from this many tokens on: below it a prefill is cheap either way, and
# every distinct budget is one more compiled program.
PACK_MIN_TOKENS = 256


def packed_prefill_budget(lengths, tp: int) -> int | None:
  """The packed-prefill budget for prompt lengths `[B]` (host values) padded to `tp`: the
  smallest power of two >= sum(lengths) (at least `tp` and `PACK_MIN_TOKENS`) when it is
  smaller than the dense B * Tp, else None (dense prefill)."""
  total = int(sum(int(x) for x in lengths))
  dense = len(lengths) * tp
  n = max(tp, PACK_MIN_TOKENS, 1 << max(0, (max(total, 1) - 1).bit_length()))
  return n if n < dense else None


def first_token(logits, batch: Batch, seed_key, params):
  """The prefill's sample (step 0 of every row) and whether it already ends the row."""
  keys = sampling.row_keys(seed_key, batch.request_ids, jnp.int32(0), sampling.TAG_SAMPLE)
  first = sampling.sample(keys, logits, params)
  done = commit.is_stop(first, batch.stop_tokens) | (batch.max_new <= 1)
  return first, done


def ar_init(model, batch: Batch, cache: KVCache, seed_key, params, *, out_len: int,
            prefill_budget: int | None = None) -> ARState:
  """Prefill + first token: the decode state of a fresh batch."""
  b = batch.lengths.shape[0]
  cache, logits, _ = prefill(model, batch, cache, budget=prefill_budget)
  first, done = first_token(logits, batch, seed_key, params)
  out = jnp.full((b, out_len), -1, jnp.int32).at[:, 0].set(first)
  return ARState(cache=cache, rows=Rows.of(batch), last=first, out=out,
                 num_out=jnp.ones((b,), jnp.int32), done=done, steps=jnp.ones((b,), jnp.int32))


def ar_step(model, s: ARState, seed_key, params) -> ARState:
  """One decode step for every live row (finished rows neither write K/V nor record)."""
  live = ~s.done
  fwd = model(s.last[:, None], s.cache.lengths[:, None], cache=s.cache, write_mask=live)
  keys = sampling.row_keys(seed_key, s.rows.request_ids, s.steps, sampling.TAG_SAMPLE)
  tok = sampling.sample(keys, fwd.logits[:, 0], params)
  out, num_out, done, _ = commit.advance(s.out, s.num_out, s.done, tok[:, None],
                                         jnp.ones_like(s.num_out),
                                         commit.is_stop(tok, s.rows.stop_tokens), s.rows.max_new)
  return ARState(cache=fwd.cache.commit(s.cache.lengths + live), rows=s.rows,
                 last=jnp.where(live, tok, s.last), out=out, num_out=num_out, done=done,
                 steps=s.steps + live)


def ar_rounds(model, state: ARState, seed_key, params, num_steps,
              stop_on_finish=False) -> ARState:
  """Up to `num_steps` decode steps (fewer once every row is done), on device.

  `stop_on_finish` (bool, may be traced): also stop after the step in which a row finishes,
  so a server can fill the freed slot at once instead of after `num_steps`.
  """
  done0 = jnp.sum(state.done)

  def cond(c):
    i, s = c
    return ((i < num_steps) & ~jnp.all(s.done)
            & ~(jnp.asarray(stop_on_finish) & (jnp.sum(s.done) > done0)))

  def body(c):
    i, s = c
    return i + 1, ar_step(model, s, seed_key, params)

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps", "prefill_budget"),
                   donate_argnames=("cache",))
def ar_generate(graphdef, params, batch: Batch, cache: KVCache, seed_key,
                sampling_params: sampling.SamplingParams, *, max_steps: int,
                prefill_budget: int | None = None):
  """Prefill + autoregressive decoding of a batch, entirely on device.

  Args:
    graphdef, params: the target (`nnx.split`).
    batch: prompts and per-row limits.
    cache: a cache of capacity >= Tp + max_steps (donated).
    seed_key: PRNG key of the generation seed.
    sampling_params: temperature / top-k / top-p.
    max_steps: static output buffer size (>= max(batch.max_new)).
    prefill_budget: static packed-prefill budget (`packed_prefill_budget`), None for dense.

  Returns:
    (out `[B, max_steps]`, num_out `[B]`, steps `[B]`, cache)
  """
  count_trace("ar_generate")
  model = nnx.merge(graphdef, params)
  state = ar_init(model, batch, cache, seed_key, sampling_params, out_len=max_steps,
                  prefill_budget=prefill_budget)
  state = ar_rounds(model, state, seed_key, sampling_params, max_steps - 1)
  return state.out, state.num_out, state.steps, state.cache
