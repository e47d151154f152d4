"""LoRA adapters (peft) on a tiny UNet, on its attention and conv layers: the callback featurizes only the
trainable adapter parameters (also on the frozen EMA copy), the store records their names, the rows equal the
core API on the network rebuilt from the checkpoint, and scoring refuses other base weights (the weights hash
covers the frozen base too)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from lightning.pytorch import seed_everything
from peft import LoraConfig, get_peft_model, inject_adapter_in_model

from attribution import featurize_batch, num_parameters
from attribution.errors import CheckpointMismatchError
from attribution.featurize import FeaturizeSettings, projector_from_meta
from attribution.trajectory import save_targets
from callbacks import TrakFeaturizeCallback
from helpers import fit_trainer, small_data
from lightning_modules import AttributionModule, DDPMModule
from lightning_modules.loading import load_diffusion_module

SETTINGS = dict(proj_dim=16, num_draws=2, batch_size=40)
LORA = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])


def lora_unet(wrapped: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4)
    return get_peft_model(unet, LORA) if wrapped else inject_adapter_in_model(LORA, unet)


@pytest.mark.parametrize("wrapped, ema_decay", [(False, None), (False, 0.5), (True, None)],
                         ids=["injected", "injected-ema", "peft-model"])
def test_only_the_adapter_parameters_are_featurized_and_recorded(wrapped, ema_decay, tmp_path):
    dm = small_data(tmp_path, n=40)
    seed_everything(0)
    module = DDPMModule(lora_unet(wrapped), lr=1e-2, warmup_steps=1, num_samples=2, sample_inference_steps=2,
                        ema_decay=ema_decay)
    callback = TrakFeaturizeCallback(**SETTINGS)
    fit_trainer(tmp_path / "run", [callback], max_steps=2, every=2).fit(module, datamodule=dm)
    (store,) = callback.stores
    meta = json.loads((store / "meta.json").read_text())
    adapters = [n for n, p in module.unet.named_parameters() if p.requires_grad]
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert meta["param_names"] == adapters and meta["use_ema"] is (ema_decay is not None)
    everything = sum(p.numel() for p in module.unet.parameters())
    assert meta["projector"]["p"] == num_parameters(module.unet, adapters) < everything // 2

    rebuilt = load_diffusion_module(tmp_path / "run" / "checkpoints" / "step000002.ckpt")  # adapters rebuilt
    net = rebuilt.attribution_denoiser(ema_decay is not None)
    rows = torch.tensor([3, 21, 39])
    x0 = torch.stack([dm.full_dataset()[int(i)]["image"] for i in rows])
    ref = featurize_batch(rebuilt.attribution_task(), net, FeaturizeSettings(**SETTINGS).train_output(),
                          projector_from_meta(meta["projector"]), x0, rows, param_names=adapters)
    stored = torch.from_numpy(np.load(store / "features.npy"))[rows]
    assert ref.abs().sum() > 0 and torch.allclose(stored, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_scoring_refuses_a_checkpoint_with_other_frozen_base_weights(tmp_path):
    dm = small_data(tmp_path, n=40)
    seed_everything(0)
    module = DDPMModule(lora_unet(False), lr=1e-2, warmup_steps=1, num_samples=2, sample_inference_steps=2)
    fit_trainer(tmp_path / "run", [TrakFeaturizeCallback(**SETTINGS)], max_steps=2, every=2).fit(module, datamodule=dm)
    save_targets(module.eval().record_targets([0], 4, [750, 0]), tmp_path / "targets")
    features, targets = str(tmp_path / "run" / "features"), str(tmp_path / "targets")
    AttributionModule(features, targets, estimator="trak").setup("predict")  # the rebuilt network is the featurized one
    ckpt = tmp_path / "run" / "checkpoints" / "step000002.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    saved["state_dict"]["unet.conv_in.weight"] += 0.01  # a frozen base weight, not an adapter
    saved.pop("attribution_integrity", None)
    torch.save(saved, ckpt)
    with pytest.raises(CheckpointMismatchError, match="weights hash"):
        AttributionModule(features, targets, estimator="trak").setup("predict")
