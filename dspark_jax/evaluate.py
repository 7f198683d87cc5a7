"""Acceptance of drafts per domain on DeepSpec's evaluation sets.

  python -m dspark_jax.evaluate --drafts=dspark=DIR,dflash=DIR,eagle3=DIR \
      --eval_dir=../shared/data/eval --num_prompts=8 --out=bench_results/eval.json --overwrite

For every `<domain>.jsonl` in `--eval_dir` it shuffles the rows with `--shuffle_seed` (-1 keeps
file order), takes the first `--num_prompts` first-turn prompts that fit
`--max_prompt_tokens`, renders them with the target's chat template, and generates with each
draft (one batch per domain and draft, greedy unless `--temperature`): DeepSpec's Table 1
protocol, every round verifying all P drafts. Reported per (draft, domain) and pooled: tau
(DeepSpec's acceptance length: tokens committed per round, pooled over all rounds; a round
that ends on an accepted stop token commits no bonus), the per-position conditional
acceptance, the histogram of committed lengths and the tokens/s; plus whether greedy
speculative output equalled plain greedy output. Writes JSON, a markdown table and a plot of per-position
acceptance (`--out`, by default under the untracked `runs/`); an existing file is replaced only
with `--overwrite`. Relative `--eval_dir` / `--out` paths are taken from the repository root,
not the current directory. The default `--drafts=dspark=demo` is the committed demo draft of
the default (embedded demo) target.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
from absl import flags

from dspark_jax import cli

FLAGS = flags.FlagValues()  # this tool's own (see dspark_jax.cli)
flags.DEFINE_string("target", "smollm2-135m-instruct", "model path, hub id or demo name",
                    flag_values=FLAGS)
flags.DEFINE_string("drafts", "dspark=demo", "name=path,... (load_draft paths; 'demo' = the "
                    "committed demo draft of the demo target)", flag_values=FLAGS)
flags.DEFINE_string("eval_dir", os.path.join("..", "shared", "data", "eval"),
                    "directory of DeepSpec eval sets (<domain>.jsonl), relative to the "
                    "repository root", flag_values=FLAGS)
flags.DEFINE_integer("num_prompts", 8, "first-turn prompts per domain", flag_values=FLAGS)
flags.DEFINE_integer("shuffle_seed", 0, "seed of the per-domain shuffle before the first "
                     "--num_prompts are taken (-1 = file order)", flag_values=FLAGS)
flags.DEFINE_integer("max_prompt_tokens", 512, "skip prompts longer than this (chat-formatted)",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 96, "tokens generated per prompt", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "sampling temperature (0 = greedy)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_string("out", os.path.join("runs", "eval", "eval.json"),
                    "results JSON (plus <out>_acceptance.png), relative to the repository root",
                    flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace existing output files", flag_values=FLAGS)
flags.DEFINE_string("tree", "", "also evaluate every block draft (DSpark/DFlash) with token-tree "
                    "verification of this shape: children per depth, e.g. 2,2,1,1,1,1,1 "
                    "(reported as <name>+tree)", flag_values=FLAGS)


def load_domain_prompts(path: str, tokenizer, n: int, max_tokens: int,
                        shuffle_seed: int = -1) -> list[list[int]]:
  from dspark_jax.training import data as data_lib
  rows = data_lib.read_rows(path)
  if shuffle_seed >= 0:
    rows = [rows[i] for i in np.random.default_rng(shuffle_seed).permutation(len(rows))]
  out = []
  for row in rows:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": row["turns"][0]}])
    if len(ids) <= max_tokens:
      out.append(ids)
    if len(out) == n:
      break
  return out


def parse_drafts(spec: str) -> dict[str, str]:
  drafts = {}
  for item in filter(None, spec.split(",")):
    name, _, path = item.partition("=")
    if not path:
      raise SystemExit(f"--drafts entries are name=path, got {item!r}")
    drafts[name] = path
  return drafts


def markdown(results: dict) -> str:
  domains = results["domains"]
  names = list(results["drafts"])
  lines = ["| domain | " + " | ".join(f"τ {n}" for n in names) + " |",
           "|---|" + "---|" * len(names)]
  for d in domains:
    cells = [f"{results['drafts'][n]['per_domain'][d]['tau']:.2f}" for n in names]
    lines.append(f"| {d} | " + " | ".join(cells) + " |")
  cells = [f"**{results['drafts'][n]['mean_tau_over_sets']:.2f}**" for n in names]
  lines.append("| mean over sets | " + " | ".join(cells) + " |")
  cells = [f"{results['drafts'][n]['mean_tau']:.2f}" for n in names]
  lines.append("| pooled (all rounds) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / max(len(results["drafts"]), 1)
  for j, (name, r) in enumerate(results["drafts"].items()):
    ks = [k + 1 for k, a in enumerate(r["position_acceptance"]) if a is not None]
    acc = [a for a in r["position_acceptance"] if a is not None]
    ax.plot(ks, acc, marker="o", label=f"{name} (τ={r['mean_tau']:.2f})")
    hist = np.asarray(r["accept_histogram"], np.float64)
    share = hist / max(hist.sum(), 1.0)
    hx.bar(np.arange(1, len(hist) + 1) + (j - (len(results["drafts"]) - 1) / 2) * width, share,
           width=width, label=name)
  hx.set_xlabel("tokens committed in a round (accepted drafts + 1)")
  hx.set_ylabel("share of rounds")
  hx.set_title("acceptance histogram (pooled)", fontsize=10)
  hx.grid(alpha=0.3)
  hx.legend()
  ax.set_xlabel("draft position k")
  ax.set_ylabel("P(accept k | accepted k-1)")
  ax.set_ylim(0, 1)
  ax.set_xticks(range(1, max(len(r["position_acceptance"]) for r in results["drafts"].values())
                     + 1))
  ax.set_title(f"{results['target']}: conditional acceptance\n{results['setting']}", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
  """Runs the evaluation; `argv`: flags without the program name (None = `sys.argv[1:]`)."""
  args = cli.parse(FLAGS, argv, __doc__)
  args.eval_dir, args.out = cli.repo_path(args.eval_dir), cli.repo_path(args.out)
  files = sorted(glob.glob(os.path.join(args.eval_dir, "*.jsonl")))
  if not files:
    absent = "" if os.path.isdir(args.eval_dir) else ": no such directory"
    raise SystemExit(f"no *.jsonl eval sets under {args.eval_dir!r}{absent} (--eval_dir; a "
                     f"relative path starts at the repository root {cli.REPO_ROOT})")
  png = os.path.splitext(args.out)[0] + "_acceptance.png"
  cli.check_outputs([args.out, png], args.overwrite)
  import dspark_jax as dj
  from tqdm.auto import tqdm
  target = dj.load_target(args.target)
  drafts = {name: dj.load_draft(path, target) for name, path in parse_drafts(args.drafts).items()}
  # (draft, generate kwargs) per reported name: the chain, and with --tree the tree too.
  variants = {name: (d, {}) for name, d in drafts.items()}
  if args.tree:
    shape = dj.TreeShape.parse(args.tree)
    for name, d in drafts.items():
      if hasattr(d.runtime, "propose_tree"):
        variants[f"{name}+tree"] = (d, {"tree": shape})
  prompts = {os.path.basename(f)[:-len(".jsonl")]: load_domain_prompts(
      f, target.tokenizer, args.num_prompts, args.max_prompt_tokens, args.shuffle_seed)
      for f in files}
  prompts = {d: p for d, p in prompts.items() if p}
  kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
  setting = (f"greedy" if args.temperature == 0 else f"T={args.temperature}") + (
      f", {args.num_prompts} prompts/domain"
      + (f" (shuffle seed {args.shuffle_seed})" if args.shuffle_seed >= 0 else "")
      + f", {args.max_new_tokens} new tokens")
  results = {"target": args.target, "setting": setting, "domains": list(prompts),
             "args": vars(args), "ar": {}, "drafts": {}}
  # Warm-up: compile every bucket once so tokens/s below excludes compilation.
  first = next(iter(prompts.values()))
  dj.generate(target, first, **kw)
  for d, extra in variants.values():
    dj.generate(target, first, draft=d, scheduler="fixed", **extra, **kw)
  bar = tqdm(total=len(prompts) * (1 + len(variants)), desc="evaluate", unit="run")
  ar_tokens = {}
  for dom, ps in prompts.items():
    res = dj.generate(target, ps, **kw)
    ar_tokens[dom] = res.tokens
    results["ar"][dom] = {"tokens_per_s": res.stats.tokens_per_second}
    bar.update(1)
  for name, (draft, extra) in variants.items():
    per = {}
    hits = np.zeros(draft.config.block_size)
    tries = np.zeros(draft.config.block_size)
    hist = np.zeros(draft.config.block_size + 1, np.int64)
    all_rounds = []
    for dom, ps in prompts.items():
      # Table 1 protocol: the confidence scheduler is off, every round verifies all P drafts.
      res = dj.generate(target, ps, draft=draft, scheduler="fixed", **extra, **kw)
      st = res.stats
      all_rounds += [a for row in st.accept_lengths for a in row]
      hits += st.position_hits
      tries += st.position_tries
      hist += np.asarray(st.accept_histogram[:len(hist)], np.int64)
      per[dom] = {"tau": st.tau, "position_acceptance": st.position_acceptance,
                  "accept_histogram": list(st.accept_histogram[:len(hist)]),
                  "tokens_per_s": st.tokens_per_second,
                  "speedup_vs_ar": st.tokens_per_second / results["ar"][dom]["tokens_per_s"],
                  "greedy_equal": (res.tokens == ar_tokens[dom]) if args.temperature == 0
                  else None}
      bar.update(1)
    results["drafts"][name] = {
        "path": draft.path, "config": repr(draft), "per_domain": per,
        "tree": list(extra["tree"].branching) if "tree" in extra else None,
        "mean_tau": float(np.mean(all_rounds)),
        "mean_tau_over_sets": float(np.mean([p["tau"] for p in per.values()])),
        "accept_histogram": [int(x) for x in hist],
        # None where no round ever reached position k (not a measured 0).
        "position_acceptance": [float(h / t) if t else None for h, t in zip(hits, tries)],
        "position_tries": [int(t) for t in tries],
        "greedy_equal_all": all(p["greedy_equal"] for p in per.values())
        if args.temperature == 0 else None}
  bar.close()
  results["table"] = markdown(results)
  cli.write_json(args.out, results)
  plot(results, png)
  print(results["table"])
  print(f"wrote {args.out} and {png}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
