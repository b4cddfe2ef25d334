# Launch logic shared by every slurm/*.slurm script (sourced, not executed).
#
# A per-size script sources this file, sets a few variables and calls `bloom_launch "$@"`:
#
#   CONFIG            YAML run config (relative to the repository root)
#   PROCS_PER_NODE    training processes per node (GPUs per node; CPU ranks for cpu-tiny)
#   EXIT_MARGIN_MINS  stop this many minutes before the job's time limit, via
#                     training.exit_duration_in_mins (default 10: BLOOM-176B stopped at 5990 of
#                     6000 minutes; bloom-176b.slurm uses 15, see there)
#   SETS              optional array of extra `section.field=value` overrides for this size
#
# Arguments given to sbatch after the script name reach pretrain_bloom.py unchanged, so any run
# setting can be overridden at submission: sbatch slurm/bloom-560m.slurm --set training.seed=1
#
# What a job does: check the config (a --dry-run over the whole allocation, so a typo fails in
# seconds instead of after every node has started), then run one torchrun per node through srun
# (c10d rendezvous on the first node of the allocation, port derived from the job id). torchrun
# starts PROCS_PER_NODE ranks on its node. The run resumes from `latest` in checkpoint.load when
# there is one, so every job of a chain continues where the previous one stopped.
#
# When training fails after it started (a rank died, a node's torchrun exited with an error),
# the job requeues itself (`scontrol requeue`): it keeps its job id and its place in a chain,
# gets a fresh allocation after SLURM's requeue delay, and resumes from the newest complete
# checkpoint; a failure that repeats stops after BLOOM_MAX_REQUEUES requeues (see
# requeue_after_failure). The scripts also ask for `--requeue`, so that SLURM itself requeues a
# job whose node fails under it (the batch script cannot act then).
#
# Environment knobs: DRY_RUN=1 prints the resolved launch command (after the config check)
# instead of running it, also outside SLURM; BLOOM_PYTHON picks the interpreter (default
# .venv/bin/python); BLOOM_LOG_DIR is where per-job log directories go (default logs/);
# BLOOM_MAX_REQUEUES caps the requeues after failures of one job (default 3; 0: never);
# BLOOM_ROOT tells the per-size scripts where the repository is when sbatch was not called from
# its root (sbatch runs a copy of the script, so the script's own path does not tell).
#
# Finding this file: the search cannot live here, since it is what finds this file, so every
# per-size script starts with the same line, to be copied unchanged into a new one:
#
#   source "$(for d in "${BLOOM_ROOT:-}" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}" ...; done; ...)"
#
# It sources the first slurm/common.sh found under, in order: BLOOM_ROOT; the parent of the
# script's directory (a script run with bash, e.g. DRY_RUN=1 bash slurm/bloom-560m.slurm from
# anywhere; under sbatch that is the spool directory, which never matches); SLURM_SUBMIT_DIR,
# where sbatch was called (the repository root, as scripts/submit_chain.sh does); its parent
# (sbatch called from slurm/). Finding none, it names BLOOM_ROOT and the script stops.

