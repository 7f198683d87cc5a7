"""Verify-length scheduler: Appendix A, exact losslessness by enumeration, brute force, jit."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.scheduling import Scheduler, schedule_verify

APPENDIX_A_SPS = np.array([0.0, 1.0, 0.5, 0.45])


def _jitted(policy):
  return jax.jit(functools.partial(schedule_verify, policy=policy))


# ---------------------------------------------------------------------------------------------
# references written as plain Python
# ---------------------------------------------------------------------------------------------
def _greedy_reference(c, sps, max_tokens=None):
  """The spec's §3.2 pseudocode, loop for loop (float64, strict >, early stop)."""
  r_count, p = c.shape
  a = np.cumprod(c, axis=1)
  cand = [(r, j) for r in range(r_count) for j in range(1, p + 1) if a[r, j - 1] > 0]
  order = np.argsort([-a[r, j - 1] for r, j in cand], kind="stable")

  def rate(b):
    if b >= len(sps) or (max_tokens is not None and b > max_tokens and b > r_count):
      return -np.inf
    return sps[b]

  ell, best_ell = np.zeros(r_count, int), np.zeros(r_count, int)
  b, tau = r_count, float(r_count)
  best = tau * rate(b)
  for i in order:
    r, j = cand[i]
    assert j == ell[r] + 1  # prefix invariant
    ell[r] = j
    b += 1
    tau += a[r, j - 1]
    theta = tau * rate(b)
    if theta > best:
      best, best_ell = theta, ell.copy()
    else:
      break
  return best_ell


def _brute_force_global(c, sps):
  """argmax over every length vector of (R + sum_r sum_{j<=l_r} a_rj) * sps[R + sum l]."""
  r_count, p = c.shape
  a = np.cumprod(c, axis=1)
  best, best_key = None, None
  for ell in itertools.product(range(p + 1), repeat=r_count):
    n = r_count + sum(ell)
    theta = (r_count + sum(a[r, :l].sum() for r, l in enumerate(ell))) * sps[n]
    key = (-theta, n)  # largest theta, then the smallest batch
    if best_key is None or key < best_key:
      best, best_key = np.array(ell), key
  return best


# ---------------------------------------------------------------------------------------------
# exact enumeration of one speculative round (P = 2 drafts per request)
# ---------------------------------------------------------------------------------------------
def _residual(p, q):
  r = np.maximum(p - q, 0.0)
  return r / r.sum() if r.sum() > 0 else p


def _round_law(p1, p2, q1, q2, x1, x2, ell):
  """Exact law `[V, V]` of a request's first two output tokens given its drafts and `ell`.

  `p1[v]`, `p2[v, w]` target laws of the first token and of the second given the first; `q1`,
  `q2` the draft's. Tokens not produced by this round come from a lossless next round (`p2`).
  """
  v = len(p1)
  if ell == 0:
    return p1[:, None] * p2
  acc1 = min(1.0, p1[x1] / q1[x1])
  law = (1.0 - acc1) * _residual(p1, q1)[:, None] * p2
  if ell == 1:
    law[x1] += acc1 * p2[x1]
  else:
    acc2 = min(1.0, p2[x1, x2] / q2[x1, x2])
    law[x1] += acc1 * (acc2 * np.eye(v)[x2] + (1.0 - acc2) * _residual(p2[x1], q2[x1]))
  return law


def _output_laws(case, policy):
  """Per-request exact output laws `[R, V, V]`; `policy(confidence [R, 2]) -> lengths [R]`.

  The drafts of all requests are enumerated; request r's confidences are `c1[r]` (anchor only)
  and `c2[r, x_{r,1}]` (pre-token: depends on the previous draft token, never on `x_{r,2}`).
  """
  p1, p2, q1, q2, c1, c2 = (case[k] for k in ("p1", "p2", "q1", "q2", "c1", "c2"))
  r_count, v = p1.shape
  laws = np.zeros((r_count, v, v))
  for drafts in itertools.product(range(v), repeat=2 * r_count):
    x = np.array(drafts).reshape(r_count, 2)
    rows = np.arange(r_count)
    prob = np.prod(q1[rows, x[:, 0]] * q2[rows, x[:, 0], x[:, 1]])
    ell = policy(np.stack([c1, c2[rows, x[:, 0]]], axis=1))
    for r in rows:
      laws[r] += prob * _round_law(p1[r], p2[r], q1[r], q2[r], x[r, 0], x[r, 1], ell[r])
  return laws


