"""Data that does not fit the model is refused before the first training step, naming both sides: the images'
(channels, height, width) against the UNet's in_channels/sample_size (DDPM), the images' channels against the
VAE's and the latents against the UNet (LDM); from the CLI as one line, exit code 2."""
from __future__ import annotations

import pytest
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

from attribution.errors import SettingsError
from cli import run
from conftest import CONFIGS
from helpers import fit_trainer, small_data
from lightning_modules import DDPMModule, LDMModule

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False, norm_num_groups=4)


@pytest.mark.parametrize("unet, named", [
    (dict(sample_size=16, in_channels=1, out_channels=1), r"in_channels = 1, sample_size = 16.*\(1, 8, 8\)"),
    (dict(sample_size=8, in_channels=3, out_channels=3), r"in_channels = 3, sample_size = 8.*\(1, 8, 8\)"),
])
def test_a_ddpm_on_images_of_another_shape_is_refused_before_training(unet, named, tmp_path):
    trainer = fit_trainer(tmp_path / "run", [], max_steps=1)
    with pytest.raises(SettingsError, match=named):
        trainer.fit(DDPMModule(UNet2DModel(**unet, **TINY), warmup_steps=1), datamodule=small_data(tmp_path, n=20))
    assert trainer.global_step == 0


def _vae(in_channels: int, down_blocks: int) -> AutoencoderKL:
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=4, layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * down_blocks,
                         up_block_types=["UpDecoderBlock2D"] * down_blocks, block_out_channels=[4] * down_blocks,
                         norm_num_groups=2)


@pytest.mark.parametrize("vae, named", [
    (_vae(3, 2), r"VAE's in_channels = 3.*\(20, 1, 8, 8\)"),  # RGB VAE, grayscale digits
    (_vae(1, 3), r"fit the UNet \(in_channels, sample_size\) = \(4, 4, 4\).*\(4, 2, 2\)"),  # 8x8 -> 2x2 latents
])
def test_an_ldm_whose_vae_does_not_fit_the_data_or_the_unet_is_refused_before_training(vae, named, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=[8, 16],
                                layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=384,
                                attention_head_dim=4, norm_num_groups=4)
    trainer = fit_trainer(tmp_path / "run", [], max_steps=1)
    with pytest.raises(SettingsError, match=named):
        trainer.fit(LDMModule(unet, vae=str(tmp_path / "vae"), text_max_length=8, warmup_steps=1),
                    datamodule=small_data(tmp_path, n=20, caption_template="a handwritten digit {label}"))
    assert trainer.global_step == 0


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    code = run(["fit", "--config", str(CONFIGS / "smoke.yaml"), "--model.init_args.unet.init_args.in_channels=3",
                "--model.init_args.unet.init_args.out_channels=3", f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "in_channels = 3" in err and "(1, 8, 8)" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))
