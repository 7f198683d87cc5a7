"""Plain batch generation: greedy == argmax loop, batch invariance, limits, compiles, errors."""

import jax
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.demo import tiny as testing
from dspark_jax.decoding import loop as loop_lib

PROMPTS = [[1, 5, 9, 33, 10, 7, 8, 20, 3, 4, 11, 12, 13], [4, 2, 9, 19, 12], [7, 7]]


@pytest.fixture(scope="module", params=["qwen3", "gemma3", "llama"])
def target(request):
  cfg = testing.tiny_config(request.param, vocab=64)
  return testing.random_target(cfg, scale=8.0, seed=1)


def argmax_loop(target, prompt, n):
  """Greedy by re-running the cache-free full forward on the whole sequence each step.

  The sequence is right-padded to one fixed length so the forward compiles once: the models
  are causal, so the logits at position t ignore everything after t (padding included).
  """
  seq = list(prompt)
  width = len(prompt) + n
  for _ in range(n):
    padded = seq + [0] * (width - len(seq))
    seq.append(int(np.asarray(target.logits([padded]))[0, len(seq) - 1].argmax()))
  return seq[len(prompt):]


def test_greedy_equals_full_forward_argmax(target):
  # 14 new tokens after a 13-token prompt crosses gemma3's sliding window (6) many times.
  res = dj.generate(target, PROMPTS, max_new_tokens=14, stop_tokens=[])
  for prompt, toks in zip(PROMPTS, res.tokens):
    assert toks == argmax_loop(target, prompt, 14)
  assert res.stats.num_tokens == [14, 14, 14]
  assert res.stats.finish_reasons == ["length"] * 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0),
                                                     (0.8, 5, 0.9)])
def test_row_independent_of_batch(target, temperature, top_k, top_p):
  kw = dict(max_new_tokens=10, stop_tokens=[], temperature=temperature, top_k=top_k,
            top_p=top_p, seed=3)
  full = dj.generate(target, PROMPTS, **kw)
  for i, p in enumerate(PROMPTS):
    alone = dj.generate(target, [p], request_ids=[i], **kw)
    assert alone.tokens[0] == full.tokens[i]


def test_sampling_differs_across_requests_and_seeds(target):
  same = [PROMPTS[0]] * 4
  r = dj.generate(target, same, max_new_tokens=12, temperature=1.0, stop_tokens=[], seed=0)
  assert len({tuple(t) for t in r.tokens}) > 1  # distinct RNG streams per request
  r2 = dj.generate(target, same, max_new_tokens=12, temperature=1.0, stop_tokens=[], seed=1)
  assert r.tokens != r2.tokens


def test_stop_tokens_and_limits_per_row(target):
  greedy = dj.generate(target, PROMPTS, max_new_tokens=12, stop_tokens=[])
  stop_row0 = greedy.tokens[0][4]
  res = dj.generate(target, PROMPTS, max_new_tokens=[12, 3, 12],
                    stop_tokens=[[stop_row0], [], [-5]])
  first = greedy.tokens[0].index(stop_row0)
  assert res.tokens[0] == greedy.tokens[0][:first + 1]
  assert res.stats.finish_reasons[0] == "stop"
  assert res.tokens[1] == greedy.tokens[1][:3]
  assert res.stats.finish_reasons[1] == "length"
  assert res.tokens[2] == greedy.tokens[2]


def test_compiles_once_per_bucket_and_no_host_round_trips():
  cfg = testing.tiny_config("qwen3", vocab=48)
  target = testing.random_target(cfg, scale=4.0, seed=7)
  kw = dict(max_new_tokens=9, stop_tokens=[])
  dj.generate(target, [[1, 2, 3]], **kw)
  before = loop_lib.TRACE_COUNTS.get("ar_generate", 0)
  # Same buckets (batch 1, prompt <= 16, output 16): no new compilation, whatever the content.
  with jax.transfer_guard_host_to_device("allow"), jax.transfer_guard_device_to_host("allow"):
    dj.generate(target, [[5, 6, 7, 8, 9]], **kw)
    dj.generate(target, [[9] * 12], max_new_tokens=14, stop_tokens=[])
  assert loop_lib.TRACE_COUNTS["ar_generate"] == before
  # A new batch bucket compiles once more.
  dj.generate(target, [[1, 2], [3, 4]], **kw)
  assert loop_lib.TRACE_COUNTS["ar_generate"] == before + 1


