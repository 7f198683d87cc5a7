"""Draft objects: construction (random init for training/tests) and the block proposal API."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import sharding as sharding_lib
from dspark_jax.decoding import sampling
from dspark_jax.decoding.cache import KVCache
from dspark_jax.decoding.state import Batch
from dspark_jax.drafts import parallel
from dspark_jax.drafts.config import DraftConfig, DraftConfigError, draft_layer_config
from dspark_jax.typing import Array


class Draft:
  """A draft model bound to a target geometry.

  Attributes:
    config: DraftConfig (algorithm, block size, taps, heads, ...).
    graphdef, params: the NNX module split for crossing jit.
    dtype: parameter dtype.
  """

  def __init__(self, config: DraftConfig, module: nnx.Module, *, dtype=jnp.float32, path=None):
    self.config = config
    self.graphdef, self.params = nnx.split(module)
    self.dtype = dtype
    self.path = path

  @property
  def algorithm(self) -> str:
    return self.config.algorithm

  @property
  def module(self):
    return nnx.merge(self.graphdef, self.params)

  @property
  def runtime(self):
    if self.config.algorithm == "eagle3":
      from dspark_jax.drafts.eagle3 import Eagle3Runtime
      return Eagle3Runtime
    from dspark_jax.drafts.runtime import ParallelRuntime
    return ParallelRuntime

  @property
  def num_params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(self.module, nnx.Param))))

  def __repr__(self):
    c = self.config
    head = f", markov={c.markov_head_type}/{c.markov_rank}" if c.markov_rank else ""
    return (f"Draft({c.algorithm}, layers={c.num_layers}, block={c.block_size}, "
            f"taps={list(c.target_layer_ids)}{head}, confidence={c.confidence_head})")


def default_target_layers(num_target_layers: int, n: int = 5) -> tuple[int, ...]:
  """Evenly spaced taps from layer 1 to L-3 (DeepSpec: [1, 9, 17, 25, 33] for 36 layers)."""
  last = num_target_layers - 3
  if last < 1:
    return tuple(range(max(1, num_target_layers - 1)))[:n] or (0,)
  n = min(n, last)
  if n == 1:
    return (1,)
  return tuple(sorted({int(round(1 + i * (last - 1) / (n - 1))) for i in range(n)}))


def build_module(dcfg: DraftConfig, dtype=jnp.float32, seed: int = 0):
  if dcfg.algorithm == "eagle3":
    from dspark_jax.drafts.eagle3 import Eagle3Draft
    return Eagle3Draft(dcfg, dtype=dtype, rngs=nnx.Rngs(seed))
  return parallel.ParallelDraft(dcfg, dtype=dtype, rngs=nnx.Rngs(seed))


def make_config(target_cfg, algorithm: str = "dspark", *, num_layers: int | None = None,
                block_size: int = 7, target_layer_ids=None, markov_rank: int | None = None,
                markov_head_type: str = "vanilla", confidence_head: bool | None = None,
                mask_token_id: int | None = None, anchor_first: bool = True,
                draft_vocab_size: int = 0) -> DraftConfig:
  """A DraftConfig with DeepSpec's defaults for `algorithm` on `target_cfg`."""
  if algorithm not in ("dspark", "dflash", "eagle3"):
    raise DraftConfigError(f"unknown draft algorithm {algorithm!r}; expected dspark, dflash or "
                           "eagle3")
  if num_layers is None:
    num_layers = 1 if algorithm == "eagle3" else 5
  ids = tuple(target_layer_ids) if target_layer_ids is not None else default_target_layers(
      target_cfg.num_layers, 3 if algorithm == "eagle3" else 5)
  dspark = algorithm == "dspark"
  rank = (256 if dspark else 0) if markov_rank is None else (markov_rank if dspark else 0)
  conf = dspark if confidence_head is None else (confidence_head and dspark)
  mask = mask_token_id if mask_token_id is not None else (target_cfg.pad_token_id or 0)
  dcfg = DraftConfig(algorithm=algorithm, block_size=block_size, target_layer_ids=ids,
                     layer=draft_layer_config(target_cfg, num_layers), mask_token_id=int(mask),
                     markov_rank=rank, markov_head_type=markov_head_type, confidence_head=conf,
                     anchor_first=anchor_first if algorithm != "eagle3" else True,
                     draft_vocab_size=int(draft_vocab_size))
  dcfg.check_target(target_cfg)
  return dcfg


