# Convenience targets; each calls the same scripts the README and CI use.
.PHONY: setup test test-slow test-slurm test-hosts test-flax demo lock

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

test-slow:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python -m pytest -m slow

# Installs (apt-get) and starts a single-node SLURM cluster, runs slurm/cpu-tiny.slurm as a job chain, stops it.
test-slurm:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python -m pytest -m slurm tests/test_slurm.py

# Two hosts as network namespaces (root): torchrun across them, a stuck rank named, a resume on one host.
test-hosts:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python -m pytest -m two_hosts tests/test_two_hosts.py

# transformers' Flax BLOOM classes (transformers 4.46.x, jax CPU) load our export: its own cached .venv-flax.
test-flax:
	bash scripts/setup.sh && bash scripts/flax_check.sh

demo:
	bash scripts/demo.sh

# Rewrites requirements/constraints.txt from .venv after an upgrade (bash scripts/lock.sh --help).
lock:
	bash scripts/lock.sh
