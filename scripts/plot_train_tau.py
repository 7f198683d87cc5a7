"""Training-time tau estimate against training tokens, from trainers' metrics.jsonl files.

  python scripts/plot_train_tau.py --out=bench_results/NAME.png name=WORKDIR [name=WORKDIR ...]

Each workdir's `metrics.jsonl` (written every `train.log_every` steps) gives tau_est and the
tokens/s and step time of the logged steps; tokens seen = their running sum. Writes the PNG
and a JSON of the curves beside it.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curve(workdir: str) -> dict:
  steps, tokens, tau = [], [], []
  seen, last_step = 0.0, 0
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      m = json.loads(line)
      if "tau_est" not in m:
        continue
      seen += m["tokens_per_s"] * m["step_time_s"] * (m["step"] - last_step)
      last_step = m["step"]
      steps.append(m["step"])
      tokens.append(seen)
      tau.append(m["tau_est"])
  if not steps:
    raise SystemExit(f"{workdir}/metrics.jsonl has no tau_est entries")
  return {"workdir": workdir, "step": steps, "tokens": tokens, "tau_est": tau}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="PNG path (the JSON goes beside it)")
  ap.add_argument("runs", nargs="+", help="name=WORKDIR")
  args = ap.parse_args()
  curves = {}
  for spec in args.runs:
    name, sep, wd = spec.partition("=")
    if not sep:
      raise SystemExit(f"expected name=WORKDIR, got {spec!r}")
    curves[name] = curve(wd)
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, c in curves.items():
    ax.plot([t / 1e6 for t in c["tokens"]], c["tau_est"], marker=".", label=name)
  ax.set_xlabel("training tokens (M)")
  ax.set_ylabel("training-time tau estimate")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
    json.dump(curves, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
