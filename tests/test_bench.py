"""The benchmark script runs end to end and reports what it claims (tiny target)."""

import json

import numpy as np

import pytest

from dspark_jax import bench


def test_bench_tiny_end_to_end(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "bench.json"
  res = bench.main(["--target=tiny", "--batch_sizes=2", "--max_new_tokens=8", "--repeats=1",
                    "--split_rounds=2", "--eval_dir=" + str(tmp_path / "none"),
                    "--hf_threads=1", f"--out={out}"])
  saved = json.loads(out.read_text())
  assert saved["table"] == res["table"]
  assert (tmp_path / "bench.md").read_text().strip() == res["table"].strip()
  r = saved["batches"]["2"]
  assert r["ar"]["tokens"] == 16  # stop tokens disabled: every row runs to the limit
  assert r["hf"]["tokens"] == 16 and r["hf"]["tokens_per_s"] > 0
  s = r["spec"]["random-init dspark"]
  assert s["tokens"] == 16 and s["greedy_equal"] is True
  assert 1.0 <= s["tau"] <= s["block"] + 1
  assert s["split"]["propose_ms"] > 0 and s["split"]["verify_ms"] > 0
  assert "| ours, speculative (random-init dspark) |" in res["table"]


def test_bench_prompts_fall_back_to_builtins(tmp_path):
  import dspark_jax as dj
  tok = dj.load_target("tiny").tokenizer
  ids = bench.bench_prompts(tok, str(tmp_path), 10)
  assert len(ids) == 10 and all(isinstance(i, int) for p in ids for i in p)


def test_bench_parse_drafts_rejects_bad_entries():
  assert bench.parse_drafts("a=x,b=y") == {"a": "x", "b": "y"}
  with pytest.raises(SystemExit, match="name=path"):
    bench.parse_drafts("dspark")


def test_generate_time_split_fills_stats():
  import dspark_jax as dj
  target = dj.load_target("tiny")
  draft = dj.init_draft(target, "dspark", num_layers=1, block_size=3, markov_rank=8)
  res = dj.generate(target, ["ab", "abc de"], draft=draft, max_new_tokens=6, time_split=True)
  st = res.stats
  split = st.extra["round_split_ms"]
  assert split["propose_ms"] > 0 and split["verify_ms"] > 0
  iters = max(st.rounds)  # one batch: loop iterations = rounds of its longest row
  np.testing.assert_allclose(st.draft_time_s, split["propose_ms"] * iters / 1e3)
  np.testing.assert_allclose(st.verify_time_s, split["verify_ms"] * iters / 1e3)
  assert dj.generate(target, ["ab"], max_new_tokens=2).stats.draft_time_s is None
  # Position counts: every round tries position 0; acceptance = hits / tries.
  assert st.position_tries[0] == sum(len(r) for r in st.accept_lengths)
  for a, h, t in zip(st.position_acceptance, st.position_hits, st.position_tries):
    assert (a is None and t == 0) or a == h / t


def test_bench_help_lists_every_flag_with_its_default(capsys):
  with pytest.raises(SystemExit) as exit_:
    bench.main(["--help"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  for name, flag in bench.FLAGS._flags().items():
    assert f"--{name}" in out or f"--[no]{name}" in out, name
    assert flag.help, name
  assert "(default: '1,8')" in out and "(default: 'runs/bench/bench.json')" in out


def test_bench_refuses_to_overwrite_results(tmp_path):
  out = tmp_path / "bench.json"
  out.write_text("{}")
  with pytest.raises(SystemExit, match="exists; pass --overwrite"):
    bench.main(["--target=tiny", f"--out={out}"])
  assert out.read_text() == "{}"
  assert not bench.FLAGS["out"].default.startswith("bench_results")  # committed results


def test_bench_full_vocab_too_adds_the_lifted_copy(tmp_path):
  """A draft over a reduced vocabulary is also run with the same weights over all of it."""
  import dspark_jax as dj
  target = dj.load_target("tiny")
  full = dj.init_draft(target, "eagle3", block_size=3, seed=1)
  ids = list(range(0, target.config.vocab_size, 2))
  dj.save_draft(dj.restrict_vocab(full, ids), tmp_path / "e3", target=target)
  res = bench.main(["--target=tiny", "--skip_hf", "--no_random_draft", "--batch_sizes=2",
                    "--max_new_tokens=8", "--repeats=1", "--split_rounds=2",
                    "--eval_dir=" + str(tmp_path / "none"), f"--drafts=e3={tmp_path / 'e3'}",
                    "--full_vocab_too", f"--out={tmp_path / 'bench.json'}"])
  spec = res["batches"]["2"]["spec"]
  assert set(spec) == {"e3", "e3@full"}
  assert all(s["greedy_equal"] is True and s["split"]["propose_ms"] > 0 for s in spec.values())
