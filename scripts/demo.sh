#!/usr/bin/env bash
# The main job: set up, prepare the bundled demo corpus if needed, train a small BLOOM on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python pretrain_bloom.py --config configs/tiny.yaml "$@"
