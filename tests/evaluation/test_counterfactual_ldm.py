"""The counterfactual measurements on a tiny text-conditional v-prediction LDM: every model is called through its
task and conditioned like the targets were sampled (prompt states, guidance), completions are decoded; with the
"retrained" model equal to the original, forgetting, completions and seed consistency measure exactly zero."""
from __future__ import annotations

import json
import math

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from lightning.pytorch import seed_everything

from attribution import train_classifier
from evaluation import counterfactual as cf
from evaluation.plan import LDSPlan
from evaluation.results import ResultCache
from evaluation.sweep import DONE, FitJob
from helpers import fit_trainer, small_data
from lightning_modules import LDMModule

TEMPLATE = "a handwritten digit {label}"


def _vae_folder(path):
    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=8).save_pretrained(path)
    return str(path)


def _unet():
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=[8, 16],
                                layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=384,
                                attention_head_dim=4, norm_num_groups=4)


def test_counterfactual_measurements_run_on_a_v_prediction_ldm(tmp_path):
    dm = small_data(tmp_path, n=20, caption_template=TEMPLATE, batch_size=10)
    seed_everything(0)
    module = LDMModule(_unet(), vae=_vae_folder(tmp_path / "vae"), text_max_length=8, guidance_scale=2.0,
                       prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", warmup_steps=1,
                       num_samples=2, sample_inference_steps=2)
    fit_trainer(tmp_path / "fit", [], max_steps=1, every=1).fit(module, datamodule=dm)
    (ckpt,) = (tmp_path / "fit" / "checkpoints").glob("*.ckpt")
    module.eval()
    n_steps, step = 10, 400
    (traj,) = module.record_targets([3], n_steps, [900, step, 0], prompts=["a handwritten digit seven"],
                                    info={"checkpoint": str(ckpt), "num_inference_steps": n_steps})
    assert traj.cond is not None and traj.info["guidance_scale"] == 2.0

    # the counterfactual's model function is the module's own guided sampler function, through the task
    x, t = traj.x_t[:1].expand(3, -1, -1, -1), torch.full((3,), step)
    assert torch.equal(cf.target_noise_fn(module, None, [traj])(x, t),
                       module.guided_noise(traj.cond.unsqueeze(0).expand(3, -1, -1), 2.0)(x, t))

    folder = tmp_path / "same"  # a "retrained" model that is the original one
    folder.mkdir()
    (folder / DONE).write_text(json.dumps({"checkpoint": str(ckpt)}))
    job = FitJob("same", None, 0, folder, {"step": step, "target_id": 0, "target_index": 0, "method": "trak", "k": 1})
    plan = LDSPlan(out_dir=str(tmp_path / "lds"), cf_step=step, forget_step=step, num_completions=4, cf_delta=100)
    images, labels = dm.images(range(20)), torch.arange(20) % 3
    classifier = train_classifier(images, labels, epochs=1)
    from lightning_modules.loading import load_diffusion_module
    original = load_diffusion_module(ckpt)

    results = ResultCache(tmp_path / "results")
    (row,) = cf.measure_removals(plan, [job], [traj], original, classifier, n_steps, results)
    assert row["completion_l2"] == 0.0 and row["forgetting_l2"] == 0.0 and math.isfinite(row["fid"])
    # a rerun reads the finished result (keyed by the conditioned target too) instead of measuring it again
    assert cf.measure_removals(plan, [job], [traj], original, classifier, n_steps, results) == [row]
    assert results.counts == {"removal": [1, 1]}
    (consistency,) = cf.seed_consistency(plan, [job], [traj], original, n_steps)
    assert consistency["l2_same_seed_mean"] == 0.0
    formation = cf.feature_formation(plan, [traj], [900, step], original, classifier, n_steps)
    assert formation.shape == (1, 2) and bool(((formation >= 0) & (formation <= 1)).all())
    completions = cf.pictures(original, cf.completions(cf.target_noise_fn(original, None, [traj]),
                                                       original.noise_scheduler, traj.x_t[1], step, 2, n_steps))
    assert completions.shape == (2, *traj.final_image.shape)  # decoded pictures, not latents
