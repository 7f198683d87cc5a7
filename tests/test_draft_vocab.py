"""Reduced draft vocabularies: q = 0 outside N tokens, decoding still exactly the target's."""

import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.demo import tiny as testing
from dspark_jax.decoding import sampling
from dspark_jax.drafts import api as draft_api
from dspark_jax.drafts import vocab
from test_speculative import _chi2_pvalue, sequence_counter


def test_frequent_tokens_keeps_required_ids():
  ids = vocab.frequent_tokens([[1, 1, 2, 5], [5, 5, 1]], 3, 8, always=[7])
  assert ids.tolist() == [1, 5, 7]
  with pytest.raises(ValueError, match="draft vocabulary size"):
    vocab.frequent_tokens([[1]], 9, 8)


def restricted_rig(algorithm="dspark"):
  """(a peaked 6-token target, a draft of block 3 restricted to tokens 0, 2, 3)."""
  cfg = testing.tiny_config("qwen3", vocab=6, layers=2, hidden=32)
  target = testing.random_target(cfg, scale=16.0, seed=11)
  extra = dict(markov_rank=4) if algorithm == "dspark" else {}
  full = draft_api.init_draft(target, algorithm, num_layers=1, block_size=3,
                              target_layer_ids=(0,), seed=3, **extra)
  return target, vocab.restrict_vocab(full, [0, 2, 3])


@pytest.mark.parametrize("algorithm", ["dspark", "eagle3"])
def test_restricted_draft_greedy_roundtrip_and_distribution(algorithm, tmp_path):
  target, draft = restricted_rig(algorithm)
  prompt = [1, 4, 2, 5]
  toks, logits, _ = dj.propose_block(target, draft, prompt, temperature=1.0)
  assert set(np.asarray(toks).tolist()) <= {0, 2, 3}
  assert np.isneginf(np.asarray(logits)[:, [1, 4, 5]]).all()  # q = 0 outside the vocabulary
  # Greedy output equals plain greedy; the restriction survives save/load.
  ref = dj.generate(target, [prompt, [3, 3]], max_new_tokens=10, stop_tokens=[])
  assert dj.generate(target, [prompt, [3, 3]], draft=draft, max_new_tokens=10,
                     stop_tokens=[]).tokens == ref.tokens
  dj.save_draft(draft, tmp_path / "d", target=target)
  loaded = dj.load_draft(tmp_path / "d", target)
  assert loaded.config.algorithm == algorithm and loaded.config.draft_vocab_size == 3
  assert np.asarray(loaded.module.draft_vocab[...]).tolist() == [0, 2, 3]
  # The same weights over the whole vocabulary: every column proposable, greedy still exact.
  lifted = dj.full_vocab(loaded)
  assert lifted.config.draft_vocab_size == 0 and lifted.module.draft_vocab is None
  _, lifted_logits, _ = dj.propose_block(target, lifted, prompt, temperature=1.0)
  _, loaded_logits, _ = dj.propose_block(target, loaded, prompt, temperature=1.0)
  # (Later positions condition on the sampled tokens, which differ between the two.)
  np.testing.assert_allclose(np.asarray(lifted_logits)[0, [0, 2, 3]],
                             np.asarray(loaded_logits)[0, [0, 2, 3]], rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(lifted_logits)).all()
  assert dj.generate(target, [prompt, [3, 3]], draft=lifted, max_new_tokens=10,
                     stop_tokens=[]).tokens == ref.tokens
  # T=1: three-token sequences follow the target's law exactly (tokens outside the draft
  # vocabulary come from the residual).
  params = sampling.SamplingParams.make(1.0)
  probs, count = sequence_counter(target, prompt, params)
  n = 20_000
  res = dj.generate(target, [prompt] * n, draft=draft, max_new_tokens=3, stop_tokens=[],
                    temperature=1.0, seed=7, batch_size=4096)
  counts = count(res.tokens)
  assert 1.05 < res.stats.tau
  assert _chi2_pvalue(counts, probs) > 1e-3


def test_bfloat16_export_keeps_large_draft_vocab_ids_exact(tmp_path):
  """Token ids are integers on disk whatever the weight dtype (bf16 would merge ids > 256)."""
  cfg = testing.tiny_config("qwen3", vocab=1200, layers=2, hidden=32)
  target = testing.random_target(cfg, seed=2)
  full = draft_api.init_draft(target, "dspark", num_layers=1, block_size=3,
                              target_layer_ids=(0,), markov_rank=4, seed=3)
  ids = [0, 257, 259, 1001, 1003, 1199]
  dj.save_draft(vocab.restrict_vocab(full, ids), tmp_path / "d", target=target, dtype="bfloat16")
  loaded = dj.load_draft(tmp_path / "d", target)
  assert np.asarray(loaded.module.draft_vocab[...]).tolist() == ids
