"""`serve(config)`: what `python serve.py` runs (batch job, HTTP server or chat).

Everything that can be checked without the model (mode, limits, the prompt file) is checked
before the (slow) model load, so a bad flag fails in a second with one line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from dspark_jax.serving import jobs
from dspark_jax.engine.batcher import ContinuousBatcher

MODES = ("batch", "server", "chat")


def _check(config) -> None:
  if config.mode not in MODES:
    raise ValueError(f"--config.mode must be one of {', '.join(MODES)}, got {config.mode!r}")
  for name in ("batch_size", "max_new_tokens", "n", "rounds_per_step"):
    if config[name] < 1:
      raise ValueError(f"--config.{name} must be >= 1, got {config[name]}")
  if config.get("max_prompt_len", 0) < 0:
    raise ValueError(f"--config.max_prompt_len must be >= 0, got {config.max_prompt_len}")
  if not 0 <= config.port < 65536:
    raise ValueError(f"--config.port must be in [0, 65535], got {config.port}")
  if config.get("tree", ""):
    from dspark_jax.kernels.tree_accept import TreeShape
    try:
      TreeShape.parse(config.tree)
    except ValueError as e:
      raise ValueError(f"--config.tree: {e}") from None


def use_compilation_cache(enabled: bool) -> str | None:
  """Keeps compiled XLA programs in `<dspark_jax cache>/xla` (JAX's persistent compilation
  cache), so a later run with the same model and shapes loads them instead of compiling:
  most of a short run's start-up. A cache directory configured already (JAX_COMPILATION_CACHE_DIR
  or `jax.config`) is left as it is. Returns the directory in use, or None."""
  import jax
  current = jax.config.jax_compilation_cache_dir
  if current or not enabled:
    return current or None
  from dspark_jax.demo.models import cache_root
  path = str(cache_root() / "xla")
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def load_models(config, out=sys.stderr):
  from dspark_jax import sharding
  from dspark_jax.target import load_target
  mesh = sharding.make_mesh(dict(config.mesh)) if "mesh" in config else None
  target = load_target(config.target, dtype=config.dtype, mesh=mesh)
  draft = None
  if config.draft:
    from dspark_jax.drafts.checkpoint import load_draft, resolve_draft_path
    draft = load_draft(resolve_draft_path(config.draft, target), target)
  print(f"target: {target}", file=out)
  print(f"draft:  {draft if draft is not None else 'none (plain autoregressive decoding)'}",
        file=out, flush=True)
  return target, draft


def make_batcher(config, target, draft, out=sys.stderr) -> ContinuousBatcher:
  scheduler = config.scheduler
  tree = config.get("tree", "") or None
  if tree is not None:
    scheduler = None  # a tree is verified whole
  if draft is not None and scheduler == "auto" and draft.config.confidence_head:
    # The scheduler needs this machine's verify-cost curve: measured once, then cached.
    from dspark_jax.engine import profile
    if profile.sps_profile(target, draft, batch=config.batch_size, measure=False) is None:
      print("profiling verify cost per token count (once per machine; cached) ...", file=out,
            flush=True)
      profile.sps_profile(target, draft, batch=config.batch_size)
  return ContinuousBatcher(target, draft, slots=config.batch_size,
                           max_new_tokens=config.max_new_tokens,
                           max_prompt_len=config.get("max_prompt_len", 0) or None,
                           rounds_per_step=config.rounds_per_step,
                           num_draft_tokens=config.num_draft_tokens or None,
                           scheduler=scheduler, seed=config.seed, tree=tree)


def serve(config, out=sys.stdout) -> dict[str, Any] | None:
  _check(config)
  rows = None
  if config.mode == "batch":
    rows = (jobs.read_prompts(config.prompts, config.max_prompts) if config.prompts else
            [{"id": i, "turns": [t]} for i, t in enumerate(jobs.DEMO_PROMPTS)])
  t0 = time.perf_counter()
  use_compilation_cache(config.get("compilation_cache", True))
  target, draft = load_models(config)
  batcher = make_batcher(config, target, draft)
  load_s = time.perf_counter() - t0
  sample = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
  if config.mode == "server":
    from dspark_jax.serving.server import Server
    name = config.model_name or config.target
    print(f"serving {name!r} on http://{config.host}:{config.port}/v1 (Ctrl-C stops); "
          "decode programs compile in the background", file=sys.stderr, flush=True)
    batcher.precompile()
    Server(target, batcher, host=config.host, port=config.port, model_name=name,
           max_waiting=config.max_waiting).serve_forever()
    return None
  if config.mode == "chat":
    from dspark_jax.serving.chat import chat_loop
    batcher.precompile([1])  # one conversation: compiles while the first message is typed
    chat_loop(target, batcher, max_new_tokens=config.max_new_tokens, **sample)
    return None
  if config.warmup:
    # Compiles the prefill and decode programs first, so tokens/s below is steady state: the
    # job's first admission (the same rows, as many as fit the slots) compiles the programs
    # it starts with; smaller live-row programs compile in the background as rows finish.
    print("warm-up (compiling; not timed) ...", file=sys.stderr, flush=True)
    first = min(config.batch_size, len(rows) * config.n)
    warm = [{"id": f"warmup-{i}", "turns": rows[i % len(rows)]["turns"][:1]}
            for i in range(first)]
    jobs.run_job(target, batcher, warm, max_new_tokens=min(8, config.max_new_tokens),
                 chat=config.chat, progress=False, **sample)
  summary = jobs.run_job(target, batcher, rows, max_new_tokens=config.max_new_tokens,
                         n=config.n, chat=config.chat, stop_strings=tuple(config.stop),
                         output=config.output, **sample)
  results = summary.pop("results")
  summary = {"target": target.path, "draft": getattr(draft, "path", None),
             "algorithm": draft.algorithm if draft is not None else "ar",
             "num_prompts": len(rows), **summary, "load_time_s": round(load_s, 2)}
  if not config.output or len(results) <= 8:
    for r in results:
      turns = r["turns"] if isinstance(r["output"], list) else r["turns"][:1]
      answers = r["output"] if isinstance(r["output"], list) else [r["output"]]
      for q, a in zip(turns, answers):
        print(f"\n### prompt {r['id']}: {q}\n{a}", file=out)
  print("\nsummary: " + json.dumps(summary), file=out)
  return summary
