"""Batch jobs lose nothing (kill mid-run, rerun: each id exactly once, equal to an
uninterrupted run), multi-turn rows, n samples, prompt validation before the model loads,
and the chat CLI."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dspark_jax as dj
from dspark_jax.serving import jobs
from dspark_jax.engine.batcher import ContinuousBatcher
from dspark_jax.serving.chat import chat_loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def target():
  return dj.load_target("tiny")


def _rows(n):
  rows = [{"id": f"q{i}", "turns": [f"Count from {i} to {i + 5}."]} for i in range(n)]
  rows[1]["turns"].append("Now count back.")  # multi-turn
  return rows


def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def test_job_multi_turn_and_samples(target, tmp_path):
  b = ContinuousBatcher(target, None, slots=3, max_new_tokens=16)
  out = tmp_path / "out.jsonl"
  s = jobs.run_job(target, b, _rows(4), max_new_tokens=16, temperature=1.0, n=2,
                   output=str(out), progress=False)
  recs = [json.loads(x) for x in open(out)]
  assert sorted((r["id"], r["sample"]) for r in recs) == sorted(
      (f"q{i}", k) for i in range(4) for k in range(2))
  two = [r for r in recs if r["id"] == "q1"]
  assert all(isinstance(r["output"], list) and len(r["output"]) == 2 for r in two)
  # Turn 1 was answered with the chat template over turn 0 and the model's own answer.
  tok = target.tokenizer
  r = two[0]
  turn2 = tok.apply_chat_template([{"role": "user", "content": r["turns"][0]},
                                   {"role": "assistant", "content": r["output"][0]},
                                   {"role": "user", "content": r["turns"][1]}])
  assert r["prompt_tokens"] == len(tok.apply_chat_template(
      [{"role": "user", "content": r["turns"][0]}])) + len(turn2)
  assert s["rows_done"] == 8 and s["latency_p99_s"] >= s["latency_p50_s"] > 0
  assert recs[0]["output"] != "" and recs[0]["ttft_s"] is not None
  # Samples of one prompt use distinct RNG streams.
  assert len({json.dumps(r["output"]) for r in recs if r["id"] == "q0"}) == 2


def test_a_refused_row_is_written_as_an_error_and_retried_by_a_rerun(target, tmp_path):
  """A prompt longer than the server's limit does not stop the job: its row is written with
  the one-line error (not counted as done), the others are answered; a rerun with a longer
  limit answers it."""
  rows = [{"id": "short", "turns": ["Hi."]}, {"id": "long", "turns": ["word " * 200]},
          {"id": "short2", "turns": ["Count to 3."]}]
  out = str(tmp_path / "out.jsonl")
  b = ContinuousBatcher(target, None, slots=2, max_new_tokens=8, max_prompt_len=64)
  s = jobs.run_job(target, b, rows, max_new_tokens=8, output=out, progress=False,
                   out=io.StringIO())
  recs = [json.loads(x) for x in open(out)]
  assert s["rows_done"] == 2 and s["rows_refused"] == 1
  bad = [r for r in recs if r["id"] == "long"]
  assert len(bad) == 1 and bad[0]["finish_reason"] == "error" and "at most 64" in bad[0]["error"]
  assert jobs.done_keys(out) == {(json.dumps("short"), 0), (json.dumps("short2"), 0)}
  b = ContinuousBatcher(target, None, slots=2, max_new_tokens=8, max_prompt_len=1024)
  s = jobs.run_job(target, b, rows, max_new_tokens=8, output=out, progress=False)
  assert s["rows_done"] == 1 and s["rows_skipped"] == 2 and s["rows_refused"] == 0
  assert len(jobs.done_keys(out)) == 3


def test_prompt_file_errors_name_the_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a"}\n{"nothing": 1}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
    jobs.read_prompts(str(bad))
  bad.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
  with pytest.raises(ValueError, match="duplicate id 1"):
    jobs.read_prompts(str(bad))
  with pytest.raises(ValueError, match="does not exist"):
    jobs.read_prompts(str(tmp_path / "missing.jsonl"))


def _serve(args, **kw):
  return subprocess.Popen([sys.executable, "serve.py", "--config.target=tiny", "--config.draft=",
                           "--config.max_new_tokens=24", "--config.batch_size=2",
                           "--config.warmup=false", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def test_killed_job_resumes_to_the_uninterrupted_result(tmp_path):
  prompts = tmp_path / "p.jsonl"
  _write(prompts, _rows(12))
  full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
  ref = _serve([f"--config.prompts={prompts}", f"--config.output={full}"])
  assert ref.wait(timeout=600) == 0, ref.stderr.read()
  proc = _serve([f"--config.prompts={prompts}", f"--config.output={part}",
                 "--config.rounds_per_step=1"])
  deadline = time.time() + 600
  while time.time() < deadline:  # kill once some (not all) rows are on disk
    if part.exists() and 2 <= sum(1 for _ in open(part)) < 12:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = sum(1 for _ in open(part))
  assert 0 < before < 12
  again = _serve([f"--config.prompts={prompts}", f"--config.output={part}"])
  assert again.wait(timeout=600) == 0, again.stderr.read()
  key = lambda r: (r["id"], r["sample"])
  got = sorted((json.loads(x) for x in open(part)), key=key)
  want = sorted((json.loads(x) for x in open(full)), key=key)
  assert [key(r) for r in got] == [key(r) for r in want]  # each id exactly once
  assert [r["output"] for r in got] == [r["output"] for r in want]


def test_cli_errors_are_one_line_before_the_model_loads(tmp_path):
  for args, msg in [(["--config.batch_size=0"], "batch_size must be >= 1"),
                    (["--config.mode=nope"], "mode must be one of"),
                    (["--config.tree=2,x"], "--config.tree: tree must be comma-separated"),
                    ([f"--config.prompts={tmp_path / 'none.jsonl'}"], "does not exist")]:
    p = _serve(args)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and msg in lines[-1], err
    assert "Traceback" not in err


def test_chat_cli_multi_turn_reset_exit(target):
  b = ContinuousBatcher(target, None, slots=1, max_new_tokens=12)
  inputs = iter(["Count from 1 to 4.", "Again.", "/reset", "/bogus", "Hi.", "/exit"])
  out = io.StringIO()
  msgs = chat_loop(target, b, max_new_tokens=12, read=lambda _: next(inputs), out=out)
  assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[0]["content"] == "Hi."
  ref = dj.generate(target, [target.tokenizer.apply_chat_template(msgs[:1])],
                    max_new_tokens=12).texts[0]
  assert msgs[1]["content"] == ref and ref in out.getvalue()
  assert "unknown command" in out.getvalue() and "(new conversation)" in out.getvalue()
