"""The registered dataclasses that cross `jax.jit`: requests, proposals, loop states.

Drafts, the decode loops and the engine all import these from here, so the layers depend
downward only (drafts never import the loop that calls them).

Dimensions: B rows (slots), Tp padded prompt length, M stop ids per row, P draft block,
V vocabulary, O output buffer length, Rm rounds recorded per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dspark_jax.decoding.cache import KVCache
from dspark_jax.typing import Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
  """One padded batch of requests.

  Attributes:
    tokens: int32 `[B, Tp]` right-padded prompts.
    lengths: int32 `[B]` prompt lengths (>= 1).
    max_new: int32 `[B]` per-row new-token limit.
    stop_tokens: int32 `[B, M]` per-row stop ids, padded with -1.
    request_ids: int32 `[B]` RNG stream ids.
  """

  tokens: Array
  lengths: Array
  max_new: Array
  stop_tokens: Array
  request_ids: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
  """Per-row request metadata a decode loop needs after prefill (see `Batch`)."""

  max_new: Array
  stop_tokens: Array
  request_ids: Array

  @classmethod
  def of(cls, batch: Batch) -> "Rows":
    return cls(batch.max_new, batch.stop_tokens, batch.request_ids)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Proposal:
  """Attributes:
    tokens: int32 `[B, P]` draft tokens.
    logits: float32 `[B, P, V]` logits the tokens were sampled from (after the sequential
      head, before temperature/top-k/top-p, which `sampling` applies identically to both
      models).
    confidence: float32 `[B, P]` confidence logits (sigmoid -> P(accept | prefix)), or None.
    probs: float32 `[B, P, V]` the sampling distributions the tokens were drawn from
      (`sampling.probabilities(logits, params, exact=False)`, kept from the draw so the
      acceptance test need not filter the logits again), or None (greedy, or a drafter
      that does not keep them).
  """

  tokens: Array
  logits: Array
  confidence: Array | None
  probs: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TreeProposal:
  """A token tree (`kernels.tree_accept.TreeShape`, W nodes breadth first, root = anchor).

  Attributes:
    tokens: int32 `[B, W]` node tokens; tokens[:, 0] is the anchor.
    logits: float32 `[B, W, V]` the logits node i was drawn from (its parent's
      distribution, shared by siblings; the root's row is zeros), as `Proposal.logits`.
  """

  tokens: Array
  logits: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ARState:
  """Loop carry of plain decoding.

  Attributes:
    cache: target KV cache (lengths = committed tokens, excluding `last`).
    rows: per-row limits, stop ids and RNG ids.
    last: int32 `[B]` newest token, not yet run through the target.
    out: int32 `[B, O]` generated tokens (-1 = empty).
    num_out: int32 `[B]` tokens generated.
    done: bool `[B]`.
    steps: int32 `[B]` decode steps taken by each row (its RNG step counter).
  """

  cache: KVCache
  rows: Rows
  last: Array
  out: Array
  num_out: Array
  done: Array
  steps: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
  """Loop carry of speculative decoding.

  Attributes:
    cache: target cache (lengths = committed tokens, the anchor excluded).
    draft_state: the draft runtime's state (context cache, ...).
    rows: per-row limits, stop ids and RNG ids.
    anchor: int32 `[B]` newest token (the next round's anchor).
    out, num_out, done: as in `ARState`.
    steps: int32 `[B]` rounds taken by each row (its RNG step counter and record index).
    accept_lens: int32 `[B, Rm]` tokens committed per round (0 = no round).
    verify_lens: int32 `[B, Rm]` drafts verified per round.
    proposed: bool `[B, Rm]` whether the round proposed (False: a plain decode step).
    confidence: float32 `[B, Rm, P]` raw confidence logits of each round's block.
    stale: float32 `[B, P]` raw confidence logits of the row's latest proposed block
      (-inf before the first): what the scheduler may use without looking at this round.
    since_probe: int32 scalar, rounds since the last proposing round.
    probe_level: int32 scalar, forced probes in a row that found the draft not paying (the
      scheduler waits `probe_every * 2**probe_level` rounds before the next one).
    pos_hits / pos_tries: int32 `[B, P]` accepted / verified counts per draft position,
      where a position counts as tried only if every earlier position was accepted.
  """

  cache: KVCache
  draft_state: Any
  rows: Rows
  anchor: Array
  out: Array
  num_out: Array
  done: Array
  steps: Array
  accept_lens: Array
  verify_lens: Array
  proposed: Array
  confidence: Array
  stale: Array
  since_probe: Array
  probe_level: Array
  pos_hits: Array
  pos_tries: Array


@dataclasses.dataclass(frozen=True)
class Pack:
  """Maps a flat token batch `[1, N]` onto the dense per-row layout `[B, W]` of a verify.

  Projections, MLPs and the LM head run on the N packed tokens only (their cost is what
  packing saves); attention scatters queries/keys back to `[B, W]`, reads each row's own
  cache and gathers the outputs back.

  Attributes:
    rows, cols: int32 `[N]` dense coordinates of each flat token (`rows == B`: padding).
    start: int32 `[B]` cache position of each row's first dense slot.
    valid: bool `[B, W]` dense slots that hold a token.
  """

  rows: Array
  cols: Array
  start: Array
  valid: Array

  @classmethod
  def build(cls, tokens: Array, valid: Array, start: Array, budget: int) -> tuple[Array, "Pack"]:
    """Packs the valid slots of dense `tokens` `[B, W]` into a flat batch of `budget` (static,
    >= the number of valid slots), in row-major order.

    Args:
      tokens: int32 `[B, W]`.
      valid: bool `[B, W]`; each row's valid slots are a prefix.
      start: int32 `[B]` cache position of each row's slot 0.
      budget: N.

    Returns:
      (flat tokens int32 `[N]` (padding 0), the Pack).
    """
    b, w = tokens.shape
    flat_index = jnp.cumsum(valid.reshape(-1)) - 1  # position of each valid slot in the pack
    dest = jnp.where(valid.reshape(-1), flat_index, budget)  # invalid -> dropped
    rows = jnp.full((budget,), b, jnp.int32).at[dest].set(
        jnp.repeat(jnp.arange(b, dtype=jnp.int32), w), mode="drop")
    cols = jnp.zeros((budget,), jnp.int32).at[dest].set(
        jnp.tile(jnp.arange(w, dtype=jnp.int32), b), mode="drop")
    flat = jnp.zeros((budget,), jnp.int32).at[dest].set(tokens.reshape(-1), mode="drop")
    return flat, cls(rows=rows, cols=cols, start=start, valid=valid)

  def to_dense(self, x: Array) -> Array:
    """`[1, N, ...]` -> `[B, W, ...]` (empty slots zero)."""
    b, w = self.valid.shape
    dense = jnp.zeros((b, w) + x.shape[2:], x.dtype)
    return dense.at[self.rows, self.cols].set(x[0], mode="drop")

  def to_flat(self, y: Array) -> Array:
    """`[B, W, ...]` -> `[1, N, ...]` (padding tokens read row 0's slot: ignored)."""
    rows = jnp.minimum(self.rows, self.valid.shape[0] - 1)
    return y[rows, self.cols][None]

  @property
  def positions(self) -> Array:
    """int32 `[B, W]` dense query positions."""
    return self.start[:, None] + jnp.arange(self.valid.shape[1], dtype=jnp.int32)[None, :]
