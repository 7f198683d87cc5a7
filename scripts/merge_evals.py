"""Merges `python -m dspark_jax.evaluate` results of the same setting into one JSON + PNG.

  python scripts/merge_evals.py --out=bench_results/NAME.json A.json B.json [...]

For drafts evaluated in separate processes (e.g. while another trains): a draft's τ does not
depend on which drafts share its run (same prompts, seeds and batches), so the merged table
is the one a single run over all of them gives. The settings, domains and prompt arguments
must match; the AR timings of the first file are kept.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dspark_jax import evaluate  # noqa: E402

SAME = ("num_prompts", "shuffle_seed", "max_prompt_tokens", "max_new_tokens", "temperature",
        "seed", "target", "eval_dir")


def merge(paths: list[str]) -> dict:
  runs = []
  for p in paths:
    with open(p, encoding="utf-8") as f:
      runs.append(json.load(f))
  out = dict(runs[0], drafts={})
  for p, r in zip(paths, runs):
    if r["setting"] != out["setting"] or r["domains"] != out["domains"]:
      raise SystemExit(f"{p}: setting {r['setting']!r} / domains differ from {paths[0]}")
    diff = [k for k in SAME if r["args"].get(k) != out["args"].get(k)]
    if diff:
      raise SystemExit(f"{p}: arguments {diff} differ from {paths[0]}")
    for name, d in r["drafts"].items():
      if name in out["drafts"]:
        raise SystemExit(f"{p}: draft {name!r} is in two files")
      out["drafts"][name] = d
  out["merged_from"] = [os.path.basename(p) for p in paths]
  out["table"] = evaluate.markdown(out)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("files", nargs="+")
  a = ap.parse_args()
  res = merge(a.files)
  with open(a.out, "w", encoding="utf-8") as f:
    json.dump(res, f, indent=2)
  evaluate.plot(res, os.path.splitext(a.out)[0] + "_acceptance.png")
  print(res["table"])


if __name__ == "__main__":
  main()
