"""The engine seam and scheduled verification: packed verify, policies in the loop, the
plain-step fallback, buffer bounds, round-boundary splitting (init / rounds / insert)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.demo import tiny as testing
from dspark_jax.decoding import loop as loop_lib
from dspark_jax.decoding import sampling, speculative
from dspark_jax.decoding.cache import KVCache
from dspark_jax.decoding.state import Batch
from dspark_jax.drafts import api as draft_api
from dspark_jax.engine import Engine
from dspark_jax.scheduling import Scheduler
from test_speculative import _chi2_pvalue, sequence_counter

PROMPTS = [[1, 5, 9, 3, 10, 7, 8, 2, 3, 4, 11], [4, 2, 9, 1, 0], [7, 7], [3, 1, 4, 1, 5, 9, 2]]
P = 4


@pytest.fixture(scope="module")
def target():
  cfg = testing.tiny_config("qwen3", vocab=12, layers=4)
  return testing.random_target(cfg, scale=12.0, seed=2)


def _draft(target, algorithm="dspark", seed=0, block=P):
  return draft_api.init_draft(target, algorithm, num_layers=1 if algorithm == "eagle3" else 2,
                              block_size=block, target_layer_ids=(0, 2), markov_rank=8,
                              seed=seed)


def _sps(n_max, rows=1):
  """A convex decreasing steps/s curve: a verify of n tokens costs 1 + 0.15 n / rows."""
  return 1.0 / (1.0 + 0.15 * np.arange(n_max + 1) / rows)


def _schedulers(batch, p=P):
  sps = _sps(batch * (p + 1), batch)
  return {
      "threshold": Scheduler(policy="threshold", threshold=0.5),
      "early_stop": Scheduler(policy="early_stop", sps=sps),
      "global": Scheduler(policy="global", sps=sps),
      "async": Scheduler(policy="async", sps=sps),
      # A costly draft: many rounds fall back to a plain step, with a probe every 2 rounds.
      "early_stop+skip": Scheduler(policy="early_stop", sps=sps, propose_cost=2.0,
                                   probe_every=2),
  }


def test_packed_verify_equals_dense_verify(target):
  tmodel = target.model
  b, w = 3, P + 1
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, 12, (b, 8)), jnp.int32)
  lengths = jnp.array([8, 5, 3], jnp.int32)
  cache = KVCache.init(target.config, b, 32)
  cache, _, _ = loop_lib.prefill(tmodel, Batch(prompt, lengths, jnp.ones((b,), jnp.int32),
                                               -jnp.ones((b, 1), jnp.int32), jnp.arange(b)),
                                 cache)
  anchor = jnp.array([3, 1, 4], jnp.int32)
  drafts = jnp.asarray(rng.integers(0, 12, (b, P)), jnp.int32)
  live = jnp.array([True, True, False])
  dense, dtaps, dpend = speculative.verify(tmodel, cache, anchor, drafts, (0, 2), live)
  dcache = cache.write_pending(dpend)
  # Mixed lengths (packed) and all-zero lengths (the plain decode-step branch).
  for budgets, ell in [((16,), [4, 0, 2]), ((2, 7, 15), [4, 0, 2]), ((2, 7, 15), [0, 0, 3])]:
    ell = jnp.array(ell, jnp.int32)
    packed, ptaps, ppend = speculative.verify_packed(tmodel, cache, anchor, drafts, ell, live,
                                                     (0, 2), budgets)
    pcache = cache.write_pending(ppend)
    for r in range(b):
      if not live[r]:
        continue
      n = int(ell[r]) + 1
      np.testing.assert_allclose(packed[r, :n], dense[r, :n], atol=1e-5)
      np.testing.assert_allclose(ptaps[r, :n], dtaps[r, :n], atol=1e-5)
      start = int(lengths[r])
      for kp, kd in zip(pcache.k, dcache.k):
        np.testing.assert_allclose(kp[r, ..., :start + n], kd[r, ..., :start + n], atol=1e-5)
    # The finished row's cache is untouched by either path.
    np.testing.assert_array_equal(np.asarray(pcache.k[0][2]), np.asarray(cache.k[0][2]))
    np.testing.assert_array_equal(np.asarray(dcache.k[0][2]), np.asarray(cache.k[0][2]))


@pytest.mark.parametrize("policy", ["threshold", "early_stop", "global", "async",
                                    "early_stop+skip"])
def test_greedy_equals_plain_greedy_under_every_policy(target, policy):
  ref = dj.generate(target, PROMPTS, max_new_tokens=17, stop_tokens=[])
  sched = _schedulers(4)[policy]
  for seed in range(2):
    res = dj.generate(target, PROMPTS, draft=_draft(target, seed=seed), max_new_tokens=17,
                      stop_tokens=[], scheduler=sched)
    assert res.tokens == ref.tokens
    assert res.stats.scheduler == sched.policy
    verified = [v for row in res.stats.verify_lengths for v in row]
    assert min(verified) >= 0 and max(verified) <= P
  if policy == "early_stop+skip":
    flags = [f for row in res.stats.proposed for f in row]
    assert not all(flags) and any(flags), "the fallback should skip some rounds, probe others"
  if policy in ("early_stop", "global", "threshold"):
    assert res.stats.verify_tokens_per_round < P + 1  # the schedule really shortens verify


def test_fixed_policy_and_drafts_without_confidence(target):
  ref = dj.generate(target, PROMPTS, max_new_tokens=12, stop_tokens=[])
  for alg in ("eagle3", "dflash"):
    res = dj.generate(target, PROMPTS, draft=_draft(target, alg), max_new_tokens=12,
                      stop_tokens=[], scheduler="fixed")
    assert res.tokens == ref.tokens
    with pytest.raises(ValueError, match="confidence head"):
      dj.generate(target, PROMPTS, draft=_draft(target, alg), max_new_tokens=4,
                  scheduler=Scheduler(policy="early_stop", sps=_sps(20)))


def test_confidences_recorded_per_round(target):
  draft = _draft(target)
  res = dj.generate(target, PROMPTS[:2], draft=draft, max_new_tokens=10, stop_tokens=[])
  conf = res.stats.confidence_logits
  assert len(conf) == 2 and all(len(c) == len(a) for c, a in zip(conf, res.stats.accept_lengths))
  assert all(len(x) == P for row in conf for x in row)
  # Round 1's block is the block propose_block gives after the prompt and the first token.
  first = res.tokens[0][0]
  _, _, c = dj.propose_block(target, draft, PROMPTS[0] + [first])
  np.testing.assert_allclose(jax.nn.sigmoid(np.asarray(conf[0][0])), c, atol=1e-5)


@pytest.fixture(scope="module")
def peaked_target():
  cfg = testing.tiny_config("qwen3", vocab=6, layers=2, hidden=32)
  return testing.random_target(cfg, scale=16.0, seed=11)


@pytest.mark.parametrize("policy", ["early_stop+skip", "async"])
def test_sampled_distribution_exact_with_scheduler(peaked_target, policy):
  target = peaked_target
  prompt = [1, 4, 2, 5]
  n = 20_000
  draft = draft_api.init_draft(target, "dspark", num_layers=1, block_size=3,
                               target_layer_ids=(0,), markov_rank=4, seed=3)
  probs, count = sequence_counter(target, prompt, sampling.SamplingParams.make(1.0))
  sched = _schedulers(4096, 3)[policy]
  res = dj.generate(target, [prompt] * n, draft=draft, max_new_tokens=3, stop_tokens=[],
                    temperature=1.0, seed=42, batch_size=4096, scheduler=sched)
  counts = count(res.tokens)
  lengths = {v for row in res.stats.verify_lengths for v in row}
  assert len(lengths) >= 2, lengths  # the schedule varied, so the test exercises it
  assert _chi2_pvalue(counts, probs) > 1e-3
  assert 0.5 * np.abs(counts / n - probs).sum() < 0.05


def test_scheduler_tables_do_not_recompile(target):
  draft = _draft(target)
  kw = dict(draft=draft, max_new_tokens=9, stop_tokens=[])
  # Same pytree structure (arrays, not None) -> same program; only the values change.
  dj.generate(target, [[1, 2, 3]], scheduler=Scheduler(policy="early_stop", sps=_sps(5),
                                                       temperatures=np.ones((P,))), **kw)
  before = loop_lib.TRACE_COUNTS["spec_generate"]
  dj.generate(target, [[3, 2, 1]], scheduler=Scheduler(policy="early_stop", sps=_sps(5) * 2,
                                                       temperatures=np.full((P,), 1.5)), **kw)
  dj.generate(target, [[3, 2]], scheduler=Scheduler(policy="early_stop", sps=_sps(5) ** 2,
                                                    temperatures=np.full((P,), 0.7)), **kw)
  assert loop_lib.TRACE_COUNTS["spec_generate"] == before


def test_cache_buffers_stay_bounded(target):
  draft = _draft(target)
  engine = Engine.for_target(target)
  bound = engine.pool.max_buffers
  # Five shapes (batch, prompt and output buckets all vary), plain and speculative: more
  # distinct buffers than the pool may keep.
  for i, (nb, plen, out) in enumerate([(1, 3, 5), (3, 3, 40), (5, 40, 3), (2, 3, 70),
                                       (8, 5, 5)]):
    prompts = [[(j + i) % 12 for j in range(plen)]] * nb
    dj.generate(target, prompts, max_new_tokens=out, stop_tokens=[])
    dj.generate(target, prompts, draft=draft, max_new_tokens=out, stop_tokens=[])
    assert engine.pool.size <= bound
  engine.close()
  assert engine.pool.size == 0


def _batch(prompts, rids, max_new, tp=16):
  b = len(prompts)
  tok = np.zeros((b, tp), np.int32)
  for j, p in enumerate(prompts):
    tok[j, :len(p)] = p
  return Batch(jnp.asarray(tok), jnp.asarray([len(p) for p in prompts], jnp.int32),
               jnp.full((b,), max_new, jnp.int32), -jnp.ones((b, 1), jnp.int32),
               jnp.asarray(rids, jnp.int32))


@pytest.mark.parametrize("speculative_mode", [False, True])
def test_rows_admitted_between_rounds_match_generate(target, speculative_mode):
  """init + rounds + insert (what a server does) gives each row the tokens `generate` gives
  it alone, with its request id, whatever happened to its batch-mates."""
  draft = _draft(target) if speculative_mode else None
  params = sampling.SamplingParams.make(1.0)
  key = jax.random.key(5)
  engine = Engine.for_target(target)
  loop = (speculative.LoopSpec(runtime=draft.runtime, num_draft=P) if speculative_mode
          else None)
  kw = dict(out_len=32, capacity=64, loop=loop, draft=draft, max_rounds=24)
  if not speculative_mode:
    kw.pop("max_rounds")
  state = engine.init(_batch(PROMPTS[:2], [10, 11], 12), key, params, **kw)
  state = engine.rounds(state, 3, key, params, loop=loop, draft=draft)
  new = engine.init(_batch([PROMPTS[2], PROMPTS[3]], [12, 13], 12), key, params, **kw)
  one = jax.tree.map(lambda x: x[:1] if x.ndim else x, new)
  state = engine.insert(state, one, [1])
  state = engine.rounds(state, 40, key, params, loop=loop, draft=draft)
  out, num = np.asarray(state.out), np.asarray(state.num_out)
  for row, prompt, rid in [(0, PROMPTS[0], 10), (1, PROMPTS[2], 12)]:
    ref = dj.generate(target, [prompt], draft=draft, max_new_tokens=12, stop_tokens=[],
                      temperature=1.0, seed=5, request_ids=[rid])
    assert out[row, :num[row]].tolist() == ref.tokens[0]


def test_sps_profile_is_cached_and_used_by_auto(target, tmp_path, monkeypatch):
  monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path))
  from dspark_jax.engine import profile
  draft = _draft(target)
  assert profile.sps_profile(target, draft, batch=2, measure=False) is None
  assert profile.resolve_scheduler(None, target, draft, batch=2, num_draft=P) is None
  prof = profile.sps_profile(target, draft, batch=2, rounds=2, repeats=1)
  assert len(prof["sps"]) == 2 * (P + 1) + 1 and all(s > 0 for s in prof["sps"])
  assert prof["propose_s"] > 0 and prof["budgets"] == list(speculative.token_budgets(2, P))
  again = profile.sps_profile(target, draft, batch=2, measure=False)
  assert again["sps"] == prof["sps"]
  sched = profile.resolve_scheduler(None, target, draft, batch=2, num_draft=P)
  assert sched.policy == "early_stop" and sched.sps.shape == (2 * (P + 1) + 1,)
  res = dj.generate(target, PROMPTS[:2], draft=draft, max_new_tokens=8, stop_tokens=[])
  assert res.stats.scheduler == "early_stop"


def test_probes_back_off_while_the_draft_does_not_pay(target):
  """A draft that never pays: forced probes come `probe_every * 2**level` rounds apart, the
  level growing after each unpaying probe up to `max_probe_level`; output stays plain greedy."""
  ref = dj.generate(target, PROMPTS[:1], max_new_tokens=40, stop_tokens=[])
  sched = Scheduler(policy="early_stop", sps=_sps(P + 1), propose_cost=1e9, probe_every=2,
                    max_probe_level=2)
  res = dj.generate(target, PROMPTS[:1], draft=_draft(target), max_new_tokens=40,
                    stop_tokens=[], scheduler=sched)
  assert res.tokens == ref.tokens
  flags = res.stats.proposed[0]
  # The first round probes (level 0 -> 1); then 4, 8, 8, ... plain rounds between probes.
  assert [i for i, f in enumerate(flags) if f] == [i for i in (0, 5, 14, 23, 32)
                                                   if i < len(flags)]


def test_a_prior_replaces_the_first_probe(target):
  """With the draft's calibration prior, a loop that has not proposed yet judges rows without a
  block by the prior: one that does not pay waits the longest probe gap before its first probe
  (2 * 2**2 = 8 rounds), one that pays proposes in the first round. Output stays plain greedy."""
  ref = dj.generate(target, PROMPTS[:1], max_new_tokens=24, stop_tokens=[])
  kw = dict(policy="early_stop", sps=_sps(P + 1), probe_every=2, max_probe_level=2)
  for prior, cost, want in ((np.zeros(P), 1e9, [8, 17]), (np.ones(P), 0.0, [0])):
    res = dj.generate(target, PROMPTS[:1], draft=_draft(target), max_new_tokens=24,
                      stop_tokens=[], scheduler=Scheduler(prior=prior, propose_cost=cost, **kw))
    assert res.tokens == ref.tokens
    flags = [i for i, f in enumerate(res.stats.proposed[0]) if f]
    assert flags[:len(want)] == want, flags
  with pytest.raises(ValueError, match="prior"):
    Scheduler(prior=[0.5, 2.0], **kw)
