#!/usr/bin/env bash
# A throwaway SLURM cluster on this machine, for the SLURM test tiers (`make test-slurm`,
# `make test-slurm-nodes`) and for trying the slurm/*.slurm scripts without a real cluster.
#
#   scripts/slurm_cluster.sh start [DIR]         one node (this machine): install SLURM + munge if
#                                                missing, start munged, slurmctld, slurmd
#   scripts/slurm_cluster.sh start-two ID [DIR]  two nodes, ID-a (10.0.0.1) and ID-b (10.0.0.2), each
#                                                a network namespace with its own hostname and slurmd
#                                                (scripts/netns_cluster.sh); slurmctld runs on ID-a
#   scripts/slurm_cluster.sh client DIR CMD...   run a client command (sbatch, squeue, ...) where the
#                                                controller is reachable: here, or on ID-a
#   scripts/slurm_cluster.sh stop [DIR]          cancel its jobs, stop the daemons by their PIDs (and
#                                                delete the two namespaces)
#   scripts/slurm_cluster.sh status [DIR]        show the daemons and the nodes
#
# Everything the cluster writes (slurm.conf, its own munge key and socket, state, logs, PID files)
# lives in DIR (default: $BLOOM_SLURM_DIR or /tmp/bloom-slurm), so nothing system-wide is touched
# apart from installing the Debian packages (and, for two nodes, the namespaces). Clients find
# the cluster through
#   export SLURM_CONF=DIR/slurm.conf
# Two nodes are two "hosts" rather than two slurmd on one address (which Debian's build, made
# with multiple-slurmd, would allow): each node then has its own address, hostname and port
# 6818, so a job's nodes find each other by name over a network as on a real cluster. The one
# munged serves both: its socket is a file, and files are shared across network namespaces.
# Needs root (the daemons run as root, munged as the munge user) and no systemd.
# Exit codes: 0 done, 1 failed, 3 cannot run here (not root, no apt-get, install failed, no
# namespaces): tests skip on 3.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
DAEMONS=(slurmd slurmctld munged)  # stop order: compute daemon, controller, then authentication

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { echo "slurm_cluster: $*" >&2; exit 1; }
cannot() { echo "slurm_cluster: cannot run here: $*" >&2; exit 3; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NETNS="$REPO/scripts/netns_cluster.sh"

cmd="${1:-}"
shift || true
HOSTS_ID=""  # start-two: the namespace pair's ID
if [[ "$cmd" == start-two ]]; then
    HOSTS_ID="${1:-}"
    [[ "$HOSTS_ID" =~ ^[A-Za-z0-9]{1,8}$ ]] || { usage >&2; die "start-two needs an ID (1 to 8 letters or digits)"; }
    shift
fi
if [[ "$cmd" == client ]]; then
    (( $# >= 2 )) || { usage >&2; die "client needs DIR and a command"; }
fi
DIR="${1:-${BLOOM_SLURM_DIR:-/tmp/bloom-slurm}}"
shift || true
export SLURM_CONF="$DIR/slurm.conf"
# Written by start: the nodes ("NAME ADDRESS" lines) and, for two nodes, the namespace pair's ID.
NODES_FILE="$DIR/nodes"
HOSTS_FILE="$DIR/netns-id"

pid_file() {  # pid_file DAEMON [NODE]: where that daemon's PID is recorded (slurmd: one per node)
    case "$1" in
        munged) echo "$DIR/munge/munged.pid" ;;
        slurmd) echo "$DIR/run/slurmd-$2.pid" ;;  # SlurmdPidFile's %n
        *) echo "$DIR/run/$1.pid" ;;
    esac
}

label() { if [[ "$2" == - ]]; then echo "$1"; else echo "$1 of $2"; fi; }  # label DAEMON NODE|-
node_names() { [[ -s "$NODES_FILE" ]] && awk '{print $1}' "$NODES_FILE"; return 0; }
hosts_id() { [[ -s "$HOSTS_FILE" ]] && cat "$HOSTS_FILE"; return 0; }

