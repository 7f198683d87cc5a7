"""DSpark and DFlash drafts: a parallel backbone fed with tapped target features.

Backbone (DFlash-style KV injection): the tapped target layers' raw outputs
`[.., C]` are projected once, `ctx = hidden_norm(fc(taps))` `[.., D]`, and every
draft layer projects `ctx` with its own k/v projections (k_norm and RoPE at the
context positions, no input norm) into keys/values placed *before* the block's own
keys/values. The block (anchor + mask tokens, at absolute positions) attends
bidirectionally to itself and to the verified context.

DSpark adds a sequential head over the backbone's base logits U and a confidence
head; DFlash is the same backbone without heads. Embeddings and LM head are the
target's (frozen, shared, not stored here).

Inference keeps a per-draft-layer context cache (`KVCache` over the draft layers):
`ingest` writes projected context K/V at their positions; the context length equals
the target cache's committed length, so rollback is again "don't advance".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.decoding.cache import KVCache, write_rows
from dspark_jax.drafts import heads as heads_lib
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.models import attention as attn_lib
from dspark_jax.models import layers
from dspark_jax.models import rope as rope_lib
from dspark_jax.models.transformer import DecoderLayer
from dspark_jax.typing import Array


class ParallelDraft(nnx.Module):
  """DSpark (with heads) / DFlash (without) draft model."""

  def __init__(self, dcfg: DraftConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    lc = dcfg.layer
    d = lc.hidden_size
    self.dcfg = dcfg
    norm_kw = dict(eps=lc.rms_norm_eps, offset=lc.norm_offset, dtype=dtype,
                   cast_first=lc.family in ("llama", "qwen3"))
    self.fc = layers.Linear("...C,CD->...D", (dcfg.context_dim, d), (None, "embed"), dtype=dtype,
                            rngs=rngs)
    self.hidden_norm = layers.RMSNorm(d, **norm_kw)
    self.layers = nnx.List([DecoderLayer(lc, i, dtype=dtype, rngs=rngs)
                            for i in range(lc.num_layers)])
    self.norm = layers.RMSNorm(d, **norm_kw)
    self.markov_head = (heads_lib.HEADS[dcfg.markov_head_type](
        lc.vocab_size, dcfg.markov_rank, d, dtype=dtype, rngs=rngs) if dcfg.markov_rank else None)
    extra = dcfg.markov_rank if (dcfg.confidence_with_markov and dcfg.markov_rank) else 0
    self.confidence_head = (heads_lib.ConfidenceHead(d + extra, dtype=dtype, rngs=rngs)
                            if dcfg.confidence_head else None)

  # ---- pieces shared by inference and training -------------------------------------------
  def context_hidden(self, taps: Array) -> Array:
    """Tapped features `[B, T, C]` -> injected context `[B, T, D]`."""
    return self.hidden_norm(self.fc(taps.astype(self.fc.kernel.dtype)))

  def rope(self, positions: Array):
    lc = self.dcfg.layer
    return rope_lib.rope_tables(lc.rope_full, lc.layer_head_dims[0], positions)

  def context_kv(self, ctx: Array, positions: Array) -> list[tuple[Array, Array]]:
    """Per draft layer, keys/values `[B, T, K, H]` of context `[B, T, D]` at `positions`."""
    cos, sin = self.rope(positions)
    return [layer.self_attn.key_value(ctx, cos, sin) for layer in self.layers]

  def backbone(self, x: Array, positions: Array, attn_fns) -> Array:
    """Runs the draft layers over block embeddings `x` `[B, Q, D]`.

    `attn_fns[i](attn, q, k_block, v_block)` does layer i's attention (it knows where the
    context keys are and which are visible). Returns final-normed hidden `[B, Q, D]`.
    """
    cos, sin = self.rope(positions)
    for i, layer in enumerate(self.layers):
      x = layer(x, cos, sin, attn_fns[i])
    return self.norm(x)


def block_tokens(dcfg: DraftConfig, anchor: Array) -> Array:
  """`[B]` anchors -> block input ids `[B, Q]`: anchor then mask tokens."""
  b = anchor.shape[0]
  masks = jnp.full((b, dcfg.block_inputs - 1), dcfg.mask_token_id, jnp.int32)
  return jnp.concatenate([anchor[:, None].astype(jnp.int32), masks], axis=1)


def ingest(draft: ParallelDraft, ctx_cache: KVCache, taps: Array, positions: Array) -> KVCache:
  """Writes the context K/V of `taps` `[B, T, C]` at `positions` `[B, T]` (lengths unchanged)."""
  kvs = draft.context_kv(draft.context_hidden(taps), positions)
  start = positions[:, 0]
  ks = tuple(write_rows(c, k, start) for c, (k, _) in zip(ctx_cache.k, kvs))
  vs = tuple(write_rows(c, v, start) for c, (_, v) in zip(ctx_cache.v, kvs))
  return KVCache(ks, vs, ctx_cache.lengths)


def block_hidden(draft: ParallelDraft, embeds: Array, anchor_pos: Array,
                 ctx_cache: KVCache) -> Array:
  """Backbone over a block given the context cache.

  Args:
    embeds: block input embeddings `[B, Q, D]` (anchor + masks).
    anchor_pos: int32 `[B]`, absolute position of the anchor (= context length).
    ctx_cache: draft context cache; row b's keys `< ctx_cache.lengths[b]` are visible.

  Returns:
    final-normed hidden `[B, Q, D]`.
  """
  b, q, _ = embeds.shape
  positions = anchor_pos[:, None] + jnp.arange(q, dtype=jnp.int32)[None, :]
  s = ctx_cache.capacity
  ctx_visible = jnp.arange(s)[None, :] < ctx_cache.lengths[:, None]  # [B, S]
  mask = jnp.concatenate([jnp.broadcast_to(ctx_visible[:, None, :], (b, q, s)),
                          jnp.ones((b, q, q), bool)], axis=2)  # block is bidirectional

  def make_fn(i):
    def fn(att, qv, k_blk, v_blk):
      k = jnp.concatenate([ctx_cache.k[i], k_blk.astype(ctx_cache.k[i].dtype)], axis=1)
      v = jnp.concatenate([ctx_cache.v[i], v_blk.astype(ctx_cache.v[i].dtype)], axis=1)
      return att.attention(qv, k, v, mask)
    return fn

  return draft.backbone(embeds, positions, [make_fn(i) for i in range(len(draft.layers))])


def base_logits(draft: ParallelDraft, target_model, hidden: Array) -> Array:
  """U = target LM head (incl. final soft-cap) on the draft hidden: float32 `[B, P, V]`.

  For the original DFlash layout the anchor slot's output is dropped.
  """
  if not draft.dcfg.anchor_first:
    hidden = hidden[:, 1:]
  return target_model.logits_from_hidden(hidden)
