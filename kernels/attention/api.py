"""Dispatcher for segment attention."""

from __future__ import annotations

from kernels import dispatch
from kernels.attention import reference

IMPLEMENTATIONS = ("xla",)  # backends built for this op


def attention(q, *segments, q_positions=None, scale: float, softcap: float | None = None,
              implementation: str | None = None):
  """See `reference.attention`. "auto" picks the fastest built backend for the platform."""
  dispatch.resolve("segment attention", implementation, built=False,
                   unsupported="no Pallas backend is built for segment attention yet")
  return reference.attention(q, *segments, q_positions=q_positions, scale=scale,
                             softcap=softcap)
