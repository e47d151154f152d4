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


@pytest.fixture(scope="session")
def subset_fit(tmp_path_factory):
    """A tiny model fit on a 50% subset mask of N = 120 real digits (2 featurized checkpoints, every row featurized)
    and 2 targets x 2 recorded steps (900, 0); returns ``(root, datamodule of all N, mask (N,) bool)``. Shared by
    the members and the influence tests (each writes under its own folder names)."""
    import numpy as np

    from helpers import fitted_with_targets
    root = tmp_path_factory.mktemp("subset_fit")
    mask = np.random.default_rng(0).random(120) < 0.5
    np.save(root / "mask.npy", mask)
    root, dm = fitted_with_targets(root, proj_dim=16, num_draws=1, num_inference_steps=10, record_steps=[900, 0],
                                   subset_mask=root / "mask.npy")
    return root, dm, torch.from_numpy(mask)
