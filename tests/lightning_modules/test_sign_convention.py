"""The sign convention, checked empirically (SPEC): on a model that memorized a handful of training images,
the training image nearest to a generated sample gets a strongly positive score at late (low-noise) steps."""
from __future__ import annotations

import math

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from attribution.trajectory import from_samples, save_targets
from callbacks import TrakFeaturizeCallback
from datamodules import ArrayDataModule, DigitsDataModule
from helpers import tiny_module
from lightning_modules import AttributionModule

STEPS = [500, 200, 100, 50]


def test_nearest_training_image_of_a_memorized_sample_is_the_top_positive_influencer(tmp_path):
    images = ((DigitsDataModule().images(range(8)) + 1) * 127.5).round().byte().numpy()[:, 0]  # digits 0..7
    np.save(tmp_path / "few.npy", images)
    dm = ArrayDataModule(path=str(tmp_path / "few.npy"), batch_size=8)
    seed_everything(0)
    module = tiny_module(lr=5e-3)
    checkpoints = ModelCheckpoint(every_n_train_steps=150, save_top_k=-1, filename="s{step}")
    featurize = TrakFeaturizeCallback(proj_dim=512, num_draws=32, batch_size=8,  # an ensemble of 4 checkpoints
                                      output="loss", timesteps="uniform")  # the SPEC's Eq. 3 (the paper's draws)
    Trainer(accelerator="cpu", max_steps=600, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[checkpoints, featurize]).fit(module, datamodule=dm)
    module.eval()
    result = module.sample([0, 1, 2, 3, 4, 5], 100, record=True, record_steps=[990, *STEPS, 0])
    distances = ((result.images[:, None] - dm.images(range(8))[None]) ** 2).flatten(2).sum(-1)
    nearest = distances.argmin(1)
    # the targets whose sample is memorized: its nearest training image 5x closer than the second nearest
    memorized = (distances.min(1).values * 5 < distances.sort(1).values[:, 1]).nonzero().reshape(-1).tolist()
    assert len(memorized) >= 3, memorized
    save_targets(from_samples(result), tmp_path / "targets")
    pairs = len(memorized) * len(STEPS)
    for estimator in ("trak", "kfac"):  # K-FAC influence keeps TRAK's sign (its own damped inverse curvature)
        scoring = AttributionModule(features=str(tmp_path / "features"), targets=str(tmp_path / "targets"),
                                    out_dir=str(tmp_path / f"scores_{estimator}"), num_draws=32, relative_lam=0.1,
                                    steps=STEPS, target_ids=memorized, estimator=estimator)
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False).predict(
            scoring.attach_data(dm), return_predictions=False)
        top1 = positive = 0
        for target in memorized:
            scores = torch.load(tmp_path / f"scores_{estimator}" / f"target_{target:04d}.pt",
                                weights_only=False)["scores"]
            top1 += int((scores.argmax(0) == nearest[target]).sum())
            positive += int((scores[nearest[target]] > 0).sum())
        print(f"{estimator}: nearest image top-1 in {top1}/{pairs} pairs, positive in {positive}/{pairs}")
        # chance would give pairs/8 top-1 hits (for 12 pairs P(>= 4) < 0.07) and pairs/2 positive scores;
        # a flipped sign would make the nearest image a top *negative* influencer
        assert top1 >= math.ceil(pairs / 3), (estimator, top1)
        assert positive >= math.ceil(pairs * 5 / 6), (estimator, positive)
