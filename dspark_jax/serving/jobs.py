"""Batch jobs: prompts JSONL -> outputs JSONL through the continuous batcher, losing nothing.

  * The prompt file is validated before the model loads (one line per bad row).
  * Each finished row is appended to the output and flushed, so a killed job keeps all it
    finished; rerunning with the same output file skips the (id, sample) pairs already there.
  * Multi-turn rows (`{"turns": [...]}` with several user turns, e.g. mt-bench) are answered
    turn by turn as DeepSpec does: turn k+1's prompt is the chat so far with the model's own
    answers; the row is written when its last turn is answered.
  * `n` samples per prompt (distinct RNG streams: request id = row index * n + sample).
  * Per row: latency, time to first token, prompt tokens, tokens, rounds, tau; the summary
    has totals, tokens/s and p50/p99 latency and TTFT.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from dspark_jax.engine.batcher import ContinuousBatcher, Request, RequestError

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "Give me three tips for staying focused while studying.",
)


def read_prompts(path: str, limit: int = 0) -> list[dict[str, Any]]:
  """Reads a JSONL of `{"turns": [...]}` / `{"prompt": ...}` / `{"question": ...}` rows.

  Returns rows `{"id", "turns": [str, ...]}`; raises ValueError naming the first bad line.
  """
  if not os.path.exists(path):
    raise ValueError(f"prompts file {path} does not exist")
  rows, ids = [], set()
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object")
      if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
          raise ValueError(f"{path}:{n}: 'turns' must be a non-empty list of strings")
      elif isinstance(row.get("prompt"), str):
        turns = [row["prompt"]]
      elif isinstance(row.get("question"), str):
        turns = [row["question"]]
      else:
        raise ValueError(f"{path}:{n}: expected a 'turns', 'prompt' or 'question' field")
      rid = row.get("id", len(rows))
      if rid in ids:
        raise ValueError(f"{path}:{n}: duplicate id {rid!r}")
      ids.add(rid)
      rows.append({"id": rid, "turns": turns})
      if limit and len(rows) >= limit:
        break
  if not rows:
    raise ValueError(f"{path} holds no prompts")
  return rows


def done_keys(path: str) -> set:
  """(id, sample) pairs already answered in an output file (a torn last line and rows
  written as errors are not: a rerun, e.g. with a longer `max_prompt_len`, retries them)."""
  keys = set()
  if not path or not os.path.exists(path):
    return keys
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a kill: its row is redone
      if "error" not in rec:  # a row refused before (e.g. prompt too long) is retried
        keys.add((_key(rec["id"]), rec.get("sample", 0)))
  return keys


def _key(x):
  return json.dumps(x)  # ids may be ints or strings; compare them as written


def _repair_tail(path: str) -> None:
  """Drops a partial last line left by a killed writer, so appends stay valid JSONL."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data.endswith(b"\n"):
      return
    cut = data.rfind(b"\n") + 1
    f.truncate(cut)


class _Row:
  """One (prompt, sample): its turns so far and its requests."""

  def __init__(self, index: int, row: dict, sample: int, n: int):
    self.index, self.row, self.sample = index, row, sample
    self.request_id = index * n + sample
    self.turn = 0
    self.answers: list[str] = []
    self.reqs: list[Request] = []
    self.record: dict | None = None


