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
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from attribution import class_fraction, classifier_features, fid_from_features
from attribution.atomic import atomic_save_npy
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


def noise_fn(module, use_ema: bool) -> Callable:
    model = module.attribution_denoiser(use_ema).eval()
    return lambda x, t: model(x, t).sample


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
    orig = noise_fn(original, plan.use_ema)
    reference = {}
    rows = []
    for job in jobs:
        info, record = job.info, done_record(job.folder)
        if record is None:
            continue
        traj, t = targets[info["target_index"]], info["step"]
        retrained = noise_fn(load_diffusion_module(record["checkpoint"]), plan.use_ema)
        row = {"method": info["method"], "k": info["k"], "step": t, "target_id": info["target_id"]}
        if t == plan.cf_step:
            x_t = traj.x_t[traj.position(t)]
            key = (traj.target_id, t)
            if key not in reference:
                reference[key] = completions(orig, scheduler, x_t, t, plan.num_completions, num_inference_steps)
            mixed = completions(switching_denoiser(orig, retrained, t, plan.cf_delta), scheduler, x_t, t,
                                plan.num_completions, num_inference_steps)
            row["fid"] = fid_from_features(classifier_features(classifier, mixed),
                                           classifier_features(classifier, reference[key]))
            row["completion_l2"] = float(l2(mixed, reference[key]).mean())
        if t == plan.forget_step:
            regen = regenerate(retrained, scheduler, traj.final.shape, [traj.seed], num_inference_steps)
            row["forgetting_l2"] = float(l2(regen, traj.final.unsqueeze(0))[0])
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
    finals = torch.stack([t.final for t in targets])
    seeds = [t.seed for t in targets]
    unrelated = torch.cdist(finals.flatten(1), finals.flatten(1))
    off = unrelated[~torch.eye(len(targets), dtype=torch.bool)]
    rows = []
    for job in jobs:
        record = done_record(job.folder)
        if record is None:
            continue
        other = noise_fn(load_diffusion_module(record["checkpoint"]), plan.use_ema)
        regen = regenerate(other, original.noise_scheduler, finals.shape[1:], seeds, num_inference_steps)
        mean, se, n = nan_mean_se(l2(regen, finals))
        rows.append({"model": job.name, "l2_same_seed_mean": float(mean), "l2_same_seed_se": float(se),
                     "l2_unrelated_mean": float(off.mean()) if off.numel() else math.nan, "n_targets": int(n)})
    return rows


def feature_formation(plan: LDSPlan, targets: Sequence[Trajectory], steps: Sequence[int], original, classifier,
                      num_inference_steps: Optional[int]) -> torch.Tensor:
    """``(B, S)`` fraction of completions from x_t (original model) in the class of the target's final image."""
    orig = noise_fn(original, plan.use_ema)
    with torch.no_grad():
        final_class = classifier(torch.stack([t.final for t in targets])).argmax(1).tolist()
    out = torch.full((len(targets), len(steps)), math.nan)
    for s, t in enumerate(steps):
        for b, traj in enumerate(targets):
            x_t = traj.x_t[traj.position(t)]
            images = completions(orig, original.noise_scheduler, x_t, t, plan.num_completions, num_inference_steps)
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
