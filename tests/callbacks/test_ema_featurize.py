"""EMA weights through TrakFeaturizeCallback: the featurized weights are exactly the checkpoint's EMA state (weights
hash) whatever hook updates the EMA after the save: our module (ema_decay), a foreign module with torch's
AveragedModel or diffusers' EMAModel updated in on_train_batch_end, Lightning's WeightAveraging; EMA asked for
without one is refused before training."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from attribution import DiffusionTask
from attribution.ema import MissingEMAError, ema_network
from attribution.identity import tensors_hash, weights_hash
from callbacks import TrakFeaturizeCallback
from attribution.trajectory import save_targets
from helpers import fit_trainer, small_data, tiny_module, tiny_unet
from lightning_modules import AttributionModule

SETTINGS = dict(proj_dim=16, num_draws=1, batch_size=64)


def _meta(store_path) -> dict:
    return json.loads((store_path / "meta.json").read_text())


def _checkpoint(root):
    (path,) = sorted((root / "checkpoints").glob("*.ckpt"))
    return torch.load(path, map_location="cpu", weights_only=False)


def _hash(tensors: dict, names: list[str], prefix: str = "") -> str:
    """The weights hash of saved tensors, named like the network's parameters (all of them: EMA copies are frozen)."""
    return tensors_hash((n, tensors[prefix + n]) for n in names)


def _fit(root, module, dm, *extra_callbacks, **settings):
    """Two optimizer steps, one checkpoint at step 2: the module's on_train_batch_end (its EMA update) runs after
    the save, and the callback featurizes at the end of training."""
    seed_everything(0)
    callback = TrakFeaturizeCallback(**{**SETTINGS, **settings})
    fit_trainer(root, [*extra_callbacks, callback], max_steps=2, every=2).fit(module, datamodule=dm)
    (store,) = callback.stores
    return _meta(store)


class ForeignBase(LightningModule):
    """Somebody else's v-prediction module on a cosine schedule (its own names); the EMA comes in subclasses."""

    def __init__(self):
        super().__init__()
        self.net = tiny_unet()
        self.sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                   prediction_type="v_prediction")

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        noise, t = torch.randn_like(x), torch.randint(0, 1000, (x.shape[0],))
        v = self.sched.get_velocity(x, noise, t)
        return torch.nn.functional.mse_loss(self.net(self.sched.add_noise(x, noise, t), t).sample, v)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=1e-2)

    def attribution_task(self):
        return DiffusionTask.from_scheduler(self.sched)

    def attribution_inputs(self, batch):
        return batch["image"], batch["index"], None


class ForeignAveraged(ForeignBase):
    """torch AveragedModel, frozen, updated in on_train_batch_end (the common pattern)."""

    def __init__(self):
        super().__init__()
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.5)).requires_grad_(False)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.net)

    def attribution_denoiser(self, ema=True):
        return self.ema.module if ema else self.net


class ForeignDiffusersEMA(ForeignBase):
    """diffusers' EMAModel (not a submodule: saved by the module's own on_save_checkpoint)."""

    def __init__(self):
        super().__init__()
        self.ema = EMAModel(self.net.parameters(), decay=0.5)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.step(self.net.parameters())

    def on_save_checkpoint(self, checkpoint):
        checkpoint["ema"] = self.ema.state_dict()

    def attribution_denoiser(self, ema=True):
        return ema_network(self.ema, self.net) if ema else self.net


class ForeignIgnoringTheFlag(ForeignBase):
    def attribution_denoiser(self, ema=True):
        return self.net


def test_our_module_featurizes_the_ema_weights_the_checkpoint_saved(tmp_path):
    module = tiny_module(ema_decay=0.5)
    meta = _fit(tmp_path / "run", module, small_data(tmp_path, n=40), use_ema=True)
    saved = _checkpoint(tmp_path / "run")
    names = [n for n, _ in module.ema.module.named_parameters()]
    assert meta["use_ema"] is True
    assert meta["checkpoint"]["weights_hash"] == _hash(saved["state_dict"], names, "ema.module.")
    # the module updated its EMA after the save: the live EMA is not what was saved, nor are the raw weights
    assert weights_hash(module.ema.module) != meta["checkpoint"]["weights_hash"]
    assert _hash(saved["state_dict"], names, "unet.") != meta["checkpoint"]["weights_hash"]
    # default use_ema (None): the EMA weights, since the module keeps them
    assert _fit(tmp_path / "auto", tiny_module(ema_decay=0.5), small_data(tmp_path, n=40))["use_ema"] is True
    # scoring takes the store's choice (use_ema None) and refuses other weights
    save_targets(module.eval().record_targets([0], 2, None), tmp_path / "targets")
    store = tmp_path / "run" / "features" / "step000002"
    AttributionModule(str(store), str(tmp_path / "targets"), estimator="trak").setup("predict")
    with pytest.raises(ValueError, match="weights hash"):
        AttributionModule(str(store), str(tmp_path / "targets"), use_ema=False, estimator="trak").setup("predict")


def test_a_foreign_averaged_model_updated_after_the_save(tmp_path):
    module = ForeignAveraged()
    meta = _fit(tmp_path / "run", module, small_data(tmp_path, n=40))
    saved = _checkpoint(tmp_path / "run")
    names = [n for n, _ in module.net.named_parameters()]
    assert meta["use_ema"] is True and meta["task"]["prediction_type"] == "v_prediction"
    assert meta["checkpoint"]["weights_hash"] == _hash(saved["state_dict"], names, "ema.module.")
    assert weights_hash(module.ema.module) != meta["checkpoint"]["weights_hash"]


def test_a_diffusers_ema_model(tmp_path):
    module = ForeignDiffusersEMA()
    meta = _fit(tmp_path / "run", module, small_data(tmp_path, n=40), use_ema=True)
    shadow = _checkpoint(tmp_path / "run")["ema"]["shadow_params"]
    names = [n for n, _ in module.net.named_parameters()]
    assert meta["checkpoint"]["weights_hash"] == _hash(dict(zip(names, shadow)), names)
    assert weights_hash(ema_network(module.ema, module.net)) != meta["checkpoint"]["weights_hash"]


def test_lightning_weight_averaging_featurizes_the_averaged_weights_the_checkpoint_holds(tmp_path):
    module = tiny_module()  # no EMA of its own: the callback averages the whole module
    meta = _fit(tmp_path / "run", module, small_data(tmp_path, n=40), EMAWeightAveraging(decay=0.5))
    saved = _checkpoint(tmp_path / "run")
    names = [n for n, _ in module.unet.named_parameters()]
    assert meta["use_ema"] is False  # the checkpoint's own state_dict is the average
    assert meta["checkpoint"]["weights_hash"] == _hash(saved["state_dict"], names, "unet.")
    assert _hash(saved["current_model_state"], names, "unet.") != meta["checkpoint"]["weights_hash"]


@pytest.mark.parametrize("make", [tiny_module, ForeignIgnoringTheFlag], ids=["ours", "foreign"])
def test_ema_asked_for_without_one_is_refused_before_training(tmp_path, make):
    with pytest.raises(MissingEMAError, match="use_ema=True"):
        _fit(tmp_path / "run", make(), small_data(tmp_path, n=40), use_ema=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
