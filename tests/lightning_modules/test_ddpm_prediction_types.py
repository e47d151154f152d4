"""DDPMModule / LDMModule with ``prediction_type``: the scheduler, the training loss (diffusers' get_velocity as
the reference), a v-prediction fit on a cosine schedule, what the task and the stores record, and refusals."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from lightning.pytorch import Trainer

from attribution.ema import MissingEMAError
from attribution.featurize import CheckpointFeaturizer, FeaturizeSettings
from attribution.identity import data_identity
from datamodules import DigitsDataModule
from helpers import small_data, tiny_module, tiny_unet
from lightning_modules import DDPMModule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_training_loss_is_the_mse_of_the_own_parameterization(prediction_type):
    module = tiny_module(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    assert module.noise_scheduler.config.prediction_type == prediction_type
    assert module.attribution_task().describe()["prediction_type"] == prediction_type
    x0 = DigitsDataModule().images(range(8))
    torch.manual_seed(3)
    loss = module.diffusion_loss(x0)
    torch.manual_seed(3)  # the same draws, the reference written with diffusers' scheduler
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (8,))
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    expected = F.mse_loss(module.unet(scheduler.add_noise(x0, noise, t), t).sample, target)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_a_v_prediction_model_trains_on_a_cosine_schedule(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", lr=5e-3)
    Trainer(accelerator="cpu", max_steps=30, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=tmp_path).fit(module, datamodule=DigitsDataModule(batch_size=64))
    x0 = DigitsDataModule().images(range(256))
    with torch.no_grad():
        torch.manual_seed(1)
        trained = module.diffusion_loss(x0).item()
        torch.manual_seed(1)
        fresh = tiny_module(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2").diffusion_loss(x0).item()
    assert trained < 0.8 * fresh
    samples = module.sample([0, 1], num_inference_steps=5, record=True)
    assert torch.isfinite(samples.images).all() and torch.isfinite(samples.x0_hat).all()


def test_stores_record_the_prediction_type_and_the_weights_used(tmp_path):
    dm = small_data(tmp_path, n=40)
    module = tiny_module(prediction_type="v_prediction").eval()
    loader = lambda rows: dm.featurize_dataloader(rows.tolist(), batch_size=40)  # noqa: E731
    store, _ = CheckpointFeaturizer(FeaturizeSettings(proj_dim=8, num_draws=1)).run(
        module, loader, data_identity(dm), tmp_path / "s", {"global_step": 0}, progress=False)
    assert store.meta["task"]["prediction_type"] == "v_prediction"
    assert store.meta["use_ema"] is False  # default None: EMA when kept; this module keeps none
    with pytest.raises(MissingEMAError, match="ema_decay"):
        CheckpointFeaturizer(FeaturizeSettings(proj_dim=8, num_draws=1, use_ema=True)).run(
            module, loader, data_identity(dm), tmp_path / "t", {"global_step": 0}, progress=False)
    assert not (tmp_path / "t").exists()  # refused before any store is made


def test_an_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMModule(tiny_unet(), prediction_type="velocity")
