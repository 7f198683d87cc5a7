"""Per-algorithm pieces of the draft-verify loop (static under jit).

A runtime is a class of static methods; `decoding/speculative.py` calls
`init_state`, `prefill`, `propose` and `commit` and never looks at the algorithm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.decoding import sampling
from dspark_jax.decoding.cache import KVCache, PendingKV
from dspark_jax.decoding.state import Proposal, TreeProposal
from dspark_jax.drafts import parallel
from dspark_jax.typing import Array
from dspark_jax.kernels import draw
from dspark_jax.kernels import markov_sampler as markov_kernels
from dspark_jax.kernels.tree_accept import TreeShape


def position_keys(keys: Array, k) -> Array:
  """Per-row keys for block position k."""
  return jax.vmap(lambda key: jax.random.fold_in(key, k))(keys)


def to_target_vocab(logits: Array, vocab_ids: Array | None, vocab_size: int,
                    fill: float = -jnp.inf) -> Array:
  """Draft-vocabulary logits `[..., N]` -> target-vocabulary logits `[..., V]` (-inf outside:
  q = 0 there, which exact rejection sampling handles; `fill=0` for probabilities)."""
  if vocab_ids is None:
    return logits
  full = jnp.full(logits.shape[:-1] + (vocab_size,), fill, logits.dtype)
  return full.at[..., vocab_ids].set(logits)


def sequential_sample(markov_head, confidence_head, with_markov: bool, base: Array, hidden: Array,
                      anchor: Array, keys: Array, params: sampling.SamplingParams,
                      vocab_ids: Array | None = None) -> Proposal:
  """Samples the block left to right through the sequential head.

  Z_k = U_k + B_k(x_{k-1}) with x_{-1} = the anchor; x_k ~ softmax(process(Z_k)).

  Args:
    base: U, float32 `[B, P, V]` (`[B, P, N]` over a draft vocabulary).
    hidden: backbone hidden `[B, P, D]`.
    anchor: int32 `[B]`.
    keys: `[B]` draft keys of this round.
    vocab_ids: int32 `[N]` target ids of a reduced draft vocabulary, or None.
  """
  b = anchor.shape[0]
  # The fused kernel covers the vanilla head without top-k/top-p; `DSPARK_KERNELS` picks it.
  blocker = (f"{markov_head.kind} Markov head (only the vanilla head is fused)"
             if markov_head.kind != "vanilla" else
             "top-k/top-p filtering" if params.filtered else None)
  choice = markov_kernels.choose(vocab=base.shape[-1], rank=markov_head.rank,
                                 unsupported=blocker)
  if choice.pallas:
    return _fused_sequential_sample(markov_head, confidence_head, with_markov, base, hidden,
                                    anchor, keys, params, vocab_ids, choice)

  def step(carry, xs):
    prev, st = carry
    u_k, h_k, k = xs
    bias, e, st = markov_head.step(h_k, prev, st, vocab_ids)
    z = u_k + bias
    tok, probs = sampling.sample_with_probs(position_keys(keys, k), z, params, exact=False)
    if vocab_ids is not None:
      tok = vocab_ids[tok]
    conf = (confidence_head(h_k, e if with_markov else None) if confidence_head is not None
            else jnp.zeros((b,), jnp.float32))
    return (tok, st), (tok, z, conf, probs)

  p = base.shape[1]
  init = (anchor.astype(jnp.int32), markov_head.init_state(b, hidden.dtype))
  xs = (jnp.swapaxes(base, 0, 1), jnp.swapaxes(hidden, 0, 1), jnp.arange(p))
  _, (toks, z, conf, probs) = jax.lax.scan(step, init, xs)
  vocab = markov_head.markov_w1.embedding.shape[0]
  return Proposal(tokens=jnp.swapaxes(toks, 0, 1),
                  logits=to_target_vocab(jnp.swapaxes(z, 0, 1), vocab_ids, vocab),
                  confidence=jnp.swapaxes(conf, 0, 1) if confidence_head is not None else None,
                  probs=None if probs is None else to_target_vocab(jnp.swapaxes(probs, 0, 1),
                                                                   vocab_ids, vocab, fill=0.0))


def _fused_sequential_sample(markov_head, confidence_head, with_markov: bool, base: Array,
                             hidden: Array, anchor: Array, keys: Array,
                             params: sampling.SamplingParams, vocab_ids: Array | None,
                             choice) -> Proposal:
  """`sequential_sample` through `kernels.markov_sampler` (same tokens for the same keys).

  The uniform `sampling.sample_with_probs` would draw at each position is drawn up front
  from the same keys; the confidences, which need only the sampled prefix, follow in one
  batched call.
  """
  b, p, _ = base.shape
  w1 = markov_head.markov_w1.embedding[...]
  w2 = markov_head.markov_w2.kernel[...]
  if vocab_ids is not None:  # candidates are the draft vocabulary's tokens
    w1, w2 = jnp.take(w1, vocab_ids, axis=0), jnp.take(w2, vocab_ids, axis=1)
  uniforms = temperature = greedy_rows = None
  if not params.greedy:
    uniforms = jnp.stack([draw.uniforms(position_keys(keys, k)) for k in range(p)], axis=1)
    temperature = jnp.broadcast_to(params.temperature, (b,))
    greedy_rows = None if jnp.ndim(params.temperature) == 0 else temperature <= 0
  toks, z = markov_kernels.markov_sample(base, markov_head.embed_prev(anchor, hidden.dtype), w1,
                                         w2, uniforms=uniforms, temperature=temperature,
                                         greedy_rows=greedy_rows, choice=choice)
  if vocab_ids is not None:
    toks = vocab_ids[toks]
  conf = None
  if confidence_head is not None:
    prev = jnp.concatenate([anchor.astype(jnp.int32)[:, None], toks[:, :-1]], axis=1)
    e = markov_head.embed_prev(prev, hidden.dtype) if with_markov else None
    conf = confidence_head(hidden, e)
  vocab = markov_head.markov_w1.embedding.shape[0]
  return Proposal(tokens=toks, logits=to_target_vocab(z, vocab_ids, vocab), confidence=conf)


def parallel_sample(confidence_head, base: Array, hidden: Array, keys: Array,
                    params: sampling.SamplingParams, vocab_ids: Array | None = None,
                    vocab_size: int = 0) -> Proposal:
  """No sequential head (DFlash): every position sampled independently from U_k."""
  p = base.shape[1]
  drawn = [sampling.sample_with_probs(position_keys(keys, k), base[:, k], params, exact=False)
           for k in range(p)]
  toks = jnp.stack([t for t, _ in drawn], axis=1)
  if vocab_ids is not None:
    toks = vocab_ids[toks]
  conf = confidence_head(hidden, None) if confidence_head is not None else None
  probs = None if params.greedy else jnp.stack([q for _, q in drawn], axis=1)
  return Proposal(tokens=toks, logits=to_target_vocab(base, vocab_ids, vocab_size),
                  confidence=conf,
                  probs=None if probs is None else to_target_vocab(probs, vocab_ids, vocab_size,
                                                                   fill=0.0))


def tree_sample(markov_head, base: Array, hidden: Array, anchor: Array, keys: Array,
                params: sampling.SamplingParams, shape: TreeShape, vocab_ids: Array | None,
                vocab_size: int) -> TreeProposal:
  """Expands the block into a token tree, level by level.

  A node at depth d-1 with token y gets `shape.branching[d-1]` children from
  Z = U_d + B_d(y) (the sequential head conditioned on the node's own token, its state
  carried down the node's path; `markov_head` None: Z = U_d, as DFlash). Greedy children are
  the top-k of Z (distinct, the first one the chain's token); sampled children are i.i.d.
  draws, which is what multi-draft rejection sampling needs to stay lossless.

  Args:
    base: U, float32 `[B, P, V]` (`[B, P, N]` over a draft vocabulary).
    hidden: backbone hidden `[B, P, D]`.
    anchor: int32 `[B]` (the root).
    keys: `[B]` draft keys of this round (child i of the tree draws with fold_in(key, i)).
    vocab_ids: int32 `[N]` target ids of a reduced draft vocabulary, or None.
    vocab_size: V (the target vocabulary).
  """
  b = anchor.shape[0]
  prev = anchor.astype(jnp.int32)[:, None]  # [B, n] target ids of the current level
  state = None if markov_head is None else markov_head.init_state(b, hidden.dtype)[:, None]
  tokens = [prev]
  logits = [jnp.zeros((b, 1, vocab_size), jnp.float32)]
  for d, k in enumerate(shape.branching):  # level d -> d + 1; P is small: unrolled
    n = prev.shape[1]
    z = jnp.broadcast_to(base[:, d, None], (b, n, base.shape[-1]))
    if markov_head is not None:
      h = jnp.broadcast_to(hidden[:, d, None], (b, n, hidden.shape[-1])).reshape(b * n, -1)
      width = state.shape[-1]  # 0 for the stateless heads: no -1 reshapes
      bias, _, state = markov_head.step(h, prev.reshape(-1), state.reshape(b * n, width),
                                        vocab_ids)
      z = z + bias.reshape(b, n, -1)
      state = jnp.repeat(state.reshape(b, n, width), k, axis=1)
    if params.greedy:
      child = jax.lax.top_k(z, k)[1].astype(jnp.int32)  # [B, n, k]
    else:
      x = sampling.processed_logits(z, params, exact=False)
      ids = shape.offsets[d + 1] + jnp.arange(n * k)
      node_keys = jax.vmap(lambda key: jax.vmap(lambda i: jax.random.fold_in(key, i))(ids))(keys)
      probs = jnp.repeat(jax.nn.softmax(x, axis=-1), k, axis=1)  # [B, n*k, V or N]
      child = sampling.sample_from_probs(node_keys.reshape(b * n * k), probs.reshape(b * n * k, -1))
      child = child.reshape(b, n, k)
      greedy = params.greedy_rows(z)
      if greedy is not None:
        child = jnp.where(greedy, jnp.argmax(z, axis=-1, keepdims=True).astype(jnp.int32), child)
    child = child.reshape(b, n * k)
    if vocab_ids is not None:
      child = vocab_ids[child]
    tokens.append(child)
    logits.append(jnp.repeat(to_target_vocab(z, vocab_ids, vocab_size), k, axis=1))
    prev = child
  return TreeProposal(tokens=jnp.concatenate(tokens, axis=1),
                      logits=jnp.concatenate(logits, axis=1))


class ParallelRuntime:
  """DSpark / DFlash: context cache of projected target features per draft layer."""

  @staticmethod
  def target_taps(draft) -> tuple[int, ...]:
    return draft.dcfg.target_layer_ids

  @staticmethod
  def init_state(dcfg, batch: int, capacity: int, dtype) -> KVCache:
    return KVCache.init(dcfg.layer, batch, capacity, dtype)

  @staticmethod
  def prefill(draft, tmodel, ctx: KVCache, prompt_taps: Array, batch, first: Array) -> KVCache:
    b, tp = batch.tokens.shape
    positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp))
    ctx = parallel.ingest(draft, ctx, prompt_taps, positions)
    return ctx.commit(batch.lengths)

  @staticmethod
  def backbone(draft, tmodel, ctx: KVCache, anchor: Array, anchor_pos: Array, num_draft: int):
    """The parallel backbone's pass: (hidden `[B, P, D]`, base logits U `[B, P, V or N]`,
    draft vocabulary ids or None)."""
    dcfg = draft.dcfg
    embeds = tmodel.embed(parallel.block_tokens(dcfg, anchor))
    h = parallel.block_hidden(draft, embeds, anchor_pos, ctx)
    h = (h if dcfg.anchor_first else h[:, 1:])[:, :num_draft]
    ids = None if draft.draft_vocab is None else draft.draft_vocab[...]
    return h, tmodel.logits_from_hidden(h, ids), ids

  @staticmethod
  def propose_tree(draft, tmodel, ctx: KVCache, anchor: Array, anchor_pos: Array, keys: Array,
                   params, shape: TreeShape) -> TreeProposal:
    """A token tree of `shape` instead of a chain (`tree_sample`)."""
    h, base, ids = ParallelRuntime.backbone(draft, tmodel, ctx, anchor, anchor_pos,
                                            shape.num_draft)
    return tree_sample(draft.markov_head, base, h, anchor, keys, params, shape, ids,
                       tmodel.cfg.vocab_size)

  @staticmethod
  def propose(draft, tmodel, ctx: KVCache, anchor: Array, anchor_pos: Array, keys: Array,
              params, num_draft: int) -> Proposal:
    dcfg = draft.dcfg
    h, base, ids = ParallelRuntime.backbone(draft, tmodel, ctx, anchor, anchor_pos, num_draft)
    if draft.markov_head is None:
      return parallel_sample(draft.confidence_head, base, h, keys, params, ids,
                             tmodel.cfg.vocab_size)
    return sequential_sample(draft.markov_head, draft.confidence_head, dcfg.confidence_with_markov,
                             base, h, anchor, keys, params, ids)

  @staticmethod
  def commit(draft, tmodel, ctx: KVCache, verify_taps: Array, verify_tokens: Array, n_acc: Array,
             next_token: Array, old_len: Array, new_len: Array) -> KVCache:
    # Features of all P+1 verified positions are written; only the accepted prefix
    # (anchor + n_acc drafts) becomes visible through the new length.
    return ParallelRuntime.commit_pending(
        ctx, ParallelRuntime.context_pending(draft, verify_taps, old_len), new_len)

  @staticmethod
  def context_pending(draft, verify_taps: Array, old_len: Array) -> PendingKV:
    """Context K/V of the verified positions `[B, W, C]` from `old_len` `[B]`, computed
    without touching the cache (so inside a device-side branch; see `PendingKV`)."""
    b, w = verify_taps.shape[:2]
    positions = old_len[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]
    kvs = draft.context_kv(draft.context_hidden(verify_taps), positions)
    return PendingKV(tuple(k for k, _ in kvs), tuple(v for _, v in kvs), old_len,
                     jnp.ones((b, w), bool))

  @staticmethod
  def commit_pending(ctx: KVCache, pending: PendingKV, new_len: Array) -> KVCache:
    """`commit` from precomputed `context_pending`."""
    return ctx.write_pending(pending).commit(new_len)
