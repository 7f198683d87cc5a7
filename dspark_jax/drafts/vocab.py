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
  """A copy of `draft` (DSpark / DFlash) that proposes only `token_ids` (target ids)."""
  from dspark_jax.drafts import api
  if draft.algorithm == "eagle3":
    raise ValueError("reduced draft vocabularies are implemented for DSpark/DFlash drafts only")
  ids = np.unique(np.asarray(token_ids, np.int64))
  vocab = draft.config.layer.vocab_size
  if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
    raise ValueError(f"draft vocabulary ids must be a non-empty subset of [0, {vocab})")
  cfg = dataclasses.replace(draft.config, draft_vocab_size=int(ids.size))
  module = api.build_module(cfg, draft.dtype, seed=0)
  old = nnx.state(draft.module)
  nnx.update(module, old)
  module.draft_vocab.value = jnp.asarray(ids, jnp.int32)
  out = api.Draft(cfg, module, dtype=draft.dtype, path=draft.path)
  for attr in ("target", "source_dtype", "num_anchors", "step_loss_decay", "target_name"):
    if hasattr(draft, attr):
      setattr(out, attr, getattr(draft, attr))
  return out
