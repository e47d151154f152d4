"""Targets: recorded denoising trajectories, saved one file per target.

A target is what gets attributed: the seed that reproduces its sampling, the latent ``x_t`` and the
one-step estimate ``x0_hat_t`` at the recorded steps, the final image, the conditioning (and its
prompt) when there is one. A real image can be a target too: it is noised to each step ``t`` with
noise drawn from a recorded seed, and the model's ``x0_hat_t`` is computed from that ``x_t``.

Files: ``<folder>/target_0000.pt`` ... (``torch.save`` of a plain dict, fast to load) and
``<folder>/targets.json`` (an index: ids, seeds, steps, sources), each written atomically.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .diffusion import add_noise
from .sampling import SampleResult, ddpm_sample
from .task import DiffusionTask
from .seeding import cpu_generator
from .atomic import atomic_torch_save, atomic_write_json

_REAL_NOISE_STREAM = 31


@dataclass
class Trajectory:
    """One target. Shapes: ``timesteps (S,)``, ``x_t`` and ``x0_hat`` ``(S, C, H, W)``, ``final (C, H, W)``,
    ``cond`` None or ``(L, D)``; ``source`` is "sampled" or "real:<global index>". For a latent model
    ``x_t``, ``x0_hat`` and ``final`` are latents and ``x0_hat_image`` ``(S, C', H', W')`` and
    ``final_image`` hold their decoded pictures (``pictures()`` returns whichever a person looks at)."""

    target_id: int
    seed: int
    timesteps: Tensor
    x_t: Tensor
    x0_hat: Tensor
    final: Tensor
    source: str = "sampled"
    cond: Optional[Tensor] = None
    prompt: Optional[str] = None
    info: dict = field(default_factory=dict)
    x0_hat_image: Optional[Tensor] = None
    final_image: Optional[Tensor] = None

    def pictures(self) -> tuple[Tensor, Tensor]:
        """``(x0_hat pictures (S, C, H, W), final picture (C, H, W))`` in [-1, 1]: decoded when latent."""
        return (self.x0_hat if self.x0_hat_image is None else self.x0_hat_image,
                self.final if self.final_image is None else self.final_image)

    def position(self, t: int) -> int:
        """Where recorded timestep ``t`` is in ``timesteps`` (error if ``t`` was not recorded)."""
        found = (self.timesteps == int(t)).nonzero()
        if len(found) == 0:
            raise ValueError(f"Expected a timestep recorded in target {self.target_id} "
                             f"({self.timesteps.tolist()}), but got {int(t)}")
        return int(found[0])

    def save(self, path: str | Path) -> None:
        """``torch.save`` through a temp file and ``os.replace``."""
        atomic_torch_save(asdict(self), path)

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        return cls(**torch.load(path, map_location="cpu", weights_only=False))

    def summary(self) -> dict:
        return {"target_id": self.target_id, "seed": self.seed, "source": self.source, "prompt": self.prompt,
                "timesteps": [int(t) for t in self.timesteps], "file": target_file_name(self.target_id)}


def target_file_name(target_id: int) -> str:
    return f"target_{int(target_id):04d}.pt"


def from_samples(result: SampleResult, first_id: int = 0, cond: Optional[Tensor] = None,
                 prompts: Optional[Sequence[str]] = None, info: Optional[dict] = None) -> list[Trajectory]:
    """Split a recorded ``SampleResult`` into one ``Trajectory`` per sample (ids ``first_id, first_id + 1, ...``)."""
    if result.x_t is None:
        raise ValueError("Expected a SampleResult recorded with `record=True`, but it holds no trajectory")
    return [Trajectory(target_id=first_id + i, seed=int(result.seeds[i]), timesteps=result.timesteps.clone(),
                       x_t=result.x_t[i].clone(), x0_hat=result.x0_hat[i].clone(), final=result.images[i].clone(),
                       cond=None if cond is None else cond[i].detach().cpu(),
                       prompt=None if prompts is None else prompts[i], info=dict(info or {}))
            for i in range(len(result.seeds))]


def sample_targets(predict: Callable[[Tensor, Tensor], Tensor], scheduler, sample_shape: Sequence[int],
                   seeds: Sequence[int], record_steps: Optional[Sequence[int]] = None,
                   num_inference_steps: Optional[int] = None, cond: Optional[Tensor] = None,
                   prompts: Optional[Sequence[str]] = None, info: Optional[dict] = None, first_id: int = 0,
                   device: torch.device | str = "cpu") -> list[Trajectory]:
    """Targets from any model: sample ``len(seeds)`` trajectories and record them (the helper for your own loop).

    Args:
        predict: ``(x_t (B, C, H, W), t (B,) long) -> the network output`` in the scheduler's ``prediction_type``
            (for a conditional model, close over the rows' conditioning, e.g. ``lambda x, t: task.model_output(
            net, x, t, cond)``; guidance, if any, goes in there too).
        scheduler: any diffusers scheduler (see :func:`attribution.sampling.ddpm_sample`); for a model known only
            through its :class:`~attribution.task.DiffusionTask`, :func:`attribution.sampling.scheduler_from_task`.
        sample_shape: ``(C, H, W)`` of what the denoiser works on (latents for an LDM).
        seeds: one seed per target; target ``first_id + i`` is sampled from ``seeds[i]``.
        record_steps: the timesteps to record (None: every step).
        cond: ``(B, L, D)`` conditioning stored with the targets (scoring attributes with it), or None.
        prompts, info: stored with the targets (``info``: e.g. the checkpoint and its data identity).

    Returns:
        One :class:`Trajectory` per seed; :func:`save_targets` writes them for ``cli.py score``.
    """
    result = ddpm_sample(predict, scheduler, sample_shape, seeds, num_inference_steps=num_inference_steps,
                         record=True, record_steps=record_steps, device=device)
    return from_samples(result, first_id=first_id, cond=cond, prompts=prompts, info=info)


@torch.no_grad()
def real_image_target(predict_noise: Callable[[Tensor, Tensor], Tensor], task: DiffusionTask | Tensor, image: Tensor,
                      steps: Sequence[int], seed: int, target_id: int, index: Optional[int] = None,
                      cond: Optional[Tensor] = None, info: Optional[dict] = None) -> Trajectory:
    """Attribute an existing picture: noise ``image (C,H,W)`` to each step with noise from ``(seed, t)``.

    ``predict_noise(x_t (S,C,H,W), t (S,))`` is the model (its raw output, in ``task.prediction_type``);
    ``x0_hat_t`` is its one-step estimate (:meth:`~attribution.task.DiffusionTask.split`). ``task`` is the
    model's :class:`~attribution.task.DiffusionTask`; an ``alphas_cumprod (T,)`` tensor stands for an
    epsilon-prediction task on that schedule.
    """
    if isinstance(task, Tensor):
        task = DiffusionTask(task)
    t = torch.as_tensor(list(steps), dtype=torch.long)
    noise = torch.stack([torch.randn(image.shape, generator=cpu_generator(seed, _REAL_NOISE_STREAM, int(s)))
                         for s in t]).to(image.device, image.dtype)
    abar = task.alphas_cumprod.to(image.device)
    x_t = add_noise(image.unsqueeze(0).expand_as(noise), noise, t.to(image.device), abar)
    estimate = task.split(predict_noise(x_t, t.to(image.device)), x_t, t.to(image.device))[1]
    return Trajectory(target_id=target_id, seed=seed, timesteps=t, x_t=x_t.cpu(), x0_hat=estimate.cpu(),
                      final=image.cpu(), source="real" if index is None else f"real:{int(index)}",
                      cond=None if cond is None else cond.cpu(), info=dict(info or {}))


def recorded_at(targets: Sequence[Trajectory], steps: Sequence[int], name: str = "x_t") -> Tensor:
    """``(B, S, ...)`` the recorded ``name`` ("x_t" or "x0_hat") of every target at timesteps ``steps``."""
    return torch.stack([getattr(traj, name)[[traj.position(t) for t in steps]] for traj in targets])


def save_targets(trajectories: Sequence[Trajectory], folder: str | Path) -> Path:
    """Write every trajectory and (re)write the folder's ``targets.json`` index; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = _read_index(folder)
    for traj in trajectories:
        traj.save(folder / target_file_name(traj.target_id))
        index[str(traj.target_id)] = traj.summary()
    atomic_write_json(folder / "targets.json", {"targets": [index[k] for k in sorted(index, key=int)]})
    return folder


def _read_index(folder: Path) -> dict:
    path = folder / "targets.json"
    if not path.exists():
        return {}
    return {str(t["target_id"]): t for t in json.loads(path.read_text())["targets"]}


def load_targets(folder: str | Path, target_ids: Optional[Sequence[int]] = None) -> list[Trajectory]:
    """Load the targets listed in ``<folder>/targets.json`` (optionally only ``target_ids``)."""
    folder = Path(folder)
    index = _read_index(folder)
    if not index:
        raise FileNotFoundError(f"Expected recorded targets in `targets` folder {str(folder)!r} (a targets.json "
                                f"written by `cli.py sample`), but found none")
    ids = sorted(int(k) for k in index) if target_ids is None else [int(i) for i in target_ids]
    missing = [i for i in ids if str(i) not in index]
    if missing:
        raise KeyError(f"Expected target ids among {sorted(int(k) for k in index)}, but got {missing}")
    return [Trajectory.load(folder / index[str(i)]["file"]) for i in ids]
