"""The Markov head's sequential block sampler as one Pallas kernel (spec: `reference.py`).

One program owns a block of `block_b` rows and walks the P positions in order (position k
needs the token of position k-1); within a position it streams the vocabulary in tiles of
`tile` columns: U and W2 tiles in, the corrected logits Z out, and a running (max, argmax)
of Z carried across tiles, so no `[B, N]` intermediate is ever materialised. A sampled row
also carries the online softmax normaliser of Z / t, and a second pass over the tiles
(recomputing Z: re-reading the output would need a barrier) counts the inverse-CDF draw
(`kernels.draw`). The token's Markov embedding for the next position is a row gather from
W1.

Tiles never run past the vocabulary: the last one starts at N - tile and overlaps its
predecessor. Re-scored lanes hold values already seen, and the running argmax only moves
on a strictly greater score, so the first maximal index wins as in `jnp.argmax`; sums and
counts mask the lanes already seen. This avoids masked loads, which Triton and Mosaic spell
differently.

GPU: Triton lowering (`pl.pallas_call` with Triton compiler params); the tile and the row
block must be powers of two and at least 16 (the tensor-core dot's minimum). CPU: interpret
mode, any sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dspark_jax.kernels import draw

Array = jax.Array


def _kernel(*refs, num_pos: int, n: int, tile: int, sampled: bool, bias_dtype):
  if sampled:
    base_ref, e0_ref, w1_ref, w2_ref, uni_ref, temp_ref, grow_ref, tok_ref, z_ref = refs
    t = temp_ref[...]
    t = jnp.where(t > 0, t, 1.0)[:, None]
    greedy_row = grow_ref[...] != 0
  else:
    base_ref, e0_ref, w1_ref, w2_ref, tok_ref, z_ref = refs
  e = e0_ref[...]
  rows = e.shape[0]
  n_tiles = pl.cdiv(n, tile)

  def tile_at(j):
    start = jnp.minimum(j * tile, n - tile)
    fresh = start + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1) >= j * tile
    return start, fresh

  for k in range(num_pos):  # P is small and static: unrolled; each position needs the last

    def logits(start, k=k, e=e):
      return base_ref[:, k, pl.ds(start, tile)] + jnp.dot(
          e, w2_ref[:, pl.ds(start, tile)],
          preferred_element_type=jnp.float32).astype(bias_dtype).astype(jnp.float32)

    def scan(j, carry, k=k):
      best, best_idx, mass = carry
      start, fresh = tile_at(j)
      z = logits(start)
      z_ref[:, k, pl.ds(start, tile)] = z
      m = jnp.max(z, axis=1)
      idx = jnp.argmax(z, axis=1).astype(jnp.int32) + start
      better = m > best
      new_best = jnp.where(better, m, best)
      if sampled:  # online normaliser of exp(z / t - max / t); t > 0 keeps the argmax
        w = jnp.where(fresh, jnp.exp((z - new_best[:, None]) / t), 0.0)
        mass = mass * jnp.exp((best - new_best) / t[:, 0]) + jnp.sum(w, axis=1)
      return new_best, jnp.where(better, idx, best_idx), mass

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32),
            jnp.zeros((rows,), jnp.float32))
    top, tok, mass = jax.lax.fori_loop(0, n_tiles, scan, init)
    if sampled:
      target = uni_ref[:, k] * mass

      def count(j, carry, top=top):
        drawn, last = carry
        start, fresh = tile_at(j)
        w = jnp.exp((logits(start) - top[:, None]) / t)
        return (draw.tile_count(w, fresh, target, drawn),
                draw.tile_last_positive(w, fresh, start, last))

      zeros = jnp.zeros((rows,), jnp.int32)
      (_, drawn), last = jax.lax.fori_loop(
          0, n_tiles, count, ((jnp.zeros((rows,), jnp.float32), zeros), zeros - 1))
      tok = jnp.where(greedy_row, tok, draw.finish(drawn, last, n))
    tok_ref[:, k] = tok
    e = w1_ref[tok, :].astype(e.dtype)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=("tile", "block_b", "interpret"))
def markov_sample(base: Array, e0: Array, w1: Array, w2: Array, *,
                  uniforms: Array | None = None,
                  temperature: Array | None = None, greedy_rows: Array | None = None,
                  tile: int = 256, block_b: int | None = None,
                  interpret: bool = False) -> tuple[Array, Array]:
  """See `reference.markov_sample` (same arguments and results).

  Args:
    tile: vocabulary columns per step (clipped to N).
    block_b: rows per program (None: all rows in one program; rows are padded to a multiple).
    interpret: run the kernel body with XLA ops (CPU) instead of compiling it.
  """
  b, p, n = base.shape
  r = e0.shape[1]
  sampled = uniforms is not None
  if sampled and temperature is None:
    raise ValueError("sampling (uniforms given) needs a temperature per row")
  tile = min(tile, n)
  bb = b if block_b is None else block_b
  bp = _round_up(b, bb)

  def pad_rows(x):  # padded rows compute garbage that is sliced off
    return x if bp == b else jnp.pad(x, [(0, bp - b)] + [(0, 0)] * (x.ndim - 1))

  rows3 = pl.BlockSpec((bb, p, n), lambda i: (i, 0, 0))
  rows1 = pl.BlockSpec((bb,), lambda i: (i,))
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  args = [pad_rows(base.astype(jnp.float32)), pad_rows(e0), w1, w2]
  specs = [rows3, pl.BlockSpec((bb, r), lambda i: (i, 0)), whole(w1.shape), whole(w2.shape)]
  if sampled:
    grow = (jnp.zeros((b,), jnp.int32) if greedy_rows is None
            else greedy_rows.astype(jnp.int32))
    args += [pad_rows(uniforms.astype(jnp.float32)),
             pad_rows(jnp.broadcast_to(temperature, (b,)).astype(jnp.float32)), pad_rows(grow)]
    specs += [pl.BlockSpec((bb, p), lambda i: (i, 0)), rows1, rows1]
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton  # GPU only
    params = pl_triton.CompilerParams(num_warps=4, num_stages=2)
  kernel = functools.partial(_kernel, num_pos=p, n=n, tile=tile, sampled=sampled,
                             bias_dtype=jnp.result_type(e0.dtype, w2.dtype))
  tok, z = pl.pallas_call(
      kernel, grid=(bp // bb,), in_specs=specs,
      out_specs=[pl.BlockSpec((bb, p), lambda i: (i, 0)), rows3],
      out_shape=[jax.ShapeDtypeStruct((bp, p), jnp.int32),
                 jax.ShapeDtypeStruct((bp, p, n), jnp.float32)],
      compiler_params=params, interpret=interpret)(*args)
  return tok[:b], z[:b]
