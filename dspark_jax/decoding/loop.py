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
from dspark_jax.decoding.state import ARState, Batch, Rows

# Incremented at trace time: tests assert one compilation per (bucket, ...) key.
TRACE_COUNTS: dict[str, int] = {}


def count_trace(name: str):
  TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


def prefill(model, batch: Batch, cache: KVCache, taps=()):
  """Runs the prompts through the target, filling the cache.

  Returns:
    (cache with lengths = prompt lengths, last-position logits float32 `[B, V]`,
     taps `[B, Tp, C]` or None)
  """
  tp = batch.tokens.shape[1]
  out = model(batch.tokens, cache=cache.commit(jnp.zeros_like(batch.lengths)), attend_len=tp,
              taps=taps, compute_logits=False)
  last_hidden = jnp.take_along_axis(out.hidden, (batch.lengths - 1)[:, None, None], axis=1)[:, 0]
  logits = model.logits_from_hidden(last_hidden)
  return out.cache.commit(batch.lengths), logits, out.taps


def first_token(logits, batch: Batch, seed_key, params):
  """The prefill's sample (step 0 of every row) and whether it already ends the row."""
  keys = sampling.row_keys(seed_key, batch.request_ids, jnp.int32(0), sampling.TAG_SAMPLE)
  first = sampling.sample(keys, logits, params)
  done = commit.is_stop(first, batch.stop_tokens) | (batch.max_new <= 1)
  return first, done


def ar_init(model, batch: Batch, cache: KVCache, seed_key, params, *, out_len: int) -> ARState:
  """Prefill + first token: the decode state of a fresh batch."""
  b = batch.lengths.shape[0]
  cache, logits, _ = prefill(model, batch, cache)
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


def ar_rounds(model, state: ARState, seed_key, params, num_steps) -> ARState:
  """Up to `num_steps` decode steps (fewer once every row is done), on device."""

  def cond(c):
    i, s = c
    return (i < num_steps) & ~jnp.all(s.done)

  def body(c):
    i, s = c
    return i + 1, ar_step(model, s, seed_key, params)

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps"), donate_argnames=("cache",))
def ar_generate(graphdef, params, batch: Batch, cache: KVCache, seed_key,
                sampling_params: sampling.SamplingParams, *, max_steps: int):
  """Prefill + autoregressive decoding of a batch, entirely on device.

  Args:
    graphdef, params: the target (`nnx.split`).
    batch: prompts and per-row limits.
    cache: a cache of capacity >= Tp + max_steps (donated).
    seed_key: PRNG key of the generation seed.
    sampling_params: temperature / top-k / top-p.
    max_steps: static output buffer size (>= max(batch.max_new)).

  Returns:
    (out `[B, max_steps]`, num_out `[B]`, steps `[B]`, cache)
  """
  count_trace("ar_generate")
  model = nnx.merge(graphdef, params)
  state = ar_init(model, batch, cache, seed_key, sampling_params, out_len=max_steps)
  state = ar_rounds(model, state, seed_key, sampling_params, max_steps - 1)
  return state.out, state.num_out, state.steps, state.cache
