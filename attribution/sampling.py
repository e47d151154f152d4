"""Seeded DDPM sampling that can record the denoising trajectory.

The loop is the explicit ``set_timesteps`` / predict / ``step`` loop of diffusers' DDPM pipeline.
Every sample owns a CPU ``torch.Generator`` seeded with its own seed, so sample ``i`` of a batch is
the same image whatever the batch it is drawn in, on CPU or GPU: the initial noise and every
step's noise come from that generator (never from the device's RNG stream).

``predict_noise(x_t, t)`` is any callable returning the noise prediction eps_theta(x_t, t) for a
batch ``x_t`` (B, C, H, W) and a batch of integer timesteps ``t`` (B,); conditioning and
classifier-free guidance live in that callable, so the sampler stays model-agnostic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .diffusion import x0_hat

PredictNoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    """What one batch of sampling returns.

    Attributes:
        images: final samples x_0, (B, C, H, W).
        seeds: the per-sample seeds, (B,) long.
        timesteps: the recorded timesteps in sampling order, (S,) long (empty when not recording).
        x_t: the latent x_t fed to the denoiser at each recorded step, (B, S, C, H, W).
        x0_hat: the one-step estimate of x_0 at each recorded step, (B, S, C, H, W).
    """

    images: torch.Tensor
    seeds: torch.Tensor
    timesteps: torch.Tensor
    x_t: Optional[torch.Tensor] = None
    x0_hat: Optional[torch.Tensor] = None


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _initial_noise(shape: Sequence[int], generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def _check_record_steps(record_steps: Optional[Sequence[int]], timesteps: torch.Tensor) -> Optional[set]:
    if record_steps is None:
        return None
    wanted = {int(t) for t in record_steps}
    missing = sorted(wanted - {int(t) for t in timesteps})
    if missing:
        raise ValueError(
            f"Expected `record_steps` to be timesteps of the sampling schedule "
            f"({int(timesteps[0])} .. {int(timesteps[-1])}, {len(timesteps)} steps), but got {missing}"
        )
    return wanted


@torch.no_grad()
def ddpm_sample(
    predict_noise: PredictNoise,
    scheduler,
    sample_shape: Sequence[int],
    seeds: Sequence[int],
    num_inference_steps: Optional[int] = None,
    record: bool = False,
    record_steps: Optional[Sequence[int]] = None,
    start: Optional[torch.Tensor] = None,
    start_step: Optional[int] = None,
    device: torch.device | str = "cpu",
) -> SampleResult:
    """Sample ``len(seeds)`` images with a diffusers DDPM-style scheduler.

    Args:
        predict_noise: callable (x_t (B,C,H,W), t (B,) long) -> eps (B,C,H,W).
        scheduler: a diffusers scheduler with ``set_timesteps`` and ``step`` (DDPMScheduler).
            It is deep-copied, so the caller's object is not modified.
        sample_shape: (C, H, W).
        seeds: one integer seed per sample.
        num_inference_steps: inference steps (default: the scheduler's training steps).
        record: keep x_t and x0_hat at every step (or only at ``record_steps``).
        record_steps: timesteps to record; each must be on the schedule.
        start: resume sampling from this x_t (B,C,H,W) instead of pure noise ...
        start_step: ... at this timestep (it must be on the schedule); used for completions.
        device: where the model runs.
    """
    import copy

    if len(seeds) == 0:
        raise ValueError("Expected `seeds` to hold at least one seed, but got an empty sequence")
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps or scheduler.config.num_train_timesteps)
    timesteps = scheduler.timesteps.to(torch.long)
    wanted = _check_record_steps(record_steps, timesteps)
    generators = _generators(seeds)
    if start is None:
        x = _initial_noise(sample_shape, generators).to(device)
        first = 0
    else:
        positions = (timesteps == int(start_step)).nonzero()
        if start_step is None or len(positions) == 0:
            raise ValueError(f"Expected `start_step` to be a timestep of the schedule, but got {start_step}")
        x, first = start.to(device), int(positions[0])
    rec_t, rec_x, rec_x0 = [], [], []
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=x.dtype)
    for t in timesteps[first:]:
        t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        eps = predict_noise(x, t_batch)
        if record and (wanted is None or int(t) in wanted):
            rec_t.append(int(t))
            rec_x.append(x.cpu())
            rec_x0.append(x0_hat(x, eps, t_batch, alphas_cumprod).cpu())
        x = scheduler.step(eps, t, x, generator=generators).prev_sample
    result = SampleResult(images=x.cpu(), seeds=torch.as_tensor(list(seeds), dtype=torch.long),
                          timesteps=torch.as_tensor(rec_t, dtype=torch.long))
    if record:
        result.x_t = torch.stack(rec_x, dim=1)
        result.x0_hat = torch.stack(rec_x0, dim=1)
    return result
