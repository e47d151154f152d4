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


@pytest.fixture(scope="module")
def task():
    """The DDPM task (linear betas, T = 1000) the core tests differentiate through."""
    from diffusers import DDPMScheduler

    from attribution import DiffusionTask
    return DiffusionTask.from_scheduler(DDPMScheduler(num_train_timesteps=1000))


@pytest.fixture
def repo_root() -> Path:
    return ROOT
