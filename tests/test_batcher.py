"""Continuous batching: a row's tokens do not depend on its batch-mates or on when it was
admitted; per-request settings, stop strings, cancels and slot reuse."""

import jax
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.decoding import sampling
from dspark_jax.demo import tiny as testing
from dspark_jax.drafts import api as draft_api
from dspark_jax.engine.batcher import ContinuousBatcher, Request, RequestError

PROMPTS = [[1, 5, 9, 3, 10, 7, 8, 2, 3, 4, 11], [4, 2, 9, 1, 0], [7, 7], [3, 1, 4, 1, 5, 9, 2],
           [2, 8, 1], [9, 9, 9, 4, 4, 4, 1, 2, 3, 5, 6, 7, 8, 1, 2, 3, 4, 5], [6], [0, 1, 2]]
P = 4


@pytest.fixture(scope="module")
def target():
  cfg = testing.tiny_config("qwen3", vocab=12, layers=3)
  return testing.random_target(cfg, scale=12.0, seed=2)


@pytest.fixture(scope="module")
def draft(target):
  return draft_api.init_draft(target, "dspark", num_layers=1, block_size=P,
                              target_layer_ids=(0, 1), markov_rank=8, seed=0)


def _ref(target, draft, i, max_new, temperature, seed=3):
  return dj.generate(target, [PROMPTS[i]], draft=draft, max_new_tokens=max_new, stop_tokens=[],
                     temperature=temperature, seed=seed, request_ids=[i]).tokens[0]


@pytest.mark.parametrize("speculative", [False, True])
def test_rows_match_generate_whatever_their_batch_mates(target, draft, speculative):
  """8 requests of mixed lengths and settings through 3 slots: every request equals its own
  `generate` (alone, same seed and request id), so admission order and neighbours do not
  matter; greedy and sampled rows share one batch."""
  d = draft if speculative else None
  b = ContinuousBatcher(target, d, slots=3, max_new_tokens=20, rounds_per_step=2, seed=3)
  lens = [5, 17, 9, 20, 3, 11, 14, 6]
  temps = [0.0, 1.0, 0.0, 0.7, 1.0, 0.0, 1.3, 1.0]
  reqs = [Request(prompt=PROMPTS[i], max_new_tokens=lens[i], temperature=temps[i],
                  stop_tokens=[], request_id=i) for i in range(8)]
  b.run(reqs)
  for i, r in enumerate(reqs):
    assert r.done and r.finish_reason == "length"
    assert r.tokens == _ref(target, d, i, lens[i], temps[i]), i
  assert b.idle and b.counters.requests_finished == 8
  if speculative:
    c = b.counters
    assert c.num_drafts > 0 and 0 <= c.num_accepted_tokens <= c.num_draft_tokens
    for r in reqs:  # the last round may commit past the limit (then cut to it)
      assert r.rounds == len(r.accept_lengths)
      assert 0 <= sum(r.accept_lengths) - (len(r.tokens) - 1) <= P


def test_greedy_rows_in_a_sampled_batch_are_exactly_greedy(target, draft):
  """A temperature-0 row decoded beside sampled rows (the per-row path: one-hot
  distributions through exact speculative sampling) equals static greedy decoding."""
  params = sampling.SamplingParams.for_rows([0.0, 1.0], [0, 0], [1.0, 1.0])
  assert not params.greedy
  b = ContinuousBatcher(target, draft, slots=2, max_new_tokens=16, seed=3)
  g = Request(prompt=PROMPTS[0], max_new_tokens=16, stop_tokens=[], request_id=0)
  s = Request(prompt=PROMPTS[1], max_new_tokens=16, temperature=1.0, stop_tokens=[],
              request_id=1)
  b.run([g, s])
  plain = dj.generate(target, [PROMPTS[0]], max_new_tokens=16, stop_tokens=[]).tokens[0]
  assert g.tokens == plain


def test_stop_tokens_cancel_and_slot_reuse(target):
  b = ContinuousBatcher(target, None, slots=2, max_new_tokens=24, rounds_per_step=1)
  free = _ref(target, None, 3, 24, 0.0)
  stop = free[5]
  r1 = Request(prompt=PROMPTS[3], max_new_tokens=24, stop_tokens=[stop], request_id=3)
  r2 = Request(prompt=PROMPTS[4], max_new_tokens=24, stop_tokens=[], request_id=4)
  r3 = Request(prompt=PROMPTS[6], max_new_tokens=24, stop_tokens=[], request_id=6)
  for r in (r1, r2, r3):
    b.submit(r)
  b.step()
  assert b.num_running == 2 and b.num_waiting == 1
  r2.cancel()
  while not (r1.done and r2.done and r3.done):
    b.step()
  assert r1.finish_reason == "stop" and r1.tokens == free[:free.index(stop) + 1]
  assert r2.finish_reason == "cancelled" and len(r2.tokens) < 24
  # r3 took a freed slot mid-flight and still equals its own run.
  assert r3.finish_reason == "length" and r3.tokens == _ref(target, None, 6, 24, 0.0)
  assert b.idle


