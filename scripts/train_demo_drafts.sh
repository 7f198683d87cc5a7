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
# Eagle3's TTT objective takes full-vocabulary logits at every position for each of its 5
# steps (~20x the DSpark step on CPU, ~50 s/step on 2 cores), so on a CPU it gets 2 of the 8
# epochs; on a GPU drop the override.
declare -A EXTRA=([dspark]="" [dflash]="" [eagle3]="--config.train.epochs=2")
for alg in dspark dflash eagle3; do
  python train.py --config=$CFG --workdir="$ROOT/$alg" --config.algorithm=$alg \
      --config.features.cache_dir="$ROOT/dspark/features" ${EXTRA[$alg]}
done
rm -rf dspark_jax/assets/drafts/smollm2-135m-instruct-dspark
mkdir -p dspark_jax/assets/drafts
cp -r "$ROOT/dspark/draft" dspark_jax/assets/drafts/smollm2-135m-instruct-dspark