def run_job(target, batcher: ContinuousBatcher, rows: Sequence[dict], *, max_new_tokens: int,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, n: int = 1,
            chat: bool = True, stop_strings: Sequence[str] = (), output: str = "",
            progress: bool = True, out=sys.stderr) -> dict[str, Any]:
  """Answers `rows` (see `read_prompts`), appending finished rows to `output`.

  Returns the summary dict (rows done in this run; rows found in `output` are skipped).
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  tok = target.tokenizer
  use_chat = chat and tok is not None and tok.has_chat_template
  have = done_keys(output)
  todo = [_Row(i, r, s, n) for i, r in enumerate(rows) for s in range(n)
          if (_key(r["id"]), s) not in have]
  skipped = len(rows) * n - len(todo)
  sink = None
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    _repair_tail(output)
    sink = open(output, "a")
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(todo), desc="generate", unit="row", file=out, dynamic_ncols=True)
  finished: list[_Row] = []
  pending = {}  # id(request) -> _Row
  refused: list[dict] = []  # rows the batcher refused (written with their error)
  t0 = time.perf_counter()
  tokens = 0

  def prompt_ids(r: _Row) -> list[int]:
    turns = r.row["turns"]
    if not use_chat:
      text = turns[r.turn] if r.turn == 0 else "\n".join(
          x for pair in zip(turns, r.answers) for x in pair) + "\n" + turns[r.turn]
      if tok is None:
        raise ValueError("string prompts need a tokenizer; this target has none")
      return tok.encode(text)
    msgs = []
    for k in range(r.turn + 1):
      msgs.append({"role": "user", "content": turns[k]})
      if k < r.turn:
        msgs.append({"role": "assistant", "content": r.answers[k]})
    return tok.apply_chat_template(msgs)

  def submit(r: _Row) -> None:
    req = Request(prompt=prompt_ids(r), max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, stop_strings=tuple(stop_strings),
                  request_id=r.request_id + r.turn * (1 << 20), id=r.row["id"])
    try:
      batcher.submit(req)
    except RequestError as e:  # this row only (e.g. prompt too long): recorded, job goes on
      refuse(r, str(e))
      return
    r.reqs.append(req)
    pending[id(req)] = r

  def refuse(r: _Row, message: str) -> None:
    rec = {"id": r.row["id"], "sample": r.sample, "turns": r.row["turns"],
           "output": r.answers or None, "finish_reason": "error", "error": message}
    if sink is not None:
      sink.write(json.dumps(rec) + "\n")
      sink.flush()
    print(f"row {r.row['id']!r}: {message}", file=out, flush=True)
    refused.append(rec)
    if bar is not None:
      bar.update(1)

  def write(r: _Row) -> None:
    reqs = r.reqs
    rec = {"id": r.row["id"], "sample": r.sample, "turns": r.row["turns"],
           "output": r.answers[0] if len(r.answers) == 1 else r.answers,
           "finish_reason": [q.finish_reason for q in reqs] if len(reqs) > 1
           else reqs[0].finish_reason,
           "prompt_tokens": sum(len(q.prompt) for q in reqs),
           "num_tokens": sum(len(q.tokens) for q in reqs),
           "rounds": sum(q.rounds for q in reqs),
           "latency_s": round(sum(q.latency_s for q in reqs), 4),
           "ttft_s": round(reqs[0].ttft_s, 4) if reqs[0].ttft_s is not None else None}
    acc = [a for q in reqs for a in q.accept_lengths]
    if batcher.spec is not None:
      rec["tau"] = round(float(np.mean(acc)), 4) if acc else None
    if sink is not None:
      sink.write(json.dumps(rec) + "\n")
      sink.flush()
      os.fsync(sink.fileno())
    r.record = rec

  # Admit at most a few batches ahead, so a huge file does not sit in the queue.
  queue = list(todo)
  window = 4 * batcher.slots
  while queue and len(pending) < window:
    submit(queue.pop(0))
  try:
    while pending:
      for req in batcher.offline_step():
        if not req.done:
          continue
        r = pending.pop(id(req))
        tokens += len(req.tokens)
        r.answers.append(req.text if tok is not None else req.tokens)
        r.turn += 1
        if r.turn < len(r.row["turns"]):
          submit(r)
          continue
        write(r)
        finished.append(r)
        if bar is not None:
          bar.update(1)
          bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
        while queue and len(pending) < window:
          submit(queue.pop(0))
  finally:
    if bar is not None:
      bar.close()
    if sink is not None:
      sink.close()
  wall = time.perf_counter() - t0
  lat = [r.record["latency_s"] for r in finished]
  ttft = [r.record["ttft_s"] for r in finished if r.record["ttft_s"] is not None]
  pct = lambda xs, q: round(float(np.percentile(xs, q)), 4) if xs else None
  summary = {"rows_done": len(finished), "rows_skipped": skipped, "rows_refused": len(refused),
             "new_tokens": tokens,
             "wall_time_s": round(wall, 3), "tokens_per_second": round(tokens / max(wall, 1e-9), 2),
             "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
             "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}
  c = batcher.counters
  if batcher.spec is not None and c.num_drafts:
    summary["tau"] = round(1.0 + c.num_accepted_tokens / c.num_drafts, 3)
    summary["draft_acceptance"] = round(c.num_accepted_tokens / max(c.num_draft_tokens, 1), 3)
    if c.position_tries is not None:
      summary["position_acceptance"] = [round(float(h) / float(t), 3) if t else None
                                        for h, t in zip(c.position_hits, c.position_tries)]
  summary["results"] = [r.record for r in finished]
  return summary
