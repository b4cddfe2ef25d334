# Convenience targets; each calls the same scripts the README and CI use.
.PHONY: setup test test-slow demo

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

test-slow:
	bash scripts/setup.sh && . scripts/env.sh && .venv/bin/python -m pytest -m slow

demo:
	bash scripts/demo.sh
