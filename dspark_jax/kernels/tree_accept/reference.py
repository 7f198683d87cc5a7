"""Token-tree acceptance (greedy and lossless multi-draft sampling) in pure jnp: the spec.

A draft proposes a static tree instead of a chain. `TreeShape(branching)` fixes it: the root
is the round's anchor (depth 0); every node at depth d-1 has `branching[d-1]` children at
depth d, for d = 1..P. Nodes are numbered breadth first (root 0), so the children of a node
are consecutive and every parent precedes its children. The target verifies all W nodes in
one pass (each node attends to its ancestors only: `TreeShape.mask`) and gives p_i, its
distribution after node i. Acceptance walks from the root:

  greedy   descend into the child whose token is argmax p_cur; stop where none matches
           (children are the draft's top-k, so at most one can); emit argmax p_cur.
  sampled  the children c_1..c_k of `cur` were drawn i.i.d. from q_cur (the draft's
           distribution after `cur`). With r = p_cur: for j = 1..k accept c_j iff
           u_j q(x_j) < r(x_j); on rejection r <- norm(max(r - q, 0)). Descend into the
           first accepted child (r <- p_child); if all are rejected, emit a token from r
           and stop; at a leaf, emit the bonus token from p_leaf.

The sampled rule is SpecInfer's multi-step speculative sampling: each sibling is a fresh
i.i.d. draw tested against the residual the earlier rejections left, so the emitted token
is distributed exactly as p_cur; the subtree of an accepted child depends only on its
token, so the argument repeats level by level. A chain (`branching` all 1) is exactly
`prefix_accept.reference.prefix_accept` with l = P.

Dimensions: B rows, W tree nodes (root included), P depth, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.kernels import draw
from dspark_jax.kernels.prefix_accept.reference import RESIDUAL_MIN_MASS

Array = jax.Array

MAX_NODES = 512  # a verify pass over more nodes than this is not a speculation tree


@dataclasses.dataclass(frozen=True)
class TreeShape:
  """A static token tree: `branching[d]` children per node at depth d (hashable).

  Attributes (numpy, derived):
    parent: int32 `[W]` (the root is its own parent).
    depth: int32 `[W]`.
    first_child: int32 `[W]` id of a node's first child (W for leaves).
    ancestors: int32 `[W, P+1]` ancestor at each depth (the node itself beyond its depth).
    mask: bool `[W, W]`: node i sees node j iff j is i or an ancestor of i.
  """

  branching: tuple[int, ...]

  def __post_init__(self):
    b = tuple(int(x) for x in self.branching)
    if not b or any(x < 1 for x in b):
      raise ValueError(f"a tree needs at least one level and every branching factor >= 1, "
                       f"got {self.branching}")
    object.__setattr__(self, "branching", b)
    if self.width > MAX_NODES:
      raise ValueError(f"tree {b} has {self.width} nodes; at most {MAX_NODES} are supported")

  @classmethod
  def parse(cls, spec) -> "TreeShape":
    """From "2,2,1" or a sequence of ints."""
    if isinstance(spec, TreeShape):
      return spec
    if isinstance(spec, str):
      try:
        spec = [int(x) for x in spec.replace(" ", "").split(",") if x]
      except ValueError:
        raise ValueError(f"tree must be comma-separated branching factors like '2,2,1', "
                         f"got {spec!r}") from None
    return cls(tuple(spec))

  @classmethod
  def chain(cls, depth: int) -> "TreeShape":
    return cls((1,) * depth)

  @property
  def num_draft(self) -> int:
    """P, the tree's depth."""
    return len(self.branching)

  @property
  def level_sizes(self) -> tuple[int, ...]:
    """Nodes per depth 0..P."""
    sizes = [1]
    for b in self.branching:
      sizes.append(sizes[-1] * b)
    return tuple(sizes)

  @property
  def offsets(self) -> tuple[int, ...]:
    """Id of the first node of each depth 0..P."""
    return tuple(int(x) for x in np.cumsum((0,) + self.level_sizes[:-1]))

  @property
  def width(self) -> int:
    """W: nodes including the root."""
    return int(sum(self.level_sizes))

  @functools.cached_property
  def parent(self) -> np.ndarray:
    par = np.zeros((self.width,), np.int32)
    off, sizes = self.offsets, self.level_sizes
    for d in range(1, self.num_draft + 1):
      j = np.arange(sizes[d])
      par[off[d] + j] = off[d - 1] + j // self.branching[d - 1]
    return par

  @functools.cached_property
  def depth(self) -> np.ndarray:
    return np.repeat(np.arange(self.num_draft + 1, dtype=np.int32), self.level_sizes)

  @functools.cached_property
  def first_child(self) -> np.ndarray:
    first = np.full((self.width,), self.width, np.int32)
    off, sizes = self.offsets, self.level_sizes
    for d in range(self.num_draft):
      j = np.arange(sizes[d])
      first[off[d] + j] = off[d + 1] + j * self.branching[d]
    return first

  @functools.cached_property
  def ancestors(self) -> np.ndarray:
    anc = np.repeat(np.arange(self.width, dtype=np.int32)[:, None], self.num_draft + 1, axis=1)
    for i in range(self.width):
      node = i
      for d in range(int(self.depth[i]), -1, -1):
        anc[i, d] = node
        node = self.parent[node]
    return anc

  @functools.cached_property
  def mask(self) -> np.ndarray:
    m = np.zeros((self.width, self.width), bool)
    rows = np.arange(self.width)
    for d in range(self.num_draft + 1):
      m[rows, self.ancestors[:, d]] |= d <= self.depth
    return m

  def __repr__(self):
    return f"TreeShape({','.join(map(str, self.branching))}: {self.width} nodes)"


