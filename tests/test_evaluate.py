"""The per-domain evaluation runs end to end and its pooled statistics are consistent (tiny)."""

import json
import os

import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import evaluate


def test_evaluate_tiny_end_to_end(tmp_path):
  target = dj.load_target("tiny")
  draft = dj.init_draft(target, "dspark", num_layers=1, block_size=3, markov_rank=8)
  dj.save_draft(draft, str(tmp_path / "draft"))
  eval_dir = tmp_path / "eval"
  eval_dir.mkdir()
  for dom, texts in (("alpha", ["ab cd", "hello there"]), ("beta", ["xyz", "one two three"])):
    with open(eval_dir / f"{dom}.jsonl", "w") as f:
      for t in texts:
        f.write(json.dumps({"turns": [t]}) + "\n")
  out = tmp_path / "eval.json"
  res = evaluate.main(["--target=tiny", f"--drafts=d={tmp_path / 'draft'}",
                       f"--eval_dir={eval_dir}", "--num_prompts=2", "--max_new_tokens=8",
                       f"--out={out}"])
  saved = json.loads(out.read_text())  # strict JSON: no NaN anywhere
  assert saved["domains"] == ["alpha", "beta"]
  d = saved["drafts"]["d"]
  assert d["greedy_equal_all"] is True
  assert set(d["per_domain"]) == {"alpha", "beta"}
  assert 1.0 <= d["mean_tau"] <= 4.0
  # Pooled per-position acceptance is hits / tries, None exactly where nothing was tried.
  assert len(d["position_acceptance"]) == len(d["position_tries"]) == 3
  for a, t in zip(d["position_acceptance"], d["position_tries"]):
    assert (a is None) == (t == 0)
    assert a is None or 0.0 <= a <= 1.0
  assert d["position_tries"][0] > 0
  assert (tmp_path / "eval_acceptance.png").stat().st_size > 0
  assert "| mean over sets |" in res["table"] and "| pooled (all rounds) |" in res["table"]
  # The histogram of committed lengths accounts for every round, per domain and pooled.
  assert len(d["accept_histogram"]) == 4
  assert sum(d["accept_histogram"]) == sum(sum(p["accept_histogram"])
                                           for p in d["per_domain"].values())
  assert d["mean_tau_over_sets"] == pytest.approx(
      np.mean([p["tau"] for p in d["per_domain"].values()]))
  pooled = np.average(np.arange(1, 5), weights=d["accept_histogram"])
  assert d["mean_tau"] == pytest.approx(pooled)


def test_evaluate_prompts_are_a_seeded_shuffle(tmp_path):
  tok = dj.load_target("tiny").tokenizer
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"turns": [f"q{i}"]}) + "\n" for i in range(20)))
  ordered = evaluate.load_domain_prompts(str(path), tok, 5, 512)
  a = evaluate.load_domain_prompts(str(path), tok, 5, 512, shuffle_seed=0)
  assert a == evaluate.load_domain_prompts(str(path), tok, 5, 512, shuffle_seed=0)
  assert a != ordered and a != evaluate.load_domain_prompts(str(path), tok, 5, 512,
                                                            shuffle_seed=1)
  assert ordered == [tok.apply_chat_template([{"role": "user", "content": f"q{i}"}])
                     for i in range(5)]


def test_evaluate_without_eval_sets_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="no \\*.jsonl eval sets"):
    evaluate.main([f"--eval_dir={tmp_path}"])


def test_evaluate_paths_are_relative_to_the_repository_root(tmp_path, monkeypatch):
  from dspark_jax import cli
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit, match="no such directory") as err:
    evaluate.main(["--eval_dir=no/such/eval"])
  assert os.path.join(cli.REPO_ROOT, "no", "such", "eval") in str(err.value)
  assert cli.repo_path("../shared/data/eval") == os.path.join(
      os.path.dirname(cli.REPO_ROOT), "shared", "data", "eval")
  assert cli.repo_path(str(tmp_path)) == str(tmp_path)


def test_evaluate_refuses_to_overwrite_results(tmp_path):
  eval_dir = tmp_path / "eval"
  eval_dir.mkdir()
  (eval_dir / "a.jsonl").write_text(json.dumps({"turns": ["hi"]}) + "\n")
  out = tmp_path / "eval.json"
  out.write_text("{}")
  with pytest.raises(SystemExit, match="exists; pass --overwrite"):  # before loading anything
    evaluate.main(["--target=/nonexistent", f"--eval_dir={eval_dir}", f"--out={out}"])
  assert evaluate.FLAGS["out"].default == os.path.join("runs", "eval", "eval.json")
  with pytest.raises(SystemExit, match="Unknown command line flag 'outt'"):
    evaluate.main(["--outt=x"])


def test_merge_evals_joins_drafts_of_one_setting_and_refuses_others(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "merge_evals", os.path.join(os.path.dirname(__file__), "..", "scripts", "merge_evals.py"))
  merge_evals = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(merge_evals)

  def run(name, tau, **args):
    per = {"gsm8k": {"tau": tau}}
    base = dict(num_prompts=8, shuffle_seed=0, max_new_tokens=64, temperature=0.0, seed=0)
    return {"target": "t", "setting": "greedy", "domains": ["gsm8k"], "ar": {},
            "args": dict(base, **args),
            "drafts": {name: {"per_domain": per, "mean_tau_over_sets": tau, "mean_tau": tau}}}

  paths = []
  for i, r in enumerate([run("a", 1.5), run("b", 1.25), run("c", 2.0, num_prompts=4),
                         run("a", 1.0)]):
    paths.append(str(tmp_path / f"{i}.json"))
    with open(paths[-1], "w") as f:
      json.dump(r, f)
  merged = merge_evals.merge(paths[:2])
  assert list(merged["drafts"]) == ["a", "b"]
  assert "| gsm8k | 1.50 | 1.25 |" in merged["table"]
  with pytest.raises(SystemExit, match="num_prompts"):
    merge_evals.merge([paths[0], paths[2]])
  with pytest.raises(SystemExit, match="in two files"):
    merge_evals.merge([paths[0], paths[3]])