def _target_laws(case):
  return case["p1"][:, :, None] * case["p2"]


def test_appendix_a_counterexample_numpy_and_jit():
  c = np.array([[0.8, 0.9]])
  assert schedule_verify(c, APPENDIX_A_SPS, policy="early_stop").tolist() == [0]
  assert schedule_verify(c, APPENDIX_A_SPS, policy="global").tolist() == [2]
  out = schedule_verify(c, APPENDIX_A_SPS)
  assert isinstance(out, np.ndarray) and out.dtype == np.int32
  for policy, want in (("early_stop", [0]), ("global", [2])):
    got = _jitted(policy)(jnp.asarray(c), jnp.asarray(APPENDIX_A_SPS))
    assert isinstance(got, jax.Array) and got.dtype == jnp.int32 and got.tolist() == want


def test_appendix_a_output_law_exact():
  uniform = np.full((1, 2, 2), 0.5)
  case = dict(p1=np.array([[0.7, 0.3]]), q1=np.array([[0.5, 0.5]]), p2=uniform, q2=uniform,
              c1=np.array([0.8]), c2=np.array([[0.9, 0.0]]))  # x1 = A -> c2 = 0.9, B -> 0
  first = {policy: _output_laws(case, functools.partial(schedule_verify, sps=APPENDIX_A_SPS,
                                                        policy=policy))[0].sum(axis=1)
           for policy in ("early_stop", "global")}
  np.testing.assert_allclose(first["early_stop"], [0.7, 0.3], atol=1e-12)
  np.testing.assert_allclose(first["global"], [0.85, 0.15], atol=1e-12)


def _random_case(rng, r_count=2, v=2):
  dirichlet = lambda *shape: rng.dirichlet(np.ones(v), size=shape)
  return dict(p1=dirichlet(r_count), p2=dirichlet(r_count, v), q1=dirichlet(r_count),
              q2=dirichlet(r_count, v), c1=rng.uniform(0.05, 0.95, r_count),
              c2=rng.uniform(0.0, 1.0, (r_count, v)))


def test_random_exact_enumeration_lossless_policies():
  rng = np.random.default_rng(0)
  deviation = {name: 0.0 for name in ("early_stop", "async", "threshold", "fixed", "global")}
  for _ in range(50):
    case = _random_case(rng)
    sps = np.concatenate([[0.0], np.cumprod(rng.uniform(0.5, 1.0, 6))])  # decreasing, n = 1..6
    stale = rng.uniform(0.0, 1.0, (2, 2))  # the previous block: independent of this one
    policies = dict(
        early_stop=functools.partial(schedule_verify, sps=sps, policy="early_stop"),
        async_=functools.partial(schedule_verify, sps=sps, policy="async",
                                 stale_confidence=stale),
        threshold=functools.partial(schedule_verify, sps=None, policy="threshold",
                                    threshold=0.5),
        fixed=functools.partial(schedule_verify, sps=None, policy="fixed"),
        global_=functools.partial(schedule_verify, sps=sps, policy="global"))
    target = _target_laws(case)
    for name, policy in policies.items():
      dev = np.abs(_output_laws(case, policy) - target).max()
      deviation[name.rstrip("_")] = max(deviation[name.rstrip("_")], dev)
  for name in ("early_stop", "async", "threshold", "fixed"):
    assert deviation[name] < 1e-9, (name, deviation)
  assert deviation["global"] > 1e-3, deviation  # retrospective search leaks x_{r,k}


# ---------------------------------------------------------------------------------------------
# the search itself
# ---------------------------------------------------------------------------------------------
def test_global_equals_brute_force():
  rng = np.random.default_rng(1)
  for _ in range(120):
    r_count, p = rng.integers(1, 4), rng.integers(1, 4)
    c = rng.uniform(0.01, 1.0, (r_count, p))
    sps = rng.uniform(0.1, 1.0, r_count * (p + 1) + 1)  # not monotone: global must still win
    np.testing.assert_array_equal(schedule_verify(c, sps, policy="global"),
                                  _brute_force_global(c, sps))