def _deepest(accepted: Array, shape: TreeShape) -> Array:
  """int32 `[B]`: the deepest accepted node (the first one breadth first among equals)."""
  w = shape.width
  score = jnp.where(accepted, jnp.asarray(shape.depth) * w + (w - 1 - jnp.arange(w)), -1)
  return jnp.argmax(score, axis=1).astype(jnp.int32)


def greedy_tree_accept(target_logits: Array, tokens: Array,
                       shape: TreeShape) -> tuple[Array, Array, Array]:
  """Greedy tree acceptance.

  Args:
    target_logits: `[B, W, V]` target logits after each node.
    tokens: int32 `[B, W]` node tokens (the root's is not read).
    shape: the tree.

  Returns:
    (n_accepted int32 `[B]`, next token int32 `[B]`, deepest accepted node int32 `[B]`).
  """
  best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, W]
  ok = tokens == best[:, shape.parent]
  accepted = [jnp.ones(ok.shape[:1] + (1,), bool)]
  off, sizes = shape.offsets, shape.level_sizes
  for d in range(1, shape.num_draft + 1):  # a level's parents are all decided before it
    parents = jnp.concatenate(accepted, axis=1)[:, shape.parent[off[d]:off[d] + sizes[d]]]
    accepted.append(ok[:, off[d]:off[d] + sizes[d]] & parents)
  leaf = _deepest(jnp.concatenate(accepted, axis=1), shape)
  rows = jnp.arange(tokens.shape[0])
  return jnp.asarray(shape.depth)[leaf], best[rows, leaf], leaf


def tree_accept(p: Array, q: Array, tokens: Array, uniforms: Array, sample_uniform: Array,
                shape: TreeShape) -> tuple[Array, Array, Array]:
  """Sampled tree acceptance (recursive rejection over i.i.d. siblings).

  Args:
    p: float32 `[B, W, V]` target probabilities after each node.
    q: float32 `[B, W, V]`: q[:, i] the draft distribution node i was drawn from (its
      parent's; siblings share it). The root's is not read.
    tokens: int32 `[B, W]` node tokens.
    uniforms: float32 `[B, W]` in [0, 1), one per node (the root's unused).
    sample_uniform: float32 `[B]` in [0, 1), the emitted token's inverse-CDF draw.
    shape: the tree.

  Returns:
    (n_accepted int32 `[B]`, next token int32 `[B]`, deepest accepted node int32 `[B]`).
  """
  b = tokens.shape[0]
  rows = jnp.arange(b)
  first = jnp.asarray(shape.first_child)
  cur = jnp.zeros((b,), jnp.int32)
  alive = jnp.ones((b,), bool)
  r = p[:, 0]
  for d in range(1, shape.num_draft + 1):
    chosen = jnp.full((b,), -1, jnp.int32)
    for j in range(shape.branching[d - 1]):
      c = first[cur] + j
      x = tokens[rows, c]
      qc = q[rows, c]
      trying = alive & (chosen < 0)
      ok = trying & (uniforms[rows, c] * qc[rows, x] < r[rows, x])
      chosen = jnp.where(ok, c, chosen)
      res = jnp.maximum(r - qc, 0.0)
      mass = jnp.sum(res, axis=-1, keepdims=True)
      # A rejection leaves mass unless rounding ate it; then r stays (as the chain keeps p_n).
      update = (trying & ~ok)[:, None] & (mass > RESIDUAL_MIN_MASS)
      r = jnp.where(update, res / jnp.where(update, mass, 1.0), r)
    moved = chosen >= 0
    cur = jnp.where(moved, chosen, cur)
    r = jnp.where(moved[:, None], p[rows, cur], r)
    alive = moved
  return jnp.asarray(shape.depth)[cur], draw.inverse_cdf(sample_uniform, r), cur

