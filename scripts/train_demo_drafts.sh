#!/usr/bin/env bash
# Trains the demo drafts for SmolLM2-135M-Instruct (recipe: configs/smollm2_demo.py) and, with
# INSTALL=1, copies the DSpark draft into the package (dspark_jax/assets/drafts/), where
# `serve.py` finds it.
#
#   bash scripts/train_demo_drafts.sh [ROOT] [ALGORITHMS]     (defaults: runs/smollm2_demo, dspark)
#
# INSTALL=1 copies the trained DSpark draft into the package (after you have evaluated it).
# Data and offline features are produced once in ROOT/dspark and shared by every algorithm
# (ALGORITHMS="dspark dflash eagle3" trains all three on the same budget). Every stage
# resumes where a killed run stopped. REGENERATE=1 first regenerates the answers not yet in
# data/demo_v2/ (GSM8K questions, the recipe's code and chat prompts; hours on a CPU;
# resumable); without it the GSM8K questions not regenerated keep their reference answers.
# FLAGS adds config overrides to every stage (e.g. FLAGS="--config.train.max_steps=150
# --config.data.reference_answers=False" for a smaller equal budget on the rows in
# ROOT/dspark/data/regenerated.jsonl only).
set -euo pipefail
ROOT=${1:-runs/smollm2_demo}
ALGORITHMS=${2:-dspark}
CFG=configs/smollm2_demo.py
mkdir -p "$ROOT/dspark/data"
[ -e "$ROOT/dspark/data/regenerated.jsonl" ] ||
  cp data/demo_v2/regenerated.jsonl "$ROOT/dspark/data/regenerated.jsonl"
if [ "${REGENERATE:-0}" = 1 ]; then
  python train.py --config=$CFG --workdir="$ROOT/dspark" --mode=generate_data ${FLAGS:-}
fi
[ -e "$ROOT/dspark/data/tokens.npz" ] ||
  python train.py --config=$CFG --workdir="$ROOT/dspark" --mode=tokenize ${FLAGS:-}
[ -e "$ROOT/dspark/features/manifest.json" ] ||
  python train.py --config=$CFG --workdir="$ROOT/dspark" --mode=cache_features ${FLAGS:-}
for alg in $ALGORITHMS; do
  mkdir -p "$ROOT/$alg"
  [ "$alg" = dspark ] || [ -e "$ROOT/$alg/data" ] || ln -s "../dspark/data" "$ROOT/$alg/data"
  python train.py --config=$CFG --workdir="$ROOT/$alg" --config.algorithm=$alg \
      --config.features.cache_dir="$ROOT/dspark/features" ${FLAGS:-}
done
if [ "${INSTALL:-0}" != 1 ]; then
  echo "trained drafts are in $ROOT/*/draft; evaluate them, then rerun with INSTALL=1 to copy"
  echo "the DSpark one into the package"
  exit 0
fi
rm -rf dspark_jax/assets/drafts/smollm2-135m-instruct-dspark.new
cp -r "$ROOT/dspark/draft" dspark_jax/assets/drafts/smollm2-135m-instruct-dspark.new
rm -rf dspark_jax/assets/drafts/smollm2-135m-instruct-dspark
mv dspark_jax/assets/drafts/smollm2-135m-instruct-dspark.new \
   dspark_jax/assets/drafts/smollm2-135m-instruct-dspark
echo "next: python -m dspark_jax.calibrate --draft=demo --write_into_package --overwrite"
