"""Drawing a token from unnormalised weights with one uniform (inverse CDF): the spec.

Row b with weights w `[V]` (>= 0, not all 0) and a uniform u in [0, 1) draws

  token = #{i : W_i <= u * W_{V-1}},   W_i = w_0 + ... + w_i (inclusive prefix mass),

i.e. the first token whose prefix mass exceeds u times the total: token i with probability
w_i / sum(w). One uniform per row replaces the V Gumbel (or exponential) variates of
`jax.random.categorical`, whose random bits dominated a sampled round on CPU (`[8, 49152]`
on the 2-core VM: categorical 6.8 ms; softmax and this draw 1.0 ms).

Rounding never selects a zero-weight token: W is nondecreasing, so the first i with
W_i > t >= 0 has w_i > 0; if rounding leaves no W_i above t (t rounded up to the total),
the last token with positive weight is taken. Implementations differ only in summation
order (the reference sums blocks of `BLOCK` columns, the kernels their vocabulary tiles),
which moves a boundary by float rounding, not by a token's probability.

Under tensor parallelism the vocabulary is sharded: the reference's blocks tile each shard
(`block_size`), so the draw is shard-local sums and small all-reduces, never a gather of
the row (the sharded-generation test checks the compiled program for one).

Dimensions: B rows, V columns (a vocabulary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

BLOCK = 256  # the most columns per block of the reference's two-level search
# Blocks tile each of up to this many equal vocabulary shards exactly (tensor parallelism
# shards V), so that the search is shard-local sums plus small all-reduces: no shard ever
# gathers the vocabulary.
MAX_SHARDS = 8


def block_size(v: int) -> int:
  """Columns per block for a V-column row: the largest power of two <= `BLOCK` that tiles
  V / `MAX_SHARDS` (else V itself), so that the blocks never straddle a shard."""
  for size in (BLOCK >> i for i in range(BLOCK.bit_length())):
    if v % (size * MAX_SHARDS) == 0:
      return size
  for size in (BLOCK >> i for i in range(BLOCK.bit_length())):
    if v % size == 0:
      return size
  return 1


def _last_positive(w: Array) -> Array:
  """int32 `[...]`: the largest index of `w` `[..., n]` with a positive weight (0 if none)."""
  idx = jnp.arange(w.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(w > 0, idx, 0), axis=-1)


def inverse_cdf(uniforms: Array, weights: Array) -> Array:
  """int32 `[B]`: one token per row of `weights` `[B, V]` (see the module docstring).

  Two levels, so that only one block of `block_size(V)` columns per row is ever
  prefix-summed: the block whose prefix mass first exceeds the target, then the column
  within it. The block is picked out by a masked sum over blocks, not a gather, which
  partitions over vocabulary shards as a reduction.
  """
  b, v = weights.shape
  size = block_size(v)
  nb = v // size
  w = weights.astype(jnp.float32).reshape(b, nb, size)
  block_mass = jnp.sum(w, axis=-1)  # [B, nb]
  upto = jnp.cumsum(block_mass, axis=-1)  # inclusive
  target = uniforms.astype(jnp.float32) * upto[:, -1]
  j = jnp.sum(upto <= target[:, None], axis=-1).astype(jnp.int32)
  j = jnp.where(j >= nb, _last_positive(block_mass), j)  # t rounded up to the total
  pick = (jnp.arange(nb, dtype=jnp.int32)[None, :] == j[:, None])  # [B, nb]
  col = jnp.sum(jnp.where(pick[..., None], w, 0.0), axis=1)  # [B, size], exact
  before = jnp.sum(jnp.where(pick, upto - block_mass, 0.0), axis=-1)
  inner = jnp.maximum(target - before, 0.0)
  i = jnp.sum(jnp.cumsum(col, axis=-1) <= inner[:, None], axis=-1).astype(jnp.int32)
  i = jnp.where(i >= size, _last_positive(col), i)
  return j * size + i


def uniforms(keys: Array, shape: tuple[int, ...] = ()) -> Array:
  """float32 `[B, *shape]` uniforms in [0, 1), one stream per key of `keys` `[B]`."""
  return jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32))(keys)


# ---------------------------------------------------------------------------------------------
# the tiled form the kernels use (one pass over vocabulary tiles, carried state)
# ---------------------------------------------------------------------------------------------
def tile_count(w: Array, fresh: Array, target: Array, carry):
  """Folds one vocabulary tile into the running count of the draw.

  Args:
    w: `[..., tile]` weights of the tile's columns.
    fresh: bool `[tile]` (or broadcastable): columns not seen by an earlier tile (the last
      tile may overlap its predecessor; seen columns must not count twice).
    target: `[...]` u times the total mass.
    carry: (prefix mass before the tile `[...]`, count so far int32 `[...]`).

  Returns:
    the new carry. After the last tile the count is the token (`finish`).
  """
  before, count = carry
  w = jnp.where(fresh, w, 0.0)
  upto = before[..., None] + jnp.cumsum(w, axis=-1)  # nondecreasing across tiles too
  count = count + jnp.sum((upto <= target[..., None]) & fresh, axis=-1).astype(jnp.int32)
  return upto[..., -1], count


def finish(count: Array, last_positive: Array, v: int) -> Array:
  """The token from a tiled count: the last positive column where rounding ran past V."""
  return jnp.where(count >= v, last_positive, count).astype(jnp.int32)


def tile_last_positive(w: Array, fresh: Array, start, best: Array) -> Array:
  """Running largest column with a positive weight (`finish`'s fallback), `[...]`."""
  idx = start + jax.lax.broadcasted_iota(jnp.int32, w.shape, w.ndim - 1)
  return jnp.maximum(best, jnp.max(jnp.where((w > 0) & fresh, idx, -1), axis=-1))
