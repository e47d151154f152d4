"""Shared fixtures: offline, deterministic, small thread count, paths of the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))
    yield


@pytest.fixture
def repo_root() -> Path:
    return ROOT
