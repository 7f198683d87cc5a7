"""What sampling costs: greedy vs temperature / top-k / top-p, plain and speculative, one run.

  python -m dspark_jax.sampling_bench --batch_sizes=1,8 --max_new_tokens=64 \
      --drafts=dspark=demo --out=bench_results/sampling.json --overwrite

For every batch size and sampling setting it generates `max_new_tokens` tokens per row (rows
stop only at the length limit) with plain decoding and with each draft (every round verifies
the whole block, `scheduler="fixed"`, so rounds cost the same whatever the confidences say),
and reports tokens/s and the time of one step (plain) or one round (speculative). Sampling
changes tau, hence the number of rounds, so the cost of sampling itself is the step / round
time against greedy's (`cost_vs_greedy`); the target is <= 1.2. Medians of `--repeats` warm
runs (compilation excluded). JSON and a markdown table beside it (`--out`).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

from dspark_jax import cli
from dspark_jax.engine import profile
from dspark_jax.evaluate import parse_drafts

FLAGS = flags.FlagValues()  # this tool's own (see dspark_jax.cli)
flags.DEFINE_string("target", "smollm2-135m-instruct", "load_target name or directory",
                    flag_values=FLAGS)
flags.DEFINE_string("drafts", "dspark=demo", "name=path,... drafts (load_draft paths; 'demo' = "
                    "the committed demo draft)", flag_values=FLAGS)
flags.DEFINE_list("batch_sizes", ["1", "8"], "batch sizes to measure", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per row", flag_values=FLAGS)
flags.DEFINE_string("eval_dir", os.path.join("..", "shared", "data", "eval"),
                    "DeepSpec eval sets (first turns are the prompts); built-in prompts if absent",
                    flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "timed runs per measurement (the median is kept)",
                     flag_values=FLAGS)
flags.DEFINE_string("out", os.path.join("runs", "bench", "sampling.json"),
                    "JSON results (a .md table is written beside it)", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace existing output files", flag_values=FLAGS)

# (name, temperature, top_k, top_p); the last is SmolLM2's own generation_config.json.
SETTINGS = (("greedy", 0.0, 0, 1.0), ("T=1", 1.0, 0, 1.0), ("T=1 top-k 50", 1.0, 50, 1.0),
            ("T=1 top-p 0.9", 1.0, 0, 0.9), ("T=0.7 top-k 20 top-p 0.8", 0.7, 20, 0.8))


def markdown(results: dict) -> str:
  lines = []
  for bs, r in results["batches"].items():
    lines.append(f"\n**batch {bs}** ({results['setting']})\n")
    lines.append("| decoder | sampling | tokens/s | step or round ms | cost vs greedy | τ |")
    lines.append("|---|---|---|---|---|---|")
    for dec, rows in r.items():
      for name, s in rows.items():
        tau = f"{s['tau']:.2f}" if "tau" in s else "–"
        lines.append(f"| {dec} | {name} | {s['tokens_per_s']:.1f} | {s['ms']:.1f} | "
                     f"{s['cost_vs_greedy']:.2f} | {tau} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  """Runs the benchmark; `argv`: flags without the program name (None = `sys.argv[1:]`)."""
  args = cli.parse(FLAGS, argv, __doc__)
  args.eval_dir, args.out = cli.repo_path(args.eval_dir), cli.repo_path(args.out)
  md_path = os.path.splitext(args.out)[0] + ".md"
  cli.check_outputs([args.out, md_path], args.overwrite)
  import dspark_jax as dj
  from tqdm.auto import tqdm

  from dspark_jax.bench import bench_prompts
  eval_dir = args.eval_dir if os.path.isdir(args.eval_dir) else None
  if eval_dir is None:
    print(f"no eval sets at {args.eval_dir}: using built-in prompts", file=sys.stderr)
  target = dj.load_target(args.target)
  drafts = {name: dj.load_draft(path, target) for name, path in parse_drafts(args.drafts).items()}
  sizes = [int(s) for s in args.batch_sizes if s]
  all_prompts = bench_prompts(target.tokenizer, eval_dir, max(sizes))
  results = {"target": args.target, "device": str(jax.devices()[0].device_kind),
             "backend": jax.default_backend(), "jax": jax.__version__,
             "setting": f"float32, {args.max_new_tokens} new tokens/row, verify every draft, "
                        f"median of {args.repeats}",
             "settings": [dict(zip(("name", "temperature", "top_k", "top_p"), s))
                          for s in SETTINGS],
             "args": vars(args), "batches": {}}
  bar = tqdm(total=len(sizes) * len(SETTINGS) * (1 + len(drafts)), desc="sampling bench",
             unit="run")
  for bs in sizes:
    prompts = all_prompts[:bs]
    r = results["batches"][str(bs)] = {}
    for dec, d in [("plain", None)] + list(drafts.items()):
      rows = r[dec] = {}
      for name, temp, top_k, top_p in SETTINGS:
        gen = lambda: dj.generate(target, prompts, draft=d, batch_size=bs,
                                  max_new_tokens=args.max_new_tokens, stop_tokens=[],
                                  temperature=temp, top_k=top_k, top_p=top_p, seed=0,
                                  scheduler="fixed" if d is not None else None)
        gen()  # compile
        secs, res = profile.median_time(gen, args.repeats)
        n_tok, steps = sum(res.stats.num_tokens), max(res.stats.rounds)
        s = rows[name] = {"tokens_per_s": n_tok / secs, "wall_s": secs, "tokens": n_tok,
                          "steps": steps, "ms": 1e3 * secs / steps}
        if d is not None:
          s["tau"] = res.stats.tau
        s["cost_vs_greedy"] = s["ms"] / rows["greedy"]["ms"]
        bar.update(1)
  bar.close()
  results["max_cost_vs_greedy"] = max(s["cost_vs_greedy"] for r in results["batches"].values()
                                      for rows in r.values() for s in rows.values())
  results["table"] = markdown(results)
  cli.write_json(args.out, results, table=results["table"])
  print(f"wrote {args.out}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