# The repository: the parent of this file's directory, wherever the sourcing script found it.
BLOOM_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Whole minutes in a SLURM duration: "M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S" (sbatch
# --time syntax, and squeue's %L/%l output). Prints nothing for UNLIMITED / NOT_SET / INVALID.
slurm_duration_minutes() {
    local value="$1" days=0 rest fields h=0 m=0 s=0
    case "$value" in
        ""|UNLIMITED|NOT_SET|INVALID|Partition_Limit) return 0 ;;
    esac
    if [[ "$value" == *-* ]]; then
        days="${value%%-*}"
        rest="${value#*-}"
        IFS=: read -r -a fields <<<"$rest"
        h="${fields[0]:-0}" m="${fields[1]:-0}" s="${fields[2]:-0}"
    else
        IFS=: read -r -a fields <<<"$value"
        case "${#fields[@]}" in
            1) m="${fields[0]}" ;;
            2) m="${fields[0]}" s="${fields[1]}" ;;
            3) h="${fields[0]}" m="${fields[1]}" s="${fields[2]}" ;;
            *) echo "cannot read SLURM duration '$value'" >&2; return 1 ;;
        esac
    fi
    # 10# keeps "08" from being read as an (invalid) octal number.
    echo $(( ((10#$days * 24 + 10#$h) * 60 + 10#$m) + 10#$s / 60 ))
}

# The value of `#SBATCH --NAME=...` (or `#SBATCH --NAME ...`) in a script's header; used for
# dry runs outside SLURM, where no job tells us the node count or the time limit.
sbatch_header_value() {
    local script="$1" name="$2"
    sed -n -E "s/^#SBATCH[[:space:]]+--${name}[=[:space:]]+([^[:space:]]+).*/\1/p" "$script" | tail -n 1
}

# Minutes this job has left, or the script header's --time outside SLURM (empty: unlimited).
job_minutes_left() {
    local script="$1" left
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        left="$(squeue -h --jobs="$SLURM_JOB_ID" -o %L 2>/dev/null | head -n 1)"
    else
        left="$(sbatch_header_value "$script" time)"
    fi
    slurm_duration_minutes "$left"
}

# After the training step failed with STATUS: requeue this job so that it starts again and
# resumes from the last complete checkpoint, unless it was requeued BLOOM_MAX_REQUEUES times
# already (SLURM counts them in SLURM_RESTART_COUNT), in which case the job fails with STATUS.
#
# Why the job and not torchrun --max-restarts: on a GPU cluster a rank that dies is most often
# a bad GPU or node, and torchrun would restart it on the same one; a requeued job gets a new
# allocation, where nodes drained meanwhile are not used, and a chain keeps its length (a chain
# that moved on to its next job instead would lose one job's worth of training per failure,
# and a failure in its last job would end the run). Why a cap: a failure that repeats (a bug, a
# corrupt shard) must not loop for the whole time budget.
# Only failures after the config check get here: a bad config or missing data fail the job
# before, since requeueing cannot fix them. A clean stop (time limit, SIGUSR1, kill switch)
# exits 0; scancel ends this shell before it gets here.
requeue_after_failure() {
    local status="$1" max="${BLOOM_MAX_REQUEUES:-3}" count="${SLURM_RESTART_COUNT:-0}" job="$SLURM_JOB_ID"
    # An array task by its array and task ids: the array's last task has the array's own job id,
    # and `scontrol requeue <array id>` would requeue every task of the array, finished ones too.
    if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    [[ "$max" =~ ^[0-9]+$ ]] || { echo "BLOOM_MAX_REQUEUES must be a whole number, got '$max'" >&2; return "$status"; }
    if (( count >= max )); then
        echo "[bloom] training failed with exit status $status after $count requeue(s) of job $job" \
             "(BLOOM_MAX_REQUEUES=$max): not requeueing; see $BLOOM_JOB_LOG_DIR/error-node*.json for the" \
             "failing rank, fix the cause and resubmit" >&2
        return "$status"
    fi
    echo "[bloom] training failed with exit status $status: requeueing job $job" \
         "($(( count + 1 )) of at most $max) to resume from the last complete checkpoint" >&2
    if ! scontrol requeue "$job"; then
        echo "[bloom] scontrol requeue $job failed (is the job requeueable? JobRequeue=0 in" \
             "slurm.conf needs sbatch --requeue): resubmit it by hand" >&2
        return "$status"
    fi
    # SLURM now ends this run of the job and queues the next; the exit status is not recorded.
    return 0
}

bloom_launch() {
    local script
    script="$(cd "$(dirname "${BASH_SOURCE[1]:-$0}")" && pwd)/$(basename "${BASH_SOURCE[1]:-$0}")"
    : "${CONFIG:?set CONFIG (the YAML run config) before calling bloom_launch}"
    : "${PROCS_PER_NODE:?set PROCS_PER_NODE before calling bloom_launch}"
    local margin="${EXIT_MARGIN_MINS:-10}"
    local python="${BLOOM_PYTHON:-$BLOOM_REPO/.venv/bin/python}"
    cd "$BLOOM_REPO"

    # Shared environment (offline Hugging Face caches, DeepSpeed's op cache), then what a
    # multi-node GPU run needs: NCCL errors must abort the collective (and with it the job)
    # rather than hang until the time limit; unbuffered Python keeps the job log current.
    # shellcheck source=../scripts/env.sh
    source "$BLOOM_REPO/scripts/env.sh"
    export HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_OFFLINE=1
    export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    export PYTHONUNBUFFERED=1

    local job_id nodes master_addr master_port
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        job_id="$SLURM_JOB_ID"
        nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
        master_addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
        # Array tasks and chained jobs each have their own id: no two runs share a port.
        master_port=$(( 20000 + SLURM_JOB_ID % 20000 ))
    else
        [[ -n "${DRY_RUN:-}" ]] || { echo "not inside a SLURM job: submit with sbatch, or set DRY_RUN=1" >&2; return 1; }
        job_id="dry-run"
        nodes="$(sbatch_header_value "$script" nodes)"
        nodes="${nodes:-1}"
        master_addr="$(hostname -s)"
        master_port=29500
    fi
    local world_size=$(( nodes * PROCS_PER_NODE ))

    local sets=("${SETS[@]+"${SETS[@]}"}")
    local minutes_left exit_after
    minutes_left="$(job_minutes_left "$script")"
    if [[ -n "$minutes_left" ]]; then
        exit_after=$(( minutes_left - margin ))
        if (( exit_after <= 0 )); then
            echo "the job has $minutes_left minute(s) left, not more than EXIT_MARGIN_MINS=$margin:" \
                 "ask for a longer --time or lower EXIT_MARGIN_MINS" >&2
            return 1
        fi
        # Stop (and save) cleanly before SLURM's time limit; USR1 from --signal is the backstop.
        sets+=("training.exit_duration_in_mins=$exit_after")
    fi
    local overrides=()
    for item in "${sets[@]+"${sets[@]}"}"; do overrides+=(--set "$item"); done

    local log_dir="${BLOOM_LOG_DIR:-logs}/${SLURM_JOB_NAME:-$(basename "$script" .slurm)}-$job_id"
    [[ "$log_dir" == /* ]] || log_dir="$BLOOM_REPO/$log_dir"  # node.sh runs on other nodes
    [[ -n "${DRY_RUN:-}" ]] || mkdir -p "$log_dir"
    export BLOOM_JOB_LOG_DIR="$log_dir"

    echo "[bloom] job $job_id${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID of ${SLURM_ARRAY_TASK_MAX:-?})}:" \
         "$nodes node(s) x $PROCS_PER_NODE process(es), rendezvous $master_addr:$master_port," \
         "${minutes_left:-unlimited} minute(s) left, logs in $log_dir"

    # Check the config over the whole world size, and the data (every prefix and the tokenizer),
    # before starting anything on the nodes; a DRY_RUN off the cluster plans without the data.
    local check_data=(--check-data)
    [[ -z "${DRY_RUN:-}" ]] || check_data=()
    "$python" pretrain_bloom.py --config "$CONFIG" ${overrides[@]+"${overrides[@]}"} "$@" --dry-run \
        --world-size "$world_size" ${check_data[@]+"${check_data[@]}"}

    # srun: one task per node, each a torchrun that starts the node's ranks.
    #   --kill-on-bad-exit=1  a rank (torchrun) that fails ends the whole job instead of leaving
    #                         the other nodes blocked in a collective until the time limit;
    #   --wait=60             once one node's torchrun has exited, the others get 60 s to follow;
    #   --label               prefix each line with the node it came from;
    #   --cpus-per-task       srun no longer inherits it from sbatch (SLURM 22.05+): without it the
    #                         node's ranks and data workers would share one CPU where SLURM binds.
    # slurm/node.sh makes torchrun ignore SIGUSR1 so that only the ranks act on it (see there).
    local cmd=(
        srun --kill-on-bad-exit=1 --wait=60 --label
             --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1
             --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
        bash "$BLOOM_REPO/slurm/node.sh"
        "$python" -m torch.distributed.run
            --nnodes="$nodes" --nproc-per-node="$PROCS_PER_NODE"
            --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port" --rdzv-id="$job_id"
            --max-restarts=0
        pretrain_bloom.py --config "$CONFIG" ${overrides[@]+"${overrides[@]}"} "$@"
    )
    if [[ -n "${DRY_RUN:-}" ]]; then
        echo "[bloom] launch command (DRY_RUN set, not run):"
        printf '%q ' "${cmd[@]}"
        echo
        return 0
    fi
    echo "[bloom] $(printf '%q ' "${cmd[@]}")"
    local status=0
    "${cmd[@]}" || status=$?
    (( status == 0 )) || requeue_after_failure "$status"
}
