"""STS calibration from rollouts: labels from fixed-length rounds, `sts.json`, `calibrate`, CLI."""

import json
import os

import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import calibrate as calib
from dspark_jax import testing
from dspark_jax.drafts import api as draft_api
from dspark_jax.drafts import sts as sts_lib
from dspark_jax.scheduling import calibration_report, prior_confidence

P = 4
NEW = 16
# 16 token-id prompts of lengths 2..9 (one prompt-length bucket, so one compilation).
PROMPTS = [[(3 * i + 5 * j + 1) % 12 for j in range(2 + i % 8)] for i in range(16)]


@pytest.fixture(scope="module")
def target():
  cfg = testing.tiny_config("qwen3", vocab=12, layers=4)
  return testing.random_target(cfg, scale=12.0, seed=2)


@pytest.fixture(scope="module")
def draft(target):
  return draft_api.init_draft(target, "dspark", num_layers=2, block_size=P,
                              target_layer_ids=(0, 2), markov_rank=8, seed=0)


def _generate(target, draft, prompts, stop_tokens, seed=0):
  return dj.generate(target, prompts, draft=draft, max_new_tokens=NEW, temperature=1.0,
                     seed=seed, batch_size=8, stop_tokens=stop_tokens, scheduler="fixed")


# ---------------------------------------------------------------------------------------------
# label rules
# ---------------------------------------------------------------------------------------------
def test_round_labels_rules():
  rl = calib.round_labels
  # No stop: every round fully observed, accepted = committed - 1 (also the length-cut last one,
  # whose commit of 5 tokens only partly fits the output).
  assert rl([7, 1, 2, 3, 4, 5], [2, 1, 5], [4, 4, 4], stop_ids=[11]) == [
      (0, 1, 4), (1, 0, 4), (2, 4, 4)]
  # Stop = accepted draft 3 of round 0 (commit [1, 2, S, 4]): effective length 3, all accepted,
  # the later rounds are dropped.
  assert rl([7, 1, 2, 11, 4, 5, 6], [4, 2], [4, 4], stop_ids=[11]) == [(0, 3, 3)]
  # Stop = bonus of round 1 (commit [5, S], one draft accepted): fully observed, a real rejection.
  assert rl([7, 1, 2, 3, 5, 11, 6], [3, 2, 1], [4, 4, 4], stop_ids=[11]) == [
      (0, 2, 4), (1, 1, 4)]
  # Stop as the bonus after all P drafts: accepted = P.
  assert rl([7, 1, 2, 3, 4, 11], [5, 1], [4, 4], stop_ids=[11]) == [(0, 4, 4)]
  # A stop as the prefill token: a serving run has no rounds at all.
  assert rl([11, 1, 2], [2], [4], stop_ids=[11]) == []
  # Rounds that verified nothing are skipped but still advance the output.
  assert rl([7, 1, 2, 3], [1, 2], [0, 4], stop_ids=[]) == [(1, 1, 4)]
  with pytest.raises(ValueError, match="committed"):
    rl([7, 1, 2, 3, 4, 5, 6], [6], [4], stop_ids=[])


