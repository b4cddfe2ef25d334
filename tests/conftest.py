"""Shared pytest setup: fixed seeds, repository paths, and a small-model factory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

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
