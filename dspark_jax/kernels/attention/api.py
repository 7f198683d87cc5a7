"""Dispatcher for segment attention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.kernels import dispatch
from dspark_jax.kernels.attention import pallas as pallas_impl
from dspark_jax.kernels.attention import reference

OP = "segment attention"
IMPLEMENTATIONS = ("xla", "pallas")  # backends built for this op
COMPILED_ON = ("gpu",)  # Triton lowering
# Platforms where "auto" runs the kernel: empty until the `gpu`-marked tests of
# tests/test_attention_kernel.py have passed on a GPU and scripts/gpu_bench.py shows it pays.
AUTO_ON: tuple[str, ...] = ()
GPU_BLOCK_Q = 64  # query rows (T * G) per program on GPU
GPU_BLOCK_K = 64  # keys per step on GPU; halved for head dims above 128 (registers)
INTERPRET_BLOCK = 128  # CPU interpret mode: few, wide tiles (each step is an XLA loop trip)

# Smallest key prefix worth a branch of its own: below it the slice saves less than the switch.
MIN_SPAN = 256


def prefix_spans(capacity: int) -> tuple[int, ...]:
  """The key-prefix lengths a cache of `capacity` slots is attended over: `MIN_SPAN` times
  powers of four up to a quarter of the capacity, then the capacity itself (one compiled
  branch per layer each, so few: every branch adds to every program's compile time).

  XLA-CPU copies a sliced prefix before the dots read it (slice + copy + read, about 3x the
  prefix's bytes, against one read of the whole cache), so a prefix pays only below about a
  third of the capacity; measured on a batch-64 SmolLM2 decode step, a half-capacity
  prefix saved nothing. Long fixed-capacity caches (server slots) gain the most.
  """
  spans, s = [], MIN_SPAN
  while 4 * s <= capacity:
    spans.append(s)
    s *= 4
  return (*spans, capacity)


def choose(implementation: str | None = None, *, q=None, segments=(),
           own=()) -> dispatch.Choice:
  """The backend for one call (with `q` and `segments`, and the ragged entry's `own` (k, v):
  checked against the kernel's limits)."""
  unsupported = (None if q is None else
                 pallas_impl.unsupported(q, segments, dispatch.platform(), own))
  return dispatch.resolve(OP, implementation, compiled_on=COMPILED_ON, auto_on=AUTO_ON,
                          unsupported=unsupported)


def _blocks(choice: dispatch.Choice, head_dim: int) -> dict:
  if choice.interpret:
    return dict(block_q=INTERPRET_BLOCK, block_k=INTERPRET_BLOCK)
  return dict(block_q=GPU_BLOCK_Q, block_k=GPU_BLOCK_K if head_dim <= 128 else GPU_BLOCK_K // 2)


def _prefix(seg: reference.KV, span: int) -> reference.KV:
  """`seg` cut to its first `span` slots."""
  cut = lambda x: None if x is None else x[..., :span]
  return dataclasses.replace(seg, k=seg.k[..., :span], v=seg.v[:, :, :span],
                             positions=cut(seg.positions), mask=cut(seg.mask))


def _over_prefix(first, extent, run):
  """`run(first)`, reading `first` (a `KV`) only up to a `prefix_spans` bucket covering
  `extent` (a traced scalar; None: all of it)."""
  if extent is None or not isinstance(first, reference.KV):
    return run(first)
  spans = prefix_spans(first.v.shape[2])
  if len(spans) == 1:
    return run(first)

  def branch(span):
    def f(k, v):
      return run(_prefix(dataclasses.replace(first, k=k, v=v), span))
    return f

  idx = jnp.searchsorted(jnp.asarray(spans, jnp.int32), jnp.asarray(extent, jnp.int32))
  idx = jnp.minimum(idx, len(spans) - 1)
  return jax.lax.switch(idx, [branch(s) for s in spans], first.k, first.v)


def attention(q, *segments, q_positions=None, scale: float, softcap: float | None = None,
              implementation: str | None = None, extent=None):
  """See `reference.attention`. "auto" picks the fastest built backend for the platform
  ("pallas": `pallas.attention`, interpreted on CPU).

  `extent` (traced int scalar, optional): no query sees a key of the first segment (a `KV`
  cache) at slot `>= extent`. The keys are then read only up to the smallest of
  `prefix_spans(S)` that covers it (`lax.switch`): a decode step at the start of a long
  cache reads a fraction of it. The result is the same, since hidden keys weigh exactly 0
  (except in a query that sees no key at all, whose uniform row is over the keys read).
  """
  choice = choose(implementation, q=q, segments=segments)
  if choice.pallas:
    blocks = _blocks(choice, q.shape[-1])
    run = lambda *segs: pallas_impl.attention(q, *segs, q_positions=q_positions, scale=scale,
                                              softcap=softcap, interpret=choice.interpret,
                                              **blocks)
  else:
    run = lambda *segs: reference.attention(q, *segs, q_positions=q_positions, scale=scale,
                                            softcap=softcap)
  if not segments:
    return run()  # the error of a call without keys
  return _over_prefix(segments[0], extent, lambda first: run(first, *segments[1:]))


def ragged_attention(q, cache, k=None, v=None, *, rows, cols, start, width: int, scale: float,
                     softcap: float | None = None, mask=None, implementation: str | None = None,
                     extent=None):
  """See `reference.ragged_attention` (packed verify: flat `[N, Nh, H]` queries in a
  `Pack`'s layout); `extent` bounds the cache reads as in `attention`."""
  choice = choose(implementation, q=q, segments=(cache,), own=() if k is None else (k, v))
  kw = dict(rows=rows, cols=cols, start=start, width=width, scale=scale, softcap=softcap,
            mask=mask)
  if choice.pallas:
    run = lambda c: pallas_impl.ragged_attention(q, c, k, v, interpret=choice.interpret,
                                                 **_blocks(choice, q.shape[-1]), **kw)
  else:
    run = lambda c: reference.ragged_attention(q, c, k, v, **kw)
  return _over_prefix(cache, extent, run)
