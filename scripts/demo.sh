#!/usr/bin/env bash
# The main job: set up, build the demo tokenizer and .bin/.idx data if missing, train a ~10M
# parameter BLOOM on CPU with per-language validation, save a checkpoint, print greedy
# continuations, and plot the loss curves. Extra arguments go to pretrain_bloom.py
# (e.g. --set training.train_samples=800 for a shorter run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source scripts/env.sh
PY=.venv/bin/python
OUT=data/processed

if [[ ! -f "$OUT/tokenizer.json" ]]; then
    echo "[demo] training the demo tokenizer (8,192 tokens, alpha 0.3)"
    "$PY" tools/train_tokenizer.py --input data/corpus --output-dir "$OUT" --vocab-size 8192 --alpha 0.3
fi
if [[ ! -f "$OUT/.complete" ]]; then
    echo "[demo] tokenizing the demo corpus into .bin/.idx per language"
    "$PY" tools/preprocess_data.py --corpus-dir data/corpus --output-prefix "$OUT" \
        --tokenizer "$OUT/tokenizer.json" --append-eod --workers 2
    touch "$OUT/.complete"
fi

start=$(date +%s)
"$PY" pretrain_bloom.py --config configs/tiny.yaml "$@"
"$PY" tools/plot_metrics.py runs/tiny/metrics.jsonl --output runs/tiny/loss.png
echo "[demo] done in $(( $(date +%s) - start )) s of training; metrics: runs/tiny/metrics.jsonl, plot: runs/tiny/loss.png"
