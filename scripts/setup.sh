#!/usr/bin/env bash
# Create the venv (if missing) and bring it to the locked versions; see the usage below.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLOOM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
LOCK="$ROOT/requirements/constraints.txt"
EXTRAS="test,plot,wandb"  # the tests need pytest and transformers (and wandb, for its logger's test); the demo plots

usage() {
    cat <<EOF
usage: bash scripts/setup.sh [--help]

Creates the venv if it is missing and installs, in this order:
  1. torch, as \$TORCH_SPEC says (default torch==2.13.0), before anything else can pull in
     another torch build;
  2. every package pinned in requirements/constraints.txt, at the pinned version, with
     pip install -c requirements/constraints.txt (the lock also holds pyproject.toml's
     runtime requirements and its test, plot and wandb extras);
  3. this project, editable (pip install --no-deps --no-build-isolation -e .).
A package installed at a version other than the locked one is reinstalled at the locked one.
When everything already matches, nothing is installed: one Python start checks it all.

Which torch build pip picks depends on where it looks: on Linux x86_64, PyPI's
torch==2.13.0 is the CUDA build (several GB); a CPU-only machine should take the CPU build:
  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
A torch already installed that satisfies \$TORCH_SPEC is kept, whatever its build.

options:
  -h, --help  this text; installs nothing

environment:
  BLOOM_VENV       the venv to create or update (default: $ROOT/.venv)
  PYTHON           the interpreter that creates a missing venv (default: python3)
  TORCH_SPEC       pip requirement for torch (default: torch==2.13.0); a local version such
                   as +cpu picks one build, with a TORCH_INDEX_URL that has it
  TORCH_INDEX_URL  package index for the torch install only (default: pip's configured one),
                   e.g. https://download.pytorch.org/whl/cpu or one of PyTorch's CUDA indexes

The lock file is regenerated with bash scripts/lock.sh (see its --help).
EOF
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) echo "setup.sh: unknown argument '$1'; see bash scripts/setup.sh --help" >&2; exit 2 ;;
esac

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --quiet)

check() {  # the lines of scripts/check_lock.py: what to install; exit 1 when there is some
    "$PY" "$ROOT/scripts/check_lock.py" --constraints "$LOCK" --pyproject "$ROOT/pyproject.toml" \
        --extras "$EXTRAS" --torch "$TORCH_SPEC" --project "$@"
}

status=0
plan="$(check)" || status=$?
if (( status == 0 )); then
    echo "[setup] ready: $VENV (matches ${LOCK#"$ROOT/"})"
    exit 0
elif (( status != 1 )); then
    exit "$status"  # check_lock.py said which file is wrong and how to fix it
fi

packages=()
need_torch=0 need_project=0
while read -r kind requirement; do
    case "$kind" in
        torch) need_torch=1 ;;
        require|lock) packages+=("$requirement") ;;
        project) need_project=1 ;;
    esac
done <<<"$plan"

if (( need_torch )); then
    if [[ -n "$TORCH_INDEX_URL" ]]; then
        echo "[setup] installing $TORCH_SPEC from $TORCH_INDEX_URL"
        # No -c here: that index need not hold the locked versions of torch's own
        # dependencies; step 2 puts them back to the locked ones.
        "${PIP[@]}" install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
    else
        echo "[setup] installing $TORCH_SPEC"
        "${PIP[@]}" install -c "$LOCK" "$TORCH_SPEC"
    fi
fi
if (( ${#packages[@]} )); then
    echo "[setup] installing ${#packages[@]} package(s) at the versions in ${LOCK#"$ROOT/"}"
    # torch is named again so that resolving the rest can never swap its build.
    "${PIP[@]}" install -c "$LOCK" "$TORCH_SPEC" "${packages[@]}"
fi
if (( need_project )); then
    echo "[setup] installing the project (editable)"
    "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
fi

status=0
left="$(check)" || status=$?
if (( status != 0 )); then
    echo "setup.sh: $VENV still differs from ${LOCK#"$ROOT/"} after installing:" >&2
    echo "$left" >&2
    echo "fix what pip reported above, or if pyproject.toml changed, rebuild the lock (bash scripts/lock.sh --help)" >&2
    exit 1
fi
echo "[setup] ready: $VENV"
