#!/usr/bin/env bash
# Set up the environment (idempotent) and run the fast test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m pytest -m "not slow" "$@"
