"""Server benchmark: throughput and per-user speed against concurrency, AR vs speculative.

  python -m dspark_jax.serving.bench --concurrency=1,4,16,64 --max_tokens=64 \
      --out=bench_results/server.json --overwrite

For each decoder (`--decoders`: `ar` = plain decoding, `fixed` = speculative verifying every
draft, `scheduled` = speculative with the confidence scheduler) it starts the OpenAI-compatible
server in this process on a free localhost port (`--slots` slots, the demo model and draft by
default) and, per concurrency level C, runs C client threads that each send streaming
`/v1/chat/completions` requests back to back (the first turns of DeepSpec's eval sets,
greedy, `ignore_eos` so every request generates exactly `--max_tokens` tokens) until
`--requests_per_client` x C requests are done. A warm-up request per decoder compiles first.

Per level: throughput (generated tokens / wall time), per-request latency, time to first
token (TTFT) and per-user decode speed ((tokens - 1) / (last - first token time)), each as
p50 and p99; and the process's resident memory before and after. Per `--sla` per-user speed:
the largest throughput of a level whose median per-user speed meets it (the shape of the
paper's production claim: throughput at a per-user speed target). JSON, a markdown table and
a plot (throughput against per-user speed, one line per decoder) beside `--out`.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import sys
import threading
import time

import numpy as np
from absl import flags

from dspark_jax import cli

FLAGS = flags.FlagValues()  # this tool's own (see dspark_jax.cli)
flags.DEFINE_string("target", "smollm2-135m-instruct", "load_target name or directory",
                    flag_values=FLAGS)
flags.DEFINE_string("draft", "demo", "load_draft path of the speculative decoders",
                    flag_values=FLAGS)
flags.DEFINE_list("decoders", ["ar", "fixed", "scheduled"], "ar | fixed | scheduled",
                  flag_values=FLAGS)
flags.DEFINE_list("concurrency", ["1", "4", "16", "64"], "concurrent clients per level "
                  "(empty: no server levels, only the offline comparison)",
                  flag_values=FLAGS)
flags.DEFINE_integer("requests_per_client", 2, "requests each client sends per level",
                     flag_values=FLAGS)
flags.DEFINE_integer("slots", 16, "server slots (rows decoded together)", flag_values=FLAGS)
flags.DEFINE_integer("rounds_per_step", 4, "rounds per device call between admissions",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_tokens", 64, "tokens generated per request", flag_values=FLAGS)
flags.DEFINE_list("sla", ["2", "5", "10", "20"], "per-user tokens/s targets", flag_values=FLAGS)
flags.DEFINE_string("eval_dir", os.path.join("..", "shared", "data", "eval"),
                    "DeepSpec eval sets (first turns are the prompts); built-in prompts if absent",
                    flag_values=FLAGS)
flags.DEFINE_integer("offline_prompts", 32, "also compare `generate` with static batches and "
                     "with batching='continuous' on this many eval prompts, natural stops "
                     "(0: skip)", flag_values=FLAGS)
flags.DEFINE_integer("offline_max_tokens", 96, "token limit of the offline comparison",
                     flag_values=FLAGS)
flags.DEFINE_string("out", os.path.join("runs", "bench", "server.json"),
                    "JSON results (.md table and .png plot beside it)", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace existing output files", flag_values=FLAGS)

DECODERS = ("ar", "fixed", "scheduled")


def rss_mib() -> float:
  """Resident memory of this process (Linux /proc; 0 where unavailable)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError):
    return 0.0


