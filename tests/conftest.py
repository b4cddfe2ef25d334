"""Shared pytest setup: fixed seeds, repository paths, and a small-model factory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def fixture_maker(directory: Path):
    """``directory/make.py`` (the script that made a committed fixture) as a module of its own
    name: every fixture has a ``make.py``, so putting their folders on ``sys.path`` would hand
    each test whichever ``make`` was imported first."""
    import importlib.util
    import sys

    name = f"fixture_make_{directory.name}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, directory / "make.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]

# Property-based tests (hypothesis): "ci", the default, is derandomized (the same examples every
# run) and small, for the main suite; "fuzz", which the slow tier's fuzz tests use, draws fresh
# examples and many more of them. HYPOTHESIS_PROFILE=fuzz makes it the default too.
settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", derandomize=False, max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests run on two cores; oversubscribing threads only slows gloo tests down.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three small synthetic languages as .bin/.idx pairs, built once per test module."""
    from training_utils import synthetic_corpus

    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A test that runs pretrain, evaluation or a resume in this process and ends in an error
    (on purpose) leaves torch's default process group, a world of one, behind; the next test's
    in-process run, or ranks it forks, would join that world instead of their own."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
