"""One decoder for Llama, Qwen3, Gemma 3 and Gemma 4 text models (Flax NNX).

Family differences are config switches (`ModelConfig`): q/k norms, sandwich norms,
(1 + w) norms, embedding scale, soft-caps, sliding layers, per-layer head geometry,
Gemma 4 per-layer embeddings, K=V attention, KV-shared layers and layer scalars.
Module and attribute names follow HF (`model.layers.3.self_attn.q_proj`), so the
checkpoint map is a near-identity.

Forward modes (one code path):
  * full sequence (training, `cache=None`): causal attention over the T tokens;
  * with a cache: writes the T new tokens' K/V at `positions` (each row at its own
    offset) and attends over the cache; prefill (lengths 0), decode (T = 1) and
    multi-token verify (T = 1 + P) are all this call. Nothing commits lengths here:
    the caller advances `cache.lengths` by what it accepts.
Every mode can return the raw outputs of chosen layers ("taps", the residual
stream after the layer, before the final norm) concatenated on the feature axis.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import ModelConfig
from dspark_jax.decoding.cache import KVCache, PendingKV
from dspark_jax.decoding.state import Pack
from dspark_jax.models import layers
from dspark_jax.models import rope as rope_lib
from dspark_jax.typing import Array
from dspark_jax.kernels import attention as attn_kernels


class Attention(nnx.Module):
  """Self-attention projections of one layer. The attention itself is the caller's
  `attn_fn` hook, so targets (KV cache) and drafts (injected target context, training
  block masks) share these modules."""

  def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs,
               in_dim: int | None = None):
    # in_dim: input width of q/k/v (Eagle3's first layer reads [embedding ; hidden], 2D).
    d, n = in_dim or cfg.hidden_size, cfg.num_heads
    h, k = cfg.layer_head_dims[layer], cfg.layer_kv_heads[layer]
    bias = cfg.attention_bias
    kw = dict(dtype=dtype, rngs=rngs)
    self.owns_kv = cfg.kv_sources[layer] == layer
    self.k_eq_v = cfg.k_eq_v_for(layer)
    self.scale = cfg.attn_scale
    self.logit_softcap = cfg.attn_logit_softcap
    self.v_norm_on = cfg.v_norm
    norm_kw = cfg.norm_kwargs(dtype)
    self.q_proj = layers.Linear("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"),
                                bias_shape=(n, h) if bias else None,
                                bias_axes=("heads", "head_dim"), **kw)
    self.q_norm = layers.RMSNorm(h, **norm_kw) if cfg.qk_norm else None
    if self.owns_kv:
      self.k_proj = layers.Linear("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"),
                                  bias_shape=(k, h) if bias else None,
                                  bias_axes=("kv_heads", "head_dim"), **kw)
      self.v_proj = (None if self.k_eq_v else
                     layers.Linear("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"),
                                   bias_shape=(k, h) if bias else None,
                                   bias_axes=("kv_heads", "head_dim"), **kw))
      self.k_norm = layers.RMSNorm(h, **norm_kw) if cfg.qk_norm else None
      self.v_norm = (layers.RMSNorm(h, eps=cfg.rms_norm_eps, with_scale=False, dtype=dtype)
                     if cfg.v_norm else None)
    d_out = cfg.hidden_size
    self.o_proj = layers.Linear("BTNH,NHD->BTD", (n, h, d_out), ("heads", "head_dim", "embed"),
                                bias_shape=(d_out,) if bias else None, bias_axes=("embed",), **kw)

  def query(self, x: Array, cos: Array, sin: Array) -> Array:
    """`[B, T, D] -> [B, T, N, H]` (normed, rotated)."""
    q = self.q_proj(x)
    if self.q_norm is not None:
      q = self.q_norm(q)
    return rope_lib.apply_rope(q, cos, sin)

  def key_value(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
    """`[B, T, D] -> (k, v)`, each `[B, T, K, H]`; k normed and rotated, v normed (Gemma 4)."""
    k_raw = self.k_proj(x)
    v = k_raw if self.v_proj is None else self.v_proj(x)
    k = self.k_norm(k_raw) if self.k_norm is not None else k_raw
    k = rope_lib.apply_rope(k, cos, sin)
    if self.v_norm is not None:
      v = self.v_norm(v)
    return k, v

  def attend(self, q: Array, *segments, q_positions: Array | None = None,
             extent: Array | None = None) -> Array:
    """Attention of `q` `[B, T, N, H]` over key segments (`kernels.attention`) with this
    layer's scale and soft-cap: `[B, T, N, H]`. `extent`: see `kernels.attention`."""
    return attn_kernels.attention(q, *segments, q_positions=q_positions, scale=self.scale,
                                  softcap=self.logit_softcap, extent=extent)

  def attend_packed(self, q: Array, past, k: Array, v: Array, pack: Pack,
                    extent: Array | None = None) -> Array:
    """Packed verify: flat queries `[1, N, N_h, H]` over their rows' committed cache `past`
    and their own flat keys/values `[1, N, K, H]` (`kernels.attention.ragged_attention`:
    one kernel program per row reads the row's span of the flat batch)."""
    out = attn_kernels.ragged_attention(
        q[0], past, k[0], v[0], rows=pack.rows, cols=pack.cols, start=pack.start,
        width=pack.valid.shape[1], scale=self.scale, softcap=self.logit_softcap, extent=extent)
    return out[None]