def test_collect_rollouts_labels_match_the_engine(target, draft):
  res = _generate(target, draft, PROMPTS[:8], stop_tokens=[])
  st = res.stats
  z, y, valid, index = calib.rollouts_from_result(res, P, stop_ids=())
  n = sum(st.rounds)
  assert z.shape == y.shape == valid.shape == (n, P) and index.shape == (n, 2)
  assert z.dtype == np.float64 and y.dtype == bool and valid.dtype == bool
  assert valid.all()  # fixed length, no stop: every position of every round is observed
  assert (np.diff(y.astype(int), axis=1) <= 0).all()  # prefix bits never rise along P
  for (i, r), zs, ys in zip(index, z, y):
    assert ys.sum() == st.accept_lengths[i][r] - 1
    np.testing.assert_allclose(zs, st.confidence_logits[i][r])
  # The engine's own per-position counters: position k was accepted in sum_r 1[n_acc > k] rounds.
  np.testing.assert_array_equal(y.sum(0), st.position_hits)
  assert 0 < y.mean() < 1 and np.ptp(z) > 0  # a non-trivial problem

  # collect_rollouts is the same generate call: identical arrays.
  z2, y2, v2 = calib.collect_rollouts(target, draft, PROMPTS[:8], max_new_tokens=NEW,
                                      stop_tokens=())
  np.testing.assert_array_equal(z2, z)
  np.testing.assert_array_equal(y2, y)
  np.testing.assert_array_equal(v2, valid)

  # With a stop token: the kept rounds of each row are exactly the rounds a serving run (stop
  # tokens in the loop) makes, with the same outcomes up to the stop round.
  stop = 5
  served = _generate(target, draft, PROMPTS[:8], stop_tokens=[stop]).stats
  zs, ys, vs, idx = calib.rollouts_from_result(res, P, stop_ids=[stop])
  zc, yc, vc = calib.collect_rollouts(target, draft, PROMPTS[:8], max_new_tokens=NEW,
                                      stop_tokens=[stop])
  np.testing.assert_array_equal(zc, zs)
  np.testing.assert_array_equal(yc, ys)
  np.testing.assert_array_equal(vc, vs)
  assert 0 < len(idx) < n and not vs.all()  # some rows stop early, some at an accepted draft
  cut = 0
  for i in range(8):
    rounds = idx[idx[:, 0] == i, 1]
    assert list(rounds) == list(range(len(rounds)))
    kept = len(rounds)
    assert served.rounds[i] == kept
    if kept:  # the stop round itself commits fewer tokens when serving (cut after the stop)
      assert served.accept_lengths[i][:-1] == st.accept_lengths[i][:kept - 1]
      assert served.accept_lengths[i][-1] <= st.accept_lengths[i][kept - 1]
    rows = np.flatnonzero(idx[:, 0] == i)
    for j, r in zip(rows, rounds):
      k_eff = vs[j].sum()
      assert vs[j, :k_eff].all() and not vs[j, k_eff:].any()  # observed = a prefix
      np.testing.assert_array_equal(ys[j, :k_eff], y[np.flatnonzero(
          (index[:, 0] == i) & (index[:, 1] == r))[0], :k_eff])
      cut += int(k_eff < P)
      if k_eff < P:  # the stop was accepted draft k_eff: the positions up to it accepted
        assert ys[j, :k_eff].all() and r == rounds[-1]
  assert cut > 0


# ---------------------------------------------------------------------------------------------
# sts.json
# ---------------------------------------------------------------------------------------------
def _reports():
  rng = np.random.default_rng(0)
  z = rng.normal(2.0, 2.0, (200, 3))
  y = np.cumprod(rng.random(z.shape) < 1 / (1 + np.exp(-z / 2)), axis=1).astype(bool)
  y[:, 2] = False  # one class only at position 3: AUROC undefined (NaN -> null)
  temps = np.array([2.0, 1.5, 0.75])
  return temps, calibration_report(z, y), calibration_report(z, y, temps)


