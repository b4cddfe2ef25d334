#!/usr/bin/env bash
# Two "hosts" on this machine: two network namespaces joined by a veth pair, each with its own
# address and hostname, for the two-host test tier (`make test-hosts`) and for trying a
# multi-node torchrun launch without a cluster.
#
#   scripts/netns_cluster.sh start ID            create hosts ID-a (10.0.0.1) and ID-b (10.0.0.2)
#   scripts/netns_cluster.sh exec ID a|b CMD...  run CMD on that host (its namespace and hostname)
#   scripts/netns_cluster.sh daemon ID a|b CMD...
#                                                the same, but with this machine's /sys, for daemons
#                                                that need its cgroup file systems (slurmd): `exec`
#                                                mounts a fresh /sys, which hides them
#   scripts/netns_cluster.sh stop ID             SIGKILL every process on both hosts, delete them
#   scripts/netns_cluster.sh fail ID a|b         SIGKILL every process on one host, as a node that
#                                                fails; its network stays (the other host's address
#                                                lives on the same veth pair)
#   scripts/netns_cluster.sh run ID PORT -- ARGS...
#                                                start the hosts, run `torchrun ... pretrain_bloom.py
#                                                ARGS` on both (2 ranks each, c10d rendezvous on host
#                                                A's address and PORT), wait, stop the hosts
#
# ID names the pair (letters and digits, at most 8), so that several pairs can exist at once;
# the two hosts see only each other, so every pair can use the same addresses. Processes on a
# host are found for `stop` by their network namespace (ip netns pids), so only what this pair
# ran is killed. `run` stops the hosts on any exit (a trap), also when the training fails.
# Needs root (ip netns, veth, unshare). Exit codes: 0 done, 1 failed, 3 cannot run here (not
# root, no `ip` or `unshare`, namespaces refused): the test tier reports the reason.
# Environment: BLOOM_PYTHON, the interpreter for `run` (default: the repository's .venv/bin/python);
# PROCS_PER_HOST, ranks per host for `run` (default 2).
set -euo pipefail

ADDR_A=10.0.0.1
ADDR_B=10.0.0.2
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "netns_cluster: $*" >&2; exit 1; }
cannot() { echo "netns_cluster: cannot run here: $*" >&2; exit 3; }

namespace() { echo "bloom-$1-$2"; }   # namespace ID HOST
address() { if [[ "$2" == a ]]; then echo "$ADDR_A"; else echo "$ADDR_B"; fi; }

has_namespace() { ip netns list | awk '{print $1}' | grep -qxF "$1"; }

check_id() {
    [[ "$1" =~ ^[A-Za-z0-9]{1,8}$ ]] || die "ID must be 1 to 8 letters or digits, got '$1'"
}

check_host() {
    [[ "$1" == a || "$1" == b ]] || die "HOST must be a or b, got '$1'"
}

start() {
    local id="$1" host ns
    [[ "$(id -u)" == 0 ]] || cannot "network namespaces need root (running as uid $(id -u))"
    command -v ip >/dev/null || cannot "no 'ip' command (install iproute2)"
    command -v unshare >/dev/null || cannot "no 'unshare' command (install util-linux)"
    for host in a b; do
        ns="$(namespace "$id" "$host")"
        if has_namespace "$ns"; then
            die "namespace $ns exists already: stop it first (scripts/netns_cluster.sh stop $id)"
        fi
    done
    ip netns add "$(namespace "$id" a)" 2>/dev/null || cannot "ip netns add failed (no CAP_SYS_ADMIN, or no netns support)"
    if ! ip netns add "$(namespace "$id" b)"; then
        stop "$id"
        cannot "ip netns add failed for the second host"
    fi
    # Interface names are at most 15 characters: bl<ID>a / bl<ID>b.
    if ! ip link add "bl${id}a" netns "$(namespace "$id" a)" type veth peer name "bl${id}b" netns "$(namespace "$id" b)"; then
        stop "$id"
        cannot "could not create a veth pair between the namespaces"
    fi
    for host in a b; do
        ns="$(namespace "$id" "$host")"
        # `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts: each host resolves both names
        # (torchrun's rendezvous looks its own hostname up).
        mkdir -p "/etc/netns/$ns"
        printf '127.0.0.1 localhost\n%s %s-a\n%s %s-b\n' "$ADDR_A" "$id" "$ADDR_B" "$id" >"/etc/netns/$ns/hosts"
        ip -n "$ns" addr add "$(address "$id" "$host")/24" dev "bl${id}${host}"
        ip -n "$ns" link set "bl${id}${host}" up
        ip -n "$ns" link set lo up
    done
    echo "host a: namespace $(namespace "$id" a), address $ADDR_A, hostname $id-a"
    echo "host b: namespace $(namespace "$id" b), address $ADDR_B, hostname $id-b"
}

