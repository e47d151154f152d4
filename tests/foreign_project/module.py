"""The project's module: a v-prediction UNet on a cosine schedule, EMA by torch's AveragedModel updated in
on_train_batch_end (after Lightning has saved the checkpoint of that step)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from lightning.pytorch import LightningModule
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from attribution import DiffusionTask  # protocol


class ForeignDiffusion(LightningModule):
    def __init__(self, lr: float = 1e-2, ema_decay: float = 0.5, channels: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                               layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False, norm_num_groups=4)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                       prediction_type="v_prediction")
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay)).requires_grad_(False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["pixels"]
        noise, t = torch.randn_like(x), torch.randint(0, 1000, (x.shape[0],))
        v = self.scheduler.get_velocity(x, noise, t)
        return F.mse_loss(self.net(self.scheduler.add_noise(x, noise, t), t).sample, v)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)

    def attribution_task(self) -> DiffusionTask:  # protocol
        return DiffusionTask.from_scheduler(self.scheduler)  # protocol

    def attribution_denoiser(self, ema: bool = True) -> torch.nn.Module:  # protocol
        return self.ema.module if ema else self.net  # protocol

    def attribution_inputs(self, batch: dict):  # protocol
        return batch["pixels"], batch["idx"], None  # protocol


class NoProtocol(LightningModule):
    """The module before plugging in: training only."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ForeignDiffusion()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.inner.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return self.inner.configure_optimizers()