def test_sts_json_round_trip(tmp_path):
  temps, before, after = _reports()
  assert sts_lib.read_sts(tmp_path) is None  # no file: no temperatures
  path = sts_lib.write_sts(tmp_path, temps, report_before=before, report_after=after,
                           data={"prompts": "train.jsonl", "fit_rounds": 200})
  assert path == str(tmp_path / sts_lib.STS_FILE)
  assert sts_lib.read_sts(tmp_path) == (2.0, 1.5, 0.75)
  assert sts_lib.read_sts(path) == (2.0, 1.5, 0.75)
  assert [p.name for p in tmp_path.iterdir()] == [sts_lib.STS_FILE]  # no temporary left over
  obj = json.loads((tmp_path / "sts.json").read_text())  # strict JSON (no NaN)
  assert {"temperatures", "ece_before", "ece_after", "auroc_before", "auroc_after", "summary",
          "fitted_on"} <= set(obj)
  assert obj["ece_before"] == pytest.approx(before["ece"])
  assert obj["auroc_after"][2] is None and obj["auroc_after"][0] == pytest.approx(
      after["auroc"][0])
  assert obj["summary"]["ece_after"] == pytest.approx(after["summary"]["ece"])
  assert obj["fitted_on"] == {"prompts": "train.jsonl", "fit_rounds": 200}
  # Rewriting replaces the file.
  sts_lib.write_sts(tmp_path, [1.0, 1.0, 1.0], report_before=before, report_after=after, data={})
  assert sts_lib.read_sts(tmp_path) == (1.0, 1.0, 1.0)
  with pytest.raises(ValueError, match="> 0"):
    sts_lib.write_sts(tmp_path, [1.0, 0.0, 1.0], report_before=before, report_after=after,
                      data={})
  with pytest.raises(ValueError, match="entries"):
    sts_lib.write_sts(tmp_path, [1.0, 1.0], report_before=before, report_after=after, data={})
  # The prior: optional (older files have none), P confidences in [0, 1].
  assert sts_lib.read_sts_prior(tmp_path) is None
  sts_lib.write_sts(tmp_path, temps, report_before=before, report_after=after, data={},
                    prior=[0.5, 0.25, 1.0])
  assert sts_lib.read_sts_prior(tmp_path) == (0.5, 0.25, 1.0)
  with pytest.raises(ValueError, match="3 confidences"):
    sts_lib.write_sts(tmp_path, temps, report_before=before, report_after=after, data={},
                      prior=[0.5])
  (tmp_path / "sts.json").write_text('{"temperatures": [1.0], "prior": [1.5]}')
  with pytest.raises(ValueError, match="lie in"):
    sts_lib.read_sts_prior(tmp_path)


def test_prior_confidence_is_conditional_acceptance():
  y = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)
  np.testing.assert_allclose(prior_confidence(y), [3 / 4, 2 / 3, 1 / 2])
  valid = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], bool)  # row 4 cut at position 3
  np.testing.assert_allclose(prior_confidence(y, valid), [3 / 4, 2 / 3, 0.0])


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ("[1.0, 2.0]", "JSON object"),
    ('{"ece_after": [0.1]}', "no 'temperatures'"),
    ('{"temperatures": 1.5}', "list of numbers"),
    ('{"temperatures": []}', "empty"),
    ('{"temperatures": [1.0, "2"]}', "not a number"),
    ('{"temperatures": [1.0, true]}', "not a number"),
    ('{"temperatures": [1.0, null]}', "not a number"),
    ('{"temperatures": [1.0, -0.5]}', "> 0"),
    ('{"temperatures": [0, 1.0]}', "> 0"),
    ('{"temperatures": [1.0, NaN]}', "finite"),
])
def test_read_sts_rejects_malformed_files(tmp_path, text, match):
  (tmp_path / "sts.json").write_text(text)
  with pytest.raises(ValueError, match=match) as err:
    sts_lib.read_sts(tmp_path)
  assert "\n" not in str(err.value) and "sts.json" in str(err.value)


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:STS.*grid edge:UserWarning")  # a random draft is far off
def test_calibrate_end_to_end(target, draft, tmp_path):
  out = calib.calibrate(target, draft, PROMPTS[:8], PROMPTS[8:], max_new_tokens=NEW,
                        out_dir=str(tmp_path), data={"prompts": "token ids"})
  assert set(out) >= {"temperatures", "before", "after", "fit_after", "fitted_on", "files"}
  temps = out["temperatures"]
  assert len(temps) == P and all(0.5 <= t <= 5.0 for t in temps)
  for report in (out["before"], out["after"]):
    assert all(len(report[key]) == P for key in ("ece", "auroc", "brier", "count"))
  assert out["before"]["count"] == out["after"]["count"] and out["before"]["count"][0] > 0
  assert out["fitted_on"]["prompts"] == "token ids"
  assert out["fitted_on"]["num_fit_prompts"] == 8 and out["fitted_on"]["eval_rounds"] > 0
  assert sts_lib.read_sts(tmp_path) == tuple(temps)
  assert len(out["prior"]) == P and all(0 <= c <= 1 for c in out["prior"])
  assert sts_lib.read_sts_prior(tmp_path) == pytest.approx(tuple(out["prior"]))
  obj = json.loads((tmp_path / "sts.json").read_text())
  assert obj["ece_after"] == pytest.approx(out["after"]["ece"], nan_ok=True)
  png = tmp_path / calib.RELIABILITY_FILE
  assert out["files"] == {"sts": str(tmp_path / "sts.json"), "reliability": str(png)}
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = calib.format_table(out)
  assert len(table.splitlines()) == P + 3 and "ECE" in table

  # The fitted temperatures do what they were fitted for on the fit split (in-sample).
  zf, yf, vf = calib.collect_rollouts(target, draft, PROMPTS[:8], max_new_tokens=NEW)
  raw = calibration_report(zf, yf, valid=vf)
  assert out["fit_after"]["ece"][0] <= raw["ece"][0] + 1e-12


