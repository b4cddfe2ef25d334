#!/usr/bin/env bash
# One command for a CUDA machine: kernel checks on the GPU, then BLOOM-1b7-shaped training steps
# (ours with each kernel choice, with and without recompute, and transformers' BLOOM), written to
# bench/results/gpu_check.json. Runs with the torch that is there; needs no DeepSpeed.
#
#   bash bench/gpu_check.sh                   # everything, killed after GPU_CHECK_TIMEOUT s (450)
#   bash bench/gpu_check.sh --cpu-smoke       # the same code paths on CPU at a tiny shape
#   bash bench/gpu_check.sh --help            # gpu_check.py's options (all are passed through)
#
# Python: $PYTHON, else .venv/bin/python if there is one, else python3. It needs torch and PyYAML;
# a missing PyYAML is installed from .wheels/ (ignored by git), filled on a machine with network:
#   pip download pyyaml -d .wheels            # or: pip download pyyaml -d .wheels --python-version 3.12 --only-binary=:all:
# If pip cannot install it, the wheel is put on PYTHONPATH (PyYAML's pure-Python code runs from it).
#
# Time: the whole run is killed after GPU_CHECK_TIMEOUT seconds (timeout(1): SIGTERM, then SIGKILL
# 10 s later); gpu_check.py gets a budget 30 s shorter, within which it skips what would run past,
# and on SIGTERM still writes what it measured.
set -euo pipefail

usage() {  # the comment block at the top
    sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    usage
    echo
    echo "gpu_check.py's options:"
fi

if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$python" -c "import torch" 2>/dev/null; then
    echo "gpu_check.sh: $python cannot import torch; set PYTHON to an interpreter that has it" >&2
    exit 2
fi
if ! "$python" -c "import yaml" 2>/dev/null; then
    shopt -s nullglob
    wheels=(.wheels/[Pp][Yy][Yy][Aa][Mm][Ll]-*.whl)
    shopt -u nullglob
    if [[ ! -d .wheels ]]; then
        echo "gpu_check.sh: PyYAML is missing and there is no .wheels/ folder; on a machine with network run" >&2
        echo "    pip download pyyaml -d .wheels" >&2
        echo "and bring the folder along" >&2
        exit 2
    fi
    echo "gpu_check.sh: installing PyYAML from .wheels/"
    if ! "$python" -m pip install --quiet --no-index --find-links .wheels pyyaml; then
        if (( ${#wheels[@]} == 0 )); then
            echo "gpu_check.sh: pip could not install PyYAML from .wheels/ and it holds no PyYAML wheel" >&2
            exit 2
        fi
        echo "gpu_check.sh: pip could not install it; importing PyYAML's pure-Python code from ${wheels[0]}"
        export PYTHONPATH="$PYTHONPATH:$PWD/${wheels[0]}"
    fi
    if ! "$python" -c "import yaml" 2>/dev/null; then
        echo "gpu_check.sh: PyYAML still cannot be imported" >&2
        exit 2
    fi
fi

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    exec "$python" bench/gpu_check.py --help
fi

limit="${GPU_CHECK_TIMEOUT:-450}"
budget=$(( limit > 60 ? limit - 30 : limit / 2 ))
echo "gpu_check.sh: $python, killed after ${limit} s, budget ${budget} s"
status=0
timeout --signal=TERM --kill-after=10 "$limit" "$python" bench/gpu_check.py --time-budget "$budget" "$@" || status=$?
if (( status == 124 || status == 137 )); then
    echo "gpu_check.sh: stopped after ${limit} s; the results file holds what was measured" >&2
fi
exit "$status"
