# Convenience targets; each calls the same scripts the README and CI use.
.PHONY: setup test test-slow test-slurm test-slurm-nodes test-hosts test-faults test-faults-ci test-flax demo lock

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

test-slow:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python -m pytest -m slow

# Installs (apt-get) and starts a single-node SLURM cluster, runs slurm/cpu-tiny.slurm as a job chain (one job
# loses a rank and requeues itself), stops it.
test-slurm:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python -m pytest -m slurm tests/test_slurm.py

# Two SLURM nodes as network namespaces (root): slurm/cpu-tiny.slurm with --nodes=2, one rank per node.
test-slurm-nodes:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python -m pytest -m slurm tests/test_slurm_two_nodes.py

# Two hosts as network namespaces (root): torchrun across them, a stuck rank named, a resume on one host.
test-hosts:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python -m pytest -m two_hosts tests/test_two_hosts.py

# Fault tier: random kill -9 trials (python tests/faults/run_trials.py --help; kills in start-up, steps, saves,
# universal conversion, preprocessing, and a rank of a torchrun --max-restarts job), then real runs on a full disk
# and two runs on one checkpoint directory (pytest -m faults). CI: fixed seeds, one trial of each kind.
test-faults-ci:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python tests/faults/run_trials.py --seeds 1,2,3,4 \
		&& .venv/bin/python -m pytest -m faults tests/faults

# The same with 20 trials on fresh seeds (printed, to replay one: run_trials.py --seeds SEED --kinds KIND).
test-faults:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python tests/faults/run_trials.py --trials 20 \
		&& .venv/bin/python -m pytest -m faults tests/faults

# transformers' Flax BLOOM classes (transformers 4.46.x, jax CPU) load our export: its own cached .venv-flax.
test-flax:
	bash scripts/setup.sh && bash scripts/flax_check.sh

demo:
	bash scripts/demo.sh

# Rewrites requirements/constraints.txt from .venv after an upgrade (bash scripts/lock.sh --help).
lock:
	bash scripts/lock.sh
