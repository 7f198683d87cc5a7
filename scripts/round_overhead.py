"""What a scheduled loop's rounds cost against the plain decode loop, on the demo model.

Times `dj.generate` over `--batch` prompts of `--tokens` new tokens each (greedy, no stop
tokens, prefill included in every mode) for:
  * "ar": plain decoding;
  * "plain": the speculative loop with a scheduler that never proposes (a prior and propose
    cost that never pay, no probe within the run): every round is a plain decode step, so
    the ratio to "ar" is the scheduled loop's own overhead;
  * "always": early stop with a propose cost of 0 and a paying prior: every round proposes
    and verifies the scheduled prefix.
Median of `--repeats` timed runs after one warm-up run each; JSON to `--out`.

  python scripts/round_overhead.py --batch=32 --out=runs/round_overhead_b32.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import dspark_jax as dj
from dspark_jax.scheduling import Scheduler


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--modes", default="ar,plain,always")
  ap.add_argument("--out", default="runs/round_overhead.json")
  args = ap.parse_args()
  target = dj.load_target("demo")
  draft = dj.load_draft("demo", target)
  p = draft.config.block_size
  b = args.batch
  prompts = [f"Question {i}: what is {i} times {i + 3}? Explain step by step." for i in range(b)]
  n = b * (p + 1) + 1
  schedulers = {
      "ar": None,
      "plain": Scheduler(policy="early_stop", sps=np.ones(n), propose_cost=1e9,
                         prior=np.zeros(p), probe_every=10 * args.tokens, max_probe_level=0),
      "always": Scheduler(policy="early_stop", sps=1.0 / (1.0 + 0.01 * np.arange(n)),
                          propose_cost=0.0, prior=np.ones(p)),
  }
  results = {"batch": b, "tokens": args.tokens, "repeats": args.repeats, "modes": {}}
  for mode in args.modes.split(","):
    kw = {} if mode == "ar" else dict(draft=draft, scheduler=schedulers[mode])

    def run():
      t0 = time.perf_counter()
      res = dj.generate(target, prompts, max_new_tokens=args.tokens, stop_tokens=[],
                        batch_size=b, **kw)
      return time.perf_counter() - t0, res

    run()  # compile
    times, res = [], None
    for _ in range(args.repeats):
      dt, res = run()
      times.append(dt)
    proposed = (None if res.stats.proposed is None else
                float(np.mean([np.mean(r) for r in res.stats.proposed])))
    results["modes"][mode] = {"seconds": times, "median_s": float(np.median(times)),
                              "tokens_per_s": b * args.tokens / float(np.median(times)),
                              "proposed_share": proposed}
    print(f"{mode:7s} {np.median(times):7.3f} s  proposed {proposed}", flush=True)
  if "ar" in results["modes"]:
    ar = results["modes"]["ar"]["median_s"]
    for m in results["modes"].values():
      m["speed_vs_ar"] = ar / m["median_s"]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
