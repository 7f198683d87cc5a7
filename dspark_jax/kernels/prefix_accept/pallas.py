"""Chain rejection sampling as one Pallas kernel per row (spec: `reference.py`).

Each program owns one row: the P accept tests are scalar work (a draft token's p and q
are single-element loads at the token's column), and only the two distribution rows the
outcome needs, p_n and q_n, are streamed in vocabulary tiles: once for the masses, once for
the inverse-CDF draw (`kernels.draw`; or, greedy, P+1 tiled argmaxes of the target logits).

Tiles never run past the vocabulary: the last one starts at V - tile. For the argmax the
overlap is harmless (re-seen lanes never win a strictly-greater test); for sums and counts
the lanes already seen are masked.

GPU: Triton lowering; `tile` must be a power of two. CPU: interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dspark_jax.kernels import draw
from dspark_jax.kernels.prefix_accept.reference import RESIDUAL_MIN_MASS

Array = jax.Array


def _tiles(v: int, tile: int, body, init):
  """Runs `body(start, fresh, carry)` over tiles; `fresh` `[tile]` marks lanes not yet seen."""

  def step(j, carry):
    start = jnp.minimum(j * tile, v - tile)
    fresh = start + jax.lax.iota(jnp.int32, tile) >= j * tile
    return body(start, fresh, carry)

  return jax.lax.fori_loop(0, pl.cdiv(v, tile), step, init)


def _argmax_step(s: Array, start, carry):
  """Folds tile scores `s` `[tile]` into a running (max, first argmax)."""
  best, best_idx = carry
  m = jnp.max(s)
  idx = jnp.argmax(s).astype(jnp.int32) + start
  better = m > best
  return jnp.where(better, m, best), jnp.where(better, idx, best_idx)


def _no_max():
  # Built inside the kernel: a concrete array here would be a captured constant.
  return jnp.full((), -jnp.inf, jnp.float32), jnp.zeros((), jnp.int32)


def _no_mass():
  # (mass, last positive column) of the residual and of p_n, built inside the kernel.
  zero, none = jnp.zeros((), jnp.float32), jnp.full((), -1, jnp.int32)
  return zero, none, zero, none


def draw_tiles(v: int, tile: int, dist, total: Array, last: Array, u: Array) -> Array:
  """The inverse-CDF token of the row `dist(start)` streams (total mass and last positive
  column known): one counting pass over the tiles (`draw.tile_count`)."""
  target = u * total
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  _, count = _tiles(v, tile, lambda start, fresh, carry: draw.tile_count(
      dist(start), fresh, target, carry), init)
  return draw.finish(count, last, v)


def draw_row(v: int, tile: int, dist, u: Array) -> Array:
  """`draw_tiles` for a row whose mass is not known yet: one more pass sums it."""
  def mass(start, fresh, carry):
    total, last = carry
    w = dist(start)
    return total + jnp.sum(jnp.where(fresh, w, 0.0)), draw.tile_last_positive(w, fresh, start,
                                                                             last)
  total, last = _tiles(v, tile, mass, _no_mass()[:2])
  return draw_tiles(v, tile, dist, total, last, u)


def _sampled_kernel(p_ref, q_ref, drafts_ref, len_ref, u_ref, su_ref, n_ref, tok_ref, *,
                    num_draft: int, v: int, tile: int):
  ell = len_ref[0]
  alive = jnp.ones((), jnp.bool_)
  n = jnp.zeros((), jnp.int32)
  for k in range(num_draft):  # P is small and static; scalar work
    x = drafts_ref[0, k]
    p_x = p_ref[0, k, pl.ds(x, 1)][0]
    q_x = q_ref[0, k, pl.ds(x, 1)][0]
    alive = alive & (u_ref[0, k] * q_x < p_x) & (k < ell)
    n = n + alive.astype(jnp.int32)
  qn = jnp.minimum(n, num_draft - 1)

  def residual(start):
    return jnp.maximum(p_ref[0, n, pl.ds(start, tile)] - q_ref[0, qn, pl.ds(start, tile)], 0.0)

  def masses(start, fresh, carry):
    r_mass, r_last, p_mass, p_last = carry
    r, pn = residual(start), p_ref[0, n, pl.ds(start, tile)]
    return (r_mass + jnp.sum(jnp.where(fresh, r, 0.0)),
            draw.tile_last_positive(r, fresh, start, r_last),
            p_mass + jnp.sum(jnp.where(fresh, pn, 0.0)),
            draw.tile_last_positive(pn, fresh, start, p_last))

  r_mass, r_last, p_mass, p_last = _tiles(v, tile, masses, _no_mass())
  use_residual = (n < ell) & (r_mass > RESIDUAL_MIN_MASS)
  dist = lambda start: jnp.where(use_residual, residual(start), p_ref[0, n, pl.ds(start, tile)])
  n_ref[0] = n
  tok_ref[0] = draw_tiles(v, tile, dist, jnp.where(use_residual, r_mass, p_mass),
                          jnp.where(use_residual, r_last, p_last), su_ref[0])


def _greedy_kernel(logits_ref, drafts_ref, len_ref, n_ref, tok_ref, *, num_draft: int, v: int,
                   tile: int):
  ell = len_ref[0]
  alive = jnp.ones((), jnp.bool_)
  n = jnp.zeros((), jnp.int32)
  tok = jnp.zeros((), jnp.int32)
  for k in range(num_draft + 1):
    _, best = _tiles(v, tile, lambda start, fresh, carry, k=k: _argmax_step(
        logits_ref[0, k, pl.ds(start, tile)], start, carry), _no_max())
    tok = jnp.where(n == k, best, tok)  # the target's token right after the accepted prefix
    if k < num_draft:
      alive = alive & (drafts_ref[0, k] == best) & (k < ell)
      n = n + alive.astype(jnp.int32)
  n_ref[0] = n
  tok_ref[0] = tok


def _call(kernel, args, b: int, interpret: bool, outputs: int = 2):
  """One program per row; every output is an int32 scalar per row."""
  specs = [pl.BlockSpec((1,) + a.shape[1:], lambda i, nd=a.ndim: (i,) + (0,) * (nd - 1))
           for a in args]
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton  # GPU only
    params = pl_triton.CompilerParams(num_warps=4, num_stages=2)
  out = pl.BlockSpec((1,), lambda i: (i,))
  return pl.pallas_call(
      kernel, grid=(b,), in_specs=specs, out_specs=[out] * outputs,
      out_shape=[jax.ShapeDtypeStruct((b,), jnp.int32)] * outputs,
      compiler_params=params, interpret=interpret)(*args)


@functools.partial(jax.jit, static_argnames=("tile", "interpret"))
def prefix_accept(p: Array, q: Array, drafts: Array, verify_len: Array, uniforms: Array,
                  sample_uniform: Array, *, tile: int = 1024, interpret: bool = False):
  """See `reference.prefix_accept`; `tile` vocabulary columns per step (clipped to V)."""
  b, num_draft = drafts.shape
  v = p.shape[-1]
  tile = min(tile, v)
  kernel = functools.partial(_sampled_kernel, num_draft=num_draft, v=v, tile=tile)
  args = [p.astype(jnp.float32), q.astype(jnp.float32), drafts.astype(jnp.int32),
          verify_len.astype(jnp.int32), uniforms.astype(jnp.float32),
          sample_uniform.astype(jnp.float32)]
  n, tok = _call(kernel, args, b, interpret)
  return n, tok


@functools.partial(jax.jit, static_argnames=("tile", "interpret"))
def greedy_accept(target_logits: Array, drafts: Array, verify_len: Array, *, tile: int = 1024,
                  interpret: bool = False):
  """See `reference.greedy_accept`."""
  b, num_draft = drafts.shape
  v = target_logits.shape[-1]
  tile = min(tile, v)
  kernel = functools.partial(_greedy_kernel, num_draft=num_draft, v=v, tile=tile)
  args = [target_logits, drafts.astype(jnp.int32), verify_len.astype(jnp.int32)]
  return _call(kernel, args, b, interpret)
