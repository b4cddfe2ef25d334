#!/usr/bin/env bash
# Regenerate requirements/constraints.txt, the lock file scripts/setup.sh installs from, out of
# `pip freeze` of a venv the tests pass in. See the usage below.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLOOM_VENV:-$ROOT/.venv}"
LOCK="$ROOT/requirements/constraints.txt"

usage() {
    cat <<EOF
usage: bash scripts/lock.sh [--check] [--output FILE] [--help]

Writes requirements/constraints.txt from \`pip freeze\` of the venv (default .venv): one
NAME==VERSION line per installed package, sorted by name, under a header that says how it was
made. Left out: torch (the CPU or CUDA build is the installer's choice), the CUDA libraries a
CUDA torch brings (nvidia-*, triton) and this project itself. The same venv always gives the
same file.

To upgrade a package: .venv/bin/pip install -U NAME, widen its range in pyproject.toml if
needed, run bash scripts/test.sh, then bash scripts/lock.sh and commit the file. Lock from a
venv scripts/setup.sh built: anything else installed there by hand is locked too.

options:
  --check        write nothing; exit 1 (and show the difference) when the file is out of date
  --output FILE  write FILE instead (or compare with it, with --check)
  --help         this text

environment:
  BLOOM_VENV  the venv to freeze (default: $ROOT/.venv)
EOF
}

check=0
while (( $# )); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --check) check=1 ;;
        --output)
            [[ $# -ge 2 ]] || { echo "lock.sh: --output needs a file name" >&2; exit 2; }
            LOCK="$2"; shift ;;
        *) echo "lock.sh: unknown argument '$1'; see bash scripts/lock.sh --help" >&2; exit 2 ;;
    esac
    shift
done
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "lock.sh: no venv at $VENV; build it with bash scripts/setup.sh (or set BLOOM_VENV)" >&2
    exit 2
fi

# Reads `pip freeze` on stdin, writes the lock file's text on stdout.
read -r -d '' FILTER <<'PYEOF' || true
import platform
import re
import sys

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

project = re.search(r'^name\s*=\s*"([^"]+)"', open(sys.argv[1]).read(), re.M).group(1)
# torch and its CUDA companions follow the build the installer picked, not the lock.
skip = re.compile(r"^(torch|triton|nvidia-.*|%s)$" % re.escape(canonical(project)))
pins, bad = {}, []
for line in sys.stdin.read().splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
    if not match:
        bad.append(line)
    elif not skip.match(canonical(match.group(1))):
        pins[canonical(match.group(1))] = line
if bad:
    sys.exit("lock.sh: pip freeze gave lines that are not NAME==VERSION (installed from a file, URL or "
             "checkout?):\n  " + "\n  ".join(bad) + "\nreinstall those from an index, e.g. "
             "pip install --force-reinstall NAME==VERSION, then run lock.sh again")
print(f"""\
# Locked versions for scripts/setup.sh, which installs them with `pip install -c` and repairs
# any installed package whose version differs. Do not edit by hand: regenerate with
# `bash scripts/lock.sh` (see its --help) from a venv that scripts/setup.sh built and the tests
# pass in. Made from `pip freeze` on Python {platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]}, \
{platform.system()} {platform.machine()}; other Pythons or
# platforms may need other versions. Left out: torch (the CPU or CUDA build is the installer's
# choice), nvidia-* and triton (they come with a CUDA torch) and this project.""")
for name in sorted(pins):
    print(pins[name])
PYEOF

freeze="$(mktemp)"
new="$(mktemp)"
trap 'rm -f "$freeze" "$new"' EXIT
"$VENV/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable >"$freeze"
"$VENV/bin/python" -c "$FILTER" "$ROOT/pyproject.toml" <"$freeze" >"$new"

if (( check )); then
    if diff -u "$LOCK" "$new"; then
        echo "[lock] $LOCK is up to date"
        exit 0
    fi
    echo "lock.sh: $LOCK differs from $VENV (diff above); run bash scripts/lock.sh and commit it" >&2
    exit 1
fi
mkdir -p "$(dirname "$LOCK")"
cp "$new" "$LOCK"
echo "[lock] wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
