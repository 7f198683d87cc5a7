"""Top-k / top-p filtering: HF's semantics, and the candidate fast path equals the full sort."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.decoding import sampling

V = 96


def _rows(b, seed=0, ties=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, V)) * rng.uniform(0.3, 4.0, size=(b, 1))  # peaked and flat rows
  if ties:
    x = np.round(x)  # many equal logits, also at the top-k / top-p thresholds
  return jnp.asarray(x, jnp.float32)


def _params(b, seed=1):
  rng = np.random.default_rng(seed)
  temps = rng.choice([0.0, 0.5, 1.0, 1.7], size=b)
  top_k = rng.choice([0, 1, 3, 7, 20, 200], size=b)
  top_p = rng.choice([1.0, 0.95, 0.8, 0.5, 0.05], size=b)
  top_k[0], top_p[0], temps[0] = 0, 0.9, 1.0  # at least one filtered sampled row
  return sampling.SamplingParams.for_rows(temps, top_k, top_p)


def _args(x, params):
  k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, V), V)[:, None]
  return k, jnp.broadcast_to(params.top_p, (x.shape[0],))[:, None]


def _same(got, want):
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_array_equal(np.where(np.isfinite(got), got, 0),
                                np.where(np.isfinite(want), want, 0))


def _scaled(x, params):
  return x / jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]


@pytest.mark.parametrize("ties", [False, True])
def test_bisection_fallback_equals_full_sort(ties):
  params = _params(64)
  x = _scaled(_rows(64, ties=ties), params)
  k, top_p = _args(x, params)
  want = sampling._filter(x, -jnp.sort(-x, axis=-1), k, top_p)[0]
  _same(jax.jit(sampling._bisect_filter)(x, k, top_p), want)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("candidates", [4, 8, 32])
def test_covered_candidate_rows_equal_full_sort(ties, candidates):
  params = _params(64)
  x = _scaled(_rows(64, ties=ties), params)
  k, top_p = _args(x, params)
  want = sampling._filter(x, -jnp.sort(-x, axis=-1), k, top_p)[0]
  got, covered, _ = sampling._filter(x, jax.lax.top_k(x, candidates)[0], k, top_p)
  covered = np.asarray(covered[:, 0])
  assert 0 < covered.sum() < len(covered)  # both kinds of rows occur
  _same(np.asarray(got)[covered], np.asarray(want)[covered])
  # Rows the candidates do not decide keep a non-empty subset of the exact set (the draft's
  # filter, `exact=False`).
  fin_got = np.isfinite(np.asarray(got))[~covered]
  fin_want = np.isfinite(np.asarray(want))[~covered]
  assert fin_got.any(axis=-1).all() and not (fin_got & ~fin_want).any()
  if not ties:
    assert (fin_got.sum(axis=-1) <= candidates).all()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("candidates", [4, 8, 32, V])
def test_exact_filter_does_not_depend_on_candidates(ties, candidates):
  """Through `processed_logits`: a batch some rows of which need the fallback, and a
  single row the candidates decide."""
  x, params = _rows(64, ties=ties), _params(64)
  want = sampling.processed_logits(x, params, candidates=V)  # the whole sorted row
  _same(jax.jit(lambda x: sampling.processed_logits(x, params, candidates=candidates))(x),
        want)
  # Top-p alone: the fallback knows every row's k-th value (-inf) and bisects for top-p only.
  nucleus = sampling.SamplingParams.make(1.0, top_p=0.9)
  _same(sampling.processed_logits(x, nucleus, candidates=candidates),
        sampling.processed_logits(x, nucleus, candidates=V))
  # [B, P+1, V] blocks: the undecided rows are gathered across both leading axes.
  _same(sampling.processed_logits(x.reshape(8, 8, -1), nucleus, candidates=candidates),
        np.asarray(sampling.processed_logits(x, nucleus, candidates=V)).reshape(8, 8, -1))
  one = sampling.SamplingParams.make(1.0, top_k=3, top_p=0.9)
  _same(sampling.processed_logits(x[:1], one, candidates=candidates),
        sampling.processed_logits(x[:1], one, candidates=V))


def test_candidate_path_is_taken_when_every_row_is_covered():
  x = _rows(16, seed=3)
  params = sampling.SamplingParams.make(1.0, top_k=5, top_p=0.9)
  got, covered, _ = sampling._filter(x, jax.lax.top_k(x, 8)[0], jnp.full((16, 1), 5),
                                     jnp.full((16, 1), 0.9))
  assert bool(jnp.all(covered))  # top-5 always lies inside 8 candidates
  _same(got, sampling.processed_logits(x, params, candidates=V))
  _same(sampling.processed_logits(x, params, candidates=8, exact=False), got)
  # top-p alone over a flat row needs more than 4 candidates: that row is not covered.
  flat = jnp.zeros((1, V))
  _, covered, _ = sampling._filter(flat, jax.lax.top_k(flat, 4)[0], jnp.full((1, 1), V),
                                   jnp.full((1, 1), 0.9))
  assert not bool(covered[0, 0])


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (10, 1.0), (10, 0.7), (1, 0.5), (0, 0.3)])
def test_matches_transformers_warpers(top_k, top_p):
  torch = pytest.importorskip("torch")
  from transformers.generation.logits_process import (LogitsProcessorList,
                                                      TemperatureLogitsWarper,
                                                      TopKLogitsWarper, TopPLogitsWarper)
  x = _rows(32, seed=5)
  warpers = [TemperatureLogitsWarper(0.8)]
  if top_k:
    warpers.append(TopKLogitsWarper(top_k))
  if top_p < 1.0:
    warpers.append(TopPLogitsWarper(top_p))
  want = LogitsProcessorList(warpers)(None, torch.tensor(np.asarray(x))).numpy()
  params = sampling.SamplingParams.make(0.8, top_k=top_k, top_p=top_p)
  for candidates in (8, V):
    got = np.asarray(sampling.processed_logits(x, params, candidates=candidates))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_sample_with_probs_is_sample_and_probabilities():
  """The draft keeps the distribution it drew from; it must be the one acceptance would
  recompute, and each token must come from it (greedy rows included)."""
  x = _rows(64)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(64))
  for params in (_params(64), sampling.SamplingParams.make(1.0, top_p=0.9),
                 sampling.SamplingParams.make(0.0)):
    for exact in (True, False):
      tok, probs = sampling.sample_with_probs(keys, x, params, exact=exact)
      if params.greedy:
        assert probs is None
        np.testing.assert_array_equal(tok, np.argmax(x, axis=-1))
        continue
      want = sampling.probabilities(x, params, exact=exact)
      np.testing.assert_allclose(probs, want, rtol=1e-6, atol=1e-7)
      # Each token lies in its row's support (one-hot rows: the argmax).
      assert (np.take_along_axis(np.asarray(want), np.asarray(tok)[:, None], 1) > 0).all()


def test_top_k_only_settings_look_at_fewer_candidates():
  """Without top-p the filter only needs each row's top_k largest logits: the static
  candidate count is the power of two covering them (fewer programs than distinct k)."""
  make, rows = sampling.SamplingParams.make, sampling.SamplingParams.for_rows
  assert make(1.0, 50).candidates == 64 and make(1.0, 3).candidates == 16
  assert make(1.0, 50, 0.9).candidates == 0 and make(1.0, 0, 0.9).candidates == 0
  assert make(1.0, 300).candidates == 0 and make(0.0, 50).candidates == 0
  assert rows([1.0, 0.0], [20, 300], [1.0, 0.5]).candidates == 32  # greedy rows: ignored
  assert rows([1.0, 1.0], [20, 0], [1.0, 1.0]).candidates == 32
  # The exact filter is the full sort's whatever the count (rows with k > count included).
  x = _rows(16, seed=3, ties=True)
  params = rows([1.0] * 16, [1, 3, 7, 20] * 4, [1.0] * 16)
  assert params.candidates == 32
  k, top_p = _args(x, params)
  want = sampling._filter(x, -jnp.sort(-x, axis=-1), k, top_p)[0]
  _same(jax.jit(lambda x: sampling.processed_logits(x, params))(x), want)
