"""Text-conditional latent diffusion on a subset mask: a ``UNet2DConditionModel`` on VAE latents.

Everything the DDPM has (masks, EMA, schedule, checkpoints stamped with the data identity, the
attribution protocol) is inherited from ``DDPMModule``; what the LDM adds:

* **Latents.** A frozen VAE (``vae``: a ``VAEModule`` checkpoint or a diffusers folder, e.g. Stable
  Diffusion's ``vae``) maps images to scaled posterior means, once per image: at fit start the module
  encodes all N images (one at a time, so every latent is bit-identical however it is computed) into
  an in-memory table, or loads it from ``latent_cache`` (a folder; the file name carries the VAE's
  hash and the dataset fingerprint, so another VAE or other data never reads a stale cache). Training,
  featurizing and real-image targets all use these latents; the reference code re-encodes per step.
* **Text.** A frozen text encoder (``text_encoder``: None = the packaged all-MiniLM-L6-v2; or a local
  CLIP folder) turns captions into token states, the UNet's ``encoder_hidden_states``. Training drops a
  caption (replaces it by "") with probability ``caption_dropout``, so the same UNet predicts the
  unconditional noise that classifier-free guidance needs.
* **Sampling** with guidance ``eps_u + w (eps_c - eps_u)`` records trajectories in latent space; the
  recorded x0_hat_t and the final latent are decoded for pictures.
* **Attribution** uses the conditional prediction ``eps(x_t, t, c)`` on both sides (no guidance):
  training examples are featurized with their caption (one per example, the datamodule's), targets
  with their prompt's states. Guidance only shaped the trajectory whose x_t we attribute.

Neither the VAE nor the text encoder is trained or stored in the checkpoint (they are not
submodules); the checkpoint records the VAE's hash and both paths, and refuses another VAE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import UNet2DConditionModel

from attribution.sampling import ddpm_sample
from attribution.atomic import atomic_torch_save
from attribution.trajectory import Trajectory, from_samples, real_image_target
from attribution.errors import SettingsError
from attribution.identity import CheckpointMismatchError
from lightning_modules.ddpm import DDPMModule
from attribution.text_encoder import FrozenTextEncoder
from lightning_modules.vae import decode_latents, encode_latents, load_vae, vae_hash

__all__ = ["LDMModule"]


class LDMModule(DDPMModule):
    """Latent diffusion with text conditioning; see the module docstring.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` whose ``in_channels``/``sample_size`` match the latents
            and whose ``cross_attention_dim`` matches the text encoder (384 for MiniLM, 768 for SD's CLIP).
        vae: a ``VAEModule`` checkpoint or a diffusers ``AutoencoderKL`` folder (local).
        text_encoder: a local transformers text model folder; None: the packaged all-MiniLM-L6-v2.
        text_max_length: tokens per caption (77 for CLIP).
        caption_dropout: probability of training on the empty caption instead of the example's.
        guidance_scale: classifier-free guidance weight w for sampling (1: no guidance).
        latent_cache: folder for the latents of all N images (None: computed in memory at fit start).
        sample_prompts: prompts of the sample grid (None: the captions of the first training examples).
        num_samples: images in the sample grid.
        Other arguments (schedule, ``prediction_type``, optimizer, EMA, sampling): see ``DDPMModule``, passed on
            as keywords.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: str,
        text_encoder: Optional[str] = None,
        text_max_length: int = 16,
        caption_dropout: float = 0.1,
        guidance_scale: float = 3.0,
        latent_cache: Optional[str] = None,
        sample_prompts: Optional[list[str]] = None,
        num_samples: int = 16,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"Expected `caption_dropout` in [0, 1), but got {caption_dropout}")
        if guidance_scale < 0:
            raise ValueError(f"Expected `guidance_scale` >= 0, but got {guidance_scale}")
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"Expected `unet` to be a diffusers UNet2DConditionModel, but got {type(unet).__name__}")
        super().__init__(unet, num_samples=num_samples, **kwargs)
        self.save_hyperparameters(ignore=["unet"])
        self._frozen: dict[str, Any] = {}  # the VAE and the text encoder: loaded on first use, never saved
        self._expected_vae_hash: Optional[str] = None
        self._latents: Optional[torch.Tensor] = None

    @classmethod
    def from_pretrained(cls, folder: str | Path, vae: Optional[str] = None, text_encoder: Optional[str] = None,
                        text_max_length: Optional[int] = None, **kwargs: Any) -> "LDMModule":
        """The LDM around a Stable Diffusion-layout folder (``unet/``, ``scheduler/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/``): its UNet and scheduler (see ``DDPMModule.from_pretrained``), its VAE and text encoder
        unless ``vae``/``text_encoder`` name others, ``text_max_length`` default: the text encoder's positions."""
        folder = Path(folder)
        if text_max_length is None:
            import json
            config = folder / "text_encoder" / "config.json"
            text_max_length = int(json.loads(config.read_text()).get("max_position_embeddings", 77)) \
                if config.is_file() else 77
        return cls._around_folder(folder, {"vae": vae or str(folder), "text_encoder": text_encoder or str(folder),
                                           "text_max_length": text_max_length, **kwargs})

    # ----------------------------------------------------------------- frozen parts
    @property
    def vae(self):
        if "vae" not in self._frozen:
            vae = load_vae(self.hparams.vae)
            identity = vae_hash(vae)
            if self._expected_vae_hash is not None and identity != self._expected_vae_hash:
                raise CheckpointMismatchError(
                    f"the checkpoint was trained with another VAE: expected VAE hash {self._expected_vae_hash} "
                    f"(recorded in the checkpoint), but `vae` {self.hparams.vae!r} has hash {identity}")
            self._frozen["vae"], self._frozen["vae_hash"] = vae, identity
        return self._frozen["vae"].to(self.device)

    def vae_identity(self) -> str:
        self.vae  # noqa: B018 - loads it
        return self._frozen["vae_hash"]

    @property
    def text_encoder(self) -> FrozenTextEncoder:
        if "text" not in self._frozen:
            encoder = FrozenTextEncoder(self.hparams.text_encoder, self.hparams.text_max_length)
            if encoder.dim != self.unet.config.cross_attention_dim:
                raise ValueError(f"Expected the text encoder's states ({encoder.dim}-d, {encoder.describe()['path']}) "
                                 f"to match the UNet's cross_attention_dim, but it is "
                                 f"{self.unet.config.cross_attention_dim}")
            self._frozen["text"] = encoder
        return self._frozen["text"]

    def encode_text(self, captions) -> torch.Tensor:
        """``(B, L, D)`` token states of ``captions`` on this module's device."""
        return self.text_encoder(list(captions), device=self.device)

    # ----------------------------------------------------------------- latents
    def setup(self, stage: str) -> None:
        if stage == "fit" and self._latents is None and self.trainer is not None and self.trainer.datamodule is not None:
            self.load_latents(self.trainer.datamodule, barrier=self.trainer.strategy.barrier,
                              is_writer=self.trainer.is_global_zero)

    def latent_cache_file(self, datamodule: Any) -> Optional[Path]:
        if self.hparams.latent_cache is None:
            return None
        return Path(self.hparams.latent_cache) / f"latents_{self.vae_identity()}_{datamodule.fingerprint[:16]}.pt"

    def load_latents(self, datamodule: Any, barrier=lambda: None, is_writer: bool = True) -> torch.Tensor:
        """The (N, c, h, w) latents of every training image: from the cache file, or encoded (and cached)."""
        path = self.latent_cache_file(datamodule)
        if path is not None and not path.exists() and is_writer:
            atomic_torch_save({"latents": self._encode_all(datamodule), "vae_hash": self.vae_identity(),
                          "dataset_fingerprint": datamodule.fingerprint, "num_examples": datamodule.num_examples}, path)
        barrier()
        if path is None:
            latents = self._encode_all(datamodule)
        else:
            saved = torch.load(path, map_location="cpu", weights_only=False)
            if (saved["vae_hash"], saved["dataset_fingerprint"]) != (self.vae_identity(), datamodule.fingerprint):
                raise ValueError(f"latent cache {path} belongs to another VAE or dataset; delete it")
            latents = saved["latents"]
        shape = self.sample_shape()
        if tuple(latents.shape[1:]) != shape:
            raise SettingsError(f"Expected the VAE's latents to fit the UNet (in_channels, sample_size) = {shape}, but "
                                f"`vae` {self.hparams.vae!r} gives latents of shape {tuple(latents.shape[1:])} for the "
                                "data: set the UNet's in_channels/sample_size, or the data's image_size")
        self._latents = latents
        return latents

    def _encode_all(self, datamodule: Any) -> torch.Tensor:
        from tqdm.auto import tqdm

        parts: dict[int, torch.Tensor] = {}
        loader = datamodule.featurize_dataloader()
        for batch in tqdm(loader, desc="encoding latents", disable=not (self.trainer and self.trainer.is_global_zero)):
            z = encode_latents(self.vae, batch["image"].to(self.device)).cpu()
            parts.update(zip(batch["index"].tolist(), z))
        return torch.stack([parts[i] for i in range(datamodule.num_examples)])

    def latents_of(self, batch: dict) -> torch.Tensor:
        """The latents of a batch's images: looked up by global index when the table is loaded, else
        encoded one image at a time (the same values)."""
        if self._latents is not None:
            return self._latents[batch["index"].cpu()].to(self.device)
        return encode_latents(self.vae, batch["image"].to(self.device))

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "caption" not in batch:
            raise KeyError("LDMModule trains on captioned data: expected batches with a 'caption' entry (e.g. "
                           "DigitsDataModule(caption_template='a handwritten digit {label}') or WebDatasetDataModule)")
        z = self.latents_of(batch)
        captions = list(batch["caption"])
        if self.hparams.caption_dropout > 0:
            drop = (torch.rand(len(captions)) < self.hparams.caption_dropout).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        loss = self.diffusion_loss(z, self.encode_text(captions))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=z.shape[0])
        return loss

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None,
                      ema: bool = True) -> torch.Tensor:
        """The UNet's output (eps for epsilon-prediction, v or x0 for the other ``prediction_type``) at
        (x_t, t, cond); ``cond`` None means the unconditional (empty caption) states."""
        if cond is None:
            cond = self.encode_text([""]).expand(x_t.shape[0], -1, -1)
        return self.denoiser(ema)(x_t, t, encoder_hidden_states=cond).sample

    def guided_noise(self, cond: torch.Tensor, guidance_scale: float):
        """The sampler's model function with classifier-free guidance for the rows' conditioning ``cond``
        (guidance combines the raw outputs, in the model's own parameterization, as diffusers' pipelines do)."""
        uncond = self.encode_text([""]).expand_as(cond)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            c = cond[: x.shape[0]]
            if guidance_scale == 1.0:
                return self.predict_noise(x, t, c)
            eps_u, eps_c = self.predict_noise(torch.cat([x, x]), torch.cat([t, t]),
                                              torch.cat([uncond[: x.shape[0]], c])).chunk(2)
            return eps_u + guidance_scale * (eps_c - eps_u)
        return predict

    # ----------------------------------------------------------------- sampling
    def sample(self, seeds, num_inference_steps: Optional[int] = None, prompts=None,
               guidance_scale: Optional[float] = None, **kwargs):
        """Seeded latent samples for ``prompts`` (one per seed), with guidance; see ``ddpm_sample``."""
        if not prompts or len(prompts) != len(seeds):
            raise ValueError(f"Expected one prompt per seed ({len(seeds)}) for the text-conditional LDM, but got "
                             f"{0 if not prompts else len(prompts)}; pass `prompts`")
        w = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        shape = self.sample_shape()
        was_training = self.training
        self.eval()
        try:
            return ddpm_sample(self.guided_noise(self.encode_text(prompts), w), self.noise_scheduler, shape, seeds,
                               num_inference_steps=num_inference_steps, device=self.device, **kwargs)
        finally:
            self.train(was_training)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pictures in [-1, 1] (on the CPU) of scaled latents."""
        return decode_latents(self.vae, latents.to(self.device)).cpu()

    def _grid_prompts(self, n: int) -> list[str]:
        prompts = self.hparams.sample_prompts
        if not prompts:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "captions"):
                raise ValueError("Expected `sample_prompts` (no datamodule with captions to take them from)")
            prompts = datamodule.captions(range(min(n, datamodule.num_examples)))
        return [prompts[i % len(prompts)] for i in range(n)]

    def sample_images(self, seeds, num_inference_steps: Optional[int] = None) -> torch.Tensor:
        prompts = self._grid_prompts(len(seeds))
        return self.decode(self.sample(seeds, num_inference_steps, prompts=prompts).images)

    def record_targets(self, seeds, num_inference_steps: Optional[int], record_steps, prompts=None,
                       info: Optional[dict] = None) -> list[Trajectory]:
        """Generate one target per (seed, prompt) with guidance; latents recorded, pictures decoded."""
        result = self.sample(seeds, num_inference_steps, prompts=prompts, record=True, record_steps=record_steps)
        info = {**(info or {}), "guidance_scale": self.hparams.guidance_scale, "latent": True}
        targets = from_samples(result, first_id=0, cond=self.encode_text(prompts).cpu(), prompts=list(prompts),
                               info=info)
        for traj in targets:
            self._add_pictures(traj)
        return targets

    def real_target(self, datamodule: Any, index: int, steps, seed: int, target_id: int,
                    info: Optional[dict] = None) -> Trajectory:
        """Training image ``index`` as a target: its latent noised to ``steps``, conditioned on its caption."""
        image = datamodule.images([index]).to(self.device)
        caption = datamodule.captions([index])[0]
        cond = self.encode_text([caption])
        traj = real_image_target(lambda x, t: self.predict_noise(x, t, cond.expand(len(x), -1, -1)),
                                 self.attribution_task(), encode_latents(self.vae, image)[0], steps, seed=seed,
                                 target_id=target_id, index=index, cond=cond[0],
                                 info={**(info or {}), "latent": True})
        traj.prompt = caption
        self._add_pictures(traj)
        traj.final_image = image[0].cpu()
        return traj

    def _add_pictures(self, traj: Trajectory) -> None:
        traj.x0_hat_image = self.decode(traj.x0_hat)
        traj.final_image = self.decode(traj.final.unsqueeze(0))[0]

    # ----------------------------------------------------------------- attribution protocol
    def attribution_inputs(self, batch: dict):
        """(latents (B, c, h, w), global index (B,), token states of the example's caption (B, L, D))."""
        if "caption" not in batch:
            raise KeyError("Expected featurize batches with a 'caption' entry for the text-conditional LDM")
        return self.latents_of(batch), batch["index"], self.encode_text(batch["caption"])

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vae_hash"] = self.vae_identity()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._expected_vae_hash = checkpoint.get("vae_hash")
        if self._frozen.get("vae_hash") not in (None, self._expected_vae_hash):
            self._frozen.clear()  # re-checked on next use

    def check_checkpoint(self, checkpoint: dict[str, Any], source: str = "checkpoint") -> None:
        """Refuse a checkpoint trained with another VAE than ``vae``."""
        recorded = checkpoint.get("vae_hash")
        if recorded is not None and recorded != self.vae_identity():
            raise CheckpointMismatchError(
                f"{source} was trained with another VAE: expected VAE hash {recorded} (recorded in the "
                f"checkpoint), but `vae` {self.hparams.vae!r} has hash {self.vae_identity()}")
