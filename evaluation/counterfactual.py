"""Counterfactuals: retrain without the top-k of each method, completions, forgetting, seed consistency,
feature formation.

* Retraining: for a target at step t (``plan.cf_step``), the k highest-scoring examples of a method
  (scores at the held-out lambda, from ``lds_report``) are dropped; the model is retrained with the
  same fit, seed and data order as the full model (the training sweep's ``FitJob``, resumable).
* Completions: from the recorded x_t, the retrained model denoises timesteps in (t - Delta, t] and the
  original model every other step (``completion_sample``); the same completion seeds with the original
  model only are the reference. FID on the offline classifier's features and the mean L2 between
  paired completions.
* Forgetting (step ``plan.forget_step``): the retrained model regenerates the target from its seed
  (same initial noise and noise sequence); L2 to the original sample.
* Seed consistency: full-data models with other seeds regenerate every target; L2 to the original,
  beside the mean L2 between different targets' samples (the scale of "unrelated").
* Feature formation: completions from x_t at each recorded step with the original model; the fraction
  the classifier puts in the final image's class.

Every model is called through its task (``attribution_task().model_output``: the raw output in the
scheduler's parameterization, so a v-prediction model steps right) and conditioned as the targets were
sampled (their token states, the recorded guidance scale, the module's empty caption as the unconditional
states). For a latent model, completions and regenerations are decoded (``module.decode``) before the
classifier, FID and L2 see them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from attribution import class_fraction, classifier_features, fid_from_features
from attribution.atomic import atomic_save_npy
from attribution.ema import resolve_denoiser
from attribution.lds import nan_mean_se, write_table
from attribution.plots import plot_counterfactual_bars, plot_feature_formation
from attribution.sampling import ddpm_sample
from attribution.trajectory import Trajectory
from evaluation.plan import LDSPlan
from evaluation.sweep import FitJob, done_record
from lightning_modules.loading import load_diffusion_module

COMPLETION_SEED = 1_000_000


def switching_denoiser(original: Callable, retrained: Callable, t: int, delta: int) -> Callable:
    """eps(x, t_batch) from ``retrained`` for timesteps in ``(t - delta, t]``, from ``original`` elsewhere."""
    def predict(x: torch.Tensor, t_batch: torch.Tensor) -> torch.Tensor:
        current = int(t_batch[0])
        return (retrained if t - delta < current <= t else original)(x, t_batch)
    return predict


def noise_fn(module, use_ema: Optional[bool], cond: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0) -> Callable:
    """The sampler's model function of ``module``: its task's raw output (the scheduler's parameterization: eps,
    v or x0), with the network ``use_ema`` selects (None: EMA when kept), conditioned like the module samples.

    Args:
        cond: ``None`` (unconditional), ``(L, D)`` (one target's token states, for every row) or ``(B, L, D)``
            (row i conditioned on ``cond[i]``).
        guidance_scale: classifier-free guidance ``out_u + w (out_c - out_u)`` with the module's empty-caption
            states as the unconditional ones (``module.encode_text([""])``), batched as ``LDMModule.guided_noise``.
    """
    task, model = module.attribution_task(), resolve_denoiser(module, use_ema).model.eval()
    if cond is None:
        return lambda x, t: task.model_output(model, x, t)
    uncond = module.encode_text([""]) if guidance_scale != 1.0 else None

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = (cond.unsqueeze(0).expand(len(x), *cond.shape) if cond.ndim == 2 else cond[: len(x)]).to(x.device)
        if uncond is None:
            return task.model_output(model, x, t, c)
        u = uncond.to(device=x.device, dtype=c.dtype).expand_as(c)
        out_u, out_c = task.model_output(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, c])).chunk(2)
        return out_u + guidance_scale * (out_c - out_u)
    return predict


def target_noise_fn(module, use_ema: Optional[bool], targets: Sequence[Trajectory]) -> Callable:
    """:func:`noise_fn` conditioned as ``targets`` were sampled: their conditioning (row i: ``targets[i]``; one
    target: every row) and the guidance recorded in their info (1: none)."""
    conds = [t.cond for t in targets]
    if any(c is None for c in conds):
        if any(c is not None for c in conds):
            raise ValueError("Expected every target or none to carry conditioning, but got a mix")
        return noise_fn(module, use_ema)
    scales = {float(t.info.get("guidance_scale", 1.0)) for t in targets}
    if len(scales) != 1:
        raise ValueError(f"Expected the targets sampled with one guidance scale, but got {sorted(scales)}")
    cond = conds[0] if len(conds) == 1 else torch.stack(conds)
    return noise_fn(module, use_ema, cond, scales.pop())


def pictures(module, samples: torch.Tensor) -> torch.Tensor:
    """What a person (and the classifier) looks at: decoded pictures for a latent model, else ``samples``."""
    decode = getattr(module, "decode", None)
    return decode(samples) if callable(decode) else samples


def _check_same_kind(original, other, name: str) -> None:
    a, b = original.attribution_task(), other.attribution_task()
    if (a.prediction_type, a.num_train_timesteps) != (b.prediction_type, b.num_train_timesteps):
        raise ValueError(f"Expected the retrained model {name} to predict like the original "
                         f"({a.prediction_type}, T = {a.num_train_timesteps}), but it has "
                         f"({b.prediction_type}, T = {b.num_train_timesteps})")


def completions(predict: Callable, scheduler, x_t: torch.Tensor, t: int, n: int, num_inference_steps: Optional[int],
                first_seed: int = COMPLETION_SEED) -> torch.Tensor:
    """``(n, C, H, W)`` completions from one recorded ``x_t (C, H, W)`` at timestep ``t``, seeds first_seed + i."""
    start = x_t.unsqueeze(0).expand(n, *x_t.shape).clone()
    return ddpm_sample(predict, scheduler, x_t.shape, list(range(first_seed, first_seed + n)),
                       num_inference_steps=num_inference_steps, start=start, start_step=t).images


def regenerate(predict: Callable, scheduler, shape, seeds: Sequence[int], num_inference_steps: Optional[int]) -> torch.Tensor:
    return ddpm_sample(predict, scheduler, shape, list(seeds), num_inference_steps=num_inference_steps).images


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row L2 distance of flattened images."""
    return (a - b).reshape(a.shape[0], -1).norm(dim=1)


# ----------------------------------------------------------------------------- retraining jobs
def removal_jobs(plan: LDSPlan, scores: dict, targets: Sequence[Trajectory], steps: Sequence[int],
                 report: Sequence[int], num_examples: int) -> list[FitJob]:
    """One retraining job per (step, method, k, target): the full data minus that method's top-k."""
    root = Path(plan.out_dir) / "counterfactual"
    jobs = []
    for t in sorted({plan.cf_step, plan.forget_step}):
        if t not in steps:
            raise ValueError(f"Expected `plan.cf_step` / `plan.forget_step` among the evaluated steps {list(steps)}, "
                             f"but got {t}")
        s = list(steps).index(t)
        for b in list(report)[: plan.cf_targets]:
            tid = targets[b].target_id
            for method in plan.cf_methods:
                for k in plan.cf_ks:
                    if not 0 < k < num_examples:
                        raise ValueError(f"Expected `plan.cf_ks` in (0, N = {num_examples}), but got {k}")
                    name = f"t{t:04d}_target{tid:04d}_{method}_k{k}"
                    keep = np.ones(num_examples, dtype=bool)
                    keep[torch.topk(scores[method][:, b, s], k).indices.numpy()] = False
                    mask_file = root / "masks" / f"{name}.npy"
                    if not mask_file.exists():
                        atomic_save_npy(mask_file, keep)
                    jobs.append(FitJob(name, mask_file, plan.seed, root / "models" / name,
                                       {"step": t, "target_id": tid, "target_index": int(b), "method": method, "k": k}))
    return jobs


def consistency_jobs(plan: LDSPlan) -> list[FitJob]:
    root = Path(plan.out_dir) / "counterfactual" / "models"
    return [FitJob(f"full_seed{plan.seed + 1 + c}", None, plan.seed + 1 + c, root / f"full_seed{plan.seed + 1 + c}",
                   {"consistency": c}) for c in range(plan.consistency_seeds)]


# ----------------------------------------------------------------------------- measurements
def measure_removals(plan: LDSPlan, jobs: Sequence[FitJob], targets: Sequence[Trajectory], original, classifier,
                     num_inference_steps: Optional[int]) -> list[dict]:
    """Per job: FID and mean L2 of completions (at cf_step) and/or forgetting L2 (at forget_step)."""
    scheduler = original.noise_scheduler
    reference = {}
    rows = []
    for job in jobs:
        info, record = job.info, done_record(job.folder)
        if record is None:
            continue
        traj, t = targets[info["target_index"]], info["step"]
        other = load_diffusion_module(record["checkpoint"])
        _check_same_kind(original, other, job.name)
        orig, retrained = (target_noise_fn(m, plan.use_ema, [traj]) for m in (original, other))
        row = {"method": info["method"], "k": info["k"], "step": t, "target_id": info["target_id"]}
        if t == plan.cf_step:
            x_t = traj.x_t[traj.position(t)]
            key = (traj.target_id, t)
            if key not in reference:
                reference[key] = pictures(original, completions(orig, scheduler, x_t, t, plan.num_completions,
                                                                num_inference_steps))
            mixed = pictures(original, completions(switching_denoiser(orig, retrained, t, plan.cf_delta), scheduler,
                                                   x_t, t, plan.num_completions, num_inference_steps))
            row["fid"] = fid_from_features(classifier_features(classifier, mixed),
                                           classifier_features(classifier, reference[key]))
            row["completion_l2"] = float(l2(mixed, reference[key]).mean())
        if t == plan.forget_step:
            regen = pictures(other, regenerate(retrained, scheduler, traj.final.shape, [traj.seed],
                                               num_inference_steps))
            row["forgetting_l2"] = float(l2(regen, traj.pictures()[1].unsqueeze(0))[0])
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict], metrics=("fid", "completion_l2", "forgetting_l2")) -> list[dict]:
    """Mean and s.e. over targets per (metric, method, k)."""
    out = []
    for metric in metrics:
        groups: dict = {}
        for r in rows:
            if metric in r:
                groups.setdefault((r["method"], r["k"], r["step"]), []).append(r[metric])
        for (method, k, t), values in groups.items():
            mean, se, n = nan_mean_se(torch.tensor(values, dtype=torch.float64))
            out.append({"metric": metric, "method": method, "k": k, "step": t, "value": float(mean),
                        "se": float(se), "n_targets": int(n)})
    return out


