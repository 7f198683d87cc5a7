"""Dispatcher for segment attention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.kernels import dispatch
from dspark_jax.kernels.attention import reference

IMPLEMENTATIONS = ("xla",)  # backends built for this op

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


def attention(q, *segments, q_positions=None, scale: float, softcap: float | None = None,
              implementation: str | None = None, extent=None):
  """See `reference.attention`. "auto" picks the fastest built backend for the platform.

  `extent` (traced int scalar, optional): no query sees a key of the first segment (a `KV`
  cache) at slot `>= extent`. The keys are then read only up to the smallest of
  `prefix_spans(S)` that covers it (`lax.switch`): a decode step at the start of a long
  cache reads a fraction of it. The result is the same, since hidden keys weigh exactly 0.
  """
  dispatch.resolve("segment attention", implementation, built=False,
                   unsupported="no Pallas backend is built for segment attention yet")
  run = lambda *segs: reference.attention(q, *segs, q_positions=q_positions, scale=scale,
                                          softcap=softcap)
  first = segments[0] if segments else None
  if extent is None or not isinstance(first, reference.KV):
    return run(*segments)
  spans = prefix_spans(first.v.shape[2])
  if len(spans) == 1:
    return run(*segments)

  def branch(span):
    def f(k, v):
      pos = None if first.positions is None else first.positions[:, :span]
      return run(dataclasses.replace(first, k=k[..., :span], v=v[:, :, :span], positions=pos),
                 *segments[1:])
    return f

  idx = jnp.searchsorted(jnp.asarray(spans, jnp.int32), jnp.asarray(extent, jnp.int32))
  idx = jnp.minimum(idx, len(spans) - 1)
  return jax.lax.switch(idx, [branch(s) for s in spans], first.k, first.v)
