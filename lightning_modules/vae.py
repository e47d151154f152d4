"""The latent space of the LDM: train a small ``AutoencoderKL`` (the offline default), or load one.

``VAEModule`` trains a diffusers ``AutoencoderKL`` (from YAML) with a reconstruction MSE plus a
small KL term. It tracks the standard deviation of the posterior means it sees (a running mean
over training batches), and every checkpoint stores the VAE's configuration with
``scaling_factor = 1 / that std``, so the LDM's latents have unit variance, as Stable Diffusion's
0.18215 does for its VAE.

:func:`load_vae` accepts such a checkpoint, or a diffusers folder (``save_pretrained``; a Stable
Diffusion snapshot's ``vae`` sub-folder works too). :func:`encode_latents` and
:func:`decode_latents` are the two maps between images in [-1, 1] and scaled latents; encoding uses
the posterior mean (no sampling), so an image's latent is a function of the image and the VAE only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from lightning.pytorch import LightningModule

from lightning_modules.ddpm import warmup_cosine_schedule
from attribution.errors import SettingsError
from attribution.identity import tensors_hash
from attribution.images import save_grid

__all__ = ["VAEModule", "load_vae", "encode_latents", "decode_latents", "vae_hash"]


class VAEModule(LightningModule):
    """Train an ``AutoencoderKL`` on the images of a datamodule (its subset mask is honoured).

    Args:
        vae: the autoencoder, or the keyword arguments of ``diffusers.AutoencoderKL`` (a plain mapping in
            YAML: AutoencoderKL annotates its block lists as 1-tuples, which a class_path block cannot fill).
        lr: peak AdamW learning rate (linear warmup, cosine decay).
        kl_weight: weight of the KL term (per latent element) against the per-pixel MSE.
        warmup_steps: warmup steps.
        num_samples: images in the reconstruction grid written at the end of training.
    """

    def __init__(self, vae: Union[AutoencoderKL, dict], lr: float = 1e-3, kl_weight: float = 1e-4, warmup_steps: int = 50,
                 num_samples: int = 16) -> None:
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"Expected `kl_weight` >= 0, but got {kl_weight}")
        self.save_hyperparameters(ignore=[] if isinstance(vae, dict) else ["vae"])
        self.vae = AutoencoderKL(**vae) if isinstance(vae, dict) else vae
        self.register_buffer("latent_std", torch.ones(()))
        self.register_buffer("std_updates", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
        recon = self.vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + self.hparams.kl_weight * kl
        with torch.no_grad():  # running mean of the posterior means' std (the latent scaling)
            n = self.std_updates.add_(1).float()
            self.latent_std.add_((posterior.mean.std() - self.latent_std) / n.clamp(max=100))
        self.log_dict({"vae/mse": mse, "vae/kl": kl, "train/loss": loss}, prog_bar=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.vae.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": warmup_cosine_schedule(opt, self.trainer, self.hparams.warmup_steps)}

    def scaling_factor(self) -> float:
        return float(1.0 / self.latent_std.clamp(min=1e-6))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        config = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}  # "_use_default_values"
        config["scaling_factor"] = self.scaling_factor()
        checkpoint["vae_config"] = config
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_train_end(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP
        if not self.trainer.is_global_zero or self.trainer.datamodule is None:
            return
        n = self.hparams.num_samples
        images = self.trainer.datamodule.images(range(n)).to(self.device)
        self.vae.eval()
        with torch.no_grad():
            recon = self.vae.decode(self.vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
        path = Path(log_dir or self.trainer.default_root_dir) / "samples" / "reconstructions.png"
        grid = save_grid(torch.cat([images, recon]).cpu(), path, upscale=max(1, 32 // images.shape[-1]), nrow=n)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("vae/reconstructions", grid, self.global_step)


def load_vae(path: str | Path) -> AutoencoderKL:
    """An ``AutoencoderKL`` in eval mode, frozen, from a ``VAEModule`` checkpoint or a diffusers folder."""
    path = Path(path)
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if "vae_config" not in checkpoint:
            raise ValueError(f"Expected `vae` {str(path)!r} to be a checkpoint written by VAEModule (with a "
                             f"'vae_config' entry) or a diffusers AutoencoderKL folder, but the file has no vae_config")
        vae = AutoencoderKL.from_config(checkpoint["vae_config"])
        state = {k[len("vae."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("vae.")}
        vae.load_state_dict(state)
    elif path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").exists() else None
        vae = AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
    else:
        raise FileNotFoundError(f"Expected `vae` to be a VAEModule checkpoint file or a diffusers AutoencoderKL "
                                f"folder on local disk, but {str(path)!r} does not exist")
    return vae.requires_grad_(False).eval()


def vae_hash(vae: AutoencoderKL) -> str:
    """Hash of the VAE's state dict and its latent scaling: the identity that latent caches and LDM
    checkpoints record."""
    scaling = f"{vae.config.scaling_factor!r}:{getattr(vae.config, 'shift_factor', None)!r}"
    return tensors_hash(vae.state_dict().items(), prefix=scaling)


def _scale_shift(vae: AutoencoderKL) -> tuple[float, float]:
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: Optional[int] = 1) -> torch.Tensor:
    """Scaled posterior means ``(B, c, h, w)`` of images ``(B, C, H, W)`` in [-1, 1].

    ``batch_size`` images go through the encoder at once; the default 1 makes every latent independent
    of how images are batched (bit for bit), so cached and freshly encoded latents agree exactly.
    """
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise SettingsError(f"Expected images with the VAE's in_channels = {vae.config.in_channels} channels, but got "
                            f"images of shape {tuple(images.shape)}: the data's channels (e.g. `grayscale`) and the "
                            "VAE must agree")
    scale, shift = _scale_shift(vae)
    step = batch_size or len(images)
    means = [vae.encode(images[i:i + step]).latent_dist.mean for i in range(0, len(images), step)]
    return (torch.cat(means) - shift) * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents."""
    scale, shift = _scale_shift(vae)
    return vae.decode(latents / scale + shift).sample.clamp(-1, 1)
