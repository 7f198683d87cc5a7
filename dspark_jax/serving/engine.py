"""Batch serving: prompts JSONL -> outputs JSONL with per-row stats, progress and a summary.

`serve(config)` is what `python serve.py` runs. Prompts come from DeepSpec-style
`{"turns": [...]}` rows (the first turn is used, rendered with the chat template) or
`{"prompt": ...}` rows; with no prompts file a few built-in demo prompts are used.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Iterable

from dspark_jax import generation
from dspark_jax.target import load_target

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "Give me three tips for staying focused while studying.",
)


def read_prompts(path: str, limit: int = 0) -> list[dict[str, Any]]:
  """Reads a JSONL of `{"turns": [...]}` / `{"prompt": ...}` / `{"question": ...}` rows."""
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
      if "turns" in row:
        if not row["turns"]:
          raise ValueError(f"{path}:{n}: empty 'turns'")
        text = row["turns"][0]
      elif "prompt" in row:
        text = row["prompt"]
      elif "question" in row:
        text = row["question"]
      else:
        raise ValueError(f"{path}:{n}: expected a 'turns', 'prompt' or 'question' field")
      rows.append({"id": row.get("id", len(rows)), "text": text})
      if limit and len(rows) >= limit:
        break
  return rows


def format_prompts(target, texts: Iterable[str], chat: bool) -> list:
  if chat and target.tokenizer is not None and target.tokenizer.has_chat_template:
    return [target.tokenizer.apply_chat_template([{"role": "user", "content": t}])
            for t in texts]
  return list(texts)


def load_draft_from_config(config, target):
  draft_path = config.get("draft", "")
  if not draft_path:
    return None
  from dspark_jax.drafts.checkpoint import load_draft, resolve_draft_path
  return load_draft(resolve_draft_path(draft_path, target), target)


def serve(config, out=sys.stdout) -> dict[str, Any]:
  """Runs batch generation as described by a serve config; returns the summary dict."""
  if config.batch_size < 1:  # checked before the (slow) model load
    raise ValueError(f"--config.batch_size must be >= 1, got {config.batch_size}")
  from dspark_jax import sharding
  mesh = sharding.make_mesh(dict(config.mesh)) if "mesh" in config else None
  t0 = time.perf_counter()
  target = load_target(config.target, dtype=config.dtype, mesh=mesh)
  draft = load_draft_from_config(config, target)
  load_s = time.perf_counter() - t0
  print(f"target: {target}", file=out)
  print(f"draft:  {draft if draft is not None else 'none (plain autoregressive decoding)'}",
        file=out)
  if config.prompts:
    rows = read_prompts(config.prompts, config.max_prompts)
  else:
    rows = [{"id": i, "text": t} for i, t in enumerate(DEMO_PROMPTS)]
  if not rows:
    raise ValueError("no prompts to serve")

  prompts = format_prompts(target, [r["text"] for r in rows], config.chat)
  kwargs = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                top_k=config.top_k, top_p=config.top_p, seed=config.seed,
                batch_size=config.batch_size, progress=len(rows) > config.batch_size)
  if draft is not None and config.num_draft_tokens:
    kwargs["num_draft_tokens"] = config.num_draft_tokens
  if draft is not None:
    kwargs["scheduler"] = config.get("scheduler", "auto")
    if kwargs["scheduler"] == "auto" and draft.config.confidence_head:
      # The scheduler needs this machine's verify-cost curve: measured once, then cached.
      from dspark_jax.engine import profile
      if profile.sps_profile(target, draft, batch=config.batch_size, measure=False) is None:
        print("profiling verify cost per token count (once per machine; cached) ...",
              file=out, flush=True)
        profile.sps_profile(target, draft, batch=config.batch_size)
  if config.get("warmup", True):
    # Compile once on the first batch so the reported tokens/s is steady-state speed.
    generation.generate(target, prompts[:config.batch_size], draft=draft, **kwargs)
  result = generation.generate(target, prompts, draft=draft, **kwargs)
  stats = result.stats
  if config.output:
    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    with open(config.output, "w") as f:
      for i, row in enumerate(rows):
        rec = {"id": row["id"], "prompt": row["text"], "output": result.texts[i] if result.texts
               else None, "tokens": result.tokens[i], **stats.row(i)}
        f.write(json.dumps(rec) + "\n")
  summary = {
      "target": target.path, "draft": getattr(draft, "path", None),
      "algorithm": draft.algorithm if draft is not None else "ar",
      "num_prompts": len(rows), "new_tokens": int(sum(stats.num_tokens)),
      "wall_time_s": round(stats.wall_time_s, 3),
      "tokens_per_second": round(stats.tokens_per_second, 2), "load_time_s": round(load_s, 2),
  }
  if stats.tau is not None:
    summary["tau"] = round(stats.tau, 3)
    summary["scheduler"] = stats.scheduler
    summary["verify_tokens_per_round"] = round(stats.verify_tokens_per_round, 3)
    summary["position_acceptance"] = [None if x is None else round(x, 3)
                                       for x in stats.position_acceptance]
  if not config.output or len(rows) <= 8:
    for i, row in enumerate(rows):
      text = result.texts[i] if result.texts else result.tokens[i]
      print(f"\n### prompt {row['id']}: {row['text']}\n{text}", file=out)
  print("\nsummary: " + json.dumps(summary), file=out)
  return summary
