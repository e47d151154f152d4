"""Actual step outputs of the subset models: ``f_t(x0_hat_t(full model), theta(S_j))`` per target and step.

``x0_hat_t`` is the recorded trajectory's estimate (made by the full model) and stays fixed; the
output is the same :class:`attribution.StepOutput` as on the scoring side (Eq. 3: K' draws seeded by
(draw_seed, target id, t)), evaluated without gradients. Each model's ``(B, S)`` outputs are cached
in its folder under a key of the settings, so a rerun (or a new model) only computes what is missing.
The models are evaluated through the plan's launcher like the fits (:func:`evaluate_outputs`: this process,
local submitit workers, or a SLURM job array), each claimed first so no two workers evaluate one model.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from attribution import StepOutput
from attribution.ema import resolve_denoiser
from attribution.atomic import atomic_torch_save
from attribution.trajectory import Trajectory, recorded_at
from evaluation.plan import LDSPlan, settings_hash
from evaluation.sweep import ModelTask, done_record, run_tasks


def evaluated_steps(targets: Sequence[Trajectory], steps: Optional[Sequence[int]]) -> list[int]:
    """The evaluated timesteps: ``steps`` (each recorded in every target) or the first target's recorded steps."""
    recorded = [int(t) for t in targets[0].timesteps]
    for traj in targets[1:]:
        if [int(t) for t in traj.timesteps] != recorded:
            raise ValueError(f"Expected every target recorded at the same steps, but target {traj.target_id} has "
                             f"{traj.timesteps.tolist()} and target {targets[0].target_id} has {recorded}")
    wanted = recorded if steps is None else [int(t) for t in steps]
    missing = sorted(set(wanted) - set(recorded))
    if missing:
        raise ValueError(f"Expected `plan.steps` among the recorded steps {recorded}, but got {missing}")
    return wanted


