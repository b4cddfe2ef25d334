"""Two-node SLURM on one machine: slurm/cpu-tiny.slurm submitted with ``--nodes=2``.

Run it with ``make test-slurm-nodes`` (``pytest -m slurm tests/test_slurm_two_nodes.py``). It needs
root: ``scripts/slurm_cluster.sh start-two`` makes two hosts out of network namespaces joined by
a veth pair (scripts/netns_cluster.sh: ``<id>-a`` at 10.0.0.1 and ``<id>-b`` at 10.0.0.2, each with
its own hostname and hosts file), runs a slurmd on each and slurmctld on the first, with one
munged for both; SLURM clients run on the first host, where the controller is reachable. The
daemons are stopped by PID and the hosts deleted (every process on them killed) at the end, also
when the test fails. Without root or namespaces it skips with the reason, and fails under CI=true.

What it checks, on the tiny fp32 config with one rank per node (PROCS_PER_NODE=1, DP2):

1. the same global layout started directly on one machine (torchrun, two ranks) gives the
   reference losses;
2. ``sbatch --nodes=2 slurm/cpu-tiny.slurm`` gets both nodes; srun starts one torchrun on each;
   they rendezvous on the first node by its hostname, over the veth pair; rank 0 runs in the
   first host's network namespace and rank 1 in the second's (read from /proc while the job
   runs); the job completes and every step's loss equals the reference's exactly.
"""

from __future__ import annotations

import os
import re

import pytest

from slurm_testbed import (
    job_ranks,
    job_records,
    reference_losses,
    slurm,
    start_cluster,
    tiny_overrides,
    train_losses,
    wait_until,
)

pytestmark = pytest.mark.slurm

STEPS = 12
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def hosts_id() -> str:
    """The namespace pair's ID (at most 8 characters), unique to this test process."""
    return f"s{os.getpid() % 10**7}"


@pytest.fixture(scope="module")
def cluster(request, hosts_id):
    """The two-node cluster; yields the environment its clients need; stops it whatever happens."""
    yield from start_cluster(request, "make test-slurm-nodes", two_nodes=hosts_id)


@pytest.fixture(scope="module")
def reference(cluster, corpus, tmp_path_factory) -> dict[int, float]:
    """Losses of two ranks on one machine, started with torchrun directly (no SLURM, no namespaces)."""
    root = tmp_path_factory.mktemp("reference")
    return reference_losses(root, tiny_overrides(root, corpus, STEPS, None), STEPS, cluster)


def network_namespace(pid: int) -> int:
    """The inode of a process's network namespace (a named namespace: of /run/netns/NAME)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_two_nodes_train_one_rank_each_and_match_one_machine(cluster, corpus, reference, hosts_id, tmp_path):
    env = dict(cluster, PROCS_PER_NODE="1", BLOOM_LOG_DIR=str(tmp_path / "logs"))
    log = tmp_path / "job.out"
    job_id = slurm(env, "sbatch", "--parsable", "--nodes=2", "--time=10", f"--output={log}",
                   "slurm/cpu-tiny.slurm", *tiny_overrides(tmp_path, corpus, STEPS, None)).strip().split(";")[0]

    # While it trains: which host each rank runs on, by the network namespace it is in.
    hosts = {os.stat(f"/run/netns/bloom-{hosts_id}-{h}").st_ino: f"{hosts_id}-{h}" for h in "ab"}

    def ranks_placed():
        state = job_records(env, job_id)[0]["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job_id} is {state} before its ranks were seen"
        ranks = job_ranks(env, job_id)
        if sorted(ranks) != [0, 1]:
            return None
        try:
            return {rank: hosts.get(network_namespace(pid), "this machine") for rank, pid in ranks.items()}
        except FileNotFoundError:
            return None

    placed = wait_until(ranks_placed, JOB_TIMEOUT_S, f"job {job_id} to start its two ranks", period=0.5)
    assert placed == {0: f"{hosts_id}-a", 1: f"{hosts_id}-b"}

    wait_until(lambda: job_records(env, job_id)[0]["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING",
                                                                       "COMPLETING"),
               JOB_TIMEOUT_S, f"job {job_id} to finish")
    (record,) = job_records(env, job_id)
    output = log.read_bytes().decode(errors="replace")
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), output[-4000:]
    assert slurm(env, "scontrol", "show", "hostnames", record["NodeList"]).split() == [f"{hosts_id}-a", f"{hosts_id}-b"]
    # The config checked for a world of two, the rendezvous on the first node by name, and
    # output from a torchrun on each node (srun --label: "0:" from the first, "1:" from the second).
    assert "layout: TP1 PP1 DP2 over 2 ranks" in output
    assert f"2 node(s) x 1 process(es), rendezvous {hosts_id}-a:" in output
    assert re.search(r"^0: \[[0-9:]+ rank 0\] no checkpoint in ", output, flags=re.M), output[-4000:]
    assert re.search(r"^1: ", output, flags=re.M), output[-4000:]

    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    differing = {step: (losses[step], reference[step]) for step in losses if losses[step] != reference[step]}
    assert not differing, f"steps whose loss differs from the one-machine run: {differing}"