# Run a command on a host: in its network namespace, with its own hostname (a UTS namespace), so
# that what ranks report about their host tells the two apart.
exec_on() {
    local id="$1" host="$2"
    shift 2
    exec ip netns exec "$(namespace "$id" "$host")" unshare --uts \
        sh -c 'hostname "$0" && exec "$@"' "$id-$host" "$@"
}

# The same without `ip netns exec`, which mounts a fresh sysfs on /sys and with it hides
# /sys/fs/cgroup (slurmd refuses to start without it): enter the network namespace only, and
# give the command a mount namespace of its own in which the host's hosts file covers /etc/hosts,
# as `ip netns exec` does.
daemon_on() {
    local id="$1" host="$2" ns
    shift 2
    ns="$(namespace "$id" "$host")"
    exec nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"' \
        "$id-$host" "/etc/netns/$ns/hosts" "$@"
}

# SIGKILL every process in namespace NS; 1 if some survive. SIGKILL: a rank blocked in a
# collective ignores SIGTERM, and checkpoints are written atomically.
kill_all_in() {
    local ns="$1" pids
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        [[ -z "$pids" ]] && return 0
        kill -9 $pids 2>/dev/null || true
        sleep 0.5
    done
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [[ -z "$pids" ]] || { echo "netns_cluster: processes still on $ns: $pids" >&2; return 1; }
}

fail() {
    local ns
    ns="$(namespace "$1" "$2")"
    has_namespace "$ns" || die "no host $ns"
    kill_all_in "$ns"
}

stop() {
    local id="$1" host ns left=0
    for host in a b; do
        ns="$(namespace "$id" "$host")"
        if has_namespace "$ns"; then
            kill_all_in "$ns" || left=1
            ip netns del "$ns" || left=1
        fi
        rm -rf "/etc/netns/$ns"
    done
    return "$left"
}

run() {
    local id="$1" port="$2" python procs host pids=() status=0
    shift 2
    [[ "${1:-}" == -- ]] && shift
    python="${BLOOM_PYTHON:-$REPO/.venv/bin/python}"
    procs="${PROCS_PER_HOST:-2}"
    [[ -x "$python" ]] || die "no Python at $python: run scripts/setup.sh, or set BLOOM_PYTHON"
    start "$id"
    trap "stop '$id'" EXIT
    for host in a b; do
        "${BASH_SOURCE[0]}" exec "$id" "$host" "$python" -m torch.distributed.run \
            --nnodes 2 --nproc-per-node "$procs" --rdzv-backend c10d --rdzv-endpoint "$ADDR_A:$port" \
            --rdzv-id "$id" --local-addr "$(address "$id" "$host")" \
            "$REPO/pretrain_bloom.py" "$@" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || status=$?
    done
    return "$status"
}

cmd="${1:-}"
case "$cmd" in
    -h|--help|"") usage; [[ -n "$cmd" ]] ;;
    start) check_id "${2:?start needs an ID}"; start "$2" ;;
    stop) check_id "${2:?stop needs an ID}"; stop "$2" ;;
    fail) check_id "${2:?fail needs an ID}"; check_host "${3:?fail needs a host: a or b}"; fail "$2" "$3" ;;
    exec)
        check_id "${2:?exec needs an ID}"; check_host "${3:?exec needs a host: a or b}"
        [[ $# -ge 4 ]] || die "exec needs a command"
        exec_on "${@:2}" ;;
    daemon)
        check_id "${2:?daemon needs an ID}"; check_host "${3:?daemon needs a host: a or b}"
        [[ $# -ge 4 ]] || die "daemon needs a command"
        daemon_on "${@:2}" ;;
    run)
        check_id "${2:?run needs an ID}"
        [[ "${3:-}" =~ ^[0-9]+$ ]] || die "run needs a port for the rendezvous, got '${3:-}'"
        run "${@:2}" ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
esac
