#!/usr/bin/env bash
# One node's part of a job: `srun` runs this once per node (see slurm/common.sh), and it
# becomes the node's torchrun, whose command line it receives as arguments.
#
# Why it exists: `#SBATCH --signal=USR1@T` (without `B:`) makes SLURM send SIGUSR1 to every
# process of every job step, so torchrun receives it alongside the training ranks. torchrun has
# no handler for SIGUSR1, and its default action would kill it (and, through srun's
# --kill-on-bad-exit, the ranks) before they could save. An ignored signal stays ignored across
# exec, so torchrun ignores it; each rank installs its own handler when training starts (save at
# the next step boundary, exit 0) and thus still acts on it.
set -euo pipefail
trap '' USR1

# torchrun writes the first failing rank's error (the traceback of a rank whose main is wrapped
# in torch.distributed.elastic's @record) to this file: one per node, in the job's log directory.
if [[ -n "${BLOOM_JOB_LOG_DIR:-}" ]]; then
    export TORCHELASTIC_ERROR_FILE="$BLOOM_JOB_LOG_DIR/error-node${SLURM_NODEID:-0}.json"
fi
exec "$@"
