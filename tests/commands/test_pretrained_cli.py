"""A diffusers pipeline folder (save_pretrained, no hub) through `cli.py featurize`, `sample` and `score`, in-process,
scored from another working directory: the unconditional DDPMPipeline layout (v-prediction, cosine schedule) and
the Stable Diffusion layout (UNet2DConditionModel + vae/ + text_encoder/ + tokenizer/, the LDM path)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DConditionModel

from attribution import featurize_batch
from attribution.featurize import FeaturizeSettings, projector_from_meta
from attribution.identity import weights_hash
from attribution.pretrained import load_pretrained_unet
from attribution.trajectory import load_targets
from callbacks.score_writer import load_target_scores
from cli import run
from conftest import CONFIGS
from helpers import small_data, tiny_unet
from lightning_modules import LDMModule
from lightning_modules.loading import load_diffusion_module

TEMPLATE = "a handwritten digit {label}"
N = 40
FEATURIZE = ["--settings.proj_dim=16", "--settings.num_draws=2", f"--settings.batch_size={N}"]
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.default_root_dir=."]


def _scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False)


def ddpm_folder(path):
    torch.manual_seed(0)
    DDPMPipeline(unet=tiny_unet(), scheduler=_scheduler()).save_pretrained(path)


def stable_diffusion_folder(path):
    """The Stable Diffusion layout on tiny models: unet/ scheduler/ vae/ text_encoder/ tokenizer/."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from attribution.text_encoder import default_text_encoder_path

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=[8, 16], layers_per_block=1,
                         down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                         attention_head_dim=4, norm_num_groups=4).save_pretrained(path / "unet")
    _scheduler().save_pretrained(path / "scheduler")
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=8).save_pretrained(path / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=12)).save_pretrained(
        path / "text_encoder")
    AutoTokenizer.from_pretrained(default_text_encoder_path()).save_pretrained(path / "tokenizer")


@pytest.mark.parametrize("layout", ["ddpm", "stable_diffusion"])
def test_a_pipeline_folder_is_featurized_sampled_and_scored_from_the_cli(layout, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    (ddpm_folder if layout == "ddpm" else stable_diffusion_folder)(work / "pipe")
    captions = [f"--data.caption_template={TEMPLATE}"] if layout != "ddpm" else []
    dm = small_data(work, n=N, **({"caption_template": TEMPLATE} if captions else {}))
    data = ["--data=datamodules.ArrayDataModule", f"--data.path=digits{N}.npz", *captions]
    model = ["--model=lightning_modules.PretrainedDiffusion", "--model.path=pipe"]  # relative paths, from `work`
    assert run(["featurize", *model, *data, "--checkpoints=pipe", "--out_dir=features", *FEATURIZE, *QUIET]) == 0
    prompts = ['--prompts=["a handwritten digit three"]'] if captions else []
    assert run(["sample", *model, *data, "--checkpoint=pipe", "--out_dir=targets", "--num_targets=2",
                "--num_inference_steps=4", "--num_record_steps=2", "--real_indices=[5]", *prompts, *QUIET]) == 0

    meta = json.loads((work / "features" / "pipe" / "meta.json").read_text())
    assert meta["checkpoint"]["file"] == str(work / "pipe")  # absolute: resolves from any working directory
    assert (meta["N"], meta["dataset_fingerprint"]) == (N, dm.fingerprint)  # the datamodule names the data
    assert meta["checkpoint"]["weights_hash"] == weights_hash(load_pretrained_unet(work / "pipe"))  # the folder's
    assert meta["task"]["prediction_type"] == "v_prediction" and meta["use_ema"] is False
    module = load_diffusion_module(work / "pipe")
    assert isinstance(module, LDMModule) == (layout != "ddpm")
    targets = load_targets(work / "targets")
    assert [t.source for t in targets] == ["sampled", "sampled", "real:5"]
    assert targets[0].info["checkpoint"] == str(work / "pipe") and targets[0].info["data"]["num_examples"] == N

    # the stored rows equal the core API on the folder's UNet and scheduler
    rows = torch.tensor([0, 17, 39])
    batch = next(iter(dm.featurize_dataloader(rows.tolist(), batch_size=3)))
    x0, index, cond = module.attribution_inputs(batch)
    ref = featurize_batch(module.attribution_task(), module.unet, FeaturizeSettings(proj_dim=16, num_draws=2)
                          .train_output(), projector_from_meta(meta["projector"]), x0, index, cond=cond)
    stored = torch.from_numpy(np.load(work / "features" / "pipe" / "features.npy"))[rows]
    assert torch.allclose(stored, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))  # float32, another batch

    monkeypatch.chdir(elsewhere)  # scoring finds the folder and the stores from anywhere
    score_data = ["--data=datamodules.ArrayDataModule", f"--data.path={work / f'digits{N}.npz'}", *captions]
    assert run(["score", "--config", str(CONFIGS / "score_digits.yaml"), *score_data,
                f"--model.features={work / 'features'}", f"--model.targets={work / 'targets'}",
                f"--model.out_dir={elsewhere / 'scores'}", "--model.num_draws=2", "--trainer.logger=false"]) == 0
    scores = load_target_scores(elsewhere / "scores" / "target_0002.pt")["scores"]
    assert scores.shape == (N, 2) and torch.isfinite(scores).all() and scores.abs().sum() > 0


def test_a_pipeline_folder_with_a_model_of_another_schedule_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ddpm_folder(tmp_path / "pipe")
    small_data(tmp_path, n=N)
    smoke = ["--config", str(CONFIGS / "smoke.yaml"), "--data=datamodules.ArrayDataModule",
             f"--data.path=digits{N}.npz"]
    # smoke.yaml's UNet has the folder's architecture, but it is an epsilon-prediction model on linear betas
    assert run(["featurize", *smoke, "--checkpoints=pipe", "--out_dir=features", *FEATURIZE, *QUIET]) == 2
    assert "prediction_type" in capsys.readouterr().err and not (tmp_path / "features").exists()
    assert run(["featurize", *smoke, f"--checkpoints={tmp_path / 'nothing'}", *QUIET]) == 2
    assert "diffusers pipeline folder" in capsys.readouterr().err
