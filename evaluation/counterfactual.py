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

Progress and resuming: every long phase shows a progress bar (retrained models, removal models, seed
consistency, feature formation). With a :class:`~evaluation.results.ResultCache` each result (one removal
model's row, one consistency model's row, one (target, step) of feature formation, and the reference completions
of a target) is written as it finishes, keyed by everything it depends on (model folder and training record,
target and step, k, method, num_completions, cf_delta, seeds, sampler steps, the original model's and the
classifier's weights); a rerun reads the finished ones instead of measuring them again.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from attribution import class_fraction, classifier_features, fid_from_features
from attribution.atomic import atomic_save_npy
from attribution.ema import resolve_denoiser
from attribution.identity import tensors_hash
from attribution.lds import nan_mean_se, write_table
from attribution.plots import plot_counterfactual_bars, plot_feature_formation
from attribution.sampling import ddpm_sample
from attribution.trajectory import Trajectory
from evaluation.plan import LDSPlan
from evaluation.results import ResultCache
from evaluation.sweep import FitJob, done_record, run_jobs
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


# ----------------------------------------------------------------------------- result keys
def _file_stamp(path) -> dict:
    """A file's identity without reading it: resolved path, size and modification time."""
    path = Path(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def model_key(job: FitJob, record: dict) -> dict:
    """A retrained model: its folder, its training record (``done.json``) and its checkpoint file."""
    return {"folder": str(Path(job.folder).resolve()), "done": record, "checkpoint": _file_stamp(record["checkpoint"])}


def target_key(traj: Trajectory, t: Optional[int] = None) -> dict:
    """A target: id, seed, guidance and the hash of what a result reads of it (x_t at ``t``, final, conditioning)."""
    tensors = [("final", traj.pictures()[1]), ("final_sample", traj.final)]
    if t is not None:
        tensors.append(("x_t", traj.x_t[traj.position(t)]))
    if traj.cond is not None:
        tensors.append(("cond", traj.cond))
    return {"target_id": int(traj.target_id), "seed": int(traj.seed), "step": t,
            "guidance_scale": float(traj.info.get("guidance_scale", 1.0)), "tensors": tensors_hash(tensors)}


def measurement_key(plan: LDSPlan, original, classifier, num_inference_steps: Optional[int]) -> dict:
    """What every measurement shares: the original model's and the classifier's weights, the sampler settings, the
    completions (count and seeds)."""
    return {"original": tensors_hash(original.state_dict().items()),
            "classifier": None if classifier is None else tensors_hash(classifier.state_dict().items()),
            "num_inference_steps": num_inference_steps, "use_ema": plan.use_ema,
            "num_completions": plan.num_completions, "completion_seeds": [COMPLETION_SEED, plan.num_completions]}


def _bar(items, desc: str, unit: str, progress: bool):
    return tqdm(items, desc=f"counterfactual: {desc}", unit=unit, disable=not progress, dynamic_ncols=True)


# ----------------------------------------------------------------------------- retraining with progress
def retrain(jobs: Sequence[FitJob], plan: LDSPlan, max_models: Optional[int] = None, train=None,
            progress: bool = True, poll_s: float = 2.0) -> list[dict]:
    """:func:`evaluation.sweep.run_jobs` with a progress bar of the finished jobs (``done.json`` markers, polled
    every ``poll_s`` seconds: the same bar for in-process fits and for local workers)."""
    def finished() -> int:
        return sum(job.done for job in jobs)

    with tqdm(total=len(jobs), initial=finished(), desc="counterfactual: retrained models", unit="model",
              disable=not progress, dynamic_ncols=True) as bar:
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(poll_s):
                bar.update(finished() - bar.n)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            return run_jobs(jobs, plan, max_models, train)
        finally:
            stop.set()
            watcher.join()
            bar.update(finished() - bar.n)


# ----------------------------------------------------------------------------- measurements
def measure_removals(plan: LDSPlan, jobs: Sequence[FitJob], targets: Sequence[Trajectory], original, classifier,
                     num_inference_steps: Optional[int], results: Optional[ResultCache] = None,
                     progress: bool = True) -> list[dict]:
    """Per finished job: FID and mean L2 of completions (at cf_step) and/or forgetting L2 (at forget_step).

    Args:
        results: finished results (one file per job, keyed by :func:`model_key`, :func:`target_key`, step, k,
            method and the settings): read instead of measured; each new one is written as it finishes.
            None: nothing is stored.
        progress: a progress bar over the jobs.
    """
    results = ResultCache(None) if results is None else results
    shared = measurement_key(plan, original, classifier, num_inference_steps)
    finished = [(job, record) for job in jobs if (record := done_record(job.folder)) is not None]
    rows = []
    for job, record in _bar(finished, "removal models", "model", progress):
        info = job.info
        traj, t = targets[info["target_index"]], info["step"]
        key = {**shared, "model": model_key(job, record), "target": target_key(traj, t), "step": t, "k": info["k"],
               "method": info["method"], "cf_delta": plan.cf_delta, "completions": t == plan.cf_step,
               "forgetting": t == plan.forget_step}
        rows.append(results.row("removal", job.name, key, lambda: _measure_removal(
            plan, job, record, traj, t, original, classifier, num_inference_steps, results, shared)))
    return rows


def _measure_removal(plan: LDSPlan, job: FitJob, record: dict, traj: Trajectory, t: int, original, classifier,
                     num_inference_steps: Optional[int], results: ResultCache, shared: dict) -> dict:
    scheduler = original.noise_scheduler
    other = load_diffusion_module(record["checkpoint"])
    _check_same_kind(original, other, job.name)
    orig, retrained = (target_noise_fn(m, plan.use_ema, [traj]) for m in (original, other))
    info = job.info
    row = {"method": info["method"], "k": info["k"], "step": t, "target_id": info["target_id"]}
    if t == plan.cf_step:
        x_t = traj.x_t[traj.position(t)]
        reference = results.tensor(  # the original model's completions: shared by every model of this target
            "reference", f"t{t:04d}_target{traj.target_id:04d}",
            {**shared, "classifier": None, "target": target_key(traj, t)},
            lambda: pictures(original, completions(orig, scheduler, x_t, t, plan.num_completions, num_inference_steps)))
        mixed = pictures(original, completions(switching_denoiser(orig, retrained, t, plan.cf_delta), scheduler,
                                               x_t, t, plan.num_completions, num_inference_steps))
        row["fid"] = fid_from_features(classifier_features(classifier, mixed),
                                       classifier_features(classifier, reference))
        row["completion_l2"] = float(l2(mixed, reference).mean())
    if t == plan.forget_step:
        regen = pictures(other, regenerate(retrained, scheduler, traj.final.shape, [traj.seed], num_inference_steps))
        row["forgetting_l2"] = float(l2(regen, traj.pictures()[1].unsqueeze(0))[0])
    return row


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
                     num_inference_steps: Optional[int], results: Optional[ResultCache] = None,
                     progress: bool = True) -> list[dict]:
    """L2 between a target regenerated by an independently trained model and the original sample (one row, and
    with ``results`` one file, per finished model)."""
    results = ResultCache(None) if results is None else results
    finals = torch.stack([t.pictures()[1] for t in targets])
    shape = targets[0].final.shape
    seeds = [t.seed for t in targets]
    unrelated = torch.cdist(finals.flatten(1), finals.flatten(1))
    off = unrelated[~torch.eye(len(targets), dtype=torch.bool)]
    shared = {**measurement_key(plan, original, None, num_inference_steps), "num_completions": None,
              "completion_seeds": None, "targets": [target_key(t) for t in targets]}

    def measure(job: FitJob, record: dict) -> dict:
        module = load_diffusion_module(record["checkpoint"])
        _check_same_kind(original, module, job.name)
        regen = pictures(module, regenerate(target_noise_fn(module, plan.use_ema, targets), original.noise_scheduler,
                                            shape, seeds, num_inference_steps))
        mean, se, n = nan_mean_se(l2(regen, finals))
        return {"model": job.name, "l2_same_seed_mean": float(mean), "l2_same_seed_se": float(se),
                "l2_unrelated_mean": float(off.mean()) if off.numel() else math.nan, "n_targets": int(n)}

    finished = [(job, record) for job in jobs if (record := done_record(job.folder)) is not None]
    return [results.row("consistency", job.name, {**shared, "model": model_key(job, record)},
                        lambda: measure(job, record))
            for job, record in _bar(finished, "seed consistency", "model", progress)]


def check_formation_steps(targets: Sequence[Trajectory], steps: Sequence[int]) -> None:
    """Refuse feature-formation steps a target did not record, before any work."""
    for traj in targets:
        missing = [int(t) for t in steps if not bool((traj.timesteps == int(t)).any())]
        if missing:
            raise ValueError(f"Expected `plan.formation_steps` among the steps target {traj.target_id} recorded "
                             f"({traj.timesteps.tolist()}), but got {missing}")


def feature_formation(plan: LDSPlan, targets: Sequence[Trajectory], steps: Sequence[int], original, classifier,
                      num_inference_steps: Optional[int], results: Optional[ResultCache] = None,
                      progress: bool = True) -> torch.Tensor:
    """``(B, S)`` fraction of completions from x_t (original model) in the class of the target's final image.

    The pass samples ``B x S x plan.num_completions`` completions (B: ``targets``, S: ``steps``); each (target,
    step) is one result (with ``results``: one file, read instead of sampled on a rerun)."""
    results = ResultCache(None) if results is None else results
    check_formation_steps(targets, steps)
    out = torch.full((len(targets), len(steps)), math.nan)
    if not targets or not len(steps):  # plan.formation_targets = 0: no pass
        return out
    shared = measurement_key(plan, original, classifier, num_inference_steps)
    with torch.no_grad():
        final_class = classifier(torch.stack([t.pictures()[1] for t in targets])).argmax(1).tolist()

    def measure(traj: Trajectory, t: int, b: int) -> dict:
        orig = target_noise_fn(original, plan.use_ema, [traj])
        images = pictures(original, completions(orig, original.noise_scheduler, traj.x_t[traj.position(t)], t,
                                                plan.num_completions, num_inference_steps))
        return {"target_id": int(traj.target_id), "step": int(t),
                "fraction_in_final_class": float(class_fraction(classifier, images, int(final_class[b])))}

    cells = [(s, int(t), b, traj) for s, t in enumerate(steps) for b, traj in enumerate(targets)]
    for s, t, b, traj in _bar(cells, "feature formation", "target-step", progress):
        row = results.row("formation", f"target{traj.target_id:04d}_t{t:04d}",
                          {**shared, "target": target_key(traj, t), "final_class": int(final_class[b])},
                          lambda: measure(traj, t, b))
        out[b, s] = row["fraction_in_final_class"]
    return out


def paired_removals(rows: Sequence[dict], versus: Sequence[str] = ("random",),
                    metrics=("fid", "completion_l2", "forgetting_l2")) -> list[dict]:
    """Each method minus each of ``versus`` per (metric, k, step), paired over the targets both removed for:
    mean, s.e. (ddof=1) and ``z = mean / se`` (a removal that moves completions more than random has z > 2)."""
    cell = {(r["method"], r["k"], r["step"], r["target_id"]): r for r in rows}
    out = []
    for metric in metrics:
        for i, base in enumerate(versus):   # each pair once: no "random minus pixel" beside "pixel minus random"
            for method, k, t in sorted({(r["method"], r["k"], r["step"]) for r in rows
                                        if r["method"] != base and r["method"] not in versus[:i]}):
                diffs = [cell[(method, k, t, b)][metric] - cell[(base, k, t, b)][metric]
                         for (m, kk, tt, b) in cell if (m, kk, tt) == (method, k, t) and (base, k, t, b) in cell
                         and metric in cell[(method, k, t, b)] and metric in cell[(base, k, t, b)]]
                if not diffs:
                    continue
                mean, se, n = nan_mean_se(torch.tensor(diffs, dtype=torch.float64))
                out.append({"metric": metric, "method": method, "versus": base, "k": k, "step": t,
                            "diff_mean": float(mean), "diff_se": float(se), "z": float(mean / se) if se > 0 else math.nan,
                            "n_targets": int(n)})
    return out


def write_counterfactual(out: Path, rows, summary, consistency_rows, formation, steps, targets,
                         versus: Sequence[str] = ("random",)) -> None:
    out.mkdir(parents=True, exist_ok=True)
    paired = paired_removals(rows, versus)
    for name, table in (("per_target", rows), ("counterfactual", summary), ("paired", paired),
                        ("seed_consistency", consistency_rows)):
        if table:
            write_table(table, out / f"{name}.csv", out / f"{name}.json")
    for metric in ("fid", "completion_l2", "forgetting_l2"):
        bars = [r for r in summary if r["metric"] == metric]
        if bars:
            plot_counterfactual_bars(bars, out / f"{metric}.png", metric=metric)
    formation_rows = [{"target_id": t.target_id, "step": int(s), "fraction_in_final_class": float(formation[b, i])}
                      for b, t in enumerate(targets) for i, s in enumerate(steps)]
    if formation_rows:
        write_table(formation_rows, out / "feature_formation.csv", out / "feature_formation.json")
        plot_feature_formation(steps, formation, out / "feature_formation.png",
                               labels=[f"target {t.target_id}" for t in targets])
    else:  # no pass this time (plan.formation_targets = 0): no table of an earlier run stays beside the new ones
        for name in ("feature_formation.csv", "feature_formation.json", "feature_formation.png"):
            (out / name).unlink(missing_ok=True)