def stream_one(port: int, messages, max_tokens: int) -> dict:
  """One streaming chat request; times of the first and last content chunk."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                     "stream": True, "ignore_eos": True})
  t0 = time.perf_counter()
  conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
  resp = conn.getresponse()
  if resp.status != 200:
    raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
  first = last = None
  tokens = 0
  for line in resp:
    line = line.strip()
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
      continue
    chunk = json.loads(line[6:])
    now = time.perf_counter()
    if chunk["choices"][0]["delta"].get("content"):
      first = now if first is None else first
      last = now
    if "usage" in chunk:
      tokens = chunk["usage"]["completion_tokens"]
  conn.close()
  end = time.perf_counter()
  first = end if first is None else first
  last = end if last is None else last
  return {"latency_s": end - t0, "ttft_s": first - t0, "tokens": tokens,
          "decode_tok_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else None}


def run_level(port: int, prompts, concurrency: int, per_client: int, max_tokens: int) -> dict:
  """C clients, `per_client` requests each, back to back."""
  lock = threading.Lock()
  nxt = iter(range(concurrency * per_client))

  def client(_):
    out = []
    while True:
      with lock:
        i = next(nxt, None)
      if i is None:
        return out
      msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
      out.append(stream_one(port, msgs, max_tokens))

  rss0 = rss_mib()
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    rows = [r for rs in pool.map(client, range(concurrency)) for r in rs]
  wall = time.perf_counter() - t0
  pct = lambda xs, q: float(np.percentile([x for x in xs if x is not None], q)) if any(
      x is not None for x in xs) else None
  lat, ttft = [r["latency_s"] for r in rows], [r["ttft_s"] for r in rows]
  speed = [r["decode_tok_s"] for r in rows]
  n_tok = sum(r["tokens"] for r in rows)
  return {"concurrency": concurrency, "requests": len(rows), "tokens": n_tok, "wall_s": wall,
          "throughput_tok_s": n_tok / wall,
          "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
          "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
          "per_user_tok_s_p50": pct(speed, 50), "per_user_tok_s_p10": pct(speed, 10),
          "all_full_length": all(r["tokens"] == max_tokens for r in rows),
          "rss_mib_before": rss0, "rss_mib_after": rss_mib()}


def offline_compare(target, draft, prompts, *, slots: int, max_tokens: int,
                    scheduler: str) -> dict:
  """`generate` with static batches (each batch of `slots` rows runs until its longest row
  ends) against `generate(batching="continuous")` (a finished row's slot takes the next
  prompt at once) on the same chat prompts, greedy with natural stops; both warm. Outputs
  must be equal."""
  import dspark_jax as dj
  from dspark_jax.engine import profile
  tok = target.tokenizer
  ids = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
  kw = dict(draft=draft, scheduler=scheduler if draft is not None else None, batch_size=slots,
            max_new_tokens=max_tokens)
  static = lambda: dj.generate(target, ids, **kw)
  continuous = lambda: dj.generate(target, ids, batching="continuous", **kw)
  static(), continuous()  # compile
  t_static, res = profile.median_time(static, 1)
  t_cont, cont = profile.median_time(continuous, 1)
  n_static, n_cont = sum(len(t) for t in res.tokens), sum(len(t) for t in cont.tokens)
  return {"prompts": len(ids), "slots": slots, "max_tokens": max_tokens,
          "static_tok_s": n_static / t_static, "continuous_tok_s": n_cont / t_cont,
          "continuous_vs_static": (n_cont / t_cont) / (n_static / t_static),
          "tokens": n_cont, "same_tokens": cont.tokens == res.tokens,
          "mean_len": n_cont / len(ids), "max_len": max(len(t) for t in cont.tokens)}


def at_sla(levels: list[dict], sla: float) -> dict | None:
  """The highest-throughput level whose median per-user speed is at least `sla`."""
  ok = [lv for lv in levels if (lv["per_user_tok_s_p50"] or 0) >= sla]
  if not ok:
    return None
  best = max(ok, key=lambda lv: lv["throughput_tok_s"])
  return {"concurrency": best["concurrency"], "throughput_tok_s": best["throughput_tok_s"]}


def markdown(res: dict) -> str:
  lines = [f"\n{res['setting']}\n"]
  if res["decoders"]:
    lines += ["| decoder | C | tok/s | per-user tok/s p50 | latency p50 / p99 s | "
              "TTFT p50 / p99 s | RSS MiB after |", "|---|---|---|---|---|---|---|"]
  for name, d in res["decoders"].items():
    for lv in d["levels"]:
      lines.append(f"| {name} | {lv['concurrency']} | {lv['throughput_tok_s']:.1f} | "
                   f"{lv['per_user_tok_s_p50']:.1f} | {lv['latency_p50_s']:.2f} / "
                   f"{lv['latency_p99_s']:.2f} | {lv['ttft_p50_s']:.2f} / "
                   f"{lv['ttft_p99_s']:.2f} | {lv['rss_mib_after']:.0f} |")
  if res.get("offline"):
    lines += ["", "| decoder | static batches tok/s | continuous tok/s | ratio | same tokens |",
              "|---|---|---|---|---|"]
    for name, o in res["offline"].items():
      lines.append(f"| {name} | {o['static_tok_s']:.1f} | {o['continuous_tok_s']:.1f} | "
                   f"{o['continuous_vs_static']:.2f} | {o['same_tokens']} |")
  if not res["decoders"]:
    return "\n".join(lines)
  lines += ["", "| decoder | " + " | ".join(f"tok/s at ≥{s} tok/s/user" for s in res["sla"])
            + " |", "|---|" + "---|" * len(res["sla"])]
  for name, d in res["decoders"].items():
    cells = [f"{v['throughput_tok_s']:.1f} (C={v['concurrency']})" if v else "–"
             for v in d["at_sla"].values()]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(res: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, d in res["decoders"].items():
    xs = [lv["per_user_tok_s_p50"] for lv in d["levels"]]
    ys = [lv["throughput_tok_s"] for lv in d["levels"]]
    ax.plot(xs, ys, marker="o", label=name)
    for lv, x, y in zip(d["levels"], xs, ys):
      ax.annotate(f"C={lv['concurrency']}", (x, y), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
  ax.set_xlabel("per-user decode speed, tokens/s (median)")
  ax.set_ylabel("throughput, tokens/s")
  ax.set_title(res["title"], fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  """Runs the benchmark; `argv`: flags without the program name (None = `sys.argv[1:]`)."""
  args = cli.parse(FLAGS, argv, __doc__)
  bad = [d for d in args.decoders if d not in DECODERS]
  if bad:
    raise SystemExit(f"error: unknown decoder(s) {bad}; choose from {DECODERS}")
  levels = [int(c) for c in args.concurrency if c]
  if min(levels, default=1) < 1:
    raise SystemExit("error: --concurrency needs positive integers")
  if not levels and not args.offline_prompts:
    raise SystemExit("error: nothing to run: give --concurrency levels and/or --offline_prompts")
  args.eval_dir, args.out = cli.repo_path(args.eval_dir), cli.repo_path(args.out)
  stem = os.path.splitext(args.out)[0]
  cli.check_outputs([args.out, stem + ".md", stem + ".png"], args.overwrite)
  import jax

  import dspark_jax as dj
  from dspark_jax.engine import profile
  from dspark_jax.serving.jobs import DEMO_PROMPTS, read_prompts
  prompts = list(DEMO_PROMPTS)
  if os.path.isdir(args.eval_dir):
    sets = sorted(f for f in os.listdir(args.eval_dir) if f.endswith(".jsonl"))
    per = [[r["turns"][0] for r in read_prompts(os.path.join(args.eval_dir, f))] for f in sets]
    prompts = [p[i] for i in range(max(map(len, per))) for p in per if i < len(p)]
  else:
    print(f"no eval sets at {args.eval_dir}: using built-in prompts", file=sys.stderr)
  target = dj.load_target(args.target)
  draft = dj.load_draft(args.draft, target) if set(args.decoders) - {"ar"} else None
  tok = target.tokenizer
  prompts = [p for p in prompts if len(tok.apply_chat_template(
      [{"role": "user", "content": p}])) <= 256] or list(DEMO_PROMPTS)
  res = {"target": args.target, "draft": args.draft, "backend": jax.default_backend(),
         "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
         "setting": (f"{args.slots} slots, greedy, {args.max_tokens} tokens/request "
                     f"(ignore_eos), {args.requests_per_client} requests per client, streaming "
                     "chat completions over localhost HTTP") if levels else
                    (f"offline only: {args.offline_prompts} eval prompts through {args.slots} "
                     f"slots, greedy, natural stops, at most {args.offline_max_tokens} tokens"),
         "title": f"{args.target}, {args.slots} slots, {jax.default_backend()}",
         "sla": [float(s) for s in args.sla], "args": vars(args), "decoders": {}}
  for name in args.decoders:
    d = None if name == "ar" else draft
    scheduler = "auto" if name == "scheduled" else "fixed"
    if name == "scheduled" and profile.sps_profile(target, d, batch=args.slots,
                                                   measure=False) is None:
      print("profiling verify cost per token count (cached) ...", file=sys.stderr, flush=True)
      profile.sps_profile(target, d, batch=args.slots)
    if levels:
      res["decoders"][name] = server_levels(args, name, target, d, scheduler, prompts,
                                               levels, res)
    if args.offline_prompts:
      res.setdefault("offline", {})[name] = o = offline_compare(
          target, d, prompts[:args.offline_prompts], slots=args.slots,
          max_tokens=args.offline_max_tokens, scheduler=scheduler)
      print(f"{name} offline: static {o['static_tok_s']:.1f} tok/s, continuous "
            f"{o['continuous_tok_s']:.1f} tok/s (same tokens: {o['same_tokens']})",
            file=sys.stderr, flush=True)
  res["table"] = markdown(res)
  cli.write_json(args.out, res, table=res["table"])
  if res["decoders"]:
    plot(res, stem + ".png")
  print(f"wrote {args.out}", file=sys.stderr)
  return res


def server_levels(args, name: str, target, d, scheduler: str, prompts, levels, res) -> dict:
  """The server part of `main` for one decoder: every concurrency level against a fresh
  in-process server (warmed up first)."""
  from dspark_jax.engine.batcher import ContinuousBatcher
  from dspark_jax.serving.server import Server
  batcher = ContinuousBatcher(target, d, slots=args.slots, max_new_tokens=args.max_tokens,
                              rounds_per_step=args.rounds_per_step, scheduler=scheduler,
                              max_prompt_len=256)
  srv = Server(target, batcher, port=0, model_name=args.target, max_waiting=4096).start()
  try:
    # Compile first: the batcher runs one program per live-row bucket (1, 2, 4, ... slots).
    b = 1
    while True:
      run_level(srv.port, prompts, min(b, args.slots), 1, args.max_tokens)
      if b >= args.slots:
        break
      b *= 2
    out = {"levels": []}
    for c in levels:
      lv = run_level(srv.port, prompts, c, args.requests_per_client, args.max_tokens)
      out["levels"].append(lv)
      print(f"{name} C={c}: {lv['throughput_tok_s']:.1f} tok/s, per-user "
            f"{lv['per_user_tok_s_p50']:.1f} tok/s, p99 latency {lv['latency_p99_s']:.1f} s",
            file=sys.stderr, flush=True)
    c = batcher.counters  # vLLM's mean acceptance length: 1 + accepted / drafts
    out["tau"] = 1 + c.num_accepted_tokens / c.num_drafts if c.num_drafts else None
    out["at_sla"] = {str(s): at_sla(out["levels"], s) for s in res["sla"]}
  finally:
    srv.stop()
  return out


if __name__ == "__main__":
  main()
