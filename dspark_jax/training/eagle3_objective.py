"""Eagle3 training-time test (TTT), DeepSpec/SpecForge style.

Step s (s = 0..TTT-1) at position t feeds token x_{t+s+1} and, as hidden, `fc(taps_t)` at
step 0 or the previous step's output at t; RoPE position t+s. Keys visible to the query
at (s, t): step-0 keys at positions <= t (causal) plus, for steps 1..s, the key of the
same index t. The prediction is x_{t+s+2}, trained by soft cross-entropy against the
target distribution softmax(target_logits[t+s+1]) (uniform past the end), masked by the
loss mask at t+s (last valid token excluded), normalised by B*S, weighted 0.8^s.

`loss_positions = K > 0` is this project's cheaper estimate of the same loss: step 0 runs
over every position (its keys are every later query's causal context), steps 1.. run only
at K indices t per row (an output at t reads nothing else of those steps), and the LM
heads, the softmax and the loss are evaluated only there, drawn uniformly without
replacement among the indices with a loss at some step and weighted n_b / min(K, n_b)
(n_b = that row's candidates), so the sum is an unbiased estimate of the full
B*S-normalised sum, and equals it when K >= n_b. The draft layers at every position of
every step were most of a CPU training step; K = the DSpark anchor count gives both the
same number of supervised predictions per sequence.

With a reduced draft vocabulary (the draft's `draft_vocab` ids `[N]`) the draft's logits
cover those N tokens only and q is zero elsewhere: the soft cross-entropy keeps the target
mass on the N tokens (the rest has log q = -inf and no gradient through q), and the L1
distance adds the mass outside, so `1 - L1/2` stays the exact acceptance probability.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dspark_jax.typing import Array
from dspark_jax.kernels import attention as attn_kernels


def ttt_attention(att, q: Array, k0: Array, v0: Array, diag: list[tuple[Array, Array]],
                  valid_len: Array, q_index: Array | None = None) -> Array:
  """q `[B, T, N, H]` over causal step-0 keys `k0` plus same-index keys of later steps.

  Args:
    k0, v0: step-0 keys/values `[B, S, K, H]` at positions 0..S-1.
    diag: keys/values `[B, T, K, H]` of steps 1..s at the queries' indices (the current
      step's included).
    valid_len: `[B]`, keys at index >= valid_len are invisible (shrinks by one per step).
    q_index: int32 `[B, T]`, the index t of each query (None: T = S, the indices 0..S-1).
  """
  b, t = q.shape[:2]
  if q_index is None:
    q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  base = attn_kernels.KV(k0.transpose(0, 2, 3, 1), v0.transpose(0, 2, 1, 3), lengths=valid_len)
  ok = q_index < valid_len[:, None]  # [B, T]
  steps = [attn_kernels.Block(kd, vd, group=1, valid=ok) for kd, vd in diag]
  return att.attend(q, base, *steps, q_positions=q_index)


def sample_positions(key, candidates: Array, k: int):
  """K indices per row drawn uniformly without replacement among `candidates` `[B, S]`.

  Returns:
    (indices int32 `[B, K]`, keep bool `[B, K]` (False for rows with fewer candidates),
     row weights float32 `[B]` = n_b / min(K, n_b): each candidate's inverse inclusion
     probability).
  """
  b, s = candidates.shape
  k = min(k, s)
  u = jnp.where(candidates, jax.random.uniform(key, (b, s)), 2.0)
  order = jnp.argsort(u, axis=1)[:, :k].astype(jnp.int32)
  keep = jnp.take_along_axis(u, order, axis=1) < 2.0
  n = jnp.sum(candidates, axis=1).astype(jnp.float32)
  return order, keep, n / jnp.maximum(jnp.minimum(n, k), 1.0)


def soft_losses(logits: Array, target: Array, ids: Array | None):
  """Per-position soft CE, L1 distance and argmax guess of one TTT step.

  Args:
    logits: draft logits float32 `[..., V]`, or `[..., N]` over the draft vocabulary `ids`.
    target: the target distribution `[..., V]`.
    ids: int32 `[N]` target ids of the draft vocabulary, or None.

  Returns:
    (ce `[...]`, l1 `[...]` (1 - l1/2 is the exact acceptance probability of q), guessed
     target id `[...]`)
  """
  logq = jax.nn.log_softmax(logits, axis=-1)
  target_in = target if ids is None else jnp.take(target, ids, axis=-1)
  ce = -jnp.sum(target_in * logq, axis=-1)
  l1 = jnp.sum(jnp.abs(jnp.exp(logq) - target_in), axis=-1)
  guess = jnp.argmax(logits, -1)
  if ids is not None:
    l1 = l1 + jnp.clip(1.0 - jnp.sum(target_in, axis=-1), 0.0, 1.0)  # q = 0 outside
    guess = ids[guess]
  return ce, l1, guess


def objective(draft, tmodel, mb: dict, taps: Array, hidden: Array, key, *, ttt_length: int,
              step_decay: float, loss_positions: int = 0):
  """Eagle3 TTT loss. Returns (loss, stats) with the same stats keys as the parallel drafts."""
  tokens, loss_mask, lengths = mb["tokens"], mb["loss_mask"], mb["lengths"]
  b, s = tokens.shape
  v = tmodel.cfg.vocab_size
  ids = draft.vocab_ids()
  idx = jnp.arange(s)
  in_seq = idx[None, :] < lengths[:, None]
  pm0 = loss_mask.astype(bool) & in_seq & (idx[None, :] != (lengths - 1)[:, None])
  sampled = 0 < loss_positions < s
  if sampled:
    # Candidates: indices t with a loss at any step (t + step inside the reply).
    later = jnp.pad(pm0, ((0, 0), (0, ttt_length)))
    cand = functools.reduce(jnp.logical_or, [later[:, j:j + s] for j in range(ttt_length)])
    sel, keep, row_w = sample_positions(key, cand, loss_positions)
    gather = jax.vmap(lambda x, i: x[i])
  else:
    # Target distribution for the prediction made at u: p(x_{u+2}) = softmax(T[u+1]).
    t_probs = jax.nn.softmax(tmodel.logits_from_hidden(hidden).astype(jnp.float32), axis=-1)
    uniform = jnp.full((b, ttt_length + 1, v), 1.0 / v, jnp.float32)
    t_probs = jnp.concatenate([t_probs[:, 1:], uniform], axis=1)  # [B, S + TTT, V]
  pm0 = jnp.concatenate([pm0, jnp.zeros((b, ttt_length), bool)], axis=1)
  padded_tokens = jnp.concatenate([tokens, jnp.zeros((b, ttt_length + 1), tokens.dtype)], axis=1)

  h = draft.project(taps)
  step0_kv: list = [None] * len(draft.layers)
  diag_kv: list = [[] for _ in draft.layers]
  total = jnp.float32(0.0)
  agree, alpha_sum, count = [], [], []
  ce_sum = jnp.float32(0.0)
  l1_sum = jnp.float32(0.0)
  for step in range(ttt_length):
    if sampled and step > 0:
      # Only the sampled indices from here on: the step-s output at t reads step-0 keys
      # (all of them, computed at step 0) and its own index's keys of steps 1..s, so the
      # other indices' later steps never reach the loss. Exact, and S / K times cheaper.
      q_index = sel
      if step == 1:
        h = gather(h, sel)  # [B, K, D]
      tok = gather(padded_tokens, sel + step + 1)
    else:
      q_index = None
      tok = jax.lax.dynamic_slice_in_dim(padded_tokens, step + 1, s, axis=1)
    e = tmodel.embed(tok).astype(h.dtype)
    rows = idx if q_index is None else q_index
    pos = jnp.broadcast_to(rows + step, tok.shape).astype(jnp.int32)
    valid_len = jnp.maximum(lengths - step, 0)

    def make_fn(i, step=step, valid_len=valid_len, q_index=q_index):
      def fn(att, q, k_new, v_new):
        if step == 0:
          step0_kv[i] = (k_new, v_new)
        else:
          diag_kv[i].append((k_new, v_new))
        k0, v0 = step0_kv[i]
        return ttt_attention(att, q, k0, v0, diag_kv[i], valid_len, q_index)
      return fn

    h = draft.forward(h, e, pos, [make_fn(i) for i in range(len(draft.layers))])
    if sampled:
      # Positions u = t + step; the mask is 0 wherever u + 1 falls outside the sequence.
      u = sel + step
      h_sel = gather(h, sel) if step == 0 else h
      logits = draft.logits(tmodel, h_sel).astype(jnp.float32)  # [B, K, V or N]
      t_hidden = gather(hidden, jnp.minimum(u + 1, s - 1))
      target = jax.nn.softmax(tmodel.logits_from_hidden(t_hidden).astype(jnp.float32), axis=-1)
      mask = (gather(pm0, u) & keep).astype(jnp.float32) * row_w[:, None]
    else:
      logits = draft.logits(tmodel, h).astype(jnp.float32)
      target = jax.lax.dynamic_slice_in_dim(t_probs, step, s, axis=1)
      mask = jax.lax.dynamic_slice_in_dim(pm0, step, s, axis=1).astype(jnp.float32)
    ce, l1, guess = soft_losses(logits, target, ids)
    step_loss = jnp.sum(ce * mask) / (b * s)
    total = total + (step_decay ** step) * step_loss
    alpha = jnp.clip(1.0 - 0.5 * l1, 0.0, 1.0)
    agree.append(jnp.sum((guess == jnp.argmax(target, -1)) * mask))
    alpha_sum.append(jnp.sum(alpha * mask))
    count.append(jnp.sum(mask))
    ce_sum = ce_sum + jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0) / ttt_length
    l1_sum = l1_sum + jnp.sum(l1 * mask) / jnp.maximum(jnp.sum(mask), 1.0) / ttt_length
  pos_alpha = jnp.stack(alpha_sum)
  pos_count = jnp.stack(count)
  rates = pos_alpha / jnp.maximum(pos_count, 1.0)
  tau = 1.0 + jnp.sum(jnp.cumprod(rates))
  stats = dict(ce=ce_sum, l1=l1_sum, bce=jnp.float32(0.0), pos_agree=jnp.stack(agree),
               pos_alpha=pos_alpha, pos_count=pos_count, tau_sum=tau, blocks=jnp.float32(1.0),
               weight=jnp.sum(pos_count))
  return total, stats
