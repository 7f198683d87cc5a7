"""The draft-verify loop is lossless: greedy token equality and sampled distributions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sstats

import dspark_jax as dj
from dspark_jax.demo import tiny as testing
from dspark_jax.decoding import sampling, speculative
from dspark_jax.decoding import loop as loop_lib
from dspark_jax.decoding.state import Proposal
from dspark_jax.drafts import api as draft_api
from spec_rigs import OracleDraft

PROMPTS = [[1, 5, 9, 3, 10, 7, 8, 2, 3, 4, 11], [4, 2, 9, 1, 0], [7, 7], [3, 1, 4, 1, 5, 9, 2]]
DRAFT_KINDS = [
    ("dspark", dict(markov_head_type="vanilla")),
    ("dspark", dict(markov_head_type="gated")),
    ("dspark", dict(markov_head_type="rnn")),
    ("dflash", dict()),
    ("dflash", dict(anchor_first=False)),
    ("eagle3", dict()),
]


@pytest.fixture(scope="module")
def target():
  # A small vocab makes random drafts agree with the target now and then: mixed acceptance.
  cfg = testing.tiny_config("qwen3", vocab=12, layers=4)
  return testing.random_target(cfg, scale=12.0, seed=2)


def _draft(target, algorithm, kw, seed=0):
  return draft_api.init_draft(target, algorithm, num_layers=1 if algorithm == "eagle3" else 2,
                              block_size=4, target_layer_ids=(0, 2), markov_rank=8, seed=seed,
                              **kw)


@pytest.mark.parametrize("algorithm,kw", DRAFT_KINDS,
                         ids=[f"{a}-{'-'.join(map(str, k.values())) or 'base'}"
                              for a, k in DRAFT_KINDS])
def test_greedy_speculative_equals_greedy(target, algorithm, kw):
  ref = dj.generate(target, PROMPTS, max_new_tokens=17, stop_tokens=[])
  for seed in range(3):
    res = dj.generate(target, PROMPTS, draft=_draft(target, algorithm, kw, seed),
                      max_new_tokens=17, stop_tokens=[])
    assert res.tokens == ref.tokens
  acc = [a for row in res.stats.accept_lengths for a in row]
  assert sum(acc) >= sum(len(t) for t in ref.tokens) - len(PROMPTS)  # every token accounted for
  assert res.stats.tau >= 1.0


def test_random_drafts_give_mixed_acceptance(target):
  seen = set()
  for seed in range(4):
    res = dj.generate(target, PROMPTS, draft=_draft(target, "dspark", {}, seed),
                      max_new_tokens=17, stop_tokens=[])
    seen.update(a for row in res.stats.accept_lengths for a in row)
  assert 1 in seen and len(seen) >= 2, seen  # some rejections and some acceptances


@pytest.mark.parametrize("pattern", ["all", "none", "mixed"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_acceptance_patterns(target, pattern, temperature):
  p = 4
  n = len(PROMPTS)
  if pattern == "all":
    table = np.zeros((n, p), bool)
  elif pattern == "none":
    table = np.ones((n, p), bool)
  else:  # row r rejects at position r (row 3: never)
    table = np.zeros((n, p), bool)
    for r in range(3):
      table[r, r] = True
  draft = OracleDraft(target, p, table)
  kw = dict(max_new_tokens=13, stop_tokens=[], temperature=temperature, seed=5)
  ref = dj.generate(target, PROMPTS, **kw)
  res = dj.generate(target, PROMPTS, draft=draft, **kw)
  if temperature == 0.0:
    assert res.tokens == ref.tokens
  for r, row in enumerate(res.stats.accept_lengths):
    full = row[:-1]  # the last round may be cut by max_new_tokens
    if pattern == "all" or (pattern == "mixed" and r == 3):
      assert all(a == p + 1 for a in full), row
    elif pattern == "none":
      assert all(a == 1 for a in row), row
    else:
      assert all(a == r + 1 for a in full), row


def test_stop_token_inside_accepted_drafts(target):
  ref = dj.generate(target, PROMPTS, max_new_tokens=16, stop_tokens=[])
  stop = ref.tokens[0][5]
  draft = OracleDraft(target, 4, np.zeros((len(PROMPTS), 4), bool))
  res = dj.generate(target, PROMPTS, draft=draft, max_new_tokens=16, stop_tokens=[stop])
  plain = dj.generate(target, PROMPTS, max_new_tokens=16, stop_tokens=[stop])
  assert res.tokens == plain.tokens
  assert res.tokens[0][-1] == stop and res.stats.finish_reasons[0] == "stop"


def test_verify_length_per_row(target):
  ref = dj.generate(target, PROMPTS, max_new_tokens=12, stop_tokens=[])
  draft = OracleDraft(target, 4, np.zeros((len(PROMPTS), 4), bool))
  res = dj.generate(target, PROMPTS, draft=draft, max_new_tokens=12, stop_tokens=[],
                    verify_lengths=[0, 1, 2, 4])
  assert res.tokens == ref.tokens
  for r, ell in enumerate([0, 1, 2, 4]):
    assert all(v == ell for v in res.stats.verify_lengths[r])
    assert all(a == ell + 1 for a in res.stats.accept_lengths[r][:-1])


# ---- the acceptance rule in isolation -------------------------------------------------------
def _chi2_pvalue(counts, probs):
  expected = probs * counts.sum()
  keep = expected >= 5
  obs = np.append(counts[keep], counts[~keep].sum())
  exp = np.append(expected[keep], expected[~keep].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return sstats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_accept_rule_recovers_target_distribution():
  """x ~ q, then accept/residual: the emitted token must be distributed as p."""
  v, n = 5, 200_000
  p = np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32)
  q = np.array([0.1, 0.4, 0.1, 0.3, 0.1], np.float32)
  key = jax.random.key(0)
  kx, ka, ks = jax.random.split(key, 3)
  x = jax.random.categorical(kx, jnp.log(q), shape=(n,)).astype(jnp.int32)
  prop = Proposal(tokens=x[:, None], logits=jnp.broadcast_to(jnp.log(q), (n, 1, v)),
                              confidence=None)
  tl = jnp.broadcast_to(jnp.log(p), (n, 2, v))
  params = sampling.SamplingParams.make(1.0)
  n_acc, nxt = speculative.accept(tl, prop, jnp.ones((n,), jnp.int32), jax.random.split(ka, n),
                                  jax.random.split(ks, n), params)
  emitted = np.where(np.asarray(n_acc) == 1, np.asarray(x), np.asarray(nxt))
  assert _chi2_pvalue(np.bincount(emitted, minlength=v), p) > 1e-3
  # Acceptance rate equals sum(min(p, q)) (= 1 - TV).
  assert abs(np.asarray(n_acc).mean() - np.minimum(p, q).sum()) < 0.01


# ---- end to end: 3-token sequences over 20k samples --------------------------------------------
def exact_sequence_probs(target, prompt, params, vocab, length=3):
  seqs = np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)
  ids = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
  logits = np.asarray(target.logits(ids))
  n = len(prompt)
  probs = np.asarray(sampling.probabilities(jnp.asarray(logits[:, n - 1:n - 1 + length]), params))
  per_step = np.take_along_axis(probs, seqs[:, :, None], axis=2)[..., 0]
  return seqs, per_step.prod(axis=1)


def sequence_counter(target, prompt, params, length=3):
  """(exact probabilities of every `length`-token continuation of `prompt`, a function
  counting generated continuations `[n, length]` into the same order)."""
  seqs, probs = exact_sequence_probs(target, prompt, params, target.config.vocab_size, length)
  index = {tuple(s): i for i, s in enumerate(seqs)}

  def count(tokens):
    c = np.zeros(len(seqs))
    for t in tokens:
      c[index[tuple(t)]] += 1
    return c

  return probs, count


def always_accept(target_logits, proposal, verify_len, keys_accept, keys_sample, params):
  """A broken rule: accepts every draft, so outputs follow the draft, not the target."""
  n_acc = verify_len
  pt = sampling.probabilities(target_logits, params)
  rows = jnp.arange(n_acc.shape[0])
  return n_acc, sampling.sample_from_probs(keys_sample, pt[rows, n_acc])


@pytest.fixture(scope="module")
def peaked_target():
  cfg = testing.tiny_config("qwen3", vocab=6, layers=2, hidden=32)
  return testing.random_target(cfg, scale=16.0, seed=11)


@pytest.mark.parametrize("temperature,top_k,top_p,candidates", [
    (1.0, 0, 1.0, None), (0.7, 3, 1.0, None),
    # Two candidates: the draft samples from a nucleus cut to its 2 largest logits, the
    # target's filter falls back to the bisection; the output must still be exact.
    (1.0, 0, 0.95, 2)])
def test_sampled_speculative_matches_target_distribution(peaked_target, temperature, top_k,
                                                         top_p, candidates, monkeypatch,
                                                         request):
  target = peaked_target
  prompt = [1, 4, 2, 5]
  n = 20_000
  draft = draft_api.init_draft(target, "dspark", num_layers=1, block_size=3,
                               target_layer_ids=(0,), markov_rank=4, seed=3)
  params = sampling.SamplingParams.make(temperature, top_k, top_p)
  probs, count = sequence_counter(target, prompt, params)  # the sorted definition
  if candidates is not None:  # read at trace time: retrace everything with it
    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    jax.clear_caches()
    request.addfinalizer(jax.clear_caches)  # no program traced with it outlives the test

  def counts_for(accept_rule):
    res = dj.generate(target, [prompt] * n, draft=draft, max_new_tokens=3, stop_tokens=[],
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=42,
                      batch_size=4096, acceptance=accept_rule)
    return count(res.tokens), res

  counts, res = counts_for("exact")
  tau = res.stats.tau
  assert 1.05 < tau < 3.95, tau  # mixed acceptance: the test exercises both branches
  assert _chi2_pvalue(counts, probs) > 1e-3
  tv = 0.5 * np.abs(counts / n - probs).sum()
  assert tv < 0.05, tv

  speculative.ACCEPT_RULES["always"] = always_accept
  try:
    broken, _ = counts_for("always")
  finally:
    speculative.ACCEPT_RULES.pop("always")
  assert _chi2_pvalue(broken, probs) < 1e-6, "the test cannot detect a broken acceptance rule"


def test_markov_head_probabilities_are_softmax_of_corrected_logits(target):
  """The logits used in acceptance are U_k + B_k(x_{k-1}) of the sampled prefix."""
  draft = _draft(target, "dspark", {}, seed=1)
  prefix = PROMPTS[0]
  toks, logits, conf = dj.propose_block(target, draft, prefix, temperature=1.0, seed=4)
  # Recompute U (backbone, independent of the sampled tokens) and B from W1/W2 by hand.
  module = draft.module
  from dspark_jax.drafts import parallel
  tmodel = target.model
  out = tmodel(jnp.asarray([prefix[:-1]]), taps=draft.config.target_layer_ids)
  from dspark_jax.decoding.cache import KVCache
  ctx = KVCache.init(draft.config.layer, 1, 32, jnp.float32)
  pos = jnp.arange(len(prefix) - 1)[None]
  ctx = parallel.ingest(module, ctx, out.taps, pos).commit(jnp.array([len(prefix) - 1]))
  emb = tmodel.embed(parallel.block_tokens(draft.config, jnp.array([prefix[-1]])))
  h = parallel.block_hidden(module, emb, jnp.array([len(prefix) - 1]), ctx)
  u = tmodel.logits_from_hidden(h)[0]
  prev = np.concatenate([[prefix[-1]], np.asarray(toks)[:-1]])
  w1 = np.asarray(module.markov_head.markov_w1.embedding[...])
  w2 = np.asarray(module.markov_head.markov_w2.kernel[...])
  expected = np.asarray(u) + w1[prev] @ w2
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)
  # ... and the confidence is sigmoid(w . [h ; W1[prev]] + b).
  cw = np.asarray(module.confidence_head.proj.kernel[...])[:, 0]
  cb = float(np.asarray(module.confidence_head.proj.bias[...])[0])
  feats = np.concatenate([np.asarray(h[0]), w1[prev]], axis=1)
  np.testing.assert_allclose(np.asarray(conf), 1 / (1 + np.exp(-(feats @ cw + cb))), atol=1e-5)


def test_propose_verify_accept_commit_pieces(target):
  """Unit checks of verify (T = P+1 at per-row offsets) and committed_tokens."""
  from dspark_jax.decoding import commit
  from dspark_jax.decoding.cache import KVCache
  tmodel = target.model
  toks = jnp.array([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]], jnp.int32)
  full = tmodel(toks).logits
  cache = KVCache.init(target.config, 2, 16)
  cache = tmodel(toks[:, :2], cache=cache.commit(jnp.zeros(2, jnp.int32))).cache
  cache = cache.commit(jnp.array([2, 2]))
  logits, _, pending = speculative.verify(tmodel, cache, toks[:, 2], toks[:, 3:6])
  np.testing.assert_allclose(logits, full[:, 2:6], atol=1e-5)
  cache2 = cache.write_pending(pending)
  assert (np.asarray(cache2.lengths) == [2, 2]).all()  # verify never commits
  # The deferred K/V are the ones a writing forward puts in the cache.
  written = tmodel(toks[:, 2:6], cache.lengths[:, None] + jnp.arange(4)[None, :],
                   cache=cache).cache
  for a, b in zip(cache2.k + cache2.v, written.k + written.v):
    np.testing.assert_allclose(a, b, atol=1e-5)
  t, n, hit = commit.round_tokens(jnp.array([[7, 8, 9], [7, 8, 9]]), jnp.array([2, 3]),
                                  jnp.array([1, 2]), jnp.array([[8], [-1]]))
  assert np.asarray(n).tolist() == [2, 4] and np.asarray(hit).tolist() == [True, False]
  assert np.asarray(t)[1].tolist() == [7, 8, 9, 2]


def test_spec_compiles_once_per_bucket(target):
  draft = _draft(target, "dspark", {}, seed=0)
  # An output bucket (64) no other test of this target uses, so the count does not depend on
  # which programs earlier tests compiled.
  kw = dict(draft=draft, max_new_tokens=33, stop_tokens=[])
  dj.generate(target, [[1, 2, 3]], **kw)
  before = loop_lib.TRACE_COUNTS["spec_generate"]
  dj.generate(target, [[3, 2, 1, 4, 5]], **kw)
  dj.generate(target, [[9, 9]], temperature=1.0, **kw)  # greedy/sampled are distinct programs
  dj.generate(target, [[9, 8]], temperature=0.5, **kw)  # ... but temperature values are not
  assert loop_lib.TRACE_COUNTS["spec_generate"] == before + 1


def test_draft_block_larger_than_trained_is_an_error(target):
  draft = _draft(target, "dspark", {})
  with pytest.raises(ValueError, match="exceeds the trained block size 4"):
    dj.generate(target, PROMPTS, draft=draft, num_draft_tokens=5, max_new_tokens=4)
