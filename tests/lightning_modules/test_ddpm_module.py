"""DDPMModule: fits on a mask, sees only the mask's indices, stamps checkpoints with the data identity."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from lightning.pytorch import Callback, Trainer

from datamodules import ArrayDataModule, DigitsDataModule
from lightning_modules import DDPMModule
from attribution.identity import CheckpointMismatchError, check_identity
from lightning_modules.ddpm import warmup_cosine_schedule


def tiny_unet():
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       add_attention=False, norm_num_groups=4)


class IndexRecorder(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch["index"].clone())


def fit(tmp_path, datamodule, max_steps=3, **module_kw):
    recorder = IndexRecorder()
    module = DDPMModule(tiny_unet(), warmup_steps=1, num_samples=4, sample_inference_steps=3, **module_kw)
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=[recorder])
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, recorder


def test_fit_on_a_mask_sees_only_the_mask(tmp_path):
    indices = np.arange(0, 1797, 7)
    np.save(tmp_path / "mask.npy", indices)
    dm = DigitsDataModule(subset_mask=str(tmp_path / "mask.npy"), batch_size=64)
    _, _, recorder = fit(tmp_path, dm, max_steps=len(indices) // 64 + 1)  # one full epoch
    seen = torch.cat(recorder.seen).numpy()
    assert set(seen.tolist()) == set(indices.tolist())
    assert len(seen) == len(indices)  # each once per epoch


def test_loss_decreases_and_ema_follows(tmp_path):
    torch.manual_seed(0)
    module, _, _ = fit(tmp_path, DigitsDataModule(batch_size=64), max_steps=30, lr=5e-3, ema_decay=0.9)
    with torch.no_grad():
        x0 = DigitsDataModule().images(range(256))
        torch.manual_seed(1)
        trained = module.diffusion_loss(x0).item()
        torch.manual_seed(1)
        fresh = DDPMModule(tiny_unet()).diffusion_loss(x0).item()
    assert trained < 0.8 * fresh
    ema_p = next(module.ema.module.parameters())
    assert not ema_p.requires_grad and not torch.equal(ema_p, next(module.unet.parameters()))
    assert module.denoiser(ema=True) is module.ema.module and module.denoiser(ema=False) is module.unet


def test_checkpoint_carries_data_identity(tmp_path):
    mask = np.zeros(1797, bool)
    mask[::2] = True
    np.save(tmp_path / "half.npy", mask)
    dm = DigitsDataModule(subset_mask=str(tmp_path / "half.npy"))
    _, trainer, _ = fit(tmp_path, dm, max_steps=2)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=False)
    ident = ckpt["attribution"]
    assert ident == {"num_examples": 1797, "subset_size": 899, "mask_hash": dm.mask_hash,
                     "dataset_fingerprint": dm.fingerprint}
    check_identity(ckpt, DigitsDataModule())  # same data, other mask: fine
    rng = np.random.default_rng(0)
    np.save(tmp_path / "other.npy", rng.integers(0, 255, (1797, 8, 8), dtype=np.uint8))
    with pytest.raises(CheckpointMismatchError, match="dataset_fingerprint"):
        check_identity(ckpt, ArrayDataModule(path=str(tmp_path / "other.npy")))
    np.save(tmp_path / "small.npy", rng.integers(0, 255, (100, 8, 8), dtype=np.uint8))
    with pytest.raises(CheckpointMismatchError, match="num_examples = 100"):
        check_identity(ckpt, ArrayDataModule(path=str(tmp_path / "small.npy")))


def test_sample_grid_is_written(tmp_path):
    module, trainer, _ = fit(tmp_path, DigitsDataModule(batch_size=32), max_steps=2)
    path = tmp_path / "samples" / "final.png"
    assert path.exists() and path.stat().st_size > 100
    images = module.sample([0, 1], num_inference_steps=3).images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def _learning_rates(warmup_steps: int, total: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine_schedule(opt, SimpleNamespace(estimated_stepping_batches=total), warmup_steps)
    assert schedule["interval"] == "step"
    rates = []
    for _ in range(total + 1):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule["scheduler"].step()
    return rates


def test_warmup_cosine_schedule_is_the_library_schedule():
    rates = _learning_rates(10, 100)  # linear warmup from 0 over 10 steps, then cosine to 0 at step 100
    assert rates[0] == 0.0 and rates[5] == pytest.approx(0.5) and rates[10] == pytest.approx(1.0)
    assert rates[55] == pytest.approx(0.5) and rates[100] == pytest.approx(0.0, abs=1e-12)
    assert _learning_rates(80, 100)[50] == pytest.approx(1.0)  # warmup capped at half the run


@pytest.mark.parametrize("kw,name", [({"num_train_timesteps": 0}, "num_train_timesteps"),
                                     ({"ema_decay": 1.5}, "ema_decay")])
def test_bad_arguments_are_named(kw, name):
    with pytest.raises(ValueError, match=name):
        DDPMModule(tiny_unet(), **kw)
