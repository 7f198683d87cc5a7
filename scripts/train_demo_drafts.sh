#!/usr/bin/env bash
# Trains the three demo drafts for SmolLM2-135M-Instruct (see configs/smollm2_demo.py) and
# copies the DSpark draft into the package (dspark_jax/assets/drafts/), where `serve.py`
# finds it. Data and offline features are produced once in $ROOT/data and shared.
set -euo pipefail
ROOT=${1:-runs/smollm2_demo}
CFG=configs/smollm2_demo.py
mkdir -p "$ROOT"
python train.py --config=$CFG --workdir="$ROOT/dspark" --mode=generate_data
python train.py --config=$CFG --workdir="$ROOT/dspark" --mode=tokenize
python train.py --config=$CFG --workdir="$ROOT/dspark" --mode=cache_features
for alg in dflash eagle3; do
  mkdir -p "$ROOT/$alg"
  [ -e "$ROOT/$alg/data" ] || ln -s "../dspark/data" "$ROOT/$alg/data"
done
for alg in dspark dflash eagle3; do
  python train.py --config=$CFG --workdir="$ROOT/$alg" --config.algorithm=$alg \
      --config.features.cache_dir="$ROOT/dspark/features"
done
rm -rf dspark_jax/assets/drafts/smollm2-135m-instruct-dspark
mkdir -p dspark_jax/assets/drafts
cp -r "$ROOT/dspark/draft" dspark_jax/assets/drafts/smollm2-135m-instruct-dspark
