#!/usr/bin/env bash
# Create .venv (if missing) and install everything the project needs, in the order that
# keeps pip from pulling a multi-GB CUDA torch: the pinned CPU torch first, then the rest.
# Idempotent: a second run checks what is installed and installs nothing new.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLOOM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
PACKAGES=(deepspeed tokenizers datasets tensorboard pyyaml safetensors transformers tqdm pytest matplotlib)

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --quiet)

installed() {  # installed NAME [VERSION]: true when NAME (at VERSION) is importable metadata-wise
    "$PY" - "$@" <<'PYEOF'
import sys
from importlib import metadata
name, want = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
try:
    have = metadata.version(name)
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if want is None or have.split("+")[0] == want else 1)
PYEOF
}

if ! installed torch "$TORCH_VERSION"; then
    echo "[setup] installing torch==$TORCH_VERSION (CPU build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
    echo "[setup] installing ${missing[*]}"
    # Keep torch pinned while resolving the rest, so nothing upgrades it to a CUDA build.
    "${PIP[@]}" install "torch==$TORCH_VERSION" "${missing[@]}"
fi

if ! installed bloom-megatron; then
    echo "[setup] installing the project (editable)"
    "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
fi
echo "[setup] ready: $VENV"