def test_bad_requests_are_one_line_errors(target):
  b = ContinuousBatcher(target, None, slots=2, max_new_tokens=8, max_prompt_len=16)
  for req, msg in [(Request(prompt=[]), "empty"),
                   (Request(prompt=[1] * 17), "at most 16"),
                   (Request(prompt=[1], max_new_tokens=9), r"max_tokens must be in \[1, 8\]"),
                   (Request(prompt=[1], temperature=-1), "temperature"),
                   (Request(prompt=[1], top_p=0.0), "top_p"),
                   (Request(prompt=[99]), r"token ids must be in \[0, 12\)")]:
    with pytest.raises(RequestError, match=msg):
      b.submit(req)
  with pytest.raises(ValueError, match="slots"):
    ContinuousBatcher(target, None, slots=0)


def test_stable_text_holds_back_possible_stop_strings():
  r = Request(prompt=[1], stop_strings=["</end>"])
  r.text = "hello </e"
  assert r.stable_text() == "hello "
  r.text = "hello \ufffd"
  assert r.stable_text() == "hello "
  r.done = True
  r.text = "hello"
  assert r.stable_text() == "hello"


@pytest.mark.parametrize("speculative", [False, True])
def test_admissions_do_not_recompile_the_decode_loop(target, draft, speculative):
  """The decode-round program compiles once per batcher and live-row bucket (B, C, O fixed),
  whatever the mix of admissions, settings (per-row arrays) and lengths."""
  from dspark_jax.decoding import loop as loop_lib
  d = draft if speculative else None
  name = "spec_rounds" if speculative else "ar_rounds"
  b = ContinuousBatcher(target, d, slots=4, max_new_tokens=12, rounds_per_step=1, seed=1)
  b.run([Request(prompt=PROMPTS[0], max_new_tokens=3, temperature=0.5, stop_tokens=[])])
  before = loop_lib.TRACE_COUNTS.get(name, 0)
  reqs = [Request(prompt=PROMPTS[i % 8], max_new_tokens=2 + i % 10, temperature=(i % 3) * 0.5,
                  top_p=0.9 if i % 2 else 1.0, stop_tokens=[]) for i in range(10)]
  b.run(reqs)
  # At most one program per live-row bucket (1, 2, 4) and top-p switch (a static switch of
  # the sampled loop), however the admissions mix ...
  again = lambda: [Request(prompt=PROMPTS[i % 8], max_new_tokens=2 + i % 10,
                           temperature=(i % 3) * 0.5, top_p=0.9 if i % 2 else 1.0,
                           stop_tokens=[]) for i in reversed(range(10))]
  b.run(again())
  assert loop_lib.TRACE_COUNTS.get(name, 0) - before <= 3 * 2
  # ... and nothing new for a mix already seen (once the helper thread has traced every
  # program queued so far: on a loaded machine one may still be compiling here).
  assert b.wait_for_compiles(timeout=600)
  seen = loop_lib.TRACE_COUNTS.get(name, 0)
  b.run(again())
  assert loop_lib.TRACE_COUNTS.get(name, 0) == seen


@pytest.mark.parametrize("speculative", [False, True])
def test_fewer_live_rows_run_a_compiled_program_while_theirs_compiles(target, draft,
                                                                    speculative):
  """When the live rows shrink to a bucket with no program yet, the step keeps running the
  bigger compiled one (rows past the live ones are finished) and the smaller one compiles
  on the helper thread, used once ready; the tokens are those of `generate` throughout."""
  d = draft if speculative else None
  b = ContinuousBatcher(target, d, slots=4, max_new_tokens=20, rounds_per_step=2, seed=3)
  lens = [20, 3, 5, 9]
  reqs = [Request(prompt=PROMPTS[i], max_new_tokens=lens[i], stop_tokens=[], request_id=i)
          for i in range(4)]
  for r in reqs:
    b.submit(r)
  picked, pick = [], b._program_rows
  b._program_rows = lambda want, *a: picked.append((want, pick(want, *a))) or picked[-1][1]
  fell_back = False
  while not all(r.done for r in reqs):
    b.step()
    if picked[-1][0] < picked[-1][1]:
      fell_back = True
      assert b.wait_for_compiles(timeout=600)
  assert picked[0] == (4, 4) and fell_back
  assert picked[-1] == (1, 1)  # the compiled 1-row program took over
  for i, r in enumerate(reqs):
    assert r.tokens == _ref(target, d, i, lens[i], 0.0), i
  off = ContinuousBatcher(target, d, slots=4, max_new_tokens=20, background_compile=False)
  assert off._program_rows(1, sampling.SamplingParams.for_rows([0.0] * 4, [0] * 4, [1.0] * 4),
                           {}) == 1