def init_draft(target, algorithm: str = "dspark", *, seed: int = 0, dtype=None,
               **config_kwargs) -> Draft:
  """A randomly initialised draft for `target` (N(0, 0.02) weights, unit norms)."""
  dcfg = make_config(target.config, algorithm, **config_kwargs)
  dtype = dtype or target.dtype
  module = build_module(dcfg, dtype, seed)
  mesh = getattr(target, "mesh", None)
  if mesh is not None:
    state = nnx.state(module)
    shardings = sharding_lib.state_shardings(state, mesh)
    nnx.update(module, jax.device_put(state, shardings))
  draft = Draft(dcfg, module, dtype=dtype)
  draft.target = target
  return draft


# ---------------------------------------------------------------------------------------------
# propose_block: one block after a prefix, for inspection and tests
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("tgraph", "dgraph", "runtime", "capacity",
                                             "num_draft"))
def _propose_block(tgraph, tparams, dgraph, dparams, runtime, prefix, length, key, params, *,
                   capacity, num_draft):
  tmodel = nnx.merge(tgraph, tparams)
  draft = nnx.merge(dgraph, dparams)
  tokens = prefix[None]
  lengths = length[None]
  batch = Batch(tokens=tokens, lengths=lengths, max_new=jnp.ones((1,), jnp.int32),
                         stop_tokens=-jnp.ones((1, 1), jnp.int32),
                         request_ids=jnp.zeros((1,), jnp.int32))
  # Context = everything before the anchor: run the target over the prefix minus its last token.
  ctx_tokens = jnp.where(jnp.arange(tokens.shape[1])[None] < lengths[:, None] - 1, tokens, 0)
  out = tmodel(ctx_tokens, taps=runtime.target_taps(draft), compute_logits=False)
  anchor = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
  ctx_batch = Batch(tokens=ctx_tokens, lengths=lengths - 1, max_new=batch.max_new,
                             stop_tokens=batch.stop_tokens, request_ids=batch.request_ids)
  state = runtime.init_state(draft.dcfg, 1, capacity, tmodel.model.norm.scale.dtype)
  state = runtime.prefill(draft, tmodel, state, out.taps, ctx_batch, anchor)
  keys = sampling.row_keys(key, jnp.zeros((1,), jnp.int32), jnp.int32(1), sampling.TAG_DRAFT)
  return runtime.propose(draft, tmodel, state, anchor, lengths - 1, keys, params, num_draft)


def propose_block(target, draft: Draft, prefix_token_ids, *, temperature: float = 0.0,
                  seed: int = 0, num_draft_tokens: int | None = None):
  """Proposes one draft block after `prefix_token_ids` (its last token is the anchor).

  Returns:
    (tokens int32 `[P]`, logits float32 `[P, V]` the tokens were sampled from (after the
    sequential head), confidence float32 `[P]` (sigmoid applied) or None)
  """
  ids = [int(t) for t in prefix_token_ids]
  if len(ids) < 2:
    raise ValueError("propose_block needs a prefix of >= 2 tokens (context + anchor)")
  target.check_token_ids(ids)
  draft.config.check_target(target.config)
  p = draft.config.block_size if num_draft_tokens is None else int(num_draft_tokens)
  draft.config.check_block(p)
  tp = 1 << max(4, (len(ids) - 1).bit_length())  # power-of-two prompt bucket, as generate
  prefix = np.zeros((tp,), np.int32)
  prefix[:len(ids)] = ids
  params = sampling.SamplingParams.make(temperature)
  prop = _propose_block(target.graphdef, target.params, draft.graphdef, draft.params,
                        draft.runtime, jnp.asarray(prefix), jnp.int32(len(ids)),
                        jax.random.key(seed), params, capacity=tp + 1, num_draft=p)
  conf = None if prop.confidence is None else jax.nn.sigmoid(prop.confidence[0])
  return prop.tokens[0], prop.logits[0], conf