# attn_fn(attn_module, q, k_new, v_new) -> attention output `[B, T, N, H]` (before o_proj).
# k_new/v_new are the new tokens' keys/values, None for KV-shared layers.
AttnFn = Callable[[Attention, Array, Array | None, Array | None], Array]


class DecoderLayer(nnx.Module):
  """Pre-norm block; Gemma adds post-attention / post-feedforward (sandwich) norms,
  Gemma 4 adds the per-layer-embedding residual and a final `layer_scalar`."""

  def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs,
               attn_in_dim: int | None = None):
    d = cfg.hidden_size
    norm_kw = cfg.norm_kwargs(dtype)
    self.sandwich = cfg.sandwich_norm
    self.input_layernorm = layers.RMSNorm(d, **norm_kw)
    self.self_attn = Attention(cfg, layer, dtype=dtype, rngs=rngs, in_dim=attn_in_dim)
    # Llama/Qwen: post_attention_layernorm is the pre-MLP norm. Gemma: it is the sandwich
    # norm on the attention output, and pre_feedforward_layernorm is the pre-MLP norm.
    self.post_attention_layernorm = layers.RMSNorm(d, **norm_kw)
    if self.sandwich:
      self.pre_feedforward_layernorm = layers.RMSNorm(d, **norm_kw)
      self.post_feedforward_layernorm = layers.RMSNorm(d, **norm_kw)
    self.mlp = layers.MLP(d, cfg.mlp_dim_for(layer), act=cfg.hidden_act, bias=cfg.mlp_bias,
                          dtype=dtype, rngs=rngs)
    self.ple_dim = cfg.ple_dim
    if cfg.ple_dim:
      kw = dict(dtype=dtype, rngs=rngs)
      self.per_layer_input_gate = layers.Linear("BTD,DP->BTP", (d, cfg.ple_dim), ("embed", None),
                                                **kw)
      self.per_layer_projection = layers.Linear("BTP,PD->BTD", (cfg.ple_dim, d), (None, "embed"),
                                                **kw)
      self.post_per_layer_input_norm = layers.RMSNorm(d, **norm_kw)
      self.act = cfg.hidden_act
    self.layer_scalar = layers.Buffer(jnp.ones((1,), dtype)) if cfg.layer_scalar else None

  def __call__(self, x: Array, cos: Array, sin: Array, attn_fn: AttnFn,
               per_layer_input: Array | None = None, attn_input: Array | None = None) -> Array:
    """`attn_input` overrides the attention input (Eagle3); default `input_layernorm(x)`."""
    h = self.input_layernorm(x) if attn_input is None else attn_input
    q = self.self_attn.query(h, cos, sin)
    k_new, v_new = self.self_attn.key_value(h, cos, sin) if self.self_attn.owns_kv else (None, None)
    a = self.self_attn.o_proj(attn_fn(self.self_attn, q, k_new, v_new))
    return self.finish(x, a, per_layer_input)

  def finish(self, x: Array, a: Array, per_layer_input: Array | None = None) -> Array:
    """Residual + MLP part of the layer given the attention output `a` (after o_proj)."""
    if self.sandwich:
      x = x + self.post_attention_layernorm(a)
      x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
    else:
      x = x + a
      x = x + self.mlp(self.post_attention_layernorm(x))
    if self.ple_dim:
      g = layers.activation(self.act)(self.per_layer_input_gate(x)) * per_layer_input
      x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
    if self.layer_scalar is not None:
      x = x * layers.lead(self.layer_scalar[...], x.ndim)
    return x


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ForwardOutput:
  """Attributes:
    logits: float32 `[B, T, V]` or None.
    hidden: final-normed hidden `[B, T, D]`.
    taps: raw outputs of the requested layers concatenated, `[B, T, C]`, or None.
    cache: the cache with the new K/V written (lengths unchanged), or None; with
      `defer_writes`, the input cache unchanged.
    pending: with `defer_writes`, the new K/V to write (`PendingKV`), else None.
  """

  logits: Array | None
  hidden: Array
  taps: Array | None
  cache: KVCache | None
  pending: PendingKV | None = None


