"""Small shared builders for the Lightning-side tests: tiny modules and small real/array data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from diffusers import UNet2DModel
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import ArrayDataModule, DigitsDataModule
from lightning_modules import DDPMModule


def tiny_unet() -> UNet2DModel:
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       add_attention=False, norm_num_groups=4)


def tiny_module(**kw) -> DDPMModule:
    return DDPMModule(tiny_unet(), warmup_steps=1, num_samples=2, sample_inference_steps=2, **kw)


def digits_subset_array(path: Path, n: int = 120) -> Path:
    """The first ``n`` real digits as a uint8 .npz (images + labels): a small real dataset for fast tests."""
    dm = DigitsDataModule()
    images = ((dm.images(range(n)) + 1) * 127.5).round().clamp(0, 255).byte().numpy()[:, 0]
    labels = np.array([int(dm.full_dataset()[i]["label"]) for i in range(n)])
    np.savez(path, images=images, labels=labels)
    return path


def small_data(tmp_path: Path, n: int = 120, **kw) -> ArrayDataModule:
    path = tmp_path / f"digits{n}.npz"
    if not path.exists():
        digits_subset_array(path, n)
    return ArrayDataModule(path=str(path), **kw)


def fit_trainer(root: Path, callbacks: list, max_steps: int = 4, every: int = 2, **kw) -> Trainer:
    checkpoint = ModelCheckpoint(every_n_train_steps=every, save_top_k=-1, filename="step{step:06d}",
                                 auto_insert_metric_name=False)
    return Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint, *callbacks], **kw)


class Killed(Exception):
    """Stands for a kill in the middle of a job (Lightning turns a KeyboardInterrupt into an exit)."""


class FailAfter:
    """A featurize rows loader that dies after ``n`` batches of 16, like a killed job (raises ``error``)."""

    def __init__(self, dm, n, error: type[BaseException] = Killed):
        self.dm, self.n, self.error = dm, n, error

    def __call__(self, rows):
        for i, batch in enumerate(self.dm.featurize_dataloader(rows.tolist(), batch_size=16)):
            if i == self.n:
                raise self.error("killed while featurizing")
            yield batch


def fitted_with_targets(root: Path, proj_dim: int, num_draws: int, num_inference_steps: int,
                        record_steps: list[int], seeds=(11, 12), subset_mask: Optional[Path] = None):
    """A tiny model fitted on small data (on ``subset_mask`` when given) with the featurize callback (2 checkpoints
    under ``root/fit``) and the recorded targets of ``seeds`` in ``root/targets``; returns ``(root, datamodule)``
    (the datamodule of all N examples: what scoring is given)."""
    from lightning.pytorch import seed_everything

    from attribution.trajectory import from_samples, save_targets
    from callbacks import TrakFeaturizeCallback

    dm = small_data(root)
    fit_data = dm if subset_mask is None else small_data(root, subset_mask=str(subset_mask))
    seed_everything(0)
    module = tiny_module()
    callback = TrakFeaturizeCallback(proj_dim=proj_dim, num_draws=num_draws, batch_size=64)
    fit_trainer(root / "fit", [callback]).fit(module, datamodule=fit_data)
    module.eval()
    result = module.sample(list(seeds), num_inference_steps=num_inference_steps, record=True, record_steps=record_steps)
    save_targets(from_samples(result), root / "targets")
    return root, dm


def subset_scorer(run, out: str, **kw):
    """An ``AttributionModule`` over the stores and targets of ``run = (root, datamodule, mask)`` (conftest
    ``subset_fit``), writing to ``root/out``."""
    from lightning_modules import AttributionModule
    root = run[0]
    kw.setdefault("estimator", "trak")  # the tests of K-FAC/EK-FAC ask for them
    return AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"),
                             out_dir=str(root / out), **kw)
