"""Seeded sampling with any diffusers scheduler, recording the denoising trajectory.

The loop is the explicit ``set_timesteps`` / ``scale_model_input`` / predict / ``step`` loop of
diffusers' pipelines (DDPM, DDIM, DPMSolverMultistep, Euler-type schedulers).
Every sample owns a CPU ``torch.Generator`` seeded with its own seed, so sample ``i`` of a batch is
the same image whatever the batch it is drawn in, on CPU or GPU: the initial noise and every
step's noise come from that generator (never from the device's RNG stream).

``predict_noise(x_t, t)`` is any callable returning the network output for a batch ``x_t``
(B, C, H, W) and a batch of integer timesteps ``t`` (B,), in the parameterization the scheduler's
``config.prediction_type`` names (eps_theta for epsilon-prediction, v_theta for v-prediction);
conditioning and classifier-free guidance live in that callable, so the sampler stays model-agnostic.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .task import DiffusionTask

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


def _check_scheduler(scheduler, timesteps: torch.Tensor, task: DiffusionTask) -> None:
    """Refuse a sampling schedule whose steps are not training timesteps at the training noise level."""
    name = type(scheduler).__name__
    if not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
        raise TypeError(f"Expected `scheduler` to be a diffusers scheduler with `set_timesteps` and `step`, but got {name}")
    variance = getattr(scheduler.config, "variance_type", None)
    if variance in ("learned", "learned_range"):
        raise ValueError(f"Expected `scheduler.config.variance_type` with a fixed variance, but got {variance!r} "
                         "(a network that also outputs its variance is not supported)")
    if timesteps.is_floating_point() and not torch.equal(timesteps, timesteps.round()):
        raise ValueError(
            f"Expected `scheduler` ({name}) to sample at integer training timesteps (each recorded step is attributed "
            f"at its training noise level), but its schedule has fractional ones, e.g. {float(timesteps[1]):.4f}; use "
            "timestep_spacing='trailing' or 'leading' and no Karras/exponential/beta sigmas, or all training steps")
    t = timesteps.round().long()
    if bool(((t < 0) | (t >= task.num_train_timesteps)).any()):
        raise ValueError(f"Expected the sampling timesteps of `scheduler` in [0, {task.num_train_timesteps}), but got "
                         f"{t.min().item()} .. {t.max().item()}")
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:  # sigma-parameterized schedulers (Euler, DPM-Solver): sigma must be the table's at t
        abar = task.alphas_cumprod[t].double()
        expected = ((1 - abar) / abar).sqrt()
        found = torch.as_tensor(sigmas)[: len(t)].double().cpu()
        if not torch.allclose(found, expected, rtol=1e-4, atol=0):
            i = int(((found - expected).abs() / expected).argmax())
            raise ValueError(
                f"Expected the noise level of every sampling step of `scheduler` ({name}) to be the training schedule's "
                f"at its timestep, but step {i} (t = {int(t[i])}) has sigma {float(found[i]):.6g} instead of "
                f"{float(expected[i]):.6g} (Karras, exponential or beta sigmas are not supported)")


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    """``generator=`` for the schedulers whose ``step`` takes one (they all draw from the per-sample generators)."""
    return {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}


def _model_input_scale(scheduler, t) -> Optional[torch.Tensor]:
    """The factor ``scale_model_input`` applies at ``t`` (Euler: 1 / sqrt(sigma^2 + 1)); None when it is 1."""
    one = torch.ones(())
    factor = scheduler.scale_model_input(one, t)
    return None if factor is one or torch.equal(factor, one) else factor


def scheduler_from_task(task: DiffusionTask):
    """A diffusers ``DDPMScheduler`` on exactly the task's training schedule (its ``alphas_cumprod`` table, bit for
    bit) and ``prediction_type``, no clipping: the sampler for a model known only through its task."""
    from diffusers import DDPMScheduler

    abar = task.alphas_cumprod.double()
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    scheduler = DDPMScheduler(num_train_timesteps=task.num_train_timesteps, trained_betas=betas.numpy(),
                              prediction_type=task.prediction_type, clip_sample=False)
    scheduler.alphas_cumprod = task.alphas_cumprod.clone()  # the table itself (step() reads only this)
    return scheduler


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
    """Sample ``len(seeds)`` images with a diffusers scheduler, recording the trajectory if asked.

    Any scheduler with ``set_timesteps`` and ``step`` works (DDPM, DDIM, DPMSolverMultistep, Euler-type)
    whose sampling steps are integer training timesteps at the training noise level (checked first).
    The recorded ``x_t`` is what the network sees (``scheduler.scale_model_input`` of the scheduler's
    sample: the variance-preserving ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` also for Euler),
    and ``x0_hat`` is the core's one-step estimate for the scheduler's ``prediction_type``
    (:meth:`~attribution.task.DiffusionTask.split`): it equals the scheduler's own
    ``pred_original_sample`` before any clipping or thresholding.

    Args:
        predict_noise: callable (x_t (B,C,H,W), t (B,) long) -> the network output (B,C,H,W) in the
            scheduler's parameterization (the noise for epsilon-prediction, v for v-prediction, x0 for sample).
        scheduler: a diffusers scheduler; its ``config.prediction_type`` says what ``predict_noise`` returns.
            It is deep-copied, so the caller's object is not modified.
        sample_shape: (C, H, W).
        seeds: one integer seed per sample.
        num_inference_steps: inference steps (default: the scheduler's training steps).
        record: keep x_t and x0_hat at every step (or only at ``record_steps``).
        record_steps: timesteps to record; each must be on the schedule.
        start: resume sampling from this recorded x_t (B,C,H,W) instead of pure noise ...
        start_step: ... at this timestep (it must be on the schedule); used for completions.
        device: where the model runs.
    """
    import copy

    if len(seeds) == 0:
        raise ValueError("Expected `seeds` to hold at least one seed, but got an empty sequence")
    task = DiffusionTask.from_scheduler(scheduler)
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps or scheduler.config.num_train_timesteps)
    schedule = scheduler.timesteps
    _check_scheduler(scheduler, schedule, task)
    timesteps = schedule.round().to(torch.long) if schedule.is_floating_point() else schedule.to(torch.long)
    wanted = _check_record_steps(record_steps, timesteps)
    generators = _generators(seeds)
    if start is None:
        x = _initial_noise(sample_shape, generators).to(device)
        sigma = scheduler.init_noise_sigma
        if not (isinstance(sigma, (int, float)) and sigma == 1):
            x = x * sigma
        first = 0
    else:
        positions = (timesteps == int(start_step)).nonzero() if start_step is not None else []
        if start_step is None or len(positions) == 0:
            raise ValueError(f"Expected `start_step` to be a timestep of the schedule, but got {start_step}")
        first = int(positions[0])
        x = start.to(device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        scale = _model_input_scale(scheduler, schedule[first])
        if scale is not None:  # the recorded x_t is the network's input: back to the scheduler's sample
            x = x / scale.to(device=device, dtype=x.dtype)
    step_kwargs = _step_kwargs(scheduler, generators)
    rec_t, rec_x, rec_x0 = [], [], []
    for i in range(first, len(timesteps)):
        t, t_native = timesteps[i], schedule[i]
        t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        x_in = scheduler.scale_model_input(x, t_native)
        out = predict_noise(x_in, t_batch)
        if record and (wanted is None or int(t) in wanted):
            rec_t.append(int(t))
            rec_x.append(x_in.cpu())
            rec_x0.append(task.split(out, x_in, t_batch)[1].cpu())
        x = scheduler.step(out, t_native, x, **step_kwargs).prev_sample
    result = SampleResult(images=x.cpu(), seeds=torch.as_tensor(list(seeds), dtype=torch.long),
                          timesteps=torch.as_tensor(rec_t, dtype=torch.long))
    if record:
        result.x_t = torch.stack(rec_x, dim=1)
        result.x0_hat = torch.stack(rec_x0, dim=1)
    return result
