#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine, for the SLURM test tier (`make test-slurm`)
# and for trying the slurm/*.slurm scripts without a real cluster.
#
#   scripts/slurm_cluster.sh start [DIR]   install SLURM + munge if missing, start munged, slurmctld, slurmd
#   scripts/slurm_cluster.sh stop [DIR]    cancel its jobs, stop the three daemons by their PIDs
#   scripts/slurm_cluster.sh status [DIR]  show the daemons and the node
#
# Everything the cluster writes (slurm.conf, its own munge key and socket, state, logs, PID files)
# lives in DIR (default: $BLOOM_SLURM_DIR or /tmp/bloom-slurm), so nothing system-wide is touched
# apart from installing the Debian packages. Clients find the cluster through
#   export SLURM_CONF=DIR/slurm.conf
# Needs root (the daemons run as root, munged as the munge user) and no systemd.
# Exit codes: 0 done, 1 failed, 3 cannot run here (not root, no apt-get, install failed): tests skip on 3.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
DAEMONS=(slurmd slurmctld munged)  # stop order: compute daemon, controller, then authentication

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "slurm_cluster: $*" >&2; exit 1; }
cannot() { echo "slurm_cluster: cannot run here: $*" >&2; exit 3; }

cmd="${1:-}"
DIR="${2:-${BLOOM_SLURM_DIR:-/tmp/bloom-slurm}}"
export SLURM_CONF="$DIR/slurm.conf"

pid_file() {  # pid_file DAEMON: where that daemon's PID is recorded
    case "$1" in
        munged) echo "$DIR/munge/munged.pid" ;;
        *) echo "$DIR/run/$1.pid" ;;
    esac
}

# Whether PID is a running process (a zombie waiting to be reaped by init does not count).
running() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"  # fields after "(comm)", whatever the command name contains
    [[ "${stat%% *}" != Z ]]
}

# PID of DAEMON if its PID file names a running process that really is that daemon (a PID
# file can outlive its process, and the number can be reused by an unrelated one).
live_pid() {
    local file pid
    file="$(pid_file "$1")"
    [[ -s "$file" ]] || return 1
    pid="$(tr -dc '0-9' < "$file")"
    [[ -n "$pid" ]] && running "$pid" || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1"* ]] || return 1
    echo "$pid"
}

