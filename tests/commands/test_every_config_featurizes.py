"""Every training config in configs/ featurizes one checkpoint with its own module settings (EMA, schedule,
prediction type, LDM parts, the featurize callback's settings when it has one), shrunk only by overrides of the
model's width and of step counts (one training step, 2 sampling steps for the end-of-training grid, one draw,
d = 64). Data that is not on this machine gets tiny stand-ins in the format its datamodule reads (a
cifar-10-batches-py pickle folder, digits webdataset shards); trained VAEs and Stable Diffusion's VAE and text
encoder get tiny local stand-ins. MNIST-5k is on this machine, but featurizing its 5000 examples takes ~50 s here:
its first 64 digits, padded as the config pads them, stand in (an ArrayDataModule .npz) to keep the whole
parametrized test near a minute."""
from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from attribution.featurize import FeaturizeSettings
from attribution.identity import tensors_hash
from callbacks import TrakFeaturizeCallback
from cli import main
from conftest import CONFIGS
from helpers import fit_trainer

UNET = "--model.init_args.unet.init_args."
WIDTH = {2: "[8, 16]", 3: "[8, 8, 8]", 4: "[8, 8, 8, 8]"}
SHRINK_FEATURIZE = dict(proj_dim=64, num_draws=1)  # 64: the layerwise projector needs one feature per layer part

# config -> (its UNet's number of levels, the extra --config under it, the stand-ins it needs)
FIT_CONFIGS = {
    "smoke.yaml": (2, None, ()),
    "ddpm_digits.yaml": (2, None, ()),
    "featurize_digits.yaml": (2, "ddpm_digits.yaml", ()),  # an overlay: the digits DDPM with the callback
    "lds_digits.yaml": (2, None, ()),
    "ddpm_mnist5k.yaml": (3, None, ("mnist64",)),
    "ddpm_cifar10.yaml": (4, None, ("cifar",)),
    "lds_cifar10.yaml": (4, None, ("cifar",)),
    "smoke_ldm.yaml": (2, None, ("vae",)),
    "ldm_digits.yaml": (2, None, ("vae",)),
    "ldm_coco.yaml": (3, None, ("shards", "sd")),
    "lds_coco.yaml": (3, None, ("shards", "sd")),
}
NOT_FEATURIZED = {
    "vae_digits.yaml": "trains the LDM's VAE: no diffusion model",
    "smoke_vae.yaml": "trains the LDM's VAE: no diffusion model",
    "score_digits.yaml": "scores (AttributionModule); instantiated in test_cli.py",
}


def test_every_config_is_featurized_or_says_why_not():
    assert set(FIT_CONFIGS) | set(NOT_FEATURIZED) == {p.name for p in CONFIGS.glob("*.yaml")}


def fake_cifar(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), b"labels": [0, 1]}, f)
    return [f"--data.root={root}", "--data.num_workers=0"]


def tiny_vae(down_blocks: int, in_channels: int = 1) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=4, layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * down_blocks,
                         up_block_types=["UpDecoderBlock2D"] * down_blocks, block_out_channels=[4] * down_blocks,
                         norm_num_groups=2)


def stand_ins(kinds, tmp_path) -> list[str]:
    args = []
    if "cifar" in kinds:
        args += fake_cifar(tmp_path / "cifar-10-batches-py")
    if "mnist64" in kinds:
        from datamodules.mnist import _mnist5k
        images, labels = _mnist5k()
        np.savez(tmp_path / "mnist64.npz", images=images[:64], labels=labels[:64])
        args += ["--data=datamodules.ArrayDataModule", f"--data.path={tmp_path / 'mnist64.npz'}", "--data.pad=2"]
    if "vae" in kinds:  # the digits VAE (8x8x1 -> 4x4x4), as `fit --config configs/vae_digits.yaml` would give
        tiny_vae(2).save_pretrained(tmp_path / "vae")
        args += [f"--model.init_args.vae={tmp_path / 'vae'}"]
    if "shards" in kinds:  # COCO shards: captioned digits in the same shard format
        from datamodules.shards import write_digits_shards
        write_digits_shards(tmp_path / "shards", samples_per_shard=8, limit=8)
        args += [f"--data.path={tmp_path / 'shards'}", "--data.num_workers=0"]
    if "sd" in kinds:  # Stable Diffusion 2's VAE (128 -> 16) and text encoder (77 positions), tiny
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

        from attribution.text_encoder import default_text_encoder_path
        sd = tmp_path / "sd"
        tiny_vae(4).save_pretrained(sd / "vae")
        CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=77)).save_pretrained(
            sd / "text_encoder")
        AutoTokenizer.from_pretrained(default_text_encoder_path()).save_pretrained(sd / "tokenizer")
        args += [f"--model.init_args.vae={sd}", f"--model.init_args.text_encoder={sd}",
                 f"{UNET}cross_attention_dim=16"]  # the stand-in's width
    return args


def callback_settings(cli) -> FeaturizeSettings:
    """The config's TrakFeaturizeCallback settings (shrunk), else small defaults."""
    own = [c.settings for c in cli.trainer.callbacks if isinstance(c, TrakFeaturizeCallback)]
    base = own[0].__dict__ if own else {"batch_size": 256}
    return FeaturizeSettings(**{**base, **SHRINK_FEATURIZE})


@pytest.mark.parametrize("config", sorted(FIT_CONFIGS))
def test_config_featurizes_one_checkpoint_with_its_module_settings(config, tmp_path, monkeypatch):
    start = time.perf_counter()
    monkeypatch.chdir(tmp_path)  # relative paths of the configs (latent caches, run folders) land here
    levels, base, kinds = FIT_CONFIGS[config]
    configs = (["--config", str(CONFIGS / base)] if base else []) + ["--config", str(CONFIGS / config)]
    width = [f"{UNET}block_out_channels={WIDTH[levels]}", f"{UNET}norm_num_groups=4",
             "--model.init_args.sample_inference_steps=2"]
    if "ldm" in config:
        width.append(f"{UNET}attention_head_dim=2")
    cli = main([*configs, *width, *stand_ins(kinds, tmp_path), "--trainer.logger=false"], run=False)
    module, dm, settings = cli.model, cli.datamodule, callback_settings(cli)
    callback = TrakFeaturizeCallback(**settings.__dict__)
    fit_trainer(tmp_path / "run", [callback], max_steps=1, every=1).fit(module, datamodule=dm)

    (store,) = callback.stores
    meta = json.loads((store / "meta.json").read_text())
    saved = torch.load(next((tmp_path / "run" / "checkpoints").glob("*.ckpt")), weights_only=False)
    init = cli.config["model"]["init_args"]
    assert meta["N"] == dm.num_examples and np.load(store / "done.npy").all() and (store / "kernel.json").exists()
    assert meta["task"]["prediction_type"] == init.get("prediction_type", "epsilon")
    assert meta["projector"]["kind"] == settings.projector and meta["dtype"] == settings.dtype
    ema = init.get("ema_decay") is not None
    assert meta["use_ema"] is ema
    names = [n for n, _ in module.unet.named_parameters()]
    prefix = "ema.module." if ema else "unet."  # the EMA weights the checkpoint saved (or the raw ones)
    assert meta["checkpoint"]["weights_hash"] == tensors_hash((n, saved["state_dict"][prefix + n]) for n in names)
    print(f"{config}: N = {dm.num_examples}, {time.perf_counter() - start:.1f} s")
