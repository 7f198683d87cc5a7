"""Rigged draft runtimes for testing the draft-verify loop mechanics.

`OracleRuntime` proposes with the *target itself* (its own copy of the target cache),
so q == p: every draft is accepted (greedy and sampled). A per-(row, position)
corruption pattern turns chosen proposals into a different token, giving forced
rejections at known positions: all-accept, none-accept and mixed rows in one batch.
"""

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.decoding import sampling
from dspark_jax.decoding.cache import KVCache
from dspark_jax.decoding.state import Proposal


@dataclasses.dataclass(frozen=True)
class OracleConfig:
  """Mimics DraftConfig where the loop/setup reads it."""

  block_size: int
  layer: object = None  # the target's ModelConfig (the oracle's cache has its geometry)
  algorithm: str = "oracle"

  def check_target(self, cfg):
    pass

  def check_block(self, p):
    assert 1 <= p <= self.block_size


class OracleModule:
  """Stands in for the draft module (no params)."""


def make_oracle_runtime(corrupt_table):
  """corrupt_table: bool `[num_requests, P]` as a tuple of tuples (static)."""

  class OracleRuntime:
    @staticmethod
    def target_taps(draft):
      return ()

    @staticmethod
    def init_state(dcfg, batch, capacity, dtype):
      return (KVCache.init(dcfg.layer, batch, capacity, dtype), jnp.zeros((batch,), jnp.int32))

    @staticmethod
    def prefill(draft, tmodel, state, prompt_taps, batch, first):
      cache = state[0]
      out = tmodel(batch.tokens, cache=cache.commit(jnp.zeros_like(batch.lengths)),
                   attend_len=batch.tokens.shape[1], compute_logits=False)
      return (out.cache.commit(batch.lengths), batch.request_ids)

    @staticmethod
    def propose(draft, tmodel, state, anchor, anchor_pos, keys, params, p):
      cache, rids = state
      table = jnp.asarray(corrupt_table, bool)[rids]  # [B, P]
      toks, logits = [], []
      tok = anchor
      length = cache.lengths
      for k in range(p):
        out = tmodel(tok[:, None], (length + k)[:, None], cache=cache)
        cache = out.cache
        lg = out.logits[:, 0]
        kk = jax.vmap(lambda key: jax.random.fold_in(key, k))(keys)
        tok = sampling.sample(kk, lg, params, exact=False)  # drawn as a draft is
        vocab = lg.shape[-1]
        if params.greedy:
          bad = (tok + 1) % vocab
        else:
          # A corrupted slot proposes a token the target gives zero mass under the filtered
          # distribution if one exists; otherwise the least likely token.
          bad = jnp.argmin(sampling.processed_logits(lg, params), axis=-1).astype(jnp.int32)
        tok = jnp.where(table[:, k], bad, tok)
        # The "draft distribution" reported for a corrupted slot is a point mass on it.
        lg = jnp.where(table[:, k][:, None], jnp.where(
            jnp.arange(vocab)[None] == tok[:, None], 0.0, -1e9), lg)
        toks.append(tok)
        logits.append(lg)
      return Proposal(tokens=jnp.stack(toks, 1), logits=jnp.stack(logits, 1), confidence=None)

    @staticmethod
    def commit(draft, tmodel, state, verify_taps, verify_tokens, n_acc, nxt, old_len, new_len):
      cache, rids = state
      positions = old_len[:, None] + jnp.arange(verify_tokens.shape[1])[None]
      out = tmodel(verify_tokens, positions, cache=cache, compute_logits=False)
      return (out.cache.commit(new_len), rids)

  return OracleRuntime


class OracleDraft:
  """Duck-types `Draft` for `generate(..., draft=...)`."""

  def __init__(self, target, block_size, corrupt_table):
    self.config = OracleConfig(block_size, target.config)
    self.algorithm = "oracle"
    self.dtype = jnp.float32
    self._runtime = make_oracle_runtime(tuple(tuple(bool(x) for x in row) for row in corrupt_table))
    import flax.nnx as nnx

    class _Empty(nnx.Module):
      pass
    self.graphdef, self.params = nnx.split(_Empty())

  @property
  def runtime(self):
    return self._runtime
