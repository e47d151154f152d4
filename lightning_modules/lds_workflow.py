"""The counterfactual-evaluation subcommands of ``cli.py`` (mixed into ``AttributionTrainer``).

    cli.py lds_train       --config configs/lds_digits.yaml --plan configs/lds/digits.yaml [--mask_start 0 --mask_stop 8]
    cli.py lds_outputs     --config configs/lds_digits.yaml --plan configs/lds/digits.yaml
    cli.py lds_report      --config configs/lds_digits.yaml --plan configs/lds/digits.yaml
    cli.py counterfactual  --config configs/lds_digits.yaml --plan configs/lds/digits.yaml

``--config`` is the model/data configuration (the same file every subset model is fit with);
``--plan`` holds the :class:`~lightning_modules.lds_plan.LDSPlan` (or give ``--plan.<field>`` flags).
Each method is a few lines over ``lds_sweep`` (training), ``lds_outputs`` (actual outputs),
``lds_methods`` + ``lds_report`` (scores and LDS) and ``lds_counterfactual``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities import rank_zero_info

from attribution.masks import write_random_masks
from attribution.plots import plot_counterfactual_bars, plot_feature_formation
from attribution.store import atomic_write_json
from attribution.trajectory import load_targets
from attribution.lds import write_table
from lightning_modules import lds_counterfactual as cf
from lightning_modules.attribution_module import open_feature_stores
from lightning_modules.lds_methods import dataset_arrays, dataset_classifier, method_scores
from lightning_modules.lds_outputs import averaged_outputs, collect_outputs, replicate_block, step_index
from lightning_modules.lds_plan import LDSPlan
from lightning_modules.lds_report import build_report, chosen_scores, masks_matrix, write_report
from lightning_modules.lds_sweep import FitJob, done_record, run_jobs
from lightning_modules.loading import load_diffusion_module

LDS_SUBCOMMANDS: dict[str, set[str]] = {
    "lds_train": {"model", "datamodule"},
    "lds_outputs": {"model", "datamodule"},
    "lds_report": {"model", "datamodule"},
    "counterfactual": {"model", "datamodule"},
}


def sweep_jobs(plan: LDSPlan, mask_files: list[Path], mask_start: int, mask_stop: Optional[int]) -> list[FitJob]:
    stop = plan.num_masks if mask_stop is None else min(mask_stop, plan.num_masks)
    if not 0 <= mask_start < stop:
        raise ValueError(f"Expected 0 <= `mask_start` < `mask_stop` <= num_masks = {plan.num_masks}, "
                         f"but got {mask_start} and {mask_stop}")
    return [FitJob(f"mask_{j:03d}_seed_{r}", mask_files[j], plan.training_seed(j, r), plan.model_dir(j, r),
                   {"mask": j, "seed_index": r})
            for r in range(max(plan.seeds_for(j) for j in range(plan.num_masks)))
            for j in range(mask_start, stop) if r < plan.seeds_for(j)]


class LDSCommands:
    """``lds_train``, ``lds_outputs``, ``lds_report``, ``counterfactual``: methods of the CLI's trainer."""

    def lds_train(self, model: LightningModule, datamodule: LightningDataModule, plan: LDSPlan,
                  mask_start: int = 0, mask_stop: Optional[int] = None, max_models: Optional[int] = None) -> list[dict]:
        """Write the J masks and train one model per (mask, seed); finished models are skipped.

        Args:
            plan: the evaluation plan (masks, seeds, fit config, workers).
            mask_start: first mask index of this process (split a sweep over processes or nodes).
            mask_stop: one past the last mask index (None: all).
            max_models: train at most this many models now (the rest on a later run).
        """
        mask_files = write_random_masks(plan.mask_dir(), datamodule.num_examples, plan.num_masks,
                                        seed=plan.mask_seed, p=plan.fraction)
        jobs = sweep_jobs(plan, mask_files, mask_start, mask_stop)
        trained = run_jobs(jobs, plan.fit_config, plan.fit_args, plan.runner, plan.workers,
                           plan.threads_per_worker, max_models, plan.keep_checkpoints)
        _check_first(jobs, model, datamodule)
        done = sum(job.done for job in jobs)
        rank_zero_info(f"lds_train: trained {len(trained)} models now; {done} of {len(jobs)} in masks "
                       f"[{mask_start}, {mask_stop or plan.num_masks}) finished")
        _append_log(plan.root / "train_times.jsonl", trained)
        return trained

    def lds_outputs(self, model: LightningModule, datamodule: LightningDataModule, plan: LDSPlan,
                    mask_start: int = 0, mask_stop: Optional[int] = None) -> Path:
        """Actual step outputs f_t(x0_hat_t of the full model, theta(S_j)) of every finished subset model (cached).

        Args:
            plan: the evaluation plan (targets, steps, K', draw seed).
            mask_start: first mask index evaluated here.
            mask_stop: one past the last (None: all).
        """
        plan.require("targets")
        targets = load_targets(plan.targets, plan.target_ids)
        steps = step_index(targets, plan.steps)
        start = time.perf_counter()
        result = collect_outputs(plan, targets, steps, range(mask_start, mask_stop or plan.num_masks))
        path = plan.root / "outputs" / "actual.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"replicates": result["replicates"], "steps": steps,
                    "target_ids": [t.target_id for t in targets]}, path)
        rank_zero_info(f"lds_outputs: {result['computed']} models evaluated, {result['cached']} read from cache in "
                       f"{time.perf_counter() - start:.1f} s -> {path}")
        return path

    def lds_report(self, model: LightningModule, datamodule: LightningDataModule, plan: LDSPlan) -> Path:
        """Scores of every method, LDS per step (held-out lambda; oracle beside it), ceiling, tables and plots.

        Args:
            plan: the evaluation plan (features, targets, methods, lambdas, split).
        """
        plan.require("targets", "features")
        out = plan.root / "report"
        targets = load_targets(plan.targets, plan.target_ids)
        steps = step_index(targets, plan.steps)
        replicates = collect_outputs(plan, targets, steps)["replicates"]
        actual = averaged_outputs(plan, replicates)
        masks = masks_matrix([plan.mask_dir() / f"mask_{j:03d}.npy" for j in range(plan.num_masks)])
        images, _ = dataset_arrays(datamodule)
        classifier = dataset_classifier(datamodule, plan, out / "cache")
        stores = open_feature_stores(plan.features, "plan.features")
        scores = {m: method_scores(m, plan, stores, targets, steps, images, classifier, out / "cache")
                  for m in plan.methods}
        report = build_report(scores, masks, actual, replicate_block(plan, replicates), steps, plan.lambdas,
                              plan.split_seed, plan.heldout_fraction, plan.lambda_per_step, plan.seeds_per_mask,
                              plan.paired_versus)
        write_report(report, steps, out, getattr(self, "logger", None))
        chosen = {m: chosen_scores(scores[m], report["results"][m]) for m in scores}
        torch.save({"scores": chosen, "steps": steps, "target_ids": [t.target_id for t in targets],
                    "heldout": report["heldout"], "report": report["report"]}, out / "chosen_scores.pt")
        atomic_write_json(out / "plan.json", plan.describe())
        rank_zero_info(f"lds_report: {len(report['tables']['lds'])} rows -> {out / 'lds.csv'}")
        return out

    def counterfactual(self, model: LightningModule, datamodule: LightningDataModule, plan: LDSPlan,
                       max_models: Optional[int] = None) -> Path:
        """Retrain without each method's top-k, completions (FID, L2), forgetting, seed consistency, feature formation.

        Args:
            plan: the evaluation plan (cf_step, forget_step, cf_ks, cf_methods, cf_delta, num_completions).
            max_models: retrain at most this many models now (resumable, like lds_train).
        """
        out = plan.root / "counterfactual"
        saved = torch.load(plan.root / "report" / "chosen_scores.pt", weights_only=False)
        targets = load_targets(plan.targets, saved["target_ids"])
        steps, report = saved["steps"], saved["report"].tolist()
        removal = cf.removal_jobs(plan, saved["scores"], targets, steps, report, datamodule.num_examples)
        consistency = cf.consistency_jobs(plan)
        run_jobs(removal + consistency, plan.fit_config, plan.fit_args, plan.runner, plan.workers,
                 plan.threads_per_worker, max_models, plan.keep_checkpoints)
        original = load_diffusion_module(targets[0].info["checkpoint"])
        classifier = dataset_classifier(datamodule, plan, plan.root / "report" / "cache")
        n_steps = targets[0].info.get("num_inference_steps")
        rows = cf.measure_removals(plan, removal, targets, original, classifier, n_steps)
        summary = cf.summarize(rows)
        consistency_rows = cf.seed_consistency(plan, consistency, targets, original, n_steps)
        formation_steps = plan.formation_steps or steps
        report_targets = [targets[b] for b in report]
        formation = cf.feature_formation(plan, report_targets, formation_steps, original, classifier, n_steps)
        _write_counterfactual(out, rows, summary, consistency_rows, formation, formation_steps, report_targets)
        rank_zero_info(f"counterfactual: {len(rows)} retrained models measured -> {out}")
        return out


def _write_counterfactual(out: Path, rows, summary, consistency_rows, formation, steps, targets) -> None:
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


def _check_first(jobs: list[FitJob], model: LightningModule, datamodule: LightningDataModule) -> None:
    """The trained checkpoints must belong to the configured model and data (`--config` vs `plan.fit_config`)."""
    from lightning_modules.trainer import check_checkpoint
    for job in jobs:
        record = done_record(job.folder)
        if record is not None:
            check_checkpoint(Path(record["checkpoint"]), model, datamodule)
            return


def _append_log(path: Path, records: list[dict]) -> None:
    if not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