@pytest.mark.parametrize("speculative", [False, True])
def test_precompiled_programs_are_the_ones_steps_run(target, draft, speculative):
  """`precompile` (a server's start) compiles on the helper thread, from shapes only; the
  steps that follow trace and compile nothing more (JAX's caches are hit)."""
  from dspark_jax.decoding import loop as loop_lib
  name = "spec_rounds" if speculative else "ar_rounds"
  d = draft if speculative else None
  b = ContinuousBatcher(target, d, slots=4, max_new_tokens=10, rounds_per_step=2, seed=5)
  compiled = []  # backend compilations of the rounds program, from JAX's monitoring events
  listen = lambda event, secs, **kw: compiled.append(kw.get("fun_name", ""))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    b.precompile([1, 2])
    assert b.wait_for_compiles(timeout=600)
    assert f"_{name}" in str(compiled)  # (the rounds program was not in JAX's caches yet)
    before, compiled[:] = loop_lib.TRACE_COUNTS.get(name, 0), []
    reqs = [Request(prompt=PROMPTS[i], max_new_tokens=10, stop_tokens=[], request_id=i)
            for i in (1, 2)]
    b.run(reqs)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert loop_lib.TRACE_COUNTS.get(name, 0) == before
  assert f"_{name}" not in str(compiled), compiled
  assert [r.tokens for r in reqs] == [_ref(target, d, i, 10, 0.0) for i in (1, 2)]


def test_offline_steps_hand_out_first_tokens_after_one_round(target):
  """`run` / batch jobs: the step that admits requests runs one round, so time to first
  token is one round, not the time until some row finishes."""
  b = ContinuousBatcher(target, None, slots=2, max_new_tokens=24)
  first = {}
  reqs = [Request(prompt=PROMPTS[i], max_new_tokens=24, stop_tokens=[], request_id=i,
                  on_update=lambda r: first.setdefault(r.request_id, len(r.tokens)))
          for i in range(3)]
  b.run(reqs)
  assert sorted(first) == [0, 1, 2] and max(first.values()) <= 2, first
  assert all(r.t_first < r.t_done and len(r.tokens) == 24 for r in reqs)


def test_a_step_returns_when_a_row_finishes_and_work_waits(target):
  """`stop_on_finish`: the device call ends after the round in which a row finishes (its
  slot is refilled at once); without it the step runs all its rounds."""
  b = ContinuousBatcher(target, None, slots=2, max_new_tokens=16, rounds_per_step=1)
  short, long_, queued = (Request(prompt=PROMPTS[i], max_new_tokens=m, stop_tokens=[],
                                  request_id=i) for i, m in ((0, 3), (1, 16), (2, 4)))
  for r in (short, long_, queued):
    b.submit(r)
  b.step(max_rounds=16)  # a request waits: stops on the short one's finish
  assert short.done and not long_.done and len(long_.tokens) == 3
  b.step(max_rounds=16, stop_on_finish=False)  # runs to the end of the queued one and beyond
  assert queued.done and long_.done
  assert long_.tokens == _ref(target, None, 1, 16, 0.0)


@pytest.mark.parametrize("speculative", [False, True])
def test_generate_continuous_equals_static(target, draft, speculative):
  """`generate(batching="continuous")` gives every prompt the tokens, finish reason and
  per-round record of static batching: 8 prompts of mixed limits through 3 slots, sampled,
  half of them with more stop ids than the batcher's default width."""
  d = draft if speculative else None
  kw = dict(draft=d, max_new_tokens=[5, 17, 9, 20, 3, 11, 14, 6], temperature=1.0, seed=5,
            stop_tokens=[[]] * 4 + [[11, 10, 6, 3, 0]] * 4, batch_size=3)
  static = dj.generate(target, PROMPTS, **kw)
  cont = dj.generate(target, PROMPTS, batching="continuous", **kw)
  assert cont.tokens == static.tokens
  assert cont.stats.finish_reasons == static.stats.finish_reasons
  assert "stop" in static.stats.finish_reasons and "length" in static.stats.finish_reasons
  assert cont.stats.rounds == static.stats.rounds
  if speculative:
    for f in ("accept_lengths", "verify_lengths", "proposed", "position_hits", "position_tries",
              "accept_histogram", "tau"):
      assert getattr(cont.stats, f) == getattr(static.stats, f), f
    # Same rounds; the logits may differ in the last float bits (other batch shapes).
    for c, s in zip(cont.stats.confidence_logits, static.stats.confidence_logits):
      np.testing.assert_allclose(np.asarray(c), np.asarray(s), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="batching must be"):
    dj.generate(target, PROMPTS[:1], batching="dynamic")