def test_loop_makes_no_transfers_inside():
  """The jitted generation itself performs no device<->host transfer: it runs under a guard
  that forbids them, with inputs placed on device beforehand."""
  cfg = testing.tiny_config("qwen3", vocab=48)
  target = testing.random_target(cfg, scale=4.0, seed=7)
  from dspark_jax.decoding import sampling
  from dspark_jax.decoding.cache import KVCache
  from dspark_jax.decoding.state import Batch
  import jax.numpy as jnp
  batch = Batch(tokens=jnp.ones((2, 16), jnp.int32), lengths=jnp.array([3, 5]),
                max_new=jnp.array([16, 16]), stop_tokens=-jnp.ones((2, 1), jnp.int32),
                request_ids=jnp.arange(2))
  cache = KVCache.init(target.config, 2, 32)
  params = sampling.SamplingParams.make(1.0)
  key = jax.random.key(0)
  loop_lib.ar_generate(target.graphdef, target.params, batch, cache, key, params,
                       max_steps=16)[0].block_until_ready()
  cache = KVCache.init(target.config, 2, 32)
  with jax.transfer_guard("disallow"):
    out = loop_lib.ar_generate(target.graphdef, target.params, batch, cache, key, params,
                               max_steps=16)
    out[0].block_until_ready()


def test_prompt_longer_than_cache_is_an_error(target):
  with pytest.raises(dj.PromptTooLongError, match="limit is 32"):
    dj.generate(target, [[1] * 30], max_new_tokens=8, max_cache_len=32)


@pytest.mark.parametrize("prompts,kw,match", [
    ([[1, 2, 64]], {}, r"token ids must be in \[0, 64\)"),
    ([[]], {}, "empty"),
    ([[1, 2]], {"temperature": -1.0}, "temperature"),
    ([[1, 2]], {"top_p": 0.0}, "top_p"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
    (["hello"], {}, "tokenizer"),
    ([[1, 2]], {"stop_tokens": [[1], [2]]}, "stop_tokens"),
])
def test_bad_input(target, prompts, kw, match):
  with pytest.raises((ValueError, TypeError), match=match):
    dj.generate(target, prompts, **kw)


def test_packed_prefill_equals_dense(target):
  """Prefill over the prompts' real tokens packed into a flat batch gives the dense
  prefill's last logits, taps and cache contents (sliding windows included: gemma3)."""
  import jax.numpy as jnp
  from dspark_jax.decoding.cache import KVCache
  from dspark_jax.decoding.state import Batch
  tp, b = 16, 4
  prompts = PROMPTS + [[3] * 16]
  tokens = np.zeros((b, tp), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  batch = Batch(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                max_new=jnp.full((b,), 4), stop_tokens=-jnp.ones((b, 1), jnp.int32),
                request_ids=jnp.arange(b))
  model = target.model
  taps = (0, 1)
  results = {}
  for budget in (None, 48, 64):  # sum(lengths) = 36: a tight and a padded budget
    cache = KVCache.init(target.config, b, tp + 8)
    results[budget] = jax.jit(
        lambda c, budget=budget: loop_lib.prefill(model, batch, c, taps, budget=budget))(cache)
  d_cache, d_logits, d_taps = results[None]
  for budget in (48, 64):
    cache, logits, tap = results[budget]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(d_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    for r, n in enumerate(lengths):
      np.testing.assert_allclose(np.asarray(tap[r, :n]), np.asarray(d_taps[r, :n]), atol=1e-5)
      for kp, kd in zip(cache.k, d_cache.k):
        np.testing.assert_allclose(np.asarray(kp[r, ..., :n]), np.asarray(kd[r, ..., :n]),
                                   atol=1e-5)
      for vp, vd in zip(cache.v, d_cache.v):
        np.testing.assert_allclose(np.asarray(vp[r, :, :n]), np.asarray(vd[r, :, :n]),
                                   atol=1e-5)


def test_packed_prefill_budget_choice():
  # Dense when packing cannot halve the work, or below the minimum worth a program.
  assert loop_lib.packed_prefill_budget([5], 16) is None
  assert loop_lib.packed_prefill_budget([3, 5], 16) is None  # 32 dense < PACK_MIN_TOKENS
  assert loop_lib.packed_prefill_budget([80, 114, 177, 97, 48, 53, 80, 114], 256) == 1024
  assert loop_lib.packed_prefill_budget([250] * 8, 256) is None  # 2048 would be no saving
  assert loop_lib.packed_prefill_budget([10] * 64, 32) == 1024


def test_generate_with_packed_prefill_equals_dense(monkeypatch):
  """End to end, plain and speculative (target taps feed the draft): greedy tokens are the
  same with every prefill packed as with every prefill dense (gemma3: sliding layers)."""
  from dspark_jax.engine import Engine
  target = testing.random_target(testing.tiny_config("gemma3", vocab=64), scale=8.0, seed=1)
  monkeypatch.setattr(loop_lib, "PACK_MIN_TOKENS", 1)
  prompts = PROMPTS + [[2, 3], [9] * 11]
  draft = dj.init_draft(target, "dspark", num_layers=1, block_size=3, target_layer_ids=(0, 1),
                        markov_rank=8, seed=0)
  engine = Engine.for_target(target)
  runs = {}
  for packed in (True, False):
    monkeypatch.setattr(engine, "packed_prefill", packed)
    runs[packed] = [dj.generate(target, prompts, max_new_tokens=6, stop_tokens=[],
                                batch_size=8, draft=d).tokens for d in (None, draft)]
  assert loop_lib.packed_prefill_budget([len(p) for p in prompts] + [1] * 3, 16) == 64
  assert runs[True] == runs[False]
