"""Where a draft-verify round's time goes, measured rather than estimated.

The loop runs as one `lax.while_loop`, so its parts cannot be timed from the host. Instead
the draft's `propose` and the target's `verify` are each jitted alone in a `fori_loop` of
`rounds` calls on a prefilled batch of the same shapes, timed, and divided by `rounds`. Each
iteration's input depends on the previous one so XLA can neither hoist nor merge the calls.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import sharding as sharding_lib
from dspark_jax.decoding import loop as loop_lib
from dspark_jax.decoding import sampling
from dspark_jax.decoding import speculative


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


@functools.partial(jax.jit, static_argnames=("tgraph", "taps", "rounds"),
                   donate_argnames=("cache",))
def _verify_loop(tgraph, tparams, cache, anchor, drafts, *, taps, rounds: int):
  tmodel = nnx.merge(tgraph, tparams)

  def body(i, carry):
    c, acc = carry
    logits, _, c = speculative.verify(tmodel, c, (anchor + acc) % 7, drafts, taps)
    return c.commit(cache.lengths), acc + logits[:, -1].argmax(-1).astype(acc.dtype)

  return jax.lax.fori_loop(0, rounds, body, (cache, anchor * 0))


def round_split(target, draft, prompts, rounds: int = 16, repeats: int = 3,
                num_draft: int | None = None) -> dict:
  """Milliseconds per call of the draft's propose and the target's verify, measured alone.

  Args:
    prompts: token id lists (a batch of `generate`'s shapes: bucketed the same way).
    rounds: calls per timed loop.
    num_draft: draft tokens per round (default: the draft's trained block).

  Returns:
    {"propose_ms", "verify_ms", "rounds_timed"}.
  """
  from dspark_jax import generation  # cache pool helpers; generation imports this module
  b = generation.bucket(len(prompts), minimum=1)
  tp = generation.bucket(max(len(p) for p in prompts))
  p = num_draft or draft.config.block_size
  tokens = np.zeros((b, tp), np.int32)
  lengths = np.ones((b,), np.int32)
  for j, ids in enumerate(prompts):
    tokens[j, :len(ids)] = ids
    lengths[j] = len(ids)
  batch = loop_lib.Batch(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                         max_new=jnp.full((b,), 1, jnp.int32),
                         stop_tokens=jnp.full((b, 1), -1, jnp.int32),
                         request_ids=jnp.arange(b, dtype=jnp.int32))
  capacity = tp + 2 * (p + 1)
  cache = generation._get_cache(target, b, capacity, pool_key="profile")
  runtime = draft.runtime
  dstate = jax.device_put(runtime.init_state(draft.config, b, capacity, draft.dtype),
                          sharding_lib.replicated(target.mesh))
  cache, dstate, anchor = _setup(target.graphdef, target.params, draft.graphdef, draft.params,
                                 runtime, batch, cache, dstate)
  params = sampling.SamplingParams.make(0.0, 0, 1.0)
  key = jax.random.key(0)
  common = (target.graphdef, target.params, draft.graphdef, draft.params, runtime)

  ctx_lengths = jnp.array(cache.lengths)  # a copy: `verify` donates the cache

  def propose():
    return jax.block_until_ready(_propose_loop(*common, dstate, ctx_lengths, anchor, key,
                                               params, num_draft=p, rounds=rounds))

  drafts = jnp.zeros((b, p), jnp.int32) + anchor[:, None]
  taps = runtime.target_taps(draft.module)
  state = {"cache": cache}

  def verify():
    c, acc = _verify_loop(target.graphdef, target.params, state["cache"], anchor, drafts,
                          taps=taps, rounds=rounds)
    state["cache"] = c
    return jax.block_until_ready(acc)

  propose(), verify()  # compile
  t_prop, _ = median_time(propose, repeats)
  t_ver, _ = median_time(verify, repeats)
  generation._return_cache(target, state["cache"], pool_key="profile")
  return {"propose_ms": 1e3 * t_prop / rounds, "verify_ms": 1e3 * t_ver / rounds,
          "rounds_timed": rounds}
