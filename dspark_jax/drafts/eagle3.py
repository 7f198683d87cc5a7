"""Eagle3 draft (DeepSpec layout) and its decode-loop runtime.

Layer 0 reads `[input_layernorm(embed(x_{j+1})) ; hidden_norm(h_j)]` (2D wide, embedding
half first) with `h_j` as the residual stream; further layers (an extension: DeepSpec uses
one) are ordinary decoder layers. `h_0 = fc(taps)` for positions whose target features
are known; during drafting the draft feeds back its own (pre-norm) output instead.
Logits = target LM head on `norm(h)` (+ Gemma final soft-cap); with a reduced draft
vocabulary (`draft_vocab` ids `[N]`, EAGLE3's d2t) only those N columns, and proposals map
back to target ids (q = 0 elsewhere, which exact rejection sampling handles).

Cache convention: the draft cache entry at RoPE position j is built from (hidden of
position j, token at position j+1). With L committed tokens and anchor x_L, entries
0..L-1 exist and the output of entry L-1 (the "seed") predicts x_{L+1}. Drafting step k
writes an in-flight entry at L+k; commit rewrites entries L..L+accepted from the target
features of the verified positions, so committed entries always come from the target.
All draft attention is causal (a later entry never influences an earlier one), which
keeps multi-layer Eagle3 drafts exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.decoding import sampling
from dspark_jax.decoding.cache import KVCache
from dspark_jax.decoding.state import Proposal
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.drafts.runtime import position_keys, to_target_vocab
from dspark_jax.models import layers
from dspark_jax.models import rope as rope_lib
from dspark_jax.models.transformer import DecoderLayer
from dspark_jax.typing import Array


class Eagle3Layer(DecoderLayer):
  """DecoderLayer whose attention reads `[input_layernorm(e) ; hidden_norm(h)]`."""

  def __init__(self, cfg, layer: int, *, dtype, rngs: nnx.Rngs):
    super().__init__(cfg, layer, dtype=dtype, rngs=rngs, attn_in_dim=2 * cfg.hidden_size)
    self.hidden_norm = layers.RMSNorm(cfg.hidden_size, **cfg.norm_kwargs(dtype))

  def eagle(self, h: Array, e: Array, cos: Array, sin: Array, attn_fn) -> Array:
    x = jnp.concatenate([self.input_layernorm(e), self.hidden_norm(h)], axis=-1)
    return self(h, cos, sin, attn_fn, attn_input=x)


class Eagle3Draft(nnx.Module):
  def __init__(self, dcfg: DraftConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    lc = dcfg.layer
    self.dcfg = dcfg
    self.fc = layers.Linear("...C,CD->...D", (dcfg.context_dim, lc.hidden_size), (None, "embed"),
                            dtype=dtype, rngs=rngs)
    self.layers = nnx.List([Eagle3Layer(lc, 0, dtype=dtype, rngs=rngs)] +
                           [DecoderLayer(lc, i, dtype=dtype, rngs=rngs)
                            for i in range(1, lc.num_layers)])
    self.norm = layers.RMSNorm(lc.hidden_size, **lc.norm_kwargs(dtype))
    self.draft_vocab = (layers.Buffer(jnp.arange(dcfg.draft_vocab_size, dtype=jnp.int32))
                        if dcfg.draft_vocab_size else None)
    # Mirrors ParallelDraft's interface for code that inspects heads.
    self.markov_head = None
    self.confidence_head = None

  def vocab_ids(self) -> Array | None:
    """Target ids `[N]` of the draft vocabulary, or None (the full vocabulary)."""
    return None if self.draft_vocab is None else self.draft_vocab[...]

  def project(self, taps: Array) -> Array:
    return self.fc(taps.astype(self.fc.kernel.dtype))

  def rope(self, positions: Array):
    lc = self.dcfg.layer
    return rope_lib.rope_tables(lc.rope_full, lc.layer_head_dims[0], positions)

  def forward(self, h: Array, e: Array, positions: Array, attn_fns) -> Array:
    """h, e: `[B, T, D]` hidden and next-token embeddings -> output hidden `[B, T, D]`."""
    cos, sin = self.rope(positions)
    h = self.layers[0].eagle(h, e, cos, sin, attn_fns[0])
    for i in range(1, len(self.layers)):
      h = self.layers[i](h, cos, sin, attn_fns[i])
    return h

  def logits(self, tmodel, h: Array) -> Array:
    """`[..., D]` -> float32 `[..., V]` (`[..., N]`: the draft vocabulary's columns)."""
    return tmodel.logits_from_hidden(self.norm(h), self.vocab_ids())


def cached_forward(draft: Eagle3Draft, cache: KVCache, h: Array, e: Array, positions: Array):
  """Runs entries at `positions` (contiguous per row), writing their K/V into `cache` and
  attending causally over it. Returns (output hidden `[B, T, D]`, cache)."""
  start = positions[:, 0]
  carry = {"cache": cache}

  def make_fn(i):
    def fn(att, q, k_new, v_new):
      carry["cache"] = carry["cache"].write(i, k_new, v_new, start)
      return att.attend(q, carry["cache"].segment(i), q_positions=positions)
    return fn

  out = draft.forward(h, e, positions, [make_fn(i) for i in range(len(draft.layers))])
  return out, carry["cache"]


def _next_tokens(tokens: Array, lengths: Array, last: Array) -> Array:
  """Token of position j+1 for each j: shift left, with `last` at index lengths-1."""
  b, t = tokens.shape
  shifted = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
  idx = jnp.arange(t)[None, :]
  return jnp.where(idx == (lengths - 1)[:, None], last[:, None], shifted)


class Eagle3Runtime:
  """State: (draft cache over the draft layers, seed hidden `[B, D]`)."""

  @staticmethod
  def target_taps(draft) -> tuple[int, ...]:
    return draft.dcfg.target_layer_ids

  @staticmethod
  def init_state(dcfg, batch: int, capacity: int, dtype):
    return (KVCache.init(dcfg.layer, batch, capacity, dtype),
            jnp.zeros((batch, dcfg.layer.hidden_size), dtype))

  @staticmethod
  def prefill(draft, tmodel, state, prompt_taps: Array, batch, first: Array):
    cache, _ = state
    b, tp = batch.tokens.shape
    pos = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp))
    nxt = _next_tokens(batch.tokens, batch.lengths, first)
    out, cache = cached_forward(draft, cache, draft.project(prompt_taps),
                                tmodel.embed(nxt).astype(prompt_taps.dtype), pos)
    seed = jnp.take_along_axis(out, (batch.lengths - 1)[:, None, None], axis=1)[:, 0]
    return cache.commit(batch.lengths), seed

  @staticmethod
  def propose(draft, tmodel, state, anchor: Array, anchor_pos: Array, keys: Array, params,
              num_draft: int) -> Proposal:
    cache, seed = state
    ids = draft.vocab_ids()

    def step(carry, k):
      h, c = carry
      z = draft.logits(tmodel, h)  # [B, V] or [B, N]
      tok, q = sampling.sample_with_probs(position_keys(keys, k), z, params, exact=False)
      if ids is not None:
        tok = ids[tok]  # draft column -> target id
      pos = (anchor_pos + k)[:, None]
      out, c = cached_forward(draft, c, h[:, None], tmodel.embed(tok[:, None]).astype(h.dtype),
                              pos)
      return (out[:, 0], c), (tok, z, q if ids is not None else None)

    # The forward after the last sample only feeds a discarded entry; a scan keeps one
    # compiled step regardless of P.
    _, (toks, z, q) = jax.lax.scan(step, (seed, cache), jnp.arange(num_draft))
    vocab = tmodel.cfg.vocab_size
    z = to_target_vocab(jnp.swapaxes(z, 0, 1), ids, vocab)
    # Over a draft vocabulary the verifier gets the sampled-from q itself (0 outside the N
    # tokens), as DFlash's; over the full vocabulary it recomputes q from the logits.
    probs = (None if ids is None or q is None else
             to_target_vocab(jnp.swapaxes(q, 0, 1), ids, vocab, fill=0.0))
    return Proposal(tokens=jnp.swapaxes(toks, 0, 1), logits=z, confidence=None, probs=probs)

  @staticmethod
  def commit(draft, tmodel, state, verify_taps: Array, verify_tokens: Array, n_acc: Array,
             next_token: Array, old_len: Array, new_len: Array):
    cache, _ = state
    b, t = verify_tokens.shape  # t = P + 1
    idx = jnp.arange(t)[None, :]
    drafts_next = jnp.concatenate([verify_tokens[:, 1:], next_token[:, None]], axis=1)
    ent_tok = jnp.where(idx < n_acc[:, None], drafts_next, next_token[:, None])
    pos = old_len[:, None] + idx
    out, cache = cached_forward(draft, cache, draft.project(verify_taps),
                                tmodel.embed(ent_tok).astype(verify_taps.dtype), pos)
    seed = jnp.take_along_axis(out, n_acc[:, None, None], axis=1)[:, 0]
    return cache.commit(new_len), seed
