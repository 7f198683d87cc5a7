"""Dispatcher for token-tree acceptance."""

from __future__ import annotations

from dspark_jax.kernels import dispatch
from dspark_jax.kernels.prefix_accept.api import _tile
from dspark_jax.kernels.tree_accept import pallas as pallas_impl
from dspark_jax.kernels.tree_accept import reference

OP = "tree accept"
COMPILED_ON = ("gpu",)  # Triton lowering, as prefix_accept
# Empty until the `gpu`-marked tests have passed on a GPU and scripts/gpu_bench.py shows the
# kernel pays (see kernels/markov_sampler/api.py).
AUTO_ON: tuple[str, ...] = ()


def choose(implementation: str | None = None) -> dispatch.Choice:
  return dispatch.resolve(OP, implementation, compiled_on=COMPILED_ON, auto_on=AUTO_ON)


def tree_accept(p, q, tokens, uniforms, sample_uniform, *, shape: reference.TreeShape,
                implementation: str | None = None, choice: dispatch.Choice | None = None,
                tile: int | None = None):
  """See `reference.tree_accept`; `choice` (from `choose`) overrides `implementation`."""
  choice = choice or choose(implementation)
  if not choice.pallas:
    return reference.tree_accept(p, q, tokens, uniforms, sample_uniform, shape)
  return pallas_impl.tree_accept(p, q, tokens, uniforms, sample_uniform, shape=shape,
                                 tile=_tile(choice, p.shape[-1], tile),
                                 interpret=choice.interpret)


def greedy_tree_accept(target_logits, tokens, *, shape: reference.TreeShape,
                       implementation: str | None = None,
                       choice: dispatch.Choice | None = None, tile: int | None = None):
  """See `reference.greedy_tree_accept`."""
  choice = choice or choose(implementation)
  if not choice.pallas:
    return reference.greedy_tree_accept(target_logits, tokens, shape)
  return pallas_impl.greedy_tree_accept(target_logits, tokens, shape=shape,
                                        tile=_tile(choice, target_logits.shape[-1], tile),
                                        interpret=choice.interpret)