# Run a client command where slurmctld can be reached: on this machine, or, for two nodes, on
# the first node, since slurmctld listens on its address and the pair's veth joins only the two
# namespaces.
client() {
    local id
    id="$(hosts_id)"
    if [[ -n "$id" ]]; then
        bash "$NETNS" exec "$id" a "$@"
    else
        "$@"
    fi
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
    file="$(pid_file "$1" "${2:-}")"
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
    local controller controller_addr cpus mem name addr nodes=()
    read -r controller controller_addr < "$NODES_FILE"
    # Describe the nodes exactly as slurmd sees them, or slurmctld drains them for a mismatch
    # (two nodes on one machine: the same CPUs and memory, each reporting all of them).
    read -r cpus mem < <(slurmd -C | tr ' ' '\n' | awk -F= '$1=="CPUs"{c=$2} $1=="RealMemory"{m=$2} END{print c, m}')
    [[ -n "$cpus" && -n "$mem" ]] || die "could not read CPUs and memory from 'slurmd -C'"
    cat >"$SLURM_CONF" <<CONF
# Written by scripts/slurm_cluster.sh: $(wc -l < "$NODES_FILE") node(s), no accounting, no cgroups (containers lack them).
ClusterName=bloomtest
SlurmctldHost=${controller}(${controller_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (120 s by
# default): short here, so that the test of a job requeued after a failure stays short.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# A requeued job becomes eligible after a delay (see cred_expire), and starts at the next periodic
# scheduling pass after that: every 5 s rather than every 60 (backfill: 30), to keep the tests short.
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
# Keep finished jobs visible to 'scontrol show job' for a while: there is no accounting (sacct).
MinJobAge=900
SlurmctldPidFile=$(pid_file slurmctld)
# %n: the node name, so that two slurmd on one file system keep apart.
SlurmdPidFile=$DIR/run/slurmd-%n.pid
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
CONF
    while read -r name addr; do
        echo "NodeName=${name} NodeAddr=${addr} CPUs=${cpus} RealMemory=$(( mem > 200 ? mem - 100 : mem )) State=UNKNOWN" \
            >>"$SLURM_CONF"
        nodes+=("$name")
    done < "$NODES_FILE"
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$SLURM_CONF"
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

# Every node idle (sinfo prints one state per line, for each node).
nodes_idle() {
    local states
    states="$(client sinfo -h -N -o %t 2>/dev/null)" || return 1
    [[ -n "$states" ]] && ! grep -qvx idle <<<"$states"
}

on_node() {  # on_node NODE CMD...: start a daemon on that node (its namespace, for two nodes)
    local node="$1" id
    shift
    id="$(hosts_id)"
    if [[ -n "$id" ]]; then
        bash "$NETNS" daemon "$id" "${node##*-}" "$@"
    else
        "$@"
    fi
}

start() {
    [[ "$(id -u)" == 0 ]] || cannot "needs root (the daemons run as root); run it with sudo"
    if [[ -s "$NODES_FILE" ]]; then
        for d in "${DAEMONS[@]}"; do
            for node in $(node_names); do
                if live_pid "$d" "$node" >/dev/null; then die "$d from $DIR is already running; stop it first: $0 stop $DIR"; fi
            done
        done
    fi
    mkdir -p "$DIR"/{run,state,spool,log}
    install_packages
    id munge >/dev/null 2>&1 || cannot "the munge user does not exist (broken munge package?)"
    if [[ -n "$HOSTS_ID" ]]; then
        local out status=0
        out="$(bash "$NETNS" start "$HOSTS_ID" 2>&1)" || status=$?
        (( status != 3 )) || cannot "${out##*cannot run here: }"
        (( status == 0 )) || die "could not create the two hosts: $out"
        echo "$HOSTS_ID" >"$HOSTS_FILE"
        printf '%s-a 10.0.0.1\n%s-b 10.0.0.2\n' "$HOSTS_ID" "$HOSTS_ID" >"$NODES_FILE"
    else
        rm -f "$HOSTS_FILE"
        echo "$(hostname -s) 127.0.0.1" >"$NODES_FILE"
    fi
    write_config
    start_munge
    wait_for 10 live_pid munged || die "munged did not start; see $DIR/munge/munged.log"
    local controller node
    controller="$(node_names | head -n 1)"
    # -i: a fresh state directory has no state to read; ignore what a previous run left behind.
    on_node "$controller" /usr/sbin/slurmctld -i -f "$SLURM_CONF" || die "slurmctld failed; see $DIR/log/slurmctld.log"
    wait_for 15 live_pid slurmctld || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    for node in $(node_names); do
        mkdir -p "$DIR/spool/$node"
        on_node "$node" /usr/sbin/slurmd -f "$SLURM_CONF" -N "$node" || die "slurmd of $node failed; see $DIR/log/slurmd-$node.log"
        wait_for 15 live_pid slurmd "$node" || die "slurmd of $node did not start; see $DIR/log/slurmd-$node.log"
    done
    wait_for 30 nodes_idle || die "the nodes did not become idle; see $DIR/log/slurmctld.log and slurmd-*.log"
    echo "[slurm] up: $(client sinfo -h -N -o '%N %c CPUs %m MB %t' | paste -sd ';')"
    echo "export SLURM_CONF=$SLURM_CONF"
    if [[ -n "$HOSTS_ID" ]]; then echo "clients: $0 client $DIR sbatch|squeue|..."; fi
}

queue_empty() { [[ -z "$(client squeue -h -o %A 2>/dev/null)" ]]; }
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
        jobs="$(client squeue -h -o %A | sort -u | tr '\n' ' ')"
        echo "[slurm] cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        client scancel $jobs 2>/dev/null || true
        # SIGTERM first (a training run saves), SIGKILL after SLURM's KillWait (30 s).
        if ! wait_for 45 queue_empty; then
            # shellcheck disable=SC2086
            client scancel --full --signal=KILL $jobs 2>/dev/null || true
            wait_for 15 queue_empty || echo "[slurm] jobs still listed: $jobs" >&2
        fi
    fi
    local pid d node
    for d in "${DAEMONS[@]}"; do
        for node in $( [[ "$d" == slurmd ]] && node_names || echo -); do
            pid="$(live_pid "$d" "$node")" || continue
            kill "$pid" 2>/dev/null || true
            # Wait on the process, not its PID file: daemons delete the file when they start exiting.
            if ! wait_for 15 not_running "$pid"; then
                echo "[slurm] $d ($pid) ignored SIGTERM; sending SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
            echo "[slurm] stopped $(label "$d" "$node") ($pid)"
        done
    done
    for pid in $(leftover_pids); do
        echo "[slurm] killing $(cat "/proc/$pid/comm" 2>/dev/null) ($pid): left over from a job" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done
    local id
    id="$(hosts_id)"
    if [[ -n "$id" ]]; then
        # Whatever else runs on the two hosts is this cluster's: netns_cluster.sh kills it by namespace.
        bash "$NETNS" stop "$id" || die "could not delete the hosts of $id (see above)"
        echo "[slurm] deleted hosts $id-a and $id-b"
        rm -f "$HOSTS_FILE"
    fi
}

status() {
    local pid d node
    for d in "${DAEMONS[@]}"; do
        for node in $( [[ "$d" == slurmd ]] && node_names || echo -); do
            if pid="$(live_pid "$d" "$node")"; then echo "$(label "$d" "$node"): running ($pid)"; else echo "$(label "$d" "$node"): not running"; fi
        done
    done
    if live_pid slurmctld >/dev/null; then client sinfo; client squeue; fi
}

case "$cmd" in
    start|start-two) start ;;
    client) client "$@" ;;
    stop) stop ;;
    status) status ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
