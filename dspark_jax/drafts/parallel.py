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

from dspark_jax.decoding.cache import KVCache
from dspark_jax.drafts import heads as heads_lib
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.models import layers
from dspark_jax.models import rope as rope_lib
from dspark_jax.models.transformer import DecoderLayer
from dspark_jax.typing import Array
from dspark_jax.kernels import attention as attn_kernels


class ParallelDraft(nnx.Module):
  """DSpark (with heads) / DFlash (without) draft model."""

  def __init__(self, dcfg: DraftConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    lc = dcfg.layer
    d = lc.hidden_size
    self.dcfg = dcfg
    norm_kw = lc.norm_kwargs(dtype)
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
    # Target ids the draft may propose (reduced vocabulary), or None for all of them.
    self.draft_vocab = (layers.Buffer(jnp.arange(dcfg.draft_vocab_size, dtype=jnp.int32))
                        if dcfg.draft_vocab_size else None)

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


def ingest(draft: ParallelDraft, ctx_cache: KVCache, taps: Array, positions: Array,
           valid: Array | None = None) -> KVCache:
  """Writes the context K/V of `taps` `[B, T, C]` at `positions` `[B, T]` (lengths unchanged;
  rows with `valid[b] == False` write nothing)."""
  kvs = draft.context_kv(draft.context_hidden(taps), positions)
  start = positions[:, 0]
  for i, (k, v) in enumerate(kvs):
    ctx_cache = ctx_cache.write(i, k, v, start, valid)
  return ctx_cache


def block_hidden(draft: ParallelDraft, embeds: Array, anchor_pos: Array,
                 ctx_cache: KVCache) -> Array:
  """Backbone over a block given the context cache.

  The block attends to the committed context (slots `< ctx_cache.lengths`) and to itself
  bidirectionally: two key segments merged by log-sum-exp, so the context cache is read in
  place (no per-round `concat(context, block)` copy).

  Args:
    embeds: block input embeddings `[B, Q, D]` (anchor + masks).
    anchor_pos: int32 `[B]`, absolute position of the anchor (= context length).
    ctx_cache: draft context cache.

  Returns:
    final-normed hidden `[B, Q, D]`.
  """
  q = embeds.shape[1]
  positions = anchor_pos[:, None] + jnp.arange(q, dtype=jnp.int32)[None, :]

  def make_fn(i):
    def fn(att, qv, k_blk, v_blk):
      ctx = ctx_cache.segment(i, causal=False, visible_lengths=ctx_cache.lengths)
      return att.attend(qv, ctx, attn_kernels.Block(k_blk, v_blk, group=q))
    return fn

  return draft.backbone(embeds, positions, [make_fn(i) for i in range(len(draft.layers))])


def base_logits(draft: ParallelDraft, target_model, hidden: Array) -> Array:
  """U = target LM head (incl. final soft-cap) on the draft hidden: float32 `[B, P, V]`.

  For the original DFlash layout the anchor slot's output is dropped.
  """
  if not draft.dcfg.anchor_first:
    hidden = hidden[:, 1:]
  return target_model.logits_from_hidden(hidden)
