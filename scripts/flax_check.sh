#!/usr/bin/env bash
# make test-flax: our export in transformers' Flax BLOOM classes, in a venv of its own (cached).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'USAGE'
usage: bash scripts/flax_check.sh

transformers 5 dropped Flax; its last line with FlaxBloomModel and FlaxBloomForCausalLM is 4.46.x.
This check keeps a venv of its own, .venv-flax (or $BLOOM_FLAX_VENV), with the versions of
requirements/flax-constraints.txt (transformers 4.46.3, jax on the CPU, flax) and torch installed
as scripts/setup.sh installs it (TORCH_SPEC, TORCH_INDEX_URL), which from_pt=True loading needs.
The venv is built once and reused while the lock file and TORCH_SPEC are unchanged.

Then:
  1. .venv (the main venv, set up by scripts/setup.sh) exports the trained tiny checkpoint of
     tests/fixtures/legacy_checkpoint (4 heads) and a random 6-head model to build/flax-check/,
     with our logits on fixed tokens (tests/flax_check/export_for_flax.py);
  2. .venv-flax loads the export with from_pt=True into FlaxBloomForCausalLM and FlaxBloomModel
     and compares their logits with ours, tolerance 1e-5 in fp32 (tests/flax_check/compare_flax.py).
Heads that are not a power of two crash transformers' Flax BLOOM (its ALiBi code calls jnp.cat,
which jax does not have): an upstream bug, reported in the output; the comparison uses 4 heads.
Exit status: non-zero when a comparison fails or an install step fails.
USAGE
    exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BLOOM_FLAX_VENV:-$ROOT/.venv-flax}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
LOCK="$ROOT/requirements/flax-constraints.txt"
OUT="$ROOT/build/flax-check"
SECONDS=0

# The venv is current when it was built from this lock and this torch spec.
stamp="$(cat "$LOCK"; echo "$TORCH_SPEC $TORCH_INDEX_URL")"
if [[ -x "$VENV/bin/python" && -f "$VENV/.bloom-stamp" && "$(cat "$VENV/.bloom-stamp")" == "$stamp" ]]; then
    echo "[flax] venv ready: $VENV"
else
    echo "[flax] building $VENV (transformers 4.46.3, jax CPU, flax, $TORCH_SPEC)"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
    if [[ -n "$TORCH_INDEX_URL" ]]; then
        "${PIP[@]}" install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
    else
        "${PIP[@]}" install "$TORCH_SPEC"
    fi
    "${PIP[@]}" install -c "$LOCK" "$TORCH_SPEC" $(grep -v '^#' "$LOCK" | cut -d= -f1)
    echo "$stamp" > "$VENV/.bloom-stamp"
    echo "[flax] venv built in ${SECONDS} s"
fi

source scripts/env.sh
.venv/bin/python tests/flax_check/export_for_flax.py "$OUT"
# jax and transformers 4.46 print deprecation noise on stderr; the verdict lines are on stdout.
"$VENV/bin/python" -W ignore tests/flax_check/compare_flax.py "$OUT"
echo "[flax] done in ${SECONDS} s"
