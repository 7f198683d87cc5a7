"""Chain rejection sampling as one Pallas kernel per row (spec: `reference.py`).

Each program owns one row: the P accept tests are scalar work (a draft token's p and q
are single-element loads at the token's column), and only the two distribution rows the
outcome needs, p_n and q_n, are streamed in vocabulary tiles: once for the residual's
mass, once for the Gumbel-max draw (or, greedy, P+1 tiled argmaxes of the target logits).

Tiles never run past the vocabulary: the last one starts at V - tile. For the argmax the
overlap is harmless (re-seen lanes never win a strictly-greater test); for the mass sum
the lanes already counted are zeroed.

GPU: Triton lowering; `tile` must be a power of two. CPU: interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dspark_jax.kernels.prefix_accept.reference import RESIDUAL_MIN_MASS, log_weights

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


def _sampled_kernel(p_ref, q_ref, drafts_ref, len_ref, u_ref, noise_ref, n_ref, tok_ref, *,
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

  mass = _tiles(v, tile, lambda start, fresh, acc: acc + jnp.sum(
      jnp.where(fresh, residual(start), 0.0)), jnp.zeros((), jnp.float32))
  use_residual = (n < ell) & (mass > RESIDUAL_MIN_MASS)

  def draw(start, fresh, carry):
    dist = jnp.where(use_residual, residual(start), p_ref[0, n, pl.ds(start, tile)])
    return _argmax_step(noise_ref[0, pl.ds(start, tile)] + log_weights(dist), start, carry)

  _, tok = _tiles(v, tile, draw, _no_max())
  n_ref[0] = n
  tok_ref[0] = tok


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
                  noise: Array, *, tile: int = 1024, interpret: bool = False):
  """See `reference.prefix_accept`; `tile` vocabulary columns per step (clipped to V)."""
  b, num_draft = drafts.shape
  v = p.shape[-1]
  tile = min(tile, v)
  kernel = functools.partial(_sampled_kernel, num_draft=num_draft, v=v, tile=tile)
  args = [p.astype(jnp.float32), q.astype(jnp.float32), drafts.astype(jnp.int32),
          verify_len.astype(jnp.int32), uniforms.astype(jnp.float32), noise.astype(jnp.float32)]
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