def test_calibrate_refuses_a_draft_without_confidence_head(target):
  dflash = draft_api.init_draft(target, "dflash", num_layers=1, block_size=P,
                                target_layer_ids=(0, 2), seed=0)
  with pytest.raises(ValueError, match="confidence head"):
    calib.collect_rollouts(target, dflash, PROMPTS[:2], max_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_refusals(tmp_path):
  with pytest.raises(SystemExit, match="--draft is required"):
    calib.main([])
  eval_file = os.path.join(calib.EVAL_DATA_DIR, "gsm8k.jsonl")
  with pytest.raises(SystemExit, match="evaluation set"):
    calib.main(["--draft=x", f"--prompts={eval_file}"])
  with pytest.raises(SystemExit, match="no prompt file"):
    calib.main(["--draft=x", f"--prompts={tmp_path / 'absent.jsonl'}"])
  with pytest.raises(SystemExit, match="holdout"):
    calib.split_prompts([[1], [2]], 1.0, 0)
  fit, held = calib.split_prompts([[i] for i in range(10)], 0.3, 0)
  assert len(fit) == 7 and len(held) == 3 and sorted(fit + held) == [[i] for i in range(10)]


@pytest.mark.filterwarnings("ignore:STS.*grid edge:UserWarning")
def test_cli_end_to_end(tmp_path, capsys):
  tiny = dj.load_target("tiny")
  draft_dir = str(tmp_path / "draft")
  dj.save_draft(draft_api.init_draft(tiny, "dspark", num_layers=1, block_size=3,
                                     target_layer_ids=(0,), markov_rank=8, seed=0), draft_dir)
  prompts = tmp_path / "train.jsonl"
  prompts.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": "x"})
                             + "\n" for i in range(10)))
  args = ["--target=tiny", f"--draft={draft_dir}", f"--prompts={prompts}", "--num_prompts=6",
          "--holdout=0.5", "--max_new_tokens=8", "--batch_size=4"]
  out = calib.main(args)
  assert out["fitted_on"]["num_fit_prompts"] == 3 and out["fitted_on"]["num_eval_prompts"] == 3
  assert out["fitted_on"]["prompts"] == str(prompts) and out["fitted_on"]["draft"] == draft_dir
  assert sts_lib.read_sts(draft_dir) == tuple(out["temperatures"])  # default: the draft dir
  loaded = dj.load_draft(draft_dir, tiny)  # the scheduler's temperatures and prior
  assert loaded.config.sts_temperatures == tuple(out["temperatures"])
  assert loaded.config.sts_prior == pytest.approx(tuple(out["prior"]))
  assert os.path.exists(os.path.join(draft_dir, calib.RELIABILITY_FILE))
  captured = capsys.readouterr()
  assert "ECE raw -> STS" in captured.out and len(captured.out.splitlines()) == 3 + 3
  assert f"wrote {draft_dir}" in captured.err
  with pytest.raises(SystemExit, match="--overwrite"):
    calib.main(args)
  # Into the installed package only with --write_into_package (checked before any work).
  packaged = os.path.join(calib.PACKAGE_ASSETS, "drafts", "some-draft")
  with pytest.raises(SystemExit, match="inside the installed package"):
    calib.main(["--target=tiny", f"--draft={packaged}", f"--prompts={prompts}"])
