"""DDPM training on a subset mask: a diffusers ``UNet2DModel`` and a ``DDPMScheduler``.

The module trains with the MSE of its own parameterization (``prediction_type``: the noise, v or x0;
diffusers' convention), AdamW with linear warmup and cosine decay, optional EMA weights, logs the loss and a sample grid (TensorBoard and PNG), and stamps every checkpoint
with the data identity (N, the mask's hash, the dataset fingerprint) so that features, masks and
checkpoints can later be checked to belong together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from lightning.pytorch import LightningModule
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from attribution import DiffusionTask, add_noise
from attribution.diffusion import check_prediction_type
from attribution.ema import MissingEMAError
from attribution.errors import SettingsError
from attribution.pretrained import load_pretrained_scheduler, load_pretrained_unet
from attribution.protocol import check_sample_shape
from attribution.sampling import ddpm_sample
from attribution.trajectory import Trajectory, from_samples, real_image_target
from attribution.identity import data_identity, write_identity
from attribution.images import save_grid
from lightning_modules.adapters import adapter_record, base_network, rebuild_adapters


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, trainer, warmup_steps: int) -> dict:
    """diffusers' linear warmup + cosine decay to 0 over the run's optimizer steps, stepped every step
    (warmup capped at half the run)."""
    total = max(1, int(trainer.estimated_stepping_batches))
    schedule = get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, total // 2), total)
    return {"scheduler": schedule, "interval": "step"}


class DDPMModule(LightningModule):
    """Denoising diffusion training of ``unet`` on the batches of a datamodule of this project.

    Args:
        unet: the denoiser, e.g. ``diffusers.UNet2DModel`` given in YAML with class_path/init_args.
        num_train_timesteps: T of the DDPM schedule.
        beta_schedule: diffusers beta schedule name ("linear", "squaredcos_cap_v2", ...).
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.
        prediction_type: what the UNet predicts and is trained on: "epsilon" (the noise), "v_prediction"
            (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0) or "sample" (x_0); the scheduler's ``prediction_type``.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup steps before the cosine decay.
        ema_decay: keep EMA weights with this decay (None: no EMA). Sampling uses them when kept; attribution
            when ``use_ema`` asks (None: when kept).
        sample_every_n_epochs: log a sample grid every this many epochs (0: only at the end).
        num_samples: images in the sample grid.
        sample_inference_steps: DDPM steps used for the grid (fewer than T is faster).
        sample_seed: first seed of the grid's samples (sample i uses seed sample_seed + i).
    """

    def __init__(
        self,
        unet: UNet2DModel,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        ema_decay: Optional[float] = None,
        sample_every_n_epochs: int = 0,
        num_samples: int = 64,
        sample_inference_steps: int = 100,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        _check_positive(num_train_timesteps=num_train_timesteps, num_samples=num_samples,
                        sample_inference_steps=sample_inference_steps)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"Expected `ema_decay` to be in (0, 1) or None, but got {ema_decay}")
        check_prediction_type(prediction_type)
        self.save_hyperparameters(ignore=["unet"])
        self.unet = unet
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                             beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type)
        self.task = DiffusionTask.from_scheduler(self.noise_scheduler)  # refuses a schedule without signal at T-1
        self.ema = (AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
                    if ema_decay is not None else None)
        if self.ema is not None:
            self.ema.requires_grad_(False)
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> "DDPMModule":
        """The module around a diffusers pipeline folder (``save_pretrained``: ``unet/``, ``scheduler/``), eval mode.

        The UNet is the folder's; the noise schedule and ``prediction_type`` come from the folder's scheduler
        (``scheduler/scheduler_config.json``), which is also the one used for sampling. ``kwargs``: the module's
        other arguments (sampling, optimizer, ...).
        """
        return cls._around_folder(folder, kwargs)

    @classmethod
    def _around_folder(cls, folder: str | Path, kwargs: dict) -> "DDPMModule":
        unet, scheduler = load_pretrained_unet(folder), load_pretrained_scheduler(folder)
        config = scheduler.config
        schedule = {"num_train_timesteps": int(config.num_train_timesteps),
                    "beta_schedule": str(config.get("beta_schedule", "linear")),
                    "beta_start": float(config.get("beta_start", 1e-4)),
                    "beta_end": float(config.get("beta_end", 0.02)),
                    "prediction_type": str(config.get("prediction_type", "epsilon"))}
        given = sorted(set(schedule) & set(kwargs))
        if given:
            raise SettingsError(f"Expected no {given} beside the pretrained folder {folder} (they come from its "
                                f"scheduler/scheduler_config.json: {[schedule[k] for k in given]}), but got "
                                f"{[kwargs[k] for k in given]}")
        # LightningCLI builds `PretrainedDiffusion(path=...)` inside a context whose hyperparameters would replace the
        # module's own (its `vae`, ...) in save_hyperparameters: the module records its own arguments
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
        token = _given_hyperparameters.set(None)
        try:
            module = cls(unet, **schedule, **kwargs)
        finally:
            _given_hyperparameters.reset(token)
        module.use_noise_scheduler(scheduler)
        return module.eval()

    def use_noise_scheduler(self, scheduler) -> None:
        """Train, attribute and sample with ``scheduler`` (a diffusers scheduler: its schedule, prediction type)."""
        self.noise_scheduler = scheduler
        self.task = DiffusionTask.from_scheduler(scheduler)
        self.alphas_cumprod = self.task.alphas_cumprod.clone().to(self.alphas_cumprod.device)

    def setup(self, stage: str) -> None:
        """Before fitting: refuse data whose (channels, size) do not fit the UNet (``in_channels``, ``sample_size``)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if stage == "fit" and hasattr(datamodule, "image_shape"):
            check_sample_shape(datamodule.image_shape, self.unet,
                               f"the images of {type(datamodule).__name__} (its image_shape)")

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch["image"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["image"].shape[0])
        return loss

    def diffusion_loss(self, x0: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean MSE of the UNet's output against its target (the noise, v or x0, ``prediction_type``) at
        uniformly drawn timesteps; x0 (B,C,H,W) in [-1, 1] (latents for the LDM)."""
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.hparams.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = add_noise(x0, noise, t, self.alphas_cumprod)
        target = self.task.target(x0, noise, t)  # the noise itself for epsilon-prediction
        return F.mse_loss(self.predict_noise(x_t, t, cond, ema=False), target)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None,
                      ema: bool = True) -> torch.Tensor:
        """The UNet's output at (x_t, t), with the EMA weights when kept and ``ema`` is true: eps_theta for
        epsilon-prediction (v_theta or x0_theta for the other ``prediction_type``)."""
        return self.denoiser(ema)(x_t, t).sample

    def denoiser(self, ema: bool = True) -> torch.nn.Module:
        """The UNet used for sampling: the EMA copy when kept (and asked for), else the trained UNet."""
        return self.ema.module if (ema and self.ema is not None) else self.unet

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.unet)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return {"optimizer": opt, "lr_scheduler": warmup_cosine_schedule(opt, self.trainer, self.hparams.warmup_steps)}

    # ----------------------------------------------------------------- sampling
    def sample(self, seeds, num_inference_steps: Optional[int] = None, **kwargs):
        """Seeded samples (see ``attribution.sampling.ddpm_sample``); images in [-1, 1]."""
        shape = self.sample_shape()
        was_training = self.training
        self.eval()
        try:
            return ddpm_sample(lambda x, t: self.predict_noise(x, t), self.noise_scheduler, shape, seeds,
                               num_inference_steps=num_inference_steps, device=self.device, **kwargs)
        finally:
            self.train(was_training)

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser works on (pixels for the DDPM, latents for the LDM)."""
        return (self.unet.config.in_channels, *_pair(self.unet.config.sample_size))

    def sample_images(self, seeds, num_inference_steps: Optional[int] = None) -> torch.Tensor:
        """Pictures (B, C, H, W) in [-1, 1] of seeded samples (the sample grid)."""
        return self.sample(seeds, num_inference_steps).images

    def record_targets(self, seeds, num_inference_steps: Optional[int], record_steps, prompts=None,
                       info: Optional[dict] = None) -> list[Trajectory]:
        """Generate one target per seed, recording x_t and x0_hat_t at ``record_steps`` (ids 0, 1, ...)."""
        if prompts:
            raise ValueError(f"{type(self).__name__} is unconditional: expected no `prompts`, but got {len(prompts)}")
        result = self.sample(seeds, num_inference_steps, record=True, record_steps=record_steps)
        return from_samples(result, first_id=0, info=info)

    def real_target(self, datamodule: Any, index: int, steps, seed: int, target_id: int,
                    info: Optional[dict] = None) -> Trajectory:
        """Training image ``index`` as a target: noised to each of ``steps`` with noise from ``seed``."""
        image = datamodule.images([index])[0].to(self.device)
        return real_image_target(lambda x, t: self.predict_noise(x, t), self.attribution_task(), image, steps,
                                 seed=seed, target_id=target_id, index=index, info=info)

    def on_train_epoch_end(self) -> None:
        every = self.hparams.sample_every_n_epochs
        if every and (self.current_epoch + 1) % every == 0:
            self.log_sample_grid()

    def on_train_end(self) -> None:
        self.log_sample_grid(tag="final")

    def log_sample_grid(self, tag: Optional[str] = None) -> Optional[Path]:
        """Sample the grid, write it to ``<log_dir>/samples/<tag>.png`` and to TensorBoard."""
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if not self.trainer.is_global_zero:
            return None
        seeds = range(self.hparams.sample_seed, self.hparams.sample_seed + self.hparams.num_samples)
        images = self.sample_images(list(seeds), self.hparams.sample_inference_steps)
        tag = tag or f"epoch_{self.current_epoch:04d}"
        path = Path(log_dir or self.trainer.default_root_dir) / "samples" / f"{tag}.png"
        grid = save_grid(images, path, upscale=max(1, 32 // images.shape[-1]))
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(f"samples/{tag}", grid, self.global_step)
        return path

    # ----------------------------------------------------------------- attribution protocol
    def attribution_task(self) -> DiffusionTask:
        """How the attribution core calls the denoiser (the training noise schedule and prediction type)."""
        return DiffusionTask.from_scheduler(self.noise_scheduler)

    def attribution_denoiser(self, ema: Optional[bool] = None) -> torch.nn.Module:
        """The network whose gradients are featurized and scored: for ``ema=True`` the EMA copy (an error when the
        module keeps none: ``ema_decay`` None), for False the trained UNet, for None the EMA copy when kept."""
        if ema is None:
            return self.denoiser(True)
        if ema and self.ema is None:
            raise MissingEMAError(f"Expected EMA weights (use_ema=True), but this {type(self).__name__} keeps none "
                                  "(ema_decay is None); use use_ema=False, or None (the EMA weights when kept)")
        return self.ema.module if ema else self.unet

    def attribution_inputs(self, batch: dict[str, torch.Tensor]):
        """(x0 (B,C,H,W) in [-1, 1], global index (B,), no conditioning)."""
        return batch["image"], batch["index"], None

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_identity(checkpoint, data_identity(self.trainer.datamodule))
        unet = base_network(self.unet)  # inside a peft wrapper
        checkpoint["unet_config"] = dict(unet.config)
        checkpoint["unet_class"] = f"{type(unet).__module__}.{type(unet).__qualname__}"
        checkpoint["unet_adapters"] = adapter_record(self.unet)  # LoRA etc.: rebuilt by from_checkpoint
        checkpoint["noise_scheduler"] = {"class": type(self.noise_scheduler).__name__,  # e.g. a pretrained folder's
                                         "config": dict(self.noise_scheduler.config)}
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    @classmethod
    def from_checkpoint(cls, path: str | Path | dict, map_location: str | torch.device = "cpu") -> "DDPMModule":
        """Rebuild the module (UNet from the configuration stored in the checkpoint) and load its weights.

        ``path`` is a checkpoint file or the checkpoint dict already loaded from one.
        """
        checkpoint = path if isinstance(path, dict) else torch.load(path, map_location=map_location,
                                                                     weights_only=False)
        unet_class = _import(checkpoint.get("unet_class", "diffusers.UNet2DModel"))
        unet = rebuild_adapters(unet_class.from_config(checkpoint["unet_config"]), checkpoint.get("unet_adapters"))
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
        module = cls(unet, **hparams)
        saved = checkpoint.get("noise_scheduler")
        if saved:  # the scheduler itself (a pretrained folder's may have trained betas, another sampler class)
            import diffusers
            module.use_noise_scheduler(getattr(diffusers, saved["class"]).from_config(saved["config"]))
        module.load_state_dict(checkpoint["state_dict"])
        module.on_load_checkpoint(checkpoint)
        return module


def _import(class_path: str):
    import importlib
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"Expected `{name}` to be a positive int, but got {value!r}")
