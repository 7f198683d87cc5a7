"""Scheduled verification vs plain decoding: tokens/s per eval set, batch size and policy.

  python -m dspark_jax.schedule_bench --batch_sizes=1,8,32 --max_new_tokens=64 \
      --out=bench_results/schedule.json

For every eval set (first turns of `--eval_dir/*.jsonl`, chat-formatted) and batch size B,
the first B prompts are decoded greedily with every row forced to `--max_new_tokens`
(stop tokens off, so all decoders produce the same token count) by

  * plain autoregressive decoding (AR);
  * speculative decoding with each policy of `--policies`: "fixed" (every round verifies
    all P drafts), "threshold" (DeepSpec's static rule, `--threshold`), "early_stop"
    (Algorithm 1), "async" (paper 5.2), each with the plain-step fallback when the
    profiled costs say the draft does not pay.

The SPS table and propose cost come from `engine.profile.sps_profile` (measured once per
batch bucket, cached, plotted). Every run is compiled first (untimed), then timed
`--repeats` times (median). Reported: tokens/s, ratio to AR, tau (tokens per round), mean
verify tokens per request and round (1 + l), share of rounds that proposed, and whether
greedy outputs equal AR's. One run on one machine; ratios are within that run.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
from absl import flags

from dspark_jax import cli
from dspark_jax.scheduling.load import trajectories_from_stats

FLAGS = flags.FlagValues()
flags.DEFINE_string("target", "smollm2-135m-instruct", "model path, hub id or demo name",
                    flag_values=FLAGS)
flags.DEFINE_string("draft", "demo", "draft directory ('demo' = the committed demo draft)",
                    flag_values=FLAGS)
flags.DEFINE_integer("draft_vocab", 0, "restrict the draft to the N most frequent tokens of "
                     "--vocab_data (0 = full vocabulary)", flag_values=FLAGS)
flags.DEFINE_string("vocab_data", os.path.join("runs", "demo_v2", "data", "regenerated.jsonl"),
                    "JSONL of regenerated conversations for --draft_vocab token counts",
                    flag_values=FLAGS)
flags.DEFINE_string("eval_dir", os.path.join("..", "shared", "data", "eval"),
                    "DeepSpec eval sets (relative paths start at the repository root)",
                    flag_values=FLAGS)
flags.DEFINE_string("sets", "", "comma-separated eval set names (default: all)",
                    flag_values=FLAGS)
flags.DEFINE_string("batch_sizes", "1,8", "comma-separated batch sizes", flag_values=FLAGS)
flags.DEFINE_string("policies", "fixed,threshold,early_stop,async",
                    "comma-separated scheduler policies", flag_values=FLAGS)
flags.DEFINE_float("threshold", 0.5, "threshold of the 'threshold' policy", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "tokens per row", flag_values=FLAGS)
flags.DEFINE_integer("max_prompt_tokens", 256, "skip longer chat-formatted prompts",
                     flag_values=FLAGS)
flags.DEFINE_string("repeats", "2", "timed runs per measurement (median): one value, or one "
                    "per batch size", flag_values=FLAGS)
flags.DEFINE_string("out", os.path.join("runs", "schedule_bench.json"),
                    "results JSON (a PNG and a markdown table are written beside it)",
                    flag_values=FLAGS)
flags.DEFINE_string("load_concurrency", "1,2,4,8,16,32,64",
                    "concurrencies of the load model (paper Fig. 8) replaying the fixed runs' "
                    "rounds on the profiled SPS curves; a concurrency is modelled with the "
                    "smallest profiled batch that holds its verify tokens (empty: skip)",
                    flag_values=FLAGS)
flags.DEFINE_string("load_from", "", "comma-separated result JSONs of earlier runs (with their "
                    "*_rollouts.npz): only run the load model over them, into --out",
                    flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace existing output files", flag_values=FLAGS)


def _prompts(tokenizer, path: str, n: int, max_tokens: int) -> list[list[int]]:
  """The first `n` chat-formatted first turns of an eval set (cycled if it has fewer)."""
  from dspark_jax.evaluate import load_domain_prompts
  out = load_domain_prompts(path, tokenizer, n, max_tokens)
  return [out[i % len(out)] for i in range(n)] if out else []


def _scheduler(policy: str, prof: dict, threshold: float, temps, prior=None):
  from dspark_jax.scheduling import Scheduler
  if policy == "fixed":
    return "fixed"
  kw = dict(sps=np.asarray(prof["sps"]), propose_cost=prof["propose_s"],
            temperatures=None if temps is None else np.asarray(temps),
            prior=None if prior is None else np.asarray(prior))
  if policy == "threshold":
    return Scheduler(policy="threshold", threshold=threshold, **kw)
  return Scheduler(policy=policy, **kw)


def pack_rollouts(rollouts) -> dict:
  """Trajectories as flat arrays (`conf [N, P]`, `accepted [N]`, `offsets [T+1]`)."""
  offsets = np.cumsum([0] + [len(a) for _, a in rollouts])
  return {"conf": np.concatenate([z for z, _ in rollouts]),
          "accepted": np.concatenate([a for _, a in rollouts]), "offsets": offsets}


def load_model(rollouts, profiles: dict, concurrency: list[int], temps, prior=None) -> dict:
  """Verify budget and tokens/s vs concurrency for AR / fixed / early stop (`scheduling.load`)."""
  from dspark_jax.scheduling import load
  sizes = sorted(int(b) for b in profiles)
  out = {"concurrency": [], "profile_batch": [], "policies": {}, "rounds": 256,
         "source": f"{sum(len(a) for _, a in rollouts)} fixed-length rounds of "
                   f"{len(rollouts)} requests (every set and batch of this run)"}
  for r in concurrency:
    fits = [b for b in sizes if b >= r]  # its table covers r * (P + 1) verify tokens
    if not fits:
      continue
    prof = profiles[str(fits[0])]
    out["concurrency"].append(r)
    out["profile_batch"].append(fits[0])
    for pol in load.LOAD_POLICIES:
      res = load.simulate(rollouts, np.asarray(prof["sps"]), prof["propose_s"], r, policy=pol,
                          temperatures=None if temps is None else np.asarray(temps),
                          prior=None if prior is None else np.asarray(prior))
      out["policies"].setdefault(pol, []).append(res)
  return out


def load_markdown(load: dict) -> str:
  lines = [f"\n**load model** ({load['source']}; {load['rounds']} rounds per point)\n",
           "| concurrency (profile batch) | AR tok/s | fixed tok/s (verify/req) | "
           "early_stop tok/s (verify/req, proposed) |", "|---|---|---|---|"]
  pols = load["policies"]
  for i, (r, b) in enumerate(zip(load["concurrency"], load["profile_batch"])):
    ar, fx, es = pols["ar"][i], pols["fixed"][i], pols["early_stop"][i]
    lines.append(f"| {r} ({b}) | {ar['tokens_per_s']:.1f} | {fx['tokens_per_s']:.1f} "
                 f"({fx['verify_per_request']:.2f}) | {es['tokens_per_s']:.1f} "
                 f"({es['verify_per_request']:.2f}, {es['proposed_share']:.2f}) |")
  return "\n".join(lines)


def plot_load(results: dict, path: str) -> None:
  """Paper Fig. 8's two panels from the load model, with the measured batches as markers."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  load = results["load"]
  conc = load["concurrency"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for pol, style in (("fixed", "s--"), ("early_stop", "o-")):
    left.plot(conc, [x["verify_per_request"] for x in load["policies"][pol]], style, label=pol)
  left.set_xscale("log", base=2)
  _label(left, "concurrency (requests)", "verify tokens per request and proposing round",
         "verify budget vs concurrency (model)", 8)
  colors = {"ar": "k", "fixed": "tab:blue", "early_stop": "tab:orange"}
  for pol in load["policies"]:
    right.plot(conc, [x["tokens_per_s"] for x in load["policies"][pol]], "-",
               color=colors[pol], label=f"{pol} (model)")
  for bs, r in results["batches"].items():
    sets = list(r["sets"].values())
    right.plot([int(bs)], [np.mean([s["ar_tokens_per_s"] for s in sets])], "x",
               color=colors["ar"])
    for pol in ("fixed", "early_stop"):
      if pol in results["policies"]:
        right.plot([int(bs)], [np.mean([s["spec"][pol]["tokens_per_s"] for s in sets])], "x",
                   color=colors[pol])
  right.set_xscale("log", base=2)
  _label(right, "concurrency (requests)", "tokens/s (all requests)",
         "throughput vs concurrency (x: measured)", 8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _label(ax, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=legend_size)


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sizes = list(results["batches"])
  fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(5 * (len(sizes) + 1), 4))
  for ax, bs in zip(axes, sizes):
    sets = list(results["batches"][bs]["sets"])
    pols = results["policies"]
    width = 0.8 / len(pols)
    for k, pol in enumerate(pols):
      vals = [results["batches"][bs]["sets"][s]["spec"][pol]["vs_ar"] for s in sets]
      ax.bar(np.arange(len(sets)) + k * width, vals, width, label=pol)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(sets)) + 0.4, sets, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s vs AR")
    ax.set_title(f"batch {bs}")
    ax.legend(fontsize=7)
  ax = axes[-1]
  for bs, prof in results["profiles"].items():
    sps = np.asarray(prof["sps"])[1:]
    ax.step(np.arange(1, len(sps) + 1) / int(bs), sps, where="post", label=f"batch {bs}")
  _label(ax, "verify tokens per request (n / B)", "verify steps/s", "profiled SPS curve", 7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def markdown(results: dict) -> str:
  lines = []
  for bs, r in results["batches"].items():
    lines.append(f"\n**batch {bs}** ({results['setting']}; median of {r.get('repeats', 2)} "
                 f"timed runs per policy, of {2 * r.get('repeats', 2)} for AR, before and "
                 "after the policies)\n")
    head = "| set | AR tok/s | " + " | ".join(
        f"{p} tok/s (×AR, τ, verify/req, proposed)" for p in results["policies"]) + " |"
    lines += [head, "|" + "---|" * (2 + len(results["policies"]))]
    for name, s in r["sets"].items():
      cells = [f"{s['ar_tokens_per_s']:.1f}"]
      for p in results["policies"]:
        x = s["spec"][p]
        cells.append(f"{x['tokens_per_s']:.1f} ({x['vs_ar']:.2f}×, {x['tau']:.2f}, "
                     f"{x['verify_tokens_per_round']:.2f}, {x['proposed_share']:.2f})")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def merge_load(paths: list[str], out: str, concurrency: str, overwrite: bool) -> dict:
  """The load model over several runs (e.g. one process per batch size): their profiles and
  the rollouts saved beside them (`*_rollouts.npz`)."""
  base = os.path.splitext(out)[0]
  cli.check_outputs([out, base + ".png", base + ".md"], overwrite)
  runs = []
  for path in paths:
    with open(path) as f:
      runs.append(json.load(f))
  rollouts, profiles = [], {}
  for path, run in zip(paths, runs):
    packed = np.load(os.path.splitext(path)[0] + "_rollouts.npz")
    off = packed["offsets"]
    rollouts += [(packed["conf"][a:b], packed["accepted"][a:b]) for a, b in zip(off, off[1:])]
    profiles.update(run["profiles"])
  temps, prior = runs[0].get("sts_temperatures"), runs[0].get("sts_prior")
  results = {"merged_from": paths, "policies": runs[0]["policies"], "profiles": profiles,
             "batches": {bs: r for run in runs for bs, r in run["batches"].items()}}
  results["load"] = load_model(rollouts, profiles,
                               [int(c) for c in concurrency.split(",") if c], temps, prior)
  results["table"] = load_markdown(results["load"])
  cli.write_json(out, results, table=results["table"])
  plot_load(results, base + ".png")
  print(f"wrote {out}, {base}.md, {base}.png", file=sys.stderr)
  return results


def main(argv=None) -> dict:
  args = cli.parse(FLAGS, argv, __doc__)
  if args.load_from:
    return merge_load([cli.repo_path(p) for p in args.load_from.split(",") if p],
                      cli.repo_path(args.out), args.load_concurrency, args.overwrite)
  args.eval_dir, args.out = cli.repo_path(args.eval_dir), cli.repo_path(args.out)
  png, md = os.path.splitext(args.out)[0] + ".png", os.path.splitext(args.out)[0] + ".md"
  base = os.path.splitext(args.out)[0]
  cli.check_outputs([args.out, png, md, base + "_load.png", base + "_rollouts.npz"],
                    args.overwrite)
  files = sorted(glob.glob(os.path.join(args.eval_dir, "*.jsonl")))
  if not files:
    raise SystemExit(f"error: no eval sets in {args.eval_dir} (../shared/data/eval beside the "
                     "checkout)")
  wanted = [s for s in args.sets.split(",") if s]
  files = [f for f in files if not wanted or os.path.basename(f)[:-6] in wanted]
  import jax
  from tqdm.auto import tqdm

  import dspark_jax as dj
  from dspark_jax.drafts import vocab
  from dspark_jax.engine import profile
  target = dj.load_target(args.target)
  draft = dj.load_draft(args.draft, target)
  if args.draft_vocab:
    path = cli.repo_path(args.vocab_data)
    with open(path) as f:
      convs = [json.loads(line)["conversations"] for line in f if line.strip()]
    toks = [target.tokenizer.encode(m["content"]) for c in convs for m in c
            if m["role"] == "assistant"]
    ids = vocab.frequent_tokens(toks, args.draft_vocab, target.config.vocab_size,
                                always=target.stop_token_ids)
    draft = vocab.restrict_vocab(draft, ids)
  sizes = [int(s) for s in args.batch_sizes.split(",") if s]
  repeats = [int(r) for r in str(args.repeats).split(",") if r]
  if len(repeats) == 1:
    repeats *= len(sizes)
  if len(repeats) != len(sizes) or min(repeats) < 1:
    raise SystemExit(f"error: --repeats needs one value >= 1 or one per batch size, got "
                     f"{args.repeats!r}")
  policies = [p for p in args.policies.split(",") if p]
  temps, prior = draft.config.sts_temperatures, draft.config.sts_prior
  results = {"target": args.target, "draft": args.draft, "draft_vocab": args.draft_vocab,
             "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
             "setting": f"greedy, float32, {args.max_new_tokens} new tokens/row",
             "sts_temperatures": None if temps is None else [float(t) for t in temps],
             "sts_prior": None if prior is None else [float(c) for c in prior],
             "policies": policies, "sts": temps is not None,
             "args": vars(args), "batches": {}, "profiles": {}}
  kw = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, stop_tokens=[])
  rollouts = []  # fixed-length rounds of every set: the load model replays them
  bar = tqdm(total=len(sizes) * len(files) * (1 + len(policies)), desc="schedule_bench",
             unit="run", file=sys.stderr)
  for bs, reps in zip(sizes, repeats):
    prof = profile.sps_profile(target, draft, batch=bs, measure=True)
    results["profiles"][str(bs)] = prof
    scheds = {p: _scheduler(p, prof, args.threshold, temps, prior) for p in policies}
    per_set = {}
    for path in files:
      name = os.path.basename(path)[:-6]
      prompts = _prompts(target.tokenizer, path, bs, args.max_prompt_tokens)
      if not prompts:
        continue
      run = lambda **k: dj.generate(target, prompts, batch_size=bs, **kw, **k)
      run()  # compile (untimed)
      ar_times = [profile.median_time(run, 1)[0] for _ in range(reps)]
      ar = run()
      n_tok = sum(ar.stats.num_tokens)
      entry = {"ar_tokens_per_s": n_tok / np.median(ar_times), "spec": {}}
      bar.update(1)
      for pol, sched in scheds.items():
        go = lambda: run(draft=draft, scheduler=sched)
        go()
        s, res = profile.median_time(go, reps)
        st = res.stats
        flags_ = [f for row in st.proposed for f in row]
        entry["spec"][pol] = {
            "tokens_per_s": n_tok / s, "vs_ar": (n_tok / s) / entry["ar_tokens_per_s"],
            "tau": st.tau, "verify_tokens_per_round": st.verify_tokens_per_round,
            "proposed_share": float(np.mean(flags_)) if flags_ else 0.0,
            "greedy_equal": res.tokens == ar.tokens}
        if pol == "fixed" and st.confidence_logits is not None:
          rollouts.extend(trajectories_from_stats(st.confidence_logits, st.accept_lengths,
                                                  st.verify_lengths,
                                                  len(st.confidence_logits[0][0])))
        bar.set_postfix(batch=bs, set=name, policy=pol, x=f"{entry['spec'][pol]['vs_ar']:.2f}")
        bar.update(1)
      # AR again after the policies: its figure is the median over both ends of the cell,
      # so slow drift of the machine does not favour either side.
      ar_times += [profile.median_time(run, 1)[0] for _ in range(reps)]
      entry["ar_tokens_per_s"] = n_tok / np.median(ar_times)
      for x in entry["spec"].values():
        x["vs_ar"] = x["tokens_per_s"] / entry["ar_tokens_per_s"]
      per_set[name] = entry
      # Every set compiles its own programs; XLA-CPU keeps each one's code mapped, and a run
      # over all sets and batch sizes ran out of memory mappings without this.
      jax.clear_caches()
    results["batches"][str(bs)] = {"sets": per_set, "repeats": reps}
  bar.close()
  results["table"] = markdown(results)
  load_png = os.path.splitext(args.out)[0] + "_load.png"
  if rollouts and args.load_concurrency:
    conc = [int(c) for c in args.load_concurrency.split(",") if c]
    results["load"] = load_model(rollouts, results["profiles"], conc, temps, prior)
    results["table"] += "\n\n" + load_markdown(results["load"])
    plot_load(results, load_png)
    np.savez_compressed(os.path.splitext(args.out)[0] + "_rollouts.npz",
                        **pack_rollouts(rollouts))
  cli.write_json(args.out, results, table=results["table"])
  plot(results, png)
  print(f"wrote {args.out}, {md}, {png}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
