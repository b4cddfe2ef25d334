#!/usr/bin/env bash
# Submit a chain of N jobs of one slurm/*.slurm script that run one after another, each resuming
# from the checkpoint the previous one saved (as BLOOM-176B ran: 100-hour jobs, one at a time).
#
#   scripts/submit_chain.sh [--dependency] N SCRIPT [SBATCH_OPTION...] [-- SCRIPT_ARG...]
#
#   N               number of jobs in the chain
#   SCRIPT          e.g. slurm/bloom-176b.slurm
#   SBATCH_OPTION   passed to sbatch (e.g. --partition=gpu --account=proj --time=20:00:00)
#   SCRIPT_ARG      after `--`: passed to the script, i.e. to pretrain_bloom.py (--set ...)
#   --dependency    N separate jobs linked by --dependency=afterany:<previous> instead of one
#                   job array with --array=1-N%1 (for clusters that limit array sizes)
#
# Prints the job ids on stdout, one per line: the array's job id (its tasks are ID_1 .. ID_N),
# or the N chained job ids. Submits from the repository root, where the scripts' relative paths
# (configs/, logs/) point, and creates logs/ there for the default --output.
# Stop a chain: scancel ID (array) or scancel each id; stop it cleanly: see slurm/README.md.
set -euo pipefail

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

mode=array
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ "${1:-}" == "--dependency" ]]; then mode=dependency; shift; fi
if (( $# < 2 )); then usage >&2; exit 2; fi
count="$1" script="$2"
shift 2
[[ "$count" =~ ^[1-9][0-9]*$ ]] || { echo "submit_chain: N must be a positive integer, got '$count'" >&2; exit 2; }
[[ -f "$script" ]] || { echo "submit_chain: no such script: $script" >&2; exit 2; }
script="$(cd "$(dirname "$script")" && pwd)/$(basename "$script")"

sbatch_options=() script_args=()
while (( $# )); do
    if [[ "$1" == "--" ]]; then shift; script_args=("$@"); break; fi
    sbatch_options+=("$1"); shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# sbatch cannot create the directory of --output; the scripts default to logs/%x-%j.out.
own_output=0
for option in "${sbatch_options[@]+"${sbatch_options[@]}"}"; do
    if [[ "$option" == -o* || "$option" == --output* ]]; then own_output=1; fi
done
if (( ! own_output )); then mkdir -p logs; fi

submit() {  # submit SBATCH_ARG...: submit the script, print its job id
    local out
    out="$(sbatch --parsable "$@" "${sbatch_options[@]+"${sbatch_options[@]}"}" "$script" \
           "${script_args[@]+"${script_args[@]}"}")"
    echo "${out%%;*}"  # --parsable prints "id" or "id;cluster"
}

if [[ "$mode" == array ]]; then
    # %1: one task at a time; each starts when the previous one ended, whatever its exit status.
    id="$(submit --array="1-$count%1")"
    echo "submitted array job $id: tasks ${id}_1 .. ${id}_$count run one after another" >&2
    echo "$id"
else
    previous=""
    for (( i = 1; i <= count; i++ )); do
        # afterany: resume even after a job that failed or hit its limit; the checkpoint decides.
        id="$(submit ${previous:+--dependency=afterany:$previous})"
        echo "submitted job $id ($i of $count)${previous:+, after $previous}" >&2
        echo "$id"
        previous="$id"
    done
fi
