#!/usr/bin/env bash
# Tau against training progress for one demo draft trained by scripts/train_demo_drafts.sh
# (configs/smollm2_demo.py keeps the checkpoint of every 100th step): exports each kept
# checkpoint as ROOT/ALG/draft_stepN and evaluates them all in one run (Table 1 protocol,
# greedy) -> bench_results/tau_curve_ALG.json + PNG. The training tokens of each step are in
# ROOT/ALG/metrics.jsonl.
#
#   bash scripts/tau_curve.sh [ROOT] [ALG] [STEPS] [NUM_PROMPTS]
#       (defaults: runs/smollm2_demo, dspark, "100 200 400 600", 4)
set -euo pipefail
ROOT=${1:-runs/smollm2_demo}
ALG=${2:-dspark}
STEPS=${3:-100 200 400 600}
N=${4:-4}
CFG=configs/smollm2_demo.py
drafts=""
for s in $STEPS; do
  [ -e "$ROOT/$ALG/draft_step$s/config.json" ] ||
    python train.py --config=$CFG --workdir="$ROOT/$ALG" --config.algorithm=$ALG --mode=export \
        --config.train.export_step=$s
  drafts="${drafts:+$drafts,}step$s=$ROOT/$ALG/draft_step$s"
done
drafts="$drafts,final=$ROOT/$ALG/draft"
python -m dspark_jax.evaluate --drafts="$drafts" --num_prompts="$N" --max_new_tokens=64 \
    --temperature=0 --out="bench_results/tau_curve_$ALG.json" --overwrite
