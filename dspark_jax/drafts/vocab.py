"""Reduced draft vocabularies: the N most frequent target tokens of a corpus.

A draft restricted to N tokens runs its LM head and sampler over N columns instead of
V (49k for SmolLM2, 262k for Gemma): on a CPU that is most of the propose time. Its
proposal distribution q is zero outside the N tokens; exact speculative sampling only
needs q(x) for the proposed x and the residual max(p - q, 0), so outputs stay exactly
the target's (the target can still emit any token). EAGLE3 ships the same idea as its
d2t / t2d maps.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx


def frequent_tokens(token_lists: Iterable[Sequence[int]], n: int, vocab_size: int,
                    always: Sequence[int] = ()) -> np.ndarray:
  """The `n` most frequent ids (ties: smaller id first), `always` included; sorted int32."""
  counts = np.zeros((vocab_size,), np.int64)
  for toks in token_lists:
    np.add.at(counts, np.asarray(toks, np.int64), 1)
  must = sorted({int(t) for t in always if 0 <= int(t) < vocab_size})
  if n < len(must) or n > vocab_size:
    raise ValueError(f"draft vocabulary size {n} must be in [{len(must)}, {vocab_size}]")
  counts[must] = np.iinfo(np.int64).max
  order = np.lexsort((np.arange(vocab_size), -counts))
  return np.sort(order[:n]).astype(np.int32)


def restrict_vocab(draft, token_ids: Sequence[int]):
  """A copy of `draft` that proposes only `token_ids` (target ids)."""
  ids = np.unique(np.asarray(token_ids, np.int64))
  vocab = draft.config.layer.vocab_size
  if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
    raise ValueError(f"draft vocabulary ids must be a non-empty subset of [0, {vocab})")
  return _with_vocab(draft, ids)


def full_vocab(draft):
  """A copy of `draft` proposing over the whole target vocabulary (its weights unchanged: the
  LM head is the target's and the Markov head has a row per target token), to measure what
  a reduced vocabulary costs or saves."""
  return _with_vocab(draft, None)


def _with_vocab(draft, ids: np.ndarray | None):
  from dspark_jax.drafts import api
  cfg = dataclasses.replace(draft.config, draft_vocab_size=0 if ids is None else int(ids.size))
  module = api.build_module(cfg, draft.dtype, seed=0)
  weights = nnx.to_pure_dict(nnx.state(draft.module))
  weights.pop("draft_vocab", None)
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, weights)
  nnx.update(module, state)
  if ids is not None:
    module.draft_vocab.value = jnp.asarray(ids, jnp.int32)
  out = api.Draft(cfg, module, dtype=draft.dtype, path=draft.path)
  for attr in ("target", "source_dtype", "num_anchors", "step_loss_decay", "target_name"):
    if hasattr(draft, attr):
      setattr(out, attr, getattr(draft, attr))
  return out
