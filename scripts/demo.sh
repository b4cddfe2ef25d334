#!/usr/bin/env bash
# The main job: set up, build the demo tokenizer and .bin/.idx data if missing, train a ~5M
# parameter BLOOM on CPU with per-language validation, save a checkpoint, print greedy
# continuations of its checkpoint (tools/generate.py), and plot the loss curves. Extra arguments go to pretrain_bloom.py
# (e.g. --set training.train_samples=800 for a shorter run).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'EOF'
usage: bash scripts/demo.sh [PRETRAIN_ARGS...]

Sets up the venv (bash scripts/setup.sh), trains the demo tokenizer and tokenizes the bundled
corpus into data/processed/ if not done yet, trains the tiny BLOOM of configs/tiny.yaml on CPU,
prints greedy continuations of the saved checkpoint (tools/generate.py) and plots its loss
curves to runs/tiny/loss.png. Every argument goes to pretrain_bloom.py, e.g.
  bash scripts/demo.sh --set training.train_samples=800
Only -h or --help as the first argument prints this text instead; for pretrain_bloom.py's help
run .venv/bin/python pretrain_bloom.py --help

environment: PYTHON, TORCH_SPEC, TORCH_INDEX_URL reach scripts/setup.sh (see its --help);
the demo runs with .venv/bin/python, whatever BLOOM_VENV says.
EOF
    exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source scripts/env.sh
PY=.venv/bin/python
OUT=data/processed
# Wall time of each phase, reported at the end (a first run on a new machine also pays for
# DeepSpeed's one-time op build, about a minute, inside the training phase).
SECONDS=0
phase_start=0 phases=()
phase_done() { phases+=("$1 $(( SECONDS - phase_start )) s"); phase_start=$SECONDS; }

if [[ ! -f "$OUT/tokenizer.json" ]]; then
    echo "[demo] training the demo tokenizer (8,192 tokens, alpha 0.3)"
    "$PY" tools/train_tokenizer.py --input data/corpus --output-dir "$OUT" --vocab-size 8192 --alpha 0.3
    phase_done tokenizer
fi
if [[ ! -f "$OUT/.complete" ]]; then
    echo "[demo] tokenizing the demo corpus into .bin/.idx per language"
    "$PY" tools/preprocess_data.py --corpus-dir data/corpus --output-prefix "$OUT" \
        --tokenizer "$OUT/tokenizer.json" --append-eod --workers 2
    touch "$OUT/.complete"
    phase_done preprocessing
fi

"$PY" pretrain_bloom.py --config configs/tiny.yaml "$@"
phase_done training
echo "[demo] greedy continuations of the config's logging.sample_prompts (tools/generate.py)"
"$PY" tools/generate.py --checkpoint runs/tiny/checkpoints --quiet
phase_done generation
"$PY" tools/plot_metrics.py runs/tiny/metrics.jsonl --output runs/tiny/loss.png
phase_done plot
summary="$(IFS=,; echo "${phases[*]}")"
echo "[demo] done in ${SECONDS} s (${summary//,/, }); metrics: runs/tiny/metrics.jsonl, plot: runs/tiny/loss.png"
