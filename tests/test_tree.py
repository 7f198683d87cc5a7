"""Token-tree verification: topology, the acceptance rules (reference, kernel, chain
equivalence), and end to end: greedy trees equal plain greedy, sampled trees follow the
target's distribution exactly and a broken tree rule is caught."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.decoding import sampling, speculative
from dspark_jax.demo import tiny as testing
from dspark_jax.drafts import api as draft_api
from dspark_jax.kernels import draw
from dspark_jax.kernels.prefix_accept import reference as pa_ref
from dspark_jax.kernels.tree_accept import pallas as ta_pallas
from dspark_jax.kernels.tree_accept import reference as ta_ref
from dspark_jax.kernels.tree_accept import TreeShape
from test_speculative import _chi2_pvalue, sequence_counter

COMPILED = [pytest.param(True, id="interpret"),
            pytest.param(False, id="compiled", marks=pytest.mark.gpu)]


def test_tree_shape_topology():
  t = TreeShape.parse("2,2,1")
  assert (t.num_draft, t.width, t.level_sizes, t.offsets) == (3, 11, (1, 2, 4, 4), (0, 1, 3, 7))
  assert t.parent.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6]
  assert t.depth.tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
  assert t.first_child.tolist()[:7] == [1, 3, 5, 7, 8, 9, 10]
  assert t.ancestors[9].tolist() == [0, 2, 5, 9] and t.ancestors[4].tolist() == [0, 1, 4, 4]
  # each node sees exactly its ancestors and itself
  assert t.mask.sum(1).tolist() == (t.depth + 1).tolist()
  assert t.mask[9].nonzero()[0].tolist() == [0, 2, 5, 9]
  assert TreeShape.chain(4).width == 5 and hash(t) == hash(TreeShape((2, 2, 1)))
  for bad in ("2,0", "", "a,b"):
    with pytest.raises(ValueError, match="tree|branching"):
      TreeShape.parse(bad)


def _tree_inputs(shape, b, v, seed, hit=0.5):
  """Random p, q (shared by siblings), node tokens biased towards the target's argmax after
  their parent so that walks go deep."""
  k = jax.random.split(jax.random.key(seed), 6)
  w = shape.width
  logits = jax.random.normal(k[0], (b, w, v)) * 2.5
  p = jax.nn.softmax(logits, -1)
  q = jax.nn.softmax(jax.random.normal(k[1], (b, w, v)) * 2.0, -1)[:, shape.parent]
  tok = jax.random.randint(k[2], (b, w), 0, v)
  best = jnp.argmax(logits, -1)[:, shape.parent]
  tok = jnp.where(jax.random.uniform(k[3], (b, w)) < hit, best, tok).astype(jnp.int32)
  u = jax.random.uniform(k[4], (b, w))
  return logits, p, q, tok, u, jax.random.uniform(k[5], (b,))


def test_chain_tree_is_prefix_accept():
  shape = TreeShape.chain(4)
  for seed in range(3):
    logits, p, q, tok, u, su = _tree_inputs(shape, 16, 29, seed)
    full = jnp.full((16,), 4, jnp.int32)
    n, nxt, leaf = ta_ref.tree_accept(p, q, tok, u, su, shape)
    want = pa_ref.prefix_accept(p, q[:, 1:], tok[:, 1:], full, u[:, 1:], su)
    np.testing.assert_array_equal(n, want[0])
    np.testing.assert_array_equal(nxt, want[1])
    np.testing.assert_array_equal(leaf, n)  # a chain's node id is its depth
    g = ta_ref.greedy_tree_accept(logits, tok, shape)
    gw = pa_ref.greedy_accept(logits, tok[:, 1:], full)
    np.testing.assert_array_equal(g[0], gw[0])
    np.testing.assert_array_equal(g[1], gw[1])


@pytest.mark.parametrize("interpret", COMPILED)
@pytest.mark.parametrize("branching,v,tile", [((3, 2, 1), 37, 8), ((1,), 16, 16),
                                              ((2, 1, 3), 45, 16)],
                         ids=["3x2x1", "1", "2x1x3"])
def test_tree_kernel_matches_reference(branching, v, tile, interpret):
  shape = TreeShape(branching)
  seen = set()
  for seed in range(3):
    logits, p, q, tok, u, su = _tree_inputs(shape, 5, v, seed)
    want = ta_ref.tree_accept(p, q, tok, u, su, shape)
    got = ta_pallas.tree_accept(p, q, tok, u, su, shape=shape, tile=tile, interpret=interpret)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
    seen.update(np.asarray(want[0]).tolist())
    want = ta_ref.greedy_tree_accept(logits, tok, shape)
    got = ta_pallas.greedy_tree_accept(logits, tok, shape=shape, tile=tile, interpret=interpret)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
  assert len(seen) > 1 or shape.num_draft == 1


def _emitted_first_token(rule, p, q, k, n, seed):
  """One tree level of k i.i.d. children: the token emitted at depth 1 (accepted child, or
  the token drawn from the residual), over n independent trials."""
  shape = TreeShape((k,))
  v = p.shape[0]
  keys = jax.random.split(jax.random.key(seed), 3)
  children = jax.random.categorical(keys[0], jnp.log(q), shape=(n, k)).astype(jnp.int32)
  tok = jnp.concatenate([jnp.zeros((n, 1), jnp.int32), children], axis=1)
  pp = jnp.broadcast_to(p, (n, k + 1, v))
  qq = jnp.broadcast_to(q, (n, k + 1, v))
  u = jax.random.uniform(keys[1], (n, k + 1))
  n_acc, nxt, leaf = rule(pp, qq, tok, u, jax.random.uniform(keys[2], (n,)), shape)
  return np.where(np.asarray(n_acc) == 1, np.asarray(tok)[np.arange(n), np.asarray(leaf)],
                  np.asarray(nxt))


def _no_residual_rule(p, q, tokens, uniforms, sample_uniform, shape):
  """Broken: every sibling is tested against p itself, not the residual earlier rejections
  left (over-accepts tokens q favours)."""
  rows = jnp.arange(tokens.shape[0])
  ok = uniforms[:, 1:] * q[rows, 1][rows[:, None], tokens[:, 1:]] < p[rows, 0][
      rows[:, None], tokens[:, 1:]]
  first = jnp.argmax(ok, axis=1)
  acc = jnp.any(ok, axis=1)
  residual = jnp.maximum(p[:, 0] - q[:, 1], 0.0)
  nxt = draw.inverse_cdf(sample_uniform, residual)
  return acc.astype(jnp.int32), nxt, jnp.where(acc, first + 1, 0)


def test_multi_draft_rule_recovers_target_distribution():
  p = jnp.asarray([0.45, 0.25, 0.15, 0.1, 0.05])
  q = jnp.asarray([0.05, 0.5, 0.1, 0.3, 0.05])
  n = 100_000
  for k in (2, 3):
    emitted = _emitted_first_token(ta_ref.tree_accept, p, q, k, n, seed=k)
    assert _chi2_pvalue(np.bincount(emitted, minlength=5), np.asarray(p)) > 1e-3
  broken = _emitted_first_token(_no_residual_rule, p, q, 3, n, seed=7)
  assert _chi2_pvalue(np.bincount(broken, minlength=5), np.asarray(p)) < 1e-6, \
      "the test cannot detect a broken multi-draft rule"


@pytest.fixture(scope="module")
def target():
  cfg = testing.tiny_config("qwen3", vocab=12, layers=4)
  return testing.random_target(cfg, scale=12.0, seed=2)


PROMPTS = [[1, 5, 9, 3, 10, 7, 8, 2, 3, 4, 11], [4, 2, 9, 1, 0], [7, 7], [3, 1, 4, 1, 5, 9, 2]]


@pytest.mark.parametrize("algorithm,kw,tree", [
    ("dspark", dict(markov_head_type="vanilla"), "3,2,1,1"),
    ("dspark", dict(markov_head_type="rnn"), "2,2,2"),
    ("dflash", dict(), "2,1,2")], ids=["dspark-vanilla", "dspark-rnn", "dflash"])
def test_greedy_tree_equals_greedy(target, algorithm, kw, tree):
  ref = dj.generate(target, PROMPTS, max_new_tokens=17, stop_tokens=[])
  draft = draft_api.init_draft(target, algorithm, num_layers=2, block_size=4,
                               target_layer_ids=(0, 2), markov_rank=8, seed=1, **kw)
  chain = dj.generate(target, PROMPTS, draft=draft, max_new_tokens=17, stop_tokens=[],
                      num_draft_tokens=len(tree.split(",")))
  res = dj.generate(target, PROMPTS, draft=draft, max_new_tokens=17, stop_tokens=[], tree=tree)
  assert res.tokens == ref.tokens
  assert res.stats.tau > chain.stats.tau  # top-k children recover rejected chain tokens


def test_tree_setup_errors(target):
  dspark = draft_api.init_draft(target, "dspark", num_layers=1, block_size=3,
                                target_layer_ids=(0,), markov_rank=4)
  eagle = draft_api.init_draft(target, "eagle3", num_layers=1, block_size=3,
                               target_layer_ids=(0, 1, 2))
  run = lambda **kw: dj.generate(target, [[1, 2]], max_new_tokens=2, **kw)
  with pytest.raises(ValueError, match="block draft"):
    run(draft=eagle, tree="2,1")
  with pytest.raises(ValueError, match="chains only"):
    run(draft=dspark, tree="2,1", scheduler="early_stop")
  with pytest.raises(ValueError, match="depth 2"):
    run(draft=dspark, tree="2,1", num_draft_tokens=3)
  with pytest.raises(ValueError, match="block"):
    run(draft=dspark, tree="2,1,1,1")  # deeper than the trained block


def _first_path_rule(target_logits, proposal, keys_accept, keys_sample, params, shape):
  """Broken: always accepts the first-child path, so outputs follow the draft."""
  b = proposal.tokens.shape[0]
  leaf = jnp.full((b,), shape.offsets[-1], jnp.int32)  # first-child path: the first leaf
  pt = sampling.probabilities(target_logits, params)
  nxt = sampling.sample_from_probs(keys_sample, pt[jnp.arange(b), leaf])
  return jnp.full((b,), shape.num_draft, jnp.int32), nxt, leaf


def test_sampled_tree_matches_target_distribution():
  cfg = testing.tiny_config("qwen3", vocab=6, layers=2, hidden=32)
  target = testing.random_target(cfg, scale=16.0, seed=11)
  prompt = [1, 4, 2, 5]
  n = 20_000
  draft = draft_api.init_draft(target, "dspark", num_layers=1, block_size=3,
                               target_layer_ids=(0,), markov_rank=4, seed=3)
  probs, count = sequence_counter(target, prompt, sampling.SamplingParams.make(1.0))

  def counts_for(rule):
    res = dj.generate(target, [prompt] * n, draft=draft, max_new_tokens=3, stop_tokens=[],
                      temperature=1.0, seed=42, batch_size=4096, acceptance=rule, tree="2,2,1")
    return count(res.tokens), res

  counts, res = counts_for("exact")
  assert 1.05 < res.stats.tau < 3.95, res.stats.tau  # both accept and reject branches taken
  assert _chi2_pvalue(counts, probs) > 1e-3
  assert 0.5 * np.abs(counts / n - probs).sum() < 0.05
  speculative.TREE_ACCEPT_RULES["first_path"] = _first_path_rule
  try:
    broken, _ = counts_for("first_path")
  finally:
    speculative.TREE_ACCEPT_RULES.pop("first_path")
  assert _chi2_pvalue(broken, probs) < 1e-6, "the test cannot detect a broken tree rule"


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
def test_tree_generation_with_pallas_kernels_equals_default(target, temperature, monkeypatch):
  draft = draft_api.init_draft(target, "dspark", num_layers=1, block_size=3,
                               target_layer_ids=(0, 1), markov_rank=8, seed=1)
  kw = dict(draft=draft, max_new_tokens=7, stop_tokens=[], tree="2,1",
            temperature=temperature, seed=3)
  monkeypatch.delenv("DSPARK_KERNELS", raising=False)
  want = dj.generate(target, PROMPTS[:3], **kw)
  calls = []
  name = "greedy_tree_accept" if temperature == 0 else "tree_accept"
  fn = getattr(ta_pallas, name)
  monkeypatch.setattr(ta_pallas, name, lambda *a, **k: calls.append(name) or fn(*a, **k))
  monkeypatch.setenv("DSPARK_KERNELS", "pallas")
  jax.clear_caches()
  try:
    got = dj.generate(target, PROMPTS[:3], **kw)
  finally:
    jax.clear_caches()
  assert calls  # the kernel was traced in
  assert got.tokens == want.tokens
  assert got.stats.accept_lengths == want.stats.accept_lengths


def test_continuous_batcher_with_a_tree_matches_generate(target):
  """Tree rounds in the server's batcher: every request (greedy and sampled rows in one
  batch, admitted as slots free up) equals its own `generate` with the same tree."""
  from dspark_jax.engine.batcher import ContinuousBatcher, Request
  draft = draft_api.init_draft(target, "dspark", num_layers=1, block_size=3,
                               target_layer_ids=(0, 1), markov_rank=8, seed=0)
  b = ContinuousBatcher(target, draft, slots=2, max_new_tokens=12, rounds_per_step=2, seed=3,
                        tree="2,1,1")
  lens, temps = [9, 12, 5], [0.0, 1.0, 0.0]
  reqs = [Request(prompt=PROMPTS[i], max_new_tokens=lens[i], temperature=temps[i],
                  stop_tokens=[], request_id=i) for i in range(3)]
  b.run(reqs)
  for i, r in enumerate(reqs):
    want = dj.generate(target, [PROMPTS[i]], draft=draft, max_new_tokens=lens[i],
                       stop_tokens=[], temperature=temps[i], seed=3, request_ids=[i],
                       tree="2,1,1").tokens[0]
    assert r.tokens == want, i


def test_tree_over_a_reduced_draft_vocabulary_is_exact():
  """Tree nodes drawn over a reduced draft vocabulary (q = 0 elsewhere): greedy equals plain
  greedy and T=1 continuations follow the target's law (tokens outside the vocabulary come
  from the residuals)."""
  from test_draft_vocab import restricted_rig
  target, draft = restricted_rig()
  prompt = [1, 4, 2, 5]
  ref = dj.generate(target, [prompt, [3, 3]], max_new_tokens=10, stop_tokens=[])
  got = dj.generate(target, [prompt, [3, 3]], draft=draft, max_new_tokens=10, stop_tokens=[],
                    tree="2,2,1")
  assert got.tokens == ref.tokens
  n = 20_000
  probs, count = sequence_counter(target, prompt, sampling.SamplingParams.make(1.0))
  res = dj.generate(target, [prompt] * n, draft=draft, max_new_tokens=3, stop_tokens=[],
                    temperature=1.0, seed=9, batch_size=4096, tree="2,2,1")
  assert res.stats.tau > 1.05
  assert _chi2_pvalue(count(res.tokens), probs) > 1e-3