def seed_consistency(plan: LDSPlan, jobs: Sequence[FitJob], targets: Sequence[Trajectory], original,
                     num_inference_steps: Optional[int]) -> list[dict]:
    """L2 between a target regenerated by an independently trained model and the original sample."""
    finals = torch.stack([t.pictures()[1] for t in targets])
    shape = targets[0].final.shape
    seeds = [t.seed for t in targets]
    unrelated = torch.cdist(finals.flatten(1), finals.flatten(1))
    off = unrelated[~torch.eye(len(targets), dtype=torch.bool)]
    rows = []
    for job in jobs:
        record = done_record(job.folder)
        if record is None:
            continue
        module = load_diffusion_module(record["checkpoint"])
        _check_same_kind(original, module, job.name)
        regen = pictures(module, regenerate(target_noise_fn(module, plan.use_ema, targets), original.noise_scheduler,
                                            shape, seeds, num_inference_steps))
        mean, se, n = nan_mean_se(l2(regen, finals))
        rows.append({"model": job.name, "l2_same_seed_mean": float(mean), "l2_same_seed_se": float(se),
                     "l2_unrelated_mean": float(off.mean()) if off.numel() else math.nan, "n_targets": int(n)})
    return rows


def feature_formation(plan: LDSPlan, targets: Sequence[Trajectory], steps: Sequence[int], original, classifier,
                      num_inference_steps: Optional[int]) -> torch.Tensor:
    """``(B, S)`` fraction of completions from x_t (original model) in the class of the target's final image."""
    with torch.no_grad():
        final_class = classifier(torch.stack([t.pictures()[1] for t in targets])).argmax(1).tolist()
    out = torch.full((len(targets), len(steps)), math.nan)
    for s, t in enumerate(steps):
        for b, traj in enumerate(targets):
            x_t = traj.x_t[traj.position(t)]
            orig = target_noise_fn(original, plan.use_ema, [traj])
            images = pictures(original, completions(orig, original.noise_scheduler, x_t, t, plan.num_completions,
                                                    num_inference_steps))
            out[b, s] = class_fraction(classifier, images, int(final_class[b]))
    return out


def write_counterfactual(out: Path, rows, summary, consistency_rows, formation, steps, targets) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("per_target", rows), ("counterfactual", summary), ("seed_consistency", consistency_rows)):
        if table:
            write_table(table, out / f"{name}.csv", out / f"{name}.json")
    for metric in ("fid", "completion_l2", "forgetting_l2"):
        bars = [r for r in summary if r["metric"] == metric]
        if bars:
            plot_counterfactual_bars(bars, out / f"{metric}.png", metric=metric)
    formation_rows = [{"target_id": t.target_id, "step": int(s), "fraction_in_final_class": float(formation[b, i])}
                      for b, t in enumerate(targets) for i, s in enumerate(steps)]
    write_table(formation_rows, out / "feature_formation.csv", out / "feature_formation.json")
    plot_feature_formation(steps, formation, out / "feature_formation.png",
                           labels=[f"target {t.target_id}" for t in targets])
