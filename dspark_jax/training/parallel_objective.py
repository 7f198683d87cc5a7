"""Training forward and loss of the parallel drafts (DSpark, DFlash).

Per sequence, N_a anchors are sampled uniformly without replacement inside the
assistant reply and sorted. Each anchor p opens a block at positions p..p+Q-1
(anchor token, then mask tokens) whose slots predict x_{p+1} .. x_{p+P}. All blocks
of a sequence go through the draft in one pass:

  * block queries attend to the injected target context at positions < p (strictly
    before the anchor: at inference the anchor's own features are not computed yet)
    and bidirectionally to their own block, never to other blocks;
  * the attention is computed as one softmax over [context keys ; own-block keys],
    i.e. logits `[.., Q, S]` plus `[.., Q, Q]` per block, never the
    `(N_a*Q) x (S + N_a*Q)` dense mask; the context mask is an iota compare that XLA
    fuses into the select;
  * dummy blocks (fewer candidates than N_a) are fully masked with a finite mask value,
    so their softmax is uniform rather than NaN, and their loss weight is 0.

Loss (DeepSpec): weights w_k = exp(-k / gamma) * eval_mask (eval mask = cumulative
product of "label inside the reply"), all terms in float32 with a shared denominator
sum(w):  a_ce * CE(Z, x*) + a_l1 * ||softmax(Z) - softmax(T)||_1 + a_conf * BCE(c, 1 - L1/2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.typing import Array
from dspark_jax.kernels import attention as attn_kernels


@dataclasses.dataclass(frozen=True)
class LossWeights:
  ce: float = 0.1
  l1: float = 0.9
  conf: float = 1.0
  decay_gamma: float = 4.0


def sample_anchors(key: Array, loss_mask: Array, lengths: Array, num_anchors: int):
  """Uniform anchors without replacement among positions p with mask[p] & mask[p+1].

  Args:
    key: PRNG key.
    loss_mask: `[B, S]` (1 inside assistant replies).
    lengths: `[B]` true lengths.
    num_anchors: N_a.

  Returns:
    (anchors int32 `[B, N_a]` sorted ascending (0 for dummy blocks), keep bool `[B, N_a]`)
  """
  b, s = loss_mask.shape
  m = loss_mask.astype(bool) & (jnp.arange(s)[None, :] < lengths[:, None])
  cand = m[:, :-1] & m[:, 1:]  # [B, S-1]: anchor and its first target both in the reply
  u = jax.random.uniform(key, cand.shape)
  u = jnp.where(cand, u, 2.0)
  n = min(num_anchors, s - 1)
  order = jnp.argsort(u, axis=1)[:, :n]
  keep = jnp.take_along_axis(u, order, axis=1) < 2.0
  anchors = jnp.where(keep, order, jnp.int32(s))  # dummies sort last
  anchors = jnp.sort(anchors, axis=1)
  keep = anchors < s
  anchors = jnp.where(keep, anchors, 0).astype(jnp.int32)
  if n < num_anchors:
    pad = num_anchors - n
    anchors = jnp.pad(anchors, ((0, 0), (0, pad)))
    keep = jnp.pad(keep, ((0, 0), (0, pad)))
  return anchors, keep


def block_labels(tokens: Array, loss_mask: Array, lengths: Array, anchors: Array, keep: Array,
                 p: int):
  """Labels, cumulative eval mask and teacher-forced previous tokens.

  Returns:
    labels int32 `[B, N_a, P]` (x_{p+1+k}), eval_mask float32 `[B, N_a, P]`,
    prev int32 `[B, N_a, P]` ([x_p, x_{p+1}, ..., x_{p+P-1}]).
  """
  b, s = tokens.shape
  idx = anchors[:, :, None] + 1 + jnp.arange(p)[None, None, :]  # [B, N_a, P]
  safe = jnp.minimum(idx, s - 1)
  gather = jax.vmap(lambda t, i: t[i])
  labels = gather(tokens, safe)
  in_reply = (idx < lengths[:, None, None]) & gather(loss_mask, safe).astype(bool)
  valid = in_reply & keep[:, :, None]
  eval_mask = jnp.cumprod(valid.astype(jnp.int32), axis=-1).astype(jnp.float32)
  anchor_tok = gather(tokens, anchors)
  prev = jnp.concatenate([anchor_tok[:, :, None], labels[:, :, :-1]], axis=-1)
  return labels, eval_mask, prev


def block_attention(att, q: Array, k_blk: Array, v_blk: Array, ctx_k: Array, ctx_v: Array,
                    anchors: Array, keep: Array, num_blocks: int) -> Array:
  """Attention of all blocks' queries over [visible context ; own block].

  Args:
    att: the layer's Attention module (scale, soft-cap).
    q: `[B, N_a*Q, N, H]`; k_blk, v_blk: `[B, N_a*Q, K, H]`.
    ctx_k, ctx_v: `[B, S, K, H]` context keys/values at positions 0..S-1.
    anchors: `[B, N_a]`: block j sees context positions `< anchors[:, j]`.
    keep: `[B, N_a]`: blocks whose own keys are visible.

  Returns:
    `[B, N_a*Q, N, H]`.
  """
  qb = q.shape[1] // num_blocks
  limit = jnp.repeat(anchors, qb, axis=1)  # [B, N_a*Q]: per-query context length
  ctx = attn_kernels.KV(ctx_k.transpose(0, 2, 3, 1), ctx_v.transpose(0, 2, 1, 3), lengths=limit,
                        causal=False)
  return att.attend(q, ctx, attn_kernels.Block(k_blk, v_blk, group=qb, valid=keep))


def draft_forward(draft, target_model, tokens: Array, taps: Array, anchors: Array, keep: Array,
                  prev: Array):
  """Teacher-forced draft outputs for all blocks.

  Args:
    draft: ParallelDraft module.
    target_model: the target (embedding / LM head, frozen).
    tokens: `[B, S]`; taps: `[B, S, C]` target features; anchors/keep: `[B, N_a]`;
    prev: `[B, N_a, P]` teacher-forced previous tokens for the sequential head.

  Returns:
    (draft logits Z float32 `[B, N_a, P, V]` (`[..., N]` over a reduced draft vocabulary),
     confidence logits `[B, N_a, P]` or None)
  """
  dcfg = draft.dcfg
  b, s = tokens.shape
  na = anchors.shape[1]
  qb = dcfg.block_inputs
  p = dcfg.block_size
  ctx = draft.context_hidden(taps)
  ctx_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  ctx_kv = draft.context_kv(ctx, ctx_pos)
  anchor_tok = jnp.take_along_axis(tokens, anchors, axis=1)
  blk = jnp.concatenate([anchor_tok[:, :, None],
                         jnp.full((b, na, qb - 1), dcfg.mask_token_id, jnp.int32)], axis=2)
  pos = (anchors[:, :, None] + jnp.arange(qb)[None, None, :]).reshape(b, na * qb)
  x = target_model.embed(blk.reshape(b, na * qb)).astype(ctx.dtype)

  def make_fn(i):
    def fn(att, q, k_blk, v_blk):
      return block_attention(att, q, k_blk, v_blk, ctx_kv[i][0], ctx_kv[i][1], anchors, keep,
                             na)
    return fn

  h = draft.backbone(x, pos, [make_fn(i) for i in range(len(draft.layers))])
  h = h.reshape(b, na, qb, -1)
  h = h[:, :, :p] if dcfg.anchor_first else h[:, :, 1:]
  ids = None if draft.draft_vocab is None else draft.draft_vocab[...]
  z = target_model.logits_from_hidden(h, ids)
  conf = None
  w1 = None
  if draft.markov_head is not None:
    bias, w1 = draft.markov_head.teacher_forced(h, prev, ids)
    z = z + bias
  if draft.confidence_head is not None:
    conf = draft.confidence_head(h, w1 if dcfg.confidence_with_markov else None)
  return z, conf


def target_block_logits(target_model, target_hidden: Array, anchors: Array, p: int) -> Array:
  """Target distributions aligned with the block slots: logits at positions p+k, `[B,N_a,P,V]`.

  `target_hidden` is the target's final-normed hidden state `[B, S, D]`.
  """
  s = target_hidden.shape[1]
  idx = jnp.minimum(anchors[:, :, None] + jnp.arange(p)[None, None, :], s - 1)
  h = jax.vmap(lambda th, i: th[i])(target_hidden, idx)
  return target_model.logits_from_hidden(h)


def losses(z: Array, conf: Array | None, t_logits: Array, labels: Array, eval_mask: Array,
           weights: LossWeights, vocab_ids: Array | None = None):
  """DeepSpec's DSpark/DFlash loss and diagnostics (all float32).

  With a reduced draft vocabulary (`vocab_ids` `[N]`, z `[..., N]`) the draft's q is zero
  outside it: the L1 distance adds the target mass there, `1 - sum_N p`, so `1 - L1/2` is
  still the exact acceptance probability; the CE term skips labels outside the vocabulary
  (their log q is -inf), while L1 and BCE keep those positions.

  Returns:
    (total loss scalar, dict of numerator sums and denominators for logging)
  """
  z = z.astype(jnp.float32)
  p = z.shape[-2]
  k = jnp.arange(p, dtype=jnp.float32)
  w = eval_mask * jnp.exp(-k / weights.decay_gamma)[None, None, :]
  logq = jax.nn.log_softmax(z, axis=-1)
  q = jnp.exp(logq)
  pt = jax.nn.softmax(t_logits.astype(jnp.float32), axis=-1)
  w_ce = w
  if vocab_ids is not None:
    # t2d: the draft column of each target id, or -1 outside the draft vocabulary.
    t2d = jnp.full((t_logits.shape[-1],), -1, jnp.int32).at[vocab_ids].set(
        jnp.arange(vocab_ids.shape[0], dtype=jnp.int32))
    col = t2d[labels]
    w_ce = w * (col >= 0)
    labels = jnp.maximum(col, 0)
    pt_in = jnp.take(pt, vocab_ids, axis=-1)
    outside = jnp.clip(1.0 - jnp.sum(pt_in, axis=-1), 0.0, 1.0)
    l1 = jnp.sum(jnp.abs(q - pt_in), axis=-1) + outside
  else:
    l1 = jnp.sum(jnp.abs(q - pt), axis=-1)
  ce = -jnp.take_along_axis(logq, labels[..., None], axis=-1)[..., 0]
  alpha = jax.lax.stop_gradient(jnp.clip(1.0 - 0.5 * l1, 0.0, 1.0))
  denom = jnp.sum(w) + 1e-6
  total = weights.ce * jnp.sum(w_ce * ce)
  if weights.l1:
    total = total + weights.l1 * jnp.sum(w * l1)
  bce = jnp.zeros_like(ce)
  if conf is not None and weights.conf:
    bce = (jnp.maximum(conf, 0) - conf * alpha + jnp.log1p(jnp.exp(-jnp.abs(conf))))
    total = total + weights.conf * jnp.sum(w * bce)
  total = total / denom
  guess = jnp.argmax(z, -1) if vocab_ids is None else vocab_ids[jnp.argmax(z, -1)]
  agree = (guess == jnp.argmax(t_logits, -1)).astype(jnp.float32)
  m = eval_mask
  # tau estimate per block: 1 + sum_k prod_{i<=k} alpha_i over the valid prefix.
  surv = jnp.cumprod(jnp.where(m > 0, alpha, 0.0), axis=-1)
  blocks = jnp.sum(m[..., 0])
  stats = dict(
      ce=jnp.sum(w_ce * ce) / denom, l1=jnp.sum(w * l1) / denom, bce=jnp.sum(w * bce) / denom,
      pos_agree=jnp.sum(agree * m, axis=(0, 1)), pos_alpha=jnp.sum(alpha * m, axis=(0, 1)),
      pos_count=jnp.sum(m, axis=(0, 1)), tau_sum=jnp.sum((1.0 + jnp.sum(surv, -1)) * m[..., 0]),
      blocks=blocks, weight=denom)
  return total, stats