class TextModel(nnx.Module):
  """The HF `model.*` backbone: embeddings, decoder layers, final norm (+ Gemma 4 PLE)."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.embed_tokens = layers.Embed(cfg.vocab_size, d,
                                     scale=d ** 0.5 if cfg.embed_scale else None,
                                     dtype=dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.norm = layers.RMSNorm(d, **cfg.norm_kwargs(dtype))
    if cfg.ple_dim:
      total = cfg.num_layers * cfg.ple_dim
      self.embed_tokens_per_layer = layers.Embed(cfg.ple_vocab_size, total,
                                                 scale=cfg.ple_dim ** 0.5, dtype=dtype, rngs=rngs,
                                                 axes=("vocab", None))
      self.per_layer_model_projection = layers.Linear("BTD,DE->BTE", (d, total), ("embed", None),
                                                      dtype=dtype, rngs=rngs)
      self.per_layer_projection_norm = layers.RMSNorm(cfg.ple_dim, eps=cfg.rms_norm_eps,
                                                      dtype=dtype)

  def per_layer_inputs(self, cfg: ModelConfig, tokens: Array, embeds: Array) -> Array:
    """Gemma 4 PLE: `[B, T, L, P_le]` = (norm(proj(embeds) / sqrt(D)) + table[tokens]) / sqrt(2)."""
    b, t = tokens.shape
    token_part = self.embed_tokens_per_layer(tokens).reshape(b, t, cfg.num_layers, cfg.ple_dim)
    proj = self.per_layer_model_projection(embeds) * jnp.asarray(cfg.hidden_size ** -0.5,
                                                                 embeds.dtype)
    proj = self.per_layer_projection_norm(proj.reshape(b, t, cfg.num_layers, cfg.ple_dim))
    return (proj + token_part) * jnp.asarray(2.0 ** -0.5, embeds.dtype)


class CausalLM(nnx.Module):
  """Decoder-only LM: `model` backbone plus `lm_head` (absent when tied)."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.cfg = cfg
    self.model = TextModel(cfg, dtype=dtype, rngs=rngs)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    layers.Linear("...D,DV->...V", (cfg.hidden_size, cfg.vocab_size),
                                  ("embed", "vocab"), dtype=dtype, rngs=rngs))

  def embed(self, tokens: Array) -> Array:
    return self.model.embed_tokens(tokens)

  def logits_from_hidden(self, hidden: Array, vocab_ids: Array | None = None) -> Array:
    """Final-normed hidden `[..., D]` -> float32 logits `[..., V]` (with final soft-cap).

    `vocab_ids` int `[N]` computes only those columns: `[..., N]` (a draft's vocabulary).
    """
    if vocab_ids is not None:
      if self.lm_head is None:
        w = jnp.take(self.model.embed_tokens.embedding[...], vocab_ids, axis=0)  # [N, D]
      else:
        w = jnp.take(self.lm_head.kernel[...], vocab_ids, axis=1).T
      logits = jnp.einsum("...D,ND->...N", hidden, w, preferred_element_type=jnp.float32)
    elif self.lm_head is None:
      logits = self.model.embed_tokens.attend(hidden)
    else:
      logits = jnp.einsum("...D,DV->...V", hidden, self.lm_head.kernel[...],
                          preferred_element_type=jnp.float32)
    return layers.softcap(logits, self.cfg.final_logit_softcap)

  def __call__(self, tokens: Array, positions: Array | None = None, *,
               cache: KVCache | None = None, attend_len: int | None = None,
               write_mask: Array | None = None, taps: Sequence[int] = (),
               compute_logits: bool = True, pack: Pack | None = None,
               defer_writes: bool = False, tree_mask: Array | None = None) -> ForwardOutput:
    """Runs the decoder.

    Args:
      tokens: int32 `[B, T]`.
      positions: int32 `[B, T]` absolute positions (default `arange(T)`). With a cache,
        the K/V of token t are written at cache slot `positions[:, t]`, so positions
        must be contiguous per row.
      cache: KV cache or None for a full-sequence (training) forward.
      attend_len: static number of cache slots to attend over (prefill uses T, since
        nothing beyond is valid); default: the whole cache.
      write_mask: bool `[B]`: rows whose K/V are written (default all); finished rows
        of a decode loop pass False so their cache slots stay untouched.
      taps: layer ids whose raw outputs to return (ascending order kept as given).
      compute_logits: skip the LM head when only hidden states are needed.
      pack: packed verify (needs `cache`): `tokens`/`positions` are the flat `[1, N]` batch
        and `pack` says where each token sits in the rows' dense `[B, W]` blocks; outputs
        stay flat.
      defer_writes: (with a cache) read the cache only: the new tokens attend to the
        committed slots (`< cache.lengths`) plus their own K/V as a second key segment,
        and the K/V come back as `ForwardOutput.pending` for the caller to write, outside
        any device-side branch (see `PendingKV`).
      tree_mask: (with `defer_writes`, dense) bool `[T, T]`: new token i sees new token j
        only where it is True: a token tree verified in one pass (`positions` are then
        the nodes' depths past the cache, not contiguous, and the caller writes the
        accepted path's K/V).

    Returns:
      ForwardOutput.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed(tokens)
    ple = self.model.per_layer_inputs(cfg, tokens, x) if cfg.ple_dim else None

    tables: dict = {}  # cos/sin depend only on (rope, head dim): built once each
    slot_of = {layer: i for i, layer in enumerate(cfg.cache_layers)}
    start = positions[:, 0]
    carry = {"cache": cache}
    segment_of_layer: dict = {}
    tap_out = {}
    # Causal cache attention sees no slot beyond the highest query position: attention reads
    # only a bucketed prefix of the cache (`kernels.attention` extent); prefill passes
    # `attend_len` instead, a static prefix.
    extent = None
    if cache is not None and attend_len is None:
      extent = jnp.max(pack.positions if pack is not None else positions) + 1
    if defer_writes and cache is None:
      raise ValueError("defer_writes needs a cache")
    if tree_mask is not None and (not defer_writes or pack is not None):
      raise ValueError("tree_mask needs defer_writes and a dense (unpacked) block")
    pending_k, pending_v = {}, {}
    # Dense block layout of the new tokens (packed: the rows' [B, W] blocks).
    q_pos = pack.positions if pack is not None else positions
    own_len = jnp.sum(pack.valid, axis=1) if pack is not None else None

    for i, layer in enumerate(self.model.layers):
      rope = cfg.rope_for(i)
      head_dim = cfg.layer_head_dims[i]
      if (rope, head_dim) not in tables:
        tables[(rope, head_dim)] = rope_lib.rope_tables(rope, head_dim, positions)
      cos, sin = tables[(rope, head_dim)]
      window = cfg.window_for(i)
      src = cfg.kv_sources[i]

      def attn_fn(att, q, k_new, v_new, i=i, src=src, window=window):
        if k_new is None:  # KV-shared layer: reuse the source layer's keys/values.
          segs = tuple(dataclasses.replace(g, window=window) for g in segment_of_layer[src])
        elif cache is None:  # full sequence: keys are the T tokens themselves
          segs = (attn_kernels.KV(k_new.transpose(0, 2, 3, 1), v_new.transpose(0, 2, 1, 3),
                                  positions=positions, window=window),)
        else:
          kd, vd = ((pack.to_dense(k_new), pack.to_dense(v_new)) if pack is not None
                    else (k_new, v_new))
          if defer_writes:
            pending_k[slot_of[i]], pending_v[slot_of[i]] = kd, vd
            past = cache.segment(slot_of[i], span=attend_len, window=window,
                                 visible_lengths=cache.lengths)
            own = attn_kernels.KV(kd.transpose(0, 2, 3, 1), vd.transpose(0, 2, 1, 3),
                                  positions=q_pos, lengths=own_len, window=window,
                                  mask=tree_mask)
            segs = (past, own)
            if pack is not None:  # KV-shared layers below still read the dense `segs`
              segment_of_layer[i] = segs
              return att.attend_packed(q, past, k_new, v_new, pack, extent)
          else:
            c = carry["cache"]
            c = (c.write(slot_of[i], kd, vd, pack.start, pack.valid) if pack is not None
                 else c.write(slot_of[i], kd, vd, start, write_mask))
            carry["cache"] = c
            segs = (c.segment(slot_of[i], span=attend_len, window=window),)
        segment_of_layer[i] = segs
        if pack is not None:
          out = att.attend(pack.to_dense(q), *segs, q_positions=pack.positions, extent=extent)
          return pack.to_flat(out)
        return att.attend(q, *segs, q_positions=positions, extent=extent)

      x = layer(x, cos, sin, attn_fn, ple[:, :, i] if ple is not None else None)
      if i in taps:
        tap_out[i] = x

    hidden = self.model.norm(x)
    logits = self.logits_from_hidden(hidden) if compute_logits else None
    tap_arr = jnp.concatenate([tap_out[i] for i in taps], axis=-1) if taps else None
    pending = None
    if defer_writes:
      n = len(cfg.cache_layers)
      if pack is not None:
        where, valid = pack.start, pack.valid
      else:
        where = start
        valid = jnp.ones((b, t), bool) if write_mask is None else jnp.broadcast_to(
            write_mask[:, None], (b, t))
      pending = PendingKV(tuple(pending_k[j] for j in range(n)),
                          tuple(pending_v[j] for j in range(n)), where, valid)
    return ForwardOutput(logits=logits, hidden=hidden, taps=tap_arr, cache=carry["cache"],
                         pending=pending)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> CausalLM:
  """The model with `ShapeDtypeStruct` params: no memory, no init compute."""
  return nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> int:
  """Trainable parameter count as transformers reports it (buffers excluded, tied once)."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return int(sum(x.size for x in jax.tree.leaves(state)))
