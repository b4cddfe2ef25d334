#!/usr/bin/env bash
# Set up the environment (idempotent) and run the fast test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'EOF'
usage: bash scripts/test.sh [PYTEST_ARGS...]

Sets up the venv (bash scripts/setup.sh: installs only what is missing or not at the locked
version), lints with ruff (rules in pyproject.toml; a few seconds), then runs the fast tests:
pytest -m "not slow and not slurm and not two_hosts". Every argument goes to pytest, e.g.
  bash scripts/test.sh -k config -x
  bash scripts/test.sh tests/test_config.py
Only -h or --help as the first argument prints this text instead; for pytest's own help run
  bash scripts/test.sh -q --help
Slow, SLURM and two-host tests: make test-slow, make test-slurm, make test-hosts.

environment: PYTHON, TORCH_SPEC, TORCH_INDEX_URL reach scripts/setup.sh (see its --help);
the tests run with .venv/bin/python, whatever BLOOM_VENV says.
EOF
    exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source scripts/env.sh
# Lint first: it fails in seconds where the suite takes minutes. `ruff check --fix` repairs most.
.venv/bin/ruff check --quiet . || { echo "ruff found problems: run .venv/bin/ruff check --fix . and fix the rest" >&2; exit 1; }
# The SLURM and two-host tiers start daemons and network namespaces as root: CI runs them apart.
exec .venv/bin/python -m pytest -m "not slow and not slurm and not two_hosts" "$@"
