"""Token-tree acceptance as one Pallas kernel per row (spec: `reference.py`).

Each program owns one row and walks the static tree level by level. The accept tests are
scalar work: a child's token x needs p(x), q(x) and the residual at x, and the residual
after j rejected siblings is an elementwise function of p_cur, the siblings' q rows and j
scalar masses, so it is recomputed at x instead of being stored. Only the masses (one per
rejected sibling) and the emitted token's inverse-CDF draw stream the vocabulary, in tiles: a `[V]` residual
never has to live in registers.

Greedy needs no walk at all: a node is accepted iff its token is the argmax after its
parent and its parent is accepted, which the static topology unrolls.

GPU: Triton lowering; `tile` must be a power of two. CPU: interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dspark_jax.kernels.prefix_accept.pallas import _argmax_step, _call, _no_max, _tiles, draw_row
from dspark_jax.kernels.prefix_accept.reference import RESIDUAL_MIN_MASS
from dspark_jax.kernels.tree_accept.reference import TreeShape

Array = jax.Array


def _residual(p_row, q_rows, steps):
  """The residual after rejected siblings: `q_rows[i]` is sibling i's q and `steps[i]` its
  (mass, applied); an applied step maps r to max(r - q_i, 0) / mass_i, as the reference
  does to the whole row."""
  r = p_row
  for i, (mass, applied) in enumerate(steps):
    r = jnp.where(applied, jnp.maximum(r - q_rows[i], 0.0) / jnp.where(applied, mass, 1.0), r)
  return r


def _sampled_kernel(p_ref, q_ref, tok_ref, u_ref, su_ref, n_ref, next_ref, leaf_ref, *,
                    shape: TreeShape, v: int, tile: int):
  off = shape.offsets
  kmax = max(shape.branching)
  cur = jnp.zeros((), jnp.int32)
  alive = jnp.ones((), jnp.bool_)
  # Where the walk stopped: the rejected siblings whose residual the emitted token uses.
  final_q = [jnp.zeros((), jnp.int32)] * kmax
  final_mass = [jnp.ones((), jnp.float32)] * kmax
  final_applied = [jnp.zeros((), jnp.bool_)] * kmax
  for d in range(1, shape.num_draft + 1):
    first = off[d] + (cur - off[d - 1]) * shape.branching[d - 1]
    chosen = jnp.full((), -1, jnp.int32)
    q_ids, steps = [], []
    for j in range(shape.branching[d - 1]):
      c = first + j
      x = tok_ref[0, c]
      at_x = lambda ref, node, x=x: ref[0, node, pl.ds(x, 1)][0]
      r_x = _residual(at_x(p_ref, cur), [at_x(q_ref, i) for i in q_ids], steps)
      trying = alive & (chosen < 0)
      ok = trying & (u_ref[0, c] * at_x(q_ref, c) < r_x)
      chosen = jnp.where(ok, c, chosen)

      def add_mass(start, fresh, acc, c=c, q_ids=tuple(q_ids), steps=tuple(steps)):
        seg = lambda ref, node: ref[0, node, pl.ds(start, tile)]
        r = _residual(seg(p_ref, cur), [seg(q_ref, i) for i in q_ids], steps)
        return acc + jnp.sum(jnp.where(fresh, jnp.maximum(r - seg(q_ref, c), 0.0), 0.0))

      mass = _tiles(v, tile, add_mass, jnp.zeros((), jnp.float32))
      q_ids.append(c)
      steps.append((mass, trying & ~ok & (mass > RESIDUAL_MIN_MASS)))
    stop = alive & (chosen < 0)
    for j in range(kmax):
      if j < len(steps):
        final_q[j] = jnp.where(stop, q_ids[j], final_q[j])
        final_mass[j] = jnp.where(stop, steps[j][0], final_mass[j])
        final_applied[j] = jnp.where(stop, steps[j][1], final_applied[j])
    alive = alive & (chosen >= 0)
    cur = jnp.where(alive, chosen, cur)

  def final(start):
    seg = lambda ref, node: ref[0, node, pl.ds(start, tile)]
    return _residual(seg(p_ref, cur), [seg(q_ref, i) for i in final_q],
                     list(zip(final_mass, final_applied)))

  n_ref[0] = _depth_of(cur, shape)
  next_ref[0] = draw_row(v, tile, final, su_ref[0])
  leaf_ref[0] = cur


def _greedy_kernel(logits_ref, tok_ref, n_ref, next_ref, leaf_ref, *, shape: TreeShape, v: int,
                   tile: int):
  best = []
  for i in range(shape.width):  # W is small and static
    _, idx = _tiles(v, tile, lambda start, fresh, carry, i=i: _argmax_step(
        logits_ref[0, i, pl.ds(start, tile)], start, carry), _no_max())
    best.append(idx)
  accepted = [jnp.ones((), jnp.bool_)]
  leaf = jnp.zeros((), jnp.int32)
  for i in range(1, shape.width):  # breadth first: a parent is decided before its children
    par = int(shape.parent[i])
    ok = accepted[par] & (tok_ref[0, i] == best[par])
    accepted.append(ok)
    # Breadth first, so among accepted nodes of equal depth the first one is kept.
    leaf = jnp.where(ok & (_depth_of(leaf, shape) < int(shape.depth[i])), i, leaf)
  tok = jnp.zeros((), jnp.int32)
  for i in range(shape.width):
    tok = jnp.where(leaf == i, best[i], tok)
  n_ref[0] = _depth_of(leaf, shape)
  next_ref[0] = tok
  leaf_ref[0] = leaf


def _depth_of(node, shape: TreeShape):
  depth = jnp.zeros((), jnp.int32)
  for d in range(1, shape.num_draft + 1):
    depth = depth + (node >= shape.offsets[d]).astype(jnp.int32)
  return depth


def _outputs(b: int):
  return [jax.ShapeDtypeStruct((b,), jnp.int32)] * 3


@functools.partial(jax.jit, static_argnames=("shape", "tile", "interpret"))
def tree_accept(p: Array, q: Array, tokens: Array, uniforms: Array, sample_uniform: Array, *,
                shape: TreeShape, tile: int = 1024, interpret: bool = False):
  """See `reference.tree_accept`; `tile` vocabulary columns per step (clipped to V)."""
  b, _, v = p.shape
  tile = min(tile, v)
  kernel = functools.partial(_sampled_kernel, shape=shape, v=v, tile=tile)
  args = [p.astype(jnp.float32), q.astype(jnp.float32), tokens.astype(jnp.int32),
          uniforms.astype(jnp.float32), sample_uniform.astype(jnp.float32)]
  return tuple(_call(kernel, args, b, interpret, outputs=3))


@functools.partial(jax.jit, static_argnames=("shape", "tile", "interpret"))
def greedy_tree_accept(target_logits: Array, tokens: Array, *, shape: TreeShape,
                       tile: int = 1024, interpret: bool = False):
  """See `reference.greedy_tree_accept`."""
  b, _, v = target_logits.shape
  tile = min(tile, v)
  kernel = functools.partial(_greedy_kernel, shape=shape, v=v, tile=tile)
  return tuple(_call(kernel, [target_logits, tokens.astype(jnp.int32)], b, interpret,
                     outputs=3))
