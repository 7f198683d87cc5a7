#!/usr/bin/env bash
# Evaluates the demo drafts trained by scripts/train_demo_drafts.sh on DeepSpec's Table 1
# protocol (first turns, seeded shuffle, every round verifying all P drafts), greedy and T=1,
# with the DSpark draft also as a token tree; writes bench_results/<NAME>_{greedy,t1}.json + PNG.
#
#   bash scripts/eval_demo_drafts.sh [ROOT] [NAME] [NUM_PROMPTS]
#       (defaults: runs/smollm2_demo, eval_demo, 8)
set -euo pipefail
ROOT=${1:-runs/smollm2_demo}
NAME=${2:-eval_demo}
N=${3:-8}
drafts=""
for alg in dspark dflash eagle3; do
  [ -d "$ROOT/$alg/draft" ] && drafts="${drafts:+$drafts,}$alg=$ROOT/$alg/draft"
done
[ -n "$drafts" ] || { echo "no trained drafts under $ROOT/*/draft" >&2; exit 1; }
for t in 0 1; do
  tag=$([ "$t" = 0 ] && echo greedy || echo t1)
  python -m dspark_jax.evaluate --drafts="$drafts" --num_prompts="$N" --max_new_tokens=64 \
      --temperature="$t" --tree=3,2,1,1,1 --out="bench_results/${NAME}_${tag}.json" --overwrite
done