@torch.no_grad()
def step_outputs(module, targets: Sequence[Trajectory], steps: Sequence[int], plan: LDSPlan,
                 kind: str = "loss") -> torch.Tensor:
    """``(B, S)`` float64 step outputs f_t(x0_hat_t) of ``module`` (no gradients)."""
    task, model = module.attribution_task(), resolve_denoiser(module, plan.use_ema).model.eval()
    device = next(model.parameters()).device
    output = StepOutput(plan.num_draws, plan.draw_seed, kind=kind, share_noise=plan.share_noise)
    x0 = recorded_at(targets, steps, "x0_hat").to(device)
    B, S = x0.shape[:2]
    keys = torch.tensor([t.target_id for t in targets]).repeat_interleave(S)
    t = torch.tensor(list(steps)).repeat(B)
    flat = x0.reshape(B * S, *x0.shape[2:])
    draws = output.draws(keys, flat.shape[1:], t, num_train_timesteps=task.num_train_timesteps, device=device,
                         dtype=flat.dtype)
    conds = [None if t.cond is None else t.cond.to(device) for t in targets]  # a text-conditional model's prompt
    values = [output.per_example(task, model, flat[i], draws.select(i), conds[i // S]) for i in range(B * S)]
    return torch.stack(values).to(torch.float64).reshape(B, S).cpu()


def model_outputs(folder: Path, targets: Sequence[Trajectory], steps: Sequence[int], plan: LDSPlan) -> tuple[torch.Tensor, bool]:
    """Outputs of the finished model in ``folder``, from its cache when present; returns (values, computed)."""
    cache = Path(folder) / f"outputs_{output_key(plan, targets, steps)}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)["outputs"], False
    from lightning_modules.loading import load_diffusion_module  # here: a launcher's worker imports this module

    record = done_record(folder)
    module = load_diffusion_module(record["checkpoint"])
    values = step_outputs(module, targets, steps, plan)
    atomic_torch_save({"outputs": values, "settings": plan.output_settings(), "steps": list(steps),
                       "target_ids": [t.target_id for t in targets], "checkpoint": record["checkpoint"]}, cache)
    return values, True


def output_key(plan: LDSPlan, targets: Sequence[Trajectory], steps: Sequence[int]) -> str:
    """The cache key of a model's outputs (settings, steps, target ids): ``outputs_<key>.pt`` in its folder."""
    return settings_hash({**plan.output_settings(), "steps": list(steps), "targets_ids": [t.target_id for t in targets]})


def output_jobs(plan: LDSPlan, targets: Sequence[Trajectory], steps: Sequence[int],
                mask_range: Optional[range] = None) -> list[ModelTask]:
    """One task per finished subset model in ``mask_range`` (all masks by default) whose outputs are not cached:
    its result is the cache file, its claim ``<cache>.claim``."""
    key = output_key(plan, targets, steps)
    jobs = []
    for j in mask_range or range(plan.num_masks):
        for r in range(plan.seeds_for(j)):
            folder = plan.model_dir(j, r)
            if done_record(folder) is not None:
                cache = folder / f"outputs_{key}.pt"
                jobs.append(ModelTask(folder.name, folder, cache, cache.with_suffix(".claim")))
    return [job for job in jobs if not job.done]


EvaluateFn = Callable[[ModelTask, LDSPlan, Sequence[Trajectory], Sequence[int]], None]
"""Evaluates one claimed model and writes its cache file (default :func:`evaluate_model`)."""


def evaluate_model(job: ModelTask, plan: LDSPlan, targets: Sequence[Trajectory], steps: Sequence[int]) -> None:
    model_outputs(job.folder, targets, steps, plan)


def evaluate_outputs(plan: LDSPlan, targets: Sequence[Trajectory], steps: Sequence[int],
                     mask_range: Optional[range] = None, progress: bool = True,
                     evaluate: Optional[EvaluateFn] = None) -> dict:
    """Evaluate the outputs of every finished, uncached subset model through ``plan.launcher``
    (:func:`evaluation.sweep.run_tasks`: this process, local submitit workers, or one SLURM array task per
    model, which submits and returns). Returns ``{"evaluated": names evaluated by this call, "submitted": n}``."""
    fn = partial(evaluate or evaluate_model, plan=plan, targets=list(targets), steps=list(steps))
    result = run_tasks(output_jobs(plan, targets, steps, mask_range), plan, fn, "outputs", progress)
    return {"evaluated": result["done"], "submitted": result["submitted"]}


def collect_outputs(plan: LDSPlan, targets: Sequence[Trajectory], steps: Sequence[int],
                    mask_range: Optional[range] = None) -> dict:
    """Outputs of every finished subset model: ``replicates (R_max, J, B, S)`` (NaN = not trained).

    Returns ``{"replicates", "computed": models evaluated now, "cached": models read from cache}``.
    """
    masks = mask_range or range(plan.num_masks)
    R = max(plan.seeds_for(j) for j in range(plan.num_masks))
    out = torch.full((R, plan.num_masks, len(targets), len(steps)), math.nan, dtype=torch.float64)
    computed = cached = 0
    for j in masks:
        for r in range(plan.seeds_for(j)):
            folder = plan.model_dir(j, r)
            if done_record(folder) is None:
                continue
            out[r, j], fresh = model_outputs(folder, targets, steps, plan)
            computed, cached = computed + fresh, cached + (not fresh)
    return {"replicates": out, "computed": computed, "cached": cached}


def averaged_outputs(plan: LDSPlan, replicates: torch.Tensor) -> torch.Tensor:
    """``(J, B, S)``: the mean over the first ``seeds_per_mask`` seeds of each mask (NaN if one is missing)."""
    return replicates[: plan.seeds_per_mask].mean(0)


def replicate_block(plan: LDSPlan, replicates: torch.Tensor) -> Optional[torch.Tensor]:
    """``(R, J_rep, B, S)`` outputs of the masks trained with several seeds (for the ceiling), or None.

    With ``share_seed`` the seed effect common to every mask (same init, same data order) does not
    change the ranking across masks; it is removed (each seed's mean over masks subtracted) so that
    the ceiling measures only the noise that does.
    """
    if plan.seeds_per_mask >= 2:
        R, masks = plan.seeds_per_mask, list(range(plan.num_masks))
    else:
        R, masks = plan.replicate_seeds, list(range(plan.replicate_masks))
    if len(masks) < 3:
        return None
    block = replicates[:R, masks]
    complete = torch.isfinite(block).all(0).all(-1).all(-1)
    block = block[:, complete]
    if block.shape[1] < 3:
        return None
    if plan.share_seed:
        block = block - block.mean(1, keepdim=True)
    return block
