"""Dispatcher for the Markov head's sequential block sampler."""

from __future__ import annotations

from dspark_jax.kernels import dispatch
from dspark_jax.kernels.markov_sampler import pallas as pallas_impl
from dspark_jax.kernels.markov_sampler import reference

OP = "markov sampler"
COMPILED_ON = ("gpu",)  # Triton lowering; TPU would need aligned (masked) vocabulary tiles
# Platforms where "auto" runs the kernel. Empty until `pytest -m gpu tests/test_kernels.py`
# has passed on a GPU and scripts/gpu_bench.py shows the kernel pays there: an uncompiled
# kernel must not become the default of every GPU run.
AUTO_ON: tuple[str, ...] = ()
# A step holds a [R, tile] W2 tile in registers: cap its size (R = 64 -> 256 columns,
# R = 256 -> 64) so Triton does not spill.
GPU_TILE_ELEMENTS = 16384
GPU_BLOCK_B = 16  # rows per program on GPU: the tensor-core dot needs >= 16


def _pow2_floor(x: int) -> int:
  return 1 << (max(x, 1).bit_length() - 1)


def choose(implementation: str | None = None, *, vocab: int | None = None,
           rank: int | None = None, unsupported: str | None = None) -> dispatch.Choice:
  """The backend for a call with N = `vocab` columns and Markov rank `rank`.

  `unsupported` is the caller's reason the kernel does not apply (e.g. a head kind it does
  not fuse); shape limits of the compiled kernel are added here.
  """
  if unsupported is None and dispatch.platform() == "gpu" and (
      (vocab is not None and vocab < 16) or (rank is not None and rank < 16)):
    unsupported = f"the GPU kernel needs a vocabulary and a rank of at least 16, got {vocab}, {rank}"
  return dispatch.resolve(OP, implementation, compiled_on=COMPILED_ON, auto_on=AUTO_ON,
                          unsupported=unsupported)


def markov_sample(base, e0, w1, w2, *, uniforms=None, temperature=None, greedy_rows=None,
                  implementation: str | None = None, choice: dispatch.Choice | None = None,
                  tile: int | None = None):
  """See `reference.markov_sample`; `choice` (from `choose`) overrides `implementation`."""
  if choice is None:
    choice = choose(implementation, vocab=base.shape[-1], rank=e0.shape[-1])
  if not choice.pallas:
    return reference.markov_sample(base, e0, w1, w2, uniforms=uniforms, temperature=temperature,
                                   greedy_rows=greedy_rows)
  n = base.shape[-1]
  if choice.interpret:
    kw = dict(tile=tile or 128, block_b=None)
  else:
    default = max(16, _pow2_floor(GPU_TILE_ELEMENTS // e0.shape[-1]))
    kw = dict(tile=min(tile or default, _pow2_floor(n)), block_b=GPU_BLOCK_B)
  return pallas_impl.markov_sample(base, e0, w1, w2, uniforms=uniforms, temperature=temperature,
                                   greedy_rows=greedy_rows, interpret=choice.interpret, **kw)
