"""Dispatcher for chain rejection sampling."""

from __future__ import annotations

from dspark_jax.kernels import dispatch
from dspark_jax.kernels.prefix_accept import pallas as pallas_impl
from dspark_jax.kernels.prefix_accept import reference

OP = "prefix accept"
COMPILED_ON = ("gpu",)  # Triton lowering; TPU would need aligned (masked) vocabulary tiles
# Platforms where "auto" runs the kernel: empty until the `gpu`-marked tests have passed on a
# GPU and scripts/gpu_bench.py shows it pays (see kernels/markov_sampler/api.py).
AUTO_ON: tuple[str, ...] = ()
GPU_TILE = 1024  # vocabulary columns per step on GPU (a power of two)


def _tile(choice: dispatch.Choice, v: int, tile: int | None) -> int:
  if choice.interpret:
    return tile or 128
  return min(tile or GPU_TILE, 1 << (v.bit_length() - 1))  # Triton: a power of two <= V


def choose(implementation: str | None = None, *,
           unsupported: str | None = None) -> dispatch.Choice:
  """The backend for one accept call (`unsupported`: the caller's reason it cannot fuse)."""
  return dispatch.resolve(OP, implementation, compiled_on=COMPILED_ON, auto_on=AUTO_ON,
                          unsupported=unsupported)


def prefix_accept(p, q, drafts, verify_len, uniforms, sample_uniform, *,
                  implementation: str | None = None, choice: dispatch.Choice | None = None,
                  tile: int | None = None):
  """See `reference.prefix_accept`; `choice` (from `choose`) overrides `implementation`."""
  choice = choice or choose(implementation)
  if not choice.pallas:
    return reference.prefix_accept(p, q, drafts, verify_len, uniforms, sample_uniform)
  return pallas_impl.prefix_accept(p, q, drafts, verify_len, uniforms, sample_uniform,
                                   tile=_tile(choice, p.shape[-1], tile),
                                   interpret=choice.interpret)


def greedy_accept(target_logits, drafts, verify_len, *, implementation: str | None = None,
                  choice: dispatch.Choice | None = None, tile: int | None = None):
  """See `reference.greedy_accept`."""
  choice = choice or choose(implementation)
  if not choice.pallas:
    return reference.greedy_accept(target_logits, drafts, verify_len)
  return pallas_impl.greedy_accept(target_logits, drafts, verify_len,
                                   tile=_tile(choice, target_logits.shape[-1], tile),
                                   interpret=choice.interpret)