install_packages() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    (( ${#missing[@]} )) || return 0
    command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get to install ${missing[*]}"
    echo "[slurm] installing ${missing[*]}"
    # The package index of a fresh machine is empty or stale: refresh it before installing.
    apt-get update -qq >"$DIR/apt.log" 2>&1 || cannot "apt-get update failed (see $DIR/apt.log)"
    # No init system: dpkg's attempt to start the services is refused (policy-rc.d) and harmless;
    # the daemons are started by hand below.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
        >>"$DIR/apt.log" 2>&1 || cannot "apt-get install ${missing[*]} failed (see $DIR/apt.log)"
}

write_config() {
    local host cpus mem
    host="$(hostname -s)"
    # Describe the node exactly as slurmd sees it, or slurmctld drains it for a mismatch.
    read -r cpus mem < <(slurmd -C | tr ' ' '\n' | awk -F= '$1=="CPUs"{c=$2} $1=="RealMemory"{m=$2} END{print c, m}')
    [[ -n "$cpus" && -n "$mem" ]] || die "could not read CPUs and memory from 'slurmd -C'"
    cat >"$SLURM_CONF" <<CONF
# Written by scripts/slurm_cluster.sh: one node, no accounting, no cgroups (containers lack them).
ClusterName=bloomtest
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
# Keep finished jobs visible to 'scontrol show job' for a while: there is no accounting (sacct).
MinJobAge=900
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=$(( mem > 200 ? mem - 100 : mem )) State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    local m="$DIR/munge"
    runuser -u munge -- test -x "$DIR" \
        || die "the munge user cannot enter $DIR (a parent directory is private): pick a directory under /tmp"
    # munged runs as the munge user and refuses a key or socket directory that others could
    # write to (its socket directory must be searchable by every client).
    mkdir -p "$m"
    chown munge:munge "$m"
    chmod 755 "$m"
    if [[ ! -s "$m/munge.key" ]]; then
        runuser -u munge -- mungekey --create --keyfile="$m/munge.key" 2>/dev/null \
            || { dd if=/dev/urandom of="$m/munge.key" bs=1 count=128 status=none; chown munge:munge "$m/munge.key"; }
        chmod 400 "$m/munge.key"
    fi
    runuser -u munge -- /usr/sbin/munged --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$(pid_file munged)" --log-file="$m/munged.log" --seed-file="$m/munged.seed"
}

wait_for() {  # wait_for SECONDS COMMAND...: poll COMMAND every 0.5 s until it succeeds
    local deadline=$(( SECONDS + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || return 1
        sleep 0.5
    done
}

node_idle() { sinfo -h -o %t | grep -qx idle; }

start() {
    [[ "$(id -u)" == 0 ]] || cannot "needs root (the daemons run as root); run it with sudo"
    for d in "${DAEMONS[@]}"; do
        if live_pid "$d" >/dev/null; then die "$d from $DIR is already running; stop it first: $0 stop $DIR"; fi
    done
    mkdir -p "$DIR"/{run,state,spool,log}
    install_packages
    id munge >/dev/null 2>&1 || cannot "the munge user does not exist (broken munge package?)"
    write_config
    start_munge
    wait_for 10 live_pid munged || die "munged did not start; see $DIR/munge/munged.log"
    # -i: a fresh state directory has no state to read; ignore what a previous run left behind.
    /usr/sbin/slurmctld -i -f "$SLURM_CONF"
    wait_for 15 live_pid slurmctld || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    /usr/sbin/slurmd -f "$SLURM_CONF"
    wait_for 15 live_pid slurmd || die "slurmd did not start; see $DIR/log/slurmd.log"
    wait_for 30 node_idle || die "the node did not become idle; see $DIR/log/slurmctld.log and slurmd.log"
    echo "[slurm] up: $(sinfo -h -o '%n %c CPUs %m MB %t')"
    echo "export SLURM_CONF=$SLURM_CONF"
}

queue_empty() { [[ -z "$(squeue -h -o %A 2>/dev/null)" ]]; }
not_running() { ! running "$1"; }

# Processes this cluster started for jobs that are still there after their job ended:
# slurmstepd, and job processes that left their step's process tree (with
# proctrack/linuxproc, a process whose parent died is no longer found by SLURM). Both carry
# this cluster's SLURM_CONF; job processes also a SLURM_JOB_ID. Our own clients have no job id.
leftover_pids() {
    local pid env
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [[ "$pid" != "$$" ]] && running "$pid" || continue
        env="$( { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null)" || continue
        grep -qx "SLURM_CONF=$SLURM_CONF" <<<"$env" || continue
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]] || grep -q '^SLURM_JOB_ID=' <<<"$env"; then
            echo "$pid"
        fi
    done
    return 0
}

stop() {
    # Jobs first, while slurmd can still end their steps: otherwise slurmstepd and the job's
    # processes would outlive the daemons that manage them.
    if live_pid slurmctld >/dev/null && ! queue_empty; then
        local jobs
        jobs="$(squeue -h -o %A | sort -u | tr '\n' ' ')"
        echo "[slurm] cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        # SIGTERM first (a training run saves), SIGKILL after SLURM's KillWait (30 s).
        if ! wait_for 45 queue_empty; then
            # shellcheck disable=SC2086
            scancel --full --signal=KILL $jobs 2>/dev/null || true
            wait_for 15 queue_empty || echo "[slurm] jobs still listed: $jobs" >&2
        fi
    fi
    local pid
    for d in "${DAEMONS[@]}"; do
        pid="$(live_pid "$d")" || continue
        kill "$pid" 2>/dev/null || true
        # Wait on the process, not its PID file: daemons delete the file when they start exiting.
        if ! wait_for 15 not_running "$pid"; then
            echo "[slurm] $d ($pid) ignored SIGTERM; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "[slurm] stopped $d ($pid)"
    done
    for pid in $(leftover_pids); do
        echo "[slurm] killing $(cat "/proc/$pid/comm" 2>/dev/null) ($pid): left over from a job" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done
}

status() {
    local pid
    for d in "${DAEMONS[@]}"; do
        if pid="$(live_pid "$d")"; then echo "$d: running ($pid)"; else echo "$d: not running"; fi
    done
    if live_pid slurmctld >/dev/null; then sinfo; squeue; fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
