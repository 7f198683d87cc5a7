"""Prefill and the plain autoregressive decode loop: one jitted `lax.while_loop`.

Everything between the prompt upload and the final result download runs on device;
the cache is donated so XLA updates it in place and the caller can reuse the buffer
for its next batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.decoding import sampling
from dspark_jax.decoding.cache import KVCache
from dspark_jax.typing import Array

# Incremented at trace time: tests assert one compilation per (bucket, ...) key.
TRACE_COUNTS: dict[str, int] = {}


def _count_trace(name: str):
  TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
  """One padded batch of requests.

  Attributes:
    tokens: int32 `[B, Tp]` right-padded prompts.
    lengths: int32 `[B]` prompt lengths (>= 1).
    max_new: int32 `[B]` per-row new-token limit.
    stop_tokens: int32 `[B, M]` per-row stop ids, padded with -1.
    request_ids: int32 `[B]` RNG stream ids.
  """

  tokens: Array
  lengths: Array
  max_new: Array
  stop_tokens: Array
  request_ids: Array


def is_stop(tokens: Array, stop_tokens: Array) -> Array:
  """`tokens` `[B, ...]` vs per-row stop ids `[B, M]` -> bool `[B, ...]`."""
  extra = tokens.ndim - 1
  stops = stop_tokens.reshape(stop_tokens.shape[:1] + (1,) * extra + stop_tokens.shape[1:])
  return jnp.any(tokens[..., None] == stops, axis=-1)


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ARState:
  """Loop carry of plain decoding.

  Attributes:
    cache: target KV cache (lengths = committed tokens, excluding `last`).
    last: int32 `[B]` newest token, not yet run through the target.
    out: int32 `[B, O]` generated tokens (-1 = empty).
    num_out: int32 `[B]` tokens generated.
    done: bool `[B]`.
    step: int32 scalar.
  """

  cache: KVCache
  last: Array
  out: Array
  num_out: Array
  done: Array
  step: Array


def _record(state_out, num_out, done, tokens_new, n_new):
  """Appends up to `n_new[b]` tokens of `tokens_new[b]` `[B, W]` to each row's buffer."""
  width = tokens_new.shape[1]
  idx = num_out[:, None] + jnp.arange(width)[None, :]
  valid = (jnp.arange(width)[None, :] < n_new[:, None]) & ~done[:, None]
  idx = jnp.where(valid, idx, state_out.shape[1])  # out of range -> dropped
  rows = jnp.broadcast_to(jnp.arange(state_out.shape[0])[:, None], idx.shape)
  return state_out.at[rows, idx].set(tokens_new, mode="drop")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps"), donate_argnames=("cache",))
def ar_generate(graphdef, params, batch: Batch, cache: KVCache, seed_key: Array,
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
    (out `[B, max_steps]`, num_out `[B]`, steps, cache)
  """
  _count_trace("ar_generate")
  model = nnx.merge(graphdef, params)
  b = batch.lengths.shape[0]
  cache, logits, _ = prefill(model, batch, cache)
  keys = sampling.row_keys(seed_key, batch.request_ids, jnp.int32(0), sampling.TAG_SAMPLE)
  first = sampling.sample(keys, logits, sampling_params)
  out = jnp.full((b, max_steps), -1, jnp.int32).at[:, 0].set(first)
  num_out = jnp.ones((b,), jnp.int32)
  done = is_stop(first, batch.stop_tokens) | (num_out >= batch.max_new)
  state = ARState(cache=cache, last=first, out=out, num_out=num_out, done=done,
                  step=jnp.int32(1))

  def cond(s: ARState):
    return (s.step < max_steps) & ~jnp.all(s.done)

  def body(s: ARState):
    fwd = model(s.last[:, None], s.cache.lengths[:, None], cache=s.cache)
    keys = sampling.row_keys(seed_key, batch.request_ids, s.step, sampling.TAG_SAMPLE)
    tok = sampling.sample(keys, fwd.logits[:, 0], sampling_params)
    live = ~s.done
    out = _record(s.out, s.num_out, s.done, tok[:, None], jnp.ones_like(s.num_out))
    num_out = s.num_out + live
    cache = fwd.cache.commit(s.cache.lengths + live)
    done = s.done | (live & (is_stop(tok, batch.stop_tokens) | (num_out >= batch.max_new)))
    last = jnp.where(live, tok, s.last)
    return ARState(cache=cache, last=last, out=out, num_out=num_out, done=done, step=s.step + 1)

  state = jax.lax.while_loop(cond, body, state)
  return state.out, state.num_out, state.step, state.cache