def _prefix_consistent(c, ell):
  """The admitted items are the first sum(ell) of the stable descending order of a > 0."""
  r_count, p = c.shape
  a = np.cumprod(c, axis=1).ravel()
  order = [i for i in np.argsort(-a, kind="stable") if a[i] > 0][:int(ell.sum())]
  admitted = {(i // p, i % p) for i in order}
  return admitted == {(r, j) for r in range(r_count) for j in range(ell[r])}


def test_early_stop_equals_greedy_loop_and_is_prefix_consistent():
  rng = np.random.default_rng(2)
  levels = np.array([0.0, 0.3, 0.6, 0.9, 1.0, 1.0])
  for trial in range(200):
    r_count, p = rng.integers(1, 5), rng.integers(1, 5)
    c = rng.uniform(0.0, 1.0, (r_count, p))
    c = np.where(rng.random((r_count, p)) < 0.4, rng.choice(levels, (r_count, p)), c)
    size = rng.integers(1, r_count * (p + 1) + 2)  # sometimes shorter than the reachable range
    sps = np.sort(rng.uniform(0.1, 1.0, size))[::-1] if trial % 2 else rng.uniform(0.1, 1.0, size)
    cap = None if trial % 3 else int(rng.integers(0, r_count * (p + 1) + 1))
    ell = schedule_verify(c, sps, policy="early_stop", max_tokens=cap)
    np.testing.assert_array_equal(ell, _greedy_reference(c, sps, cap), err_msg=f"trial {trial}")
    assert _prefix_consistent(c, ell)
    assert _prefix_consistent(c, schedule_verify(c, sps, policy="global", max_tokens=cap))


def _dyadic_case(rng, r_count=4, p=3):
  """Values exact in float32 and float64 (k/8 confidences, k/256 SPS): ties resolve alike."""
  c = rng.integers(0, 9, (r_count, p)) / 8.0
  stale = rng.integers(0, 9, (r_count, p)) / 8.0
  sps = rng.integers(1, 257, r_count * (p + 1) + 1) / 256.0
  return c, stale, sps, rng.integers(0, 9) / 8.0


@pytest.mark.parametrize("policy", ["fixed", "threshold", "early_stop", "global", "async"])
def test_numpy_and_jit_agree(policy):
  rng = np.random.default_rng(3)
  fn = _jitted(policy)
  for _ in range(25):
    c, stale, sps, thr = _dyadic_case(rng)
    kw = dict(threshold=thr, stale_confidence=stale)
    want = schedule_verify(c, sps, policy=policy, **kw)
    got = fn(jnp.asarray(c), jnp.asarray(sps), threshold=jnp.float32(thr),
             stale_confidence=jnp.asarray(stale))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_lengths_shrink_as_load_grows():
  rng = np.random.default_rng(4)
  p, counts = 5, (1, 2, 4, 8, 16, 32)
  sps = 100.0 / (20.0 + np.arange(counts[-1] * (p + 1) + 1))  # convex, decreasing
  mean_len = []
  for r_count in counts:
    c = rng.uniform(0.5, 1.0, (20, r_count, p))
    mean_len.append(np.mean([schedule_verify(ci, sps).mean() for ci in c]))
  assert all(b <= a + 0.05 for a, b in zip(mean_len, mean_len[1:])), mean_len
  assert mean_len[0] > mean_len[-1] + 1.0, mean_len


def test_saturated_ties_keep_prefix_order():
  sps = np.array([0, 0, 1.0, 0.9, 0.8, 0.5, 0.4, 0.3, 0.2])  # Theta peaks at two drafts
  ones = np.ones((2, 3))
  for policy in ("early_stop", "global"):
    assert schedule_verify(ones, sps, policy=policy).tolist() == [2, 0]
    assert _jitted(policy)(jnp.asarray(ones), jnp.asarray(sps)).tolist() == [2, 0]
  c = np.array([[1.0, 1.0, 0.5], [1.0, 0.9, 0.9]])  # a: [[1, 1, .5], [1, .9, .81]]
  assert schedule_verify(c, np.ones(9)).tolist() == [3, 3]
  cliff = np.array([0, 0, 1, 1, 1, 1, 0.1, 0.1, 0.1])  # five tokens at most: three drafts
  assert schedule_verify(c, cliff).tolist() == [2, 1]


def test_equal_objective_keeps_the_smaller_batch():
  c = np.array([[0.5, 1.0]])
  sps = np.array([0.0, 1.5, 1.0, 0.5])  # Theta = 1.5, 1.5, 1.0: the tie is not taken (strict >)
  for policy in ("early_stop", "global"):
    assert schedule_verify(c, sps, policy=policy).tolist() == [0]
    assert _jitted(policy)(jnp.asarray(c), jnp.asarray(sps)).tolist() == [0]
  # early stop breaks at the tie, global still looks past it
  assert schedule_verify(c, np.array([0.0, 1.5, 1.0, 2.0]), policy="early_stop").tolist() == [0]
  assert schedule_verify(c, np.array([0.0, 1.5, 1.0, 2.0]), policy="global").tolist() == [2]


def test_threshold_is_deepspec_rule():
  c = np.array([[0.9, 0.4, 0.95], [0.2, 0.9, 0.9], [0.5, 0.5, 0.5], [0.6, 0.7, 0.8]])
  assert schedule_verify(c, None, policy="threshold", threshold=0.5).tolist() == [1, 0, 3, 3]
  assert schedule_verify(c, None, policy="threshold", threshold=0.0).tolist() == [3] * 4
  assert schedule_verify(c, None, policy="threshold", threshold=1.0).tolist() == [0] * 4
  assert schedule_verify(c, None, policy="fixed").tolist() == [3] * 4


def test_table_length_and_max_tokens():
  c = np.full((2, 3), 0.9)
  assert schedule_verify(c, np.ones(5)).tolist() == [1, 1]  # n <= 4
  assert schedule_verify(c, np.ones(20), max_tokens=3).tolist() == [1, 0]
  assert schedule_verify(c, np.ones(20), max_tokens=1).tolist() == [0, 0]
  assert schedule_verify(c, np.ones(2)).tolist() == [0, 0]  # even sps[R] is missing
  assert schedule_verify(c, np.ones(20), policy="global").tolist() == [3, 3]
  assert _jitted("early_stop")(jnp.asarray(c), jnp.ones(20), max_tokens=jnp.int32(3)).tolist() \
      == [1, 0]


def test_async_capacity_from_stale_confidences():
  sps = np.ones(20)
  stale = np.array([[0.9, 0.9], [0.0, 0.0]])  # row 1 is new: no candidates towards K = 2
  fresh = np.array([[0.5, 0.5], [0.9, 0.9]])
  kw = dict(policy="async", stale_confidence=stale)
  assert schedule_verify(fresh, sps, **kw).tolist() == [0, 2]
  assert schedule_verify(np.array([[0.0, 0.0], [0.9, 0.0]]), sps, **kw).tolist() == [0, 1]
  rng = np.random.default_rng(5)
  for _ in range(30):  # with stale == fresh it is the global search
    c = rng.uniform(0.0, 1.0, (3, 3))
    sps = rng.uniform(0.1, 1.0, 13)
    np.testing.assert_array_equal(
        schedule_verify(c, sps, policy="async", stale_confidence=c),
        schedule_verify(c, sps, policy="global"))


def test_validation_errors():
  c = np.full((1, 2), 0.5)
  with pytest.raises(ValueError, match="unknown scheduler policy"):
    schedule_verify(c, None, policy="greedy")
  with pytest.raises(ValueError, match="needs an sps table"):
    schedule_verify(c, None, policy="early_stop")
  with pytest.raises(ValueError, match="needs stale_confidence"):
    schedule_verify(c, np.ones(4), policy="async")
  with pytest.raises(ValueError, match="needs a threshold"):
    schedule_verify(c, None, policy="threshold")
  with pytest.raises(ValueError, match="must be \\[R, P\\]"):
    schedule_verify(c[0], np.ones(4))
  for kwargs, match in ((dict(policy="nope", sps=np.ones(3)), "unknown scheduler policy"),
                        (dict(policy="threshold", threshold=1.5), "threshold must lie in"),
                        (dict(policy="threshold"), "needs a threshold"),
                        (dict(policy="global"), "needs an sps table"),
                        (dict(policy="async"), "needs an sps table"),
                        (dict(sps=np.ones(3), temperatures=np.array([1.0, 0.0])), "> 0")):
    with pytest.raises(ValueError, match=match):
      Scheduler(**kwargs)


# ---------------------------------------------------------------------------------------------
# Scheduler pytree
# ---------------------------------------------------------------------------------------------
def test_scheduler_calibrates_and_matches_schedule_verify():
  rng = np.random.default_rng(6)
  z = rng.normal(1.0, 2.0, (3, 4))
  temps = np.array([1.5, 0.8, 2.0, 1.2])
  sched = Scheduler(policy="early_stop", sps=np.linspace(1.0, 0.3, 16), temperatures=temps)
  np.testing.assert_allclose(sched.calibrate(z), 1.0 / (1.0 + np.exp(-z / temps)), rtol=1e-12)
  np.testing.assert_array_equal(sched(z), schedule_verify(sched.calibrate(z), sched.sps))
  # async: a row without a previous block holds -inf logits (confidence 0)
  stale = np.where(np.arange(3)[:, None] == 2, -np.inf, z)
  sched = Scheduler(policy="async", sps=np.ones(16))
  assert sched(z, stale=stale).sum() == np.sum(np.isfinite(stale))


def test_scheduler_pytree_does_not_retrace():
  traces = []

  @jax.jit
  def lengths(sched, z):
    traces.append(1)
    return sched(z)

  z = jnp.asarray(np.random.default_rng(7).normal(1.0, 2.0, (3, 4)), jnp.float32)
  for i in range(3):
    sched = Scheduler(policy="early_stop", sps=jnp.linspace(1.0, 0.1 * (i + 1), 16),
                      temperatures=jnp.full((4,), 1.0 + i))
    np.testing.assert_array_equal(lengths(sched, z), sched(np.asarray(z)))
  assert len(traces) == 1
  results = [lengths(Scheduler(policy="threshold", threshold=jnp.float32(t)), z).tolist()
             for t in (0.0, 0.5, 1.0)]
  assert len(traces) == 2  # a new policy is a new program; new thresholds are not
  assert results[0] == [4, 4, 4] and results[2] == [0, 0, 0]


def test_load_model_policies():
  """The load replay (paper Fig. 8 model): exact bookkeeping for AR and fixed, shrinking
  budgets under concurrency for early stop, and plain steps when the draft never pays."""
  from dspark_jax.scheduling import load
  p = 4
  rng = np.random.default_rng(0)
  # Calibrated requests: each draft survives with its confidence sigmoid(z).
  trajs = []
  for _ in range(6):
    z = rng.normal(1.0, 0.5, size=(20, p))
    acc = np.sum(np.cumprod(rng.random((20, p)) < 1 / (1 + np.exp(-z)), axis=1), axis=1)
    trajs.append((z, acc))
  sps = 1.0 / (1.0 + 0.2 * np.arange(8 * (p + 1) + 1))  # convex cost in verify tokens
  ar = load.simulate(trajs, sps, 0.1, 4, policy="ar")
  assert ar["tokens_per_s"] == pytest.approx(4 * sps[4])
  fx = load.simulate(trajs, sps, 0.1, 2, policy="fixed", rounds=50)
  assert fx["verify_per_request"] == p + 1 and fx["proposed_share"] == 1.0
  assert fx["tokens_per_s"] == pytest.approx(fx["tau"] * 2 / (0.1 + 1 / sps[2 * (p + 1)]))
  budgets = [load.simulate(trajs, sps, 0.0, r, policy="early_stop")["verify_per_request"]
             for r in (1, 2, 4, 8)]
  assert all(a >= b for a, b in zip(budgets, budgets[1:])) and budgets[0] > budgets[-1]
  never = load.simulate(trajs, sps, 1e6, 2, policy="early_stop", rounds=100)
  assert never["proposed_share"] < 0.1  # backed-off probes only
  # A prior that does not pay: the first probe waits the longest gap (8 * 2**3 = 64 rounds),
  # then one every 65; a prior that pays proposes from the first round on.
  quiet = load.simulate(trajs, sps, 1e6, 2, policy="early_stop", rounds=100, prior=np.zeros(p))
  assert quiet["proposed_share"] == pytest.approx(1 / 100)
  eager = load.simulate(trajs, sps, 0.0, 2, policy="early_stop", rounds=1, prior=np.ones(p))
  assert eager["proposed_share"] == 1.0
  with pytest.raises(ValueError, match="does not cover"):
    load.simulate(trajs, sps[:5], 0.1, 2, policy="fixed")
