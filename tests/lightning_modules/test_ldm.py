"""The text-conditional LDM chain on tiny models: captions from labels, the frozen text encoder (packaged
MiniLM and a CLIP folder), the VAE (trained checkpoint and diffusers folder), latents cached once and tied to
the VAE, fit on a mask with the featurize callback, sampling with guidance, scoring, pictures, and refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from lightning.pytorch import Trainer, seed_everything

from attribution import FeatureStore, StepOutput, featurize_batch, x0_hat
from callbacks.score_writer import load_target_scores
from attribution.trajectory import load_targets, save_targets
from callbacks import TrakFeaturizeCallback
from attribution.featurize import FeaturizeSettings, projector_from_meta
from attribution.patches import load_patch
from cli import main
from conftest import CONFIGS
from datamodules import DigitsDataModule
from helpers import fit_trainer, small_data
from lightning_modules import AttributionModule, LDMModule, VAEModule
from attribution.store import open_feature_stores
from attribution.identity import CheckpointMismatchError
from lightning_modules.loading import load_diffusion_module
from attribution.text_encoder import FrozenTextEncoder
from lightning_modules.vae import encode_latents, load_vae, vae_hash

TEMPLATE = "a handwritten digit {label}"
STEPS = [900, 400, 0]


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                         layers_per_block=1, norm_num_groups=4, sample_size=8)


def tiny_cond_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=[8, 16],
                                layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=384,
                                attention_head_dim=4, norm_num_groups=4)


def fit_vae(root, dm, seed: int = 0):
    seed_everything(seed)
    trainer = Trainer(accelerator="cpu", max_steps=3, default_root_dir=root, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(VAEModule(tiny_vae(seed), warmup_steps=1, num_samples=2), datamodule=dm)
    return trainer.checkpoint_callback.best_model_path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """VAE -> LDM on a mask with the featurize callback (2 checkpoints) -> 2 targets with prompts + 1 real."""
    root = tmp_path_factory.mktemp("ldm")
    full = small_data(root, n=60, caption_template=TEMPLATE)
    vae_ckpt = fit_vae(root / "vae", full)
    mask = np.zeros(60, dtype=bool)
    mask[::2] = True
    np.save(root / "mask.npy", mask)
    dm = small_data(root, n=60, caption_template=TEMPLATE, subset_mask=str(root / "mask.npy"), batch_size=16)
    seed_everything(0)
    module = LDMModule(tiny_cond_unet(), vae=vae_ckpt, text_max_length=8, latent_cache=str(root / "latents"),
                       warmup_steps=1, num_samples=2, sample_inference_steps=2)
    fit_trainer(root / "fit", [TrakFeaturizeCallback(proj_dim=16, num_draws=2, batch_size=32)]).fit(module, datamodule=dm)
    module.eval()
    targets = module.record_targets([3, 4], 10, STEPS, prompts=["a handwritten digit seven", "a handwritten digit 1"])
    targets.append(module.real_target(dm, 5, STEPS, seed=9, target_id=2))
    save_targets(targets, root / "targets")
    return root, dm, module, vae_ckpt


# ------------------------------------------------------------------------------------------- captions
def test_captions_come_from_labels_and_enter_the_fingerprint():
    plain, captioned = DigitsDataModule(), DigitsDataModule(caption_template=TEMPLATE)
    item = captioned.full_dataset()[7]
    assert item["label"] == 7 and item["caption"] == "a handwritten digit seven"
    assert "caption" not in plain.full_dataset()[7]
    assert captioned.captions([0, 1]) == ["a handwritten digit zero", "a handwritten digit one"]
    assert plain.fingerprint != captioned.fingerprint  # features made with captions are other data
    with pytest.raises(ValueError, match="caption_template"):
        DigitsDataModule(caption_template="a {digit}").fingerprint
    with pytest.raises(ValueError, match="no captions"):
        plain.captions([0])


# ------------------------------------------------------------------------------------------- text encoder
def test_text_encoder_states_do_not_depend_on_the_batch():
    encoder = FrozenTextEncoder(max_length=8)
    alone = encoder(["a handwritten digit seven"])
    encoder._cache.clear()
    both = encoder(["a handwritten digit one", "a handwritten digit seven"])
    assert alone.shape == (1, 8, 384) and both.shape == (2, 8, 384)
    assert torch.equal(both[1], alone[0])
    assert torch.all(alone[0, 7] == 0) and alone[0, :7].abs().sum(-1).min() > 0  # 7 tokens, 1 zeroed pad


def test_a_clip_text_encoder_loads_from_a_local_folder(tmp_path):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from attribution.text_encoder import default_text_encoder_path

    config = CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16)
    CLIPTextModel(config).save_pretrained(tmp_path / "text_encoder")
    AutoTokenizer.from_pretrained(default_text_encoder_path()).save_pretrained(tmp_path / "tokenizer")
    encoder = FrozenTextEncoder(str(tmp_path), max_length=6)  # a Stable Diffusion-like snapshot layout
    assert encoder.describe()["model_type"] == "clip_text_model" and encoder(["a cat"]).shape == (1, 6, 32)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        FrozenTextEncoder(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------- VAE
def test_vae_loads_from_a_checkpoint_or_a_diffusers_folder(chain, tmp_path):
    _, dm, module, vae_ckpt = chain
    vae = load_vae(vae_ckpt)
    assert vae.config.scaling_factor != 0.18215 and vae_hash(vae) == module.vae_identity()
    vae.save_pretrained(tmp_path / "snapshot" / "vae")
    again = load_vae(tmp_path / "snapshot")
    assert vae_hash(again) == vae_hash(vae)
    images = dm.images(range(6))
    one_by_one = torch.cat([encode_latents(vae, images[i:i + 1]) for i in range(6)])
    assert torch.equal(encode_latents(vae, images), one_by_one)  # default: bit-identical whatever the batching
    with pytest.raises(FileNotFoundError, match="`vae`"):
        load_vae(tmp_path / "nothing")


def test_latents_are_cached_once_per_vae_and_equal_fresh_encodings(chain):
    root, dm, module, _ = chain
    files = list((root / "latents").glob("latents_*.pt"))
    assert [f.name for f in files] == [f"latents_{module.vae_identity()}_{dm.fingerprint[:16]}.pt"]
    batch = next(iter(dm.featurize_dataloader(indices=[1, 4, 7])))
    cached = module.latents_of(batch)
    fresh = LDMModule(tiny_cond_unet(), vae=module.hparams.vae).latents_of(batch)  # no table: encoded now
    assert cached.shape == (3, 4, 4, 4) and torch.equal(cached, fresh)


# ------------------------------------------------------------------------------------------- chain
def test_featurized_rows_equal_the_core_api_with_the_caption(chain):
    root, dm, _, _ = chain
    stores = open_feature_stores(str(root / "fit" / "features"))
    assert len(stores) == 2 and all(s.is_complete for s in stores)
    store = stores[-1]
    module = load_diffusion_module(store.meta["checkpoint"]["file"])
    batch = next(iter(dm.featurize_dataloader(indices=[2, 3])))
    z, index, cond = module.attribution_inputs(batch)
    assert cond.shape == (2, 8, 384)
    net = module.attribution_denoiser()
    train_output = FeaturizeSettings(proj_dim=16, num_draws=2, batch_size=32).train_output()
    assert store.meta["train_output"] == train_output.describe()
    expected = featurize_batch(module.attribution_task(), net, train_output,
                               projector_from_meta(store.meta["projector"], net), z, index, cond=cond)
    assert torch.allclose(store.read()[[2, 3]], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_targets_hold_latents_prompt_conditioning_and_decoded_pictures(chain):
    root, _, _, _ = chain
    sampled, _, real = load_targets(root / "targets")
    assert sampled.x_t.shape == (3, 4, 4, 4) and sampled.timesteps.tolist() == STEPS
    assert sampled.prompt == "a handwritten digit seven" and sampled.cond.shape == (8, 384)
    assert sampled.x0_hat_image.shape == (3, 1, 8, 8) and sampled.final_image.shape == (1, 8, 8)
    assert real.source == "real:5" and real.prompt == "a handwritten digit 5" and real.final_image.shape == (1, 8, 8)
    assert (root / "targets" / "targets.json").exists()


def test_guidance_weight_one_is_the_conditional_and_zero_the_unconditional(chain):
    _, _, module, _ = chain
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([500, 20])
    cond = module.encode_text(["a handwritten digit seven"] * 2)
    with torch.no_grad():
        assert torch.allclose(module.guided_noise(cond, 1.0)(x, t), module.predict_noise(x, t, cond), atol=1e-6)
        assert torch.allclose(module.guided_noise(cond, 0.0)(x, t), module.predict_noise(x, t), atol=1e-6)


def test_scores_equal_the_core_api_with_the_prompt_and_pictures_are_written(chain):
    root, dm, _, _ = chain
    module = AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"),
                               out_dir=str(root / "scores"), num_draws=3, relative_lam=0.5, topk=3, pair_batch_size=2,
                               estimator="trak")
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False).predict(
        module.attach_data(dm), return_predictions=False)
    result = torch.load(root / "scores" / "target_0000.pt", weights_only=False)
    assert result["scores"].shape == (60, 3)
    traj = load_targets(root / "targets", [0])[0]
    members = torch.from_numpy(np.load(root / "mask.npy"))
    per_store = []
    for store in open_feature_stores(str(root / "fit" / "features")):
        ldm = load_diffusion_module(store.meta["checkpoint"]["file"])
        task, net = ldm.attribution_task(), ldm.attribution_denoiser()
        x_t, t, cond = traj.x_t[1:2], traj.timesteps[1:2], traj.cond.unsqueeze(0)
        with torch.no_grad():
            estimate = x0_hat(x_t, task.predict_noise(net, x_t, t, cond), t, task.alphas_cumprod)
        paired = "square" if store.meta["train_output"]["kind"] == "square" else "loss"  # score's default output
        g = featurize_batch(task, net, StepOutput(3, 0, kind=paired), projector_from_meta(store.meta["projector"], net),
                            estimate,
                            torch.tensor([0]), cond=cond, steps=t)
        # the model was fit on the mask: the kernel (and its relative lambda) of the member rows only
        Phi = store.read(dtype=torch.float64)
        K_M = Phi[members].T @ Phi[members]
        lam = 0.5 * float(K_M.trace()) / Phi.shape[1]
        per_store.append((Phi @ torch.linalg.solve(K_M + lam * torch.eye(Phi.shape[1], dtype=torch.float64),
                                                   g.double().T))[:, 0])
    ref = torch.stack(per_store).mean(0)
    assert torch.allclose(result["scores"][:, 1].double(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
    assert torch.equal(result["members"], members) and bool(members[result["positive_indices"]].all())
    assert (root / "scores" / "target_0000.png").stat().st_size > 5000
    assert "a handwritten digit seven" in (root / "scores" / "index.html").read_text()


def test_a_pixel_patch_maps_to_the_latent_grid(chain):
    root, _, _, _ = chain
    mask = load_patch("0:4,0:4", load_targets(root / "targets"))
    assert mask.shape == (1, 4, 4) and mask.sum() == 4 and mask[0, :2, :2].all()


# ------------------------------------------------------------------------------------------- refusals
def test_a_checkpoint_of_another_vae_is_refused(chain, tmp_path):
    root, dm, module, vae_ckpt = chain
    other_vae = fit_vae(tmp_path / "vae2", small_data(root, n=60, caption_template=TEMPLATE), seed=1)
    checkpoint = torch.load(next((root / "fit" / "checkpoints").glob("*.ckpt")), weights_only=False)
    other = LDMModule(tiny_cond_unet(), vae=other_vae)
    with pytest.raises(CheckpointMismatchError, match="another VAE"):
        other.check_checkpoint(checkpoint)
    checkpoint["hyper_parameters"]["vae"] = other_vae
    with pytest.raises(CheckpointMismatchError, match="another VAE"):
        LDMModule.from_checkpoint(checkpoint).vae
    with pytest.raises(KeyError, match="caption"):
        module.training_step({"image": torch.zeros(1, 1, 8, 8), "index": torch.tensor([0])}, 0)


# ------------------------------------------------------------------------------------------- CLI + shards
def test_cli_chain_vae_ldm_sample_with_prompts_and_score(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = small_data(tmp_path, n=40)  # writes digits40.npz
    data_args = ["--data=datamodules.ArrayDataModule", f"--data.path={tmp_path / 'digits40.npz'}",
                 f"--data.caption_template={TEMPLATE}", "--data.batch_size=40"]
    main(["fit", "--config", str(CONFIGS / "smoke_vae.yaml"), *data_args, "--trainer.default_root_dir=vae"])
    vae = tmp_path / "vae" / "checkpoints" / "vae.ckpt"
    ldm = ["--config", str(CONFIGS / "smoke_ldm.yaml"), f"--model.init_args.vae={vae}", *data_args]
    main(["fit", *ldm, "--trainer.default_root_dir=ldm", "--trainer.callbacks+=callbacks.TrakFeaturizeCallback",
          "--trainer.callbacks.proj_dim=8", "--trainer.callbacks.num_draws=1", "--trainer.callbacks.batch_size=40"])
    main(["sample", *ldm, "--checkpoint=ldm/checkpoints/step000003.ckpt", "--out_dir=targets", "--num_targets=2",
          "--num_inference_steps=4", "--num_record_steps=2", '--prompts=["a handwritten digit three"]',
          "--trainer.logger=false", "--trainer.default_root_dir=."])
    main(["score", "--config", str(CONFIGS / "score_digits.yaml"), *data_args, "--model.features=ldm/features",
          "--model.targets=targets", "--model.num_draws=2", "--trainer.logger=false"])
    assert [t.prompt for t in load_targets("targets")] == ["a handwritten digit three"] * 2
    assert (tmp_path / "scores" / "target_0001.png").exists() and data.num_examples == 40
    # the config's default is K-FAC influence (latents from the VAE, the caption's token states as conditioning);
    # TRAK Eq. 3 on request
    assert len(list((tmp_path / "scores" / "influence").glob("kfac_factors_*.pt"))) == 1
    main(["score", "--config", str(CONFIGS / "score_digits.yaml"), *data_args, "--model.features=ldm/features",
          "--model.targets=targets", "--model.num_draws=2", "--trainer.logger=false", "--model.estimator=trak",
          "--model.out_dir=scores_trak"])
    kfac = load_target_scores(tmp_path / "scores" / "target_0001.pt")["scores"]
    trak = load_target_scores(tmp_path / "scores_trak" / "target_0001.pt")["scores"]
    assert kfac.shape == trak.shape == (40, 2) and bool(torch.isfinite(kfac).all()) and not torch.equal(kfac, trak)


def test_ldm_trains_and_featurizes_on_webdataset_shards(tmp_path):
    from datamodules import WebDatasetDataModule
    from datamodules.shards import write_digits_shards

    write_digits_shards(tmp_path / "shards", samples_per_shard=16, limit=40)
    dm = WebDatasetDataModule(str(tmp_path / "shards"), batch_size=8)
    vae = fit_vae(tmp_path / "vae", dm)
    seed_everything(0)
    module = LDMModule(tiny_cond_unet(), vae=vae, text_max_length=12, warmup_steps=1, num_samples=2,
                       sample_inference_steps=2)
    fit_trainer(tmp_path / "fit", [TrakFeaturizeCallback(proj_dim=8, num_draws=1, batch_size=16)],
                max_steps=2, every=2).fit(module, datamodule=dm)
    store = open_feature_stores(str(tmp_path / "fit" / "features"))[0]
    assert store.is_complete and store.meta["N"] == 40 and isinstance(store, FeatureStore)
