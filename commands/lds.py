"""The counterfactual-evaluation subcommands of ``cli.py`` (mixed into ``AttributionTrainer``).

    cli.py lds_train       --config configs/lds_digits.yaml --plan configs/lds/digits.yaml [--mask_start 0 --mask_stop 8]
    cli.py lds_featurize   --config configs/lds_digits.yaml --plan configs/lds/digits.yaml
    cli.py lds_outputs     --config configs/lds_digits.yaml --plan configs/lds/digits.yaml
    cli.py lds_report      --config configs/lds_digits.yaml --plan configs/lds/digits.yaml
    cli.py counterfactual  --config configs/lds_digits.yaml --plan configs/lds/digits.yaml

``--config`` is the model/data configuration (the same file every subset model is fit with);
``--plan`` holds the :class:`~evaluation.plan.LDSPlan` (or give ``--plan.<field>`` flags).
Each method is a few lines over the ``evaluation`` package: ``sweep`` (training), ``outputs`` (actual
outputs), ``methods`` + ``report`` (scores and LDS) and ``counterfactual``.
"""
from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from attribution.identity import check_checkpoint
from attribution.masks import write_random_masks
from attribution.atomic import atomic_torch_save, atomic_write_json
from attribution.store import open_feature_stores
from attribution.trajectory import load_targets
from evaluation import counterfactual as cf
from evaluation.methods import dataset_classifier, dataset_images, method_scores
from evaluation.outputs import averaged_outputs, collect_outputs, evaluate_outputs, evaluated_steps, replicate_block
from evaluation.plan import LDSPlan
from evaluation.report import build_report, chosen_scores, edge_methods, extended_grid, masks_matrix, write_report
from evaluation.sweep import FitJob, done_record, featurize_model, featurize_tasks, run_jobs, run_tasks, sweep_jobs
from lightning_modules.loading import load_diffusion_module

LDS_SUBCOMMANDS: dict[str, set[str]] = {
    "lds_train": {"model", "datamodule"},
    "lds_featurize": {"model", "datamodule"},
    "lds_outputs": {"model", "datamodule"},
    "lds_report": {"model", "datamodule"},
    "counterfactual": {"model", "datamodule"},
}


class LDSCommands:
    """``lds_train``, ``lds_outputs``, ``lds_report``, ``counterfactual``: methods of the CLI's trainer."""

    def lds_train(self, model: LightningModule, datamodule: LightningDataModule, plan: LDSPlan,
                  mask_start: int = 0, mask_stop: Optional[int] = None, max_models: Optional[int] = None) -> list[dict]:
        """Write the J masks and train one model per (mask, seed); finished models are skipped.

        The fits run through ``plan.launcher`` (this process, local submitit workers, or a SLURM job array)
        and claim their jobs atomically, so several invocations at once never train one model twice.

        Args:
            plan: the evaluation plan (masks, seeds, fit config, launcher, workers, devices).
            mask_start: first mask index of this invocation (the launcher already spreads the jobs; use this
                to split a sweep by hand, e.g. over machines without SLURM).
            mask_stop: one past the last mask index (None: all).
            max_models: train at most this many models now (the rest on a later run).
        """
        mask_files = write_random_masks(plan.mask_dir(), datamodule.num_examples, plan.num_masks,
                                        seed=plan.mask_seed, p=plan.fraction)
        jobs = sweep_jobs(plan, mask_files, mask_start, mask_stop)
        trained = run_jobs(jobs, plan, max_models)
        if plan.launch_with == "slurm" and not all(job.done for job in jobs):
            rank_zero_info(f"lds_train: the unfinished jobs were submitted to SLURM as one job array (ids in "
                           f"{plan.root / 'launcher'}/slurm_<array>.json); rerun lds_train once it has finished")
        _check_first(jobs, model, datamodule)
        done = sum(job.done for job in jobs)
        rank_zero_info(f"lds_train: trained {len(trained)} models now; {done} of {len(jobs)} in masks "
                       f"[{mask_start}, {mask_stop or plan.num_masks}) finished")
        _append_log(plan.root / "train_times.jsonl", trained)
        return trained

    def lds_featurize(self, model: LightningModule, datamodule: LightningDataModule, plan: LDSPlan,
                      mask_start: int = 0, mask_stop: Optional[int] = None) -> list[str]:
        """Featurize the final checkpoint of every finished subset model into ``models/<job>/features`` with
        `cli.py featurize` (flags: ``plan.featurize_args``), through ``plan.launcher`` like the fits: each model
        claimed first, finished stores skipped, a killed store resumed by the next run.

        Args:
            plan: the evaluation plan (models, launcher, workers, featurize_args).
            mask_start: first mask index of this invocation.
            mask_stop: one past the last (None: all).
        """
        tasks = featurize_tasks(plan, range(mask_start, mask_stop or plan.num_masks))
        result = run_tasks(tasks, plan, partial(featurize_model, plan=plan, cwd=os.getcwd()), "featurize")
        if result["submitted"]:
            rank_zero_info(f"lds_featurize: {result['submitted']} models submitted to SLURM as one job array "
                           f"({plan.root / 'launcher' / 'featurize'}); rerun once it has finished")
        rank_zero_info(f"lds_featurize: {len(result['done'])} models featurized now; "
                       f"{sum(t.done for t in tasks)} of {len(tasks)} finished models have their store")
        return result["done"]

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
        steps = evaluated_steps(targets, plan.steps)
        start = time.perf_counter()
        masks = range(mask_start, mask_stop or plan.num_masks)
        launched = evaluate_outputs(plan, targets, steps, masks)
        if launched["submitted"]:
            rank_zero_info(f"lds_outputs: {launched['submitted']} models submitted to SLURM as one job array "
                           f"({plan.root / 'launcher' / 'outputs'}); rerun lds_outputs once it has finished")
            return plan.root / "launcher" / "outputs"
        result = collect_outputs(plan, targets, steps, masks)
        path = plan.root / "outputs" / "actual.pt"
        atomic_torch_save({"replicates": result["replicates"], "steps": steps,
                           "target_ids": [t.target_id for t in targets]}, path)
        rank_zero_info(f"lds_outputs: {len(launched['evaluated']) + result['computed']} models evaluated "
                       f"({plan.launch_with}), {result['cached'] - len(launched['evaluated'])} read from cache in "
                       f"{time.perf_counter() - start:.1f} s -> {path}")
        return path

    def lds_report(self, model: LightningModule, datamodule: LightningDataModule, plan: LDSPlan) -> Path:
        """Scores of every method, LDS per step (held-out lambda; oracle beside it), ceiling, tables and plots.

        Args:
            plan: the evaluation plan (features, targets, methods, relative_lambdas, split).
        """
        plan.require("targets", "features")
        out = plan.root / "report"
        targets = load_targets(plan.targets, plan.target_ids)
        steps = evaluated_steps(targets, plan.steps)
        replicates = collect_outputs(plan, targets, steps)["replicates"]
        actual = averaged_outputs(plan, replicates)
        masks = masks_matrix([plan.mask_dir() / f"mask_{j:03d}.npy" for j in range(plan.num_masks)])
        images = dataset_images(datamodule)  # streamed: one block of images at a time
        classifier = dataset_classifier(datamodule, plan, out / "cache")
        stores = open_feature_stores(plan.features, "plan.features")
        def score(method: str, grid=None):
            rank_zero_info(f"lds_report: scoring {method}" + ("" if grid is None else f" on the extended grid {grid}"))
            return method_scores(method, plan, stores, targets, steps, images, classifier, out / "cache", masks,
                                 datamodule=datamodule, lambdas=grid)

        def reported(scores: dict) -> dict:
            return build_report(scores, masks, actual, replicate_block(plan, replicates), steps,
                                plan.relative_lambdas, plan.split_seed, plan.heldout_fraction, plan.lambda_per_step,
                                plan.seeds_per_mask, plan.paired_versus)

        scores = {m: score(m) for m in plan.methods}
        report = reported(scores)
        refused: dict[str, str] = {}   # method -> why its grid cannot be extended further (e.g. damping too small)
        for _ in range(plan.extend_grid):  # a ridge chosen at the edge of its grid: extend the grid past it
            edges = {m: sides for m, sides in edge_methods(report).items() if m not in refused}
            if not edges:
                break
            for method, sides in edges.items():
                grid = extended_grid(scores[method].lambdas, sides)
                try:
                    extended = score(method, grid)
                except ValueError as error:   # the estimator refuses the grid (EK-FAC: not positive definite)
                    refused[method] = str(error)
                    rank_zero_warn(f"lds_report: {method}'s grid cannot be extended to {grid}: {error}; its choice "
                                   f"stays at the edge of {scores[method].lambdas} (flagged lambda_at_grid_edge)")
                    continue
                if hasattr(scores[method], "close"):
                    scores[method].close()
                scores[method] = extended
            report = reported(scores)
        for method, sides in edge_methods(report).items():
            if method not in refused:
                rank_zero_warn(f"lds_report: {method}'s ridge chosen on held-out targets is still at the "
                               f"{'/'.join(sides)} edge of its grid {scores[method].lambdas} after {plan.extend_grid} "
                               f"extensions (flagged lambda_at_grid_edge in lds.csv and comparison.csv; raise "
                               f"plan.extend_grid)")
        write_report(report, steps, out, getattr(self, "logger", None))
        chosen = {m: chosen_scores(scores[m], report["results"][m]) for m in scores}
        atomic_torch_save({"scores": chosen, "steps": steps, "target_ids": [t.target_id for t in targets],
                    "heldout": report["heldout"], "report": report["report"]}, out / "chosen_scores.pt")
        atomic_write_json(out / "plan.json", plan.describe())
        rank_zero_info(f"lds_report: {len(report['tables']['lds'])} rows -> {out / 'lds.csv'}")
        return out

    def counterfactual(self, model: LightningModule, datamodule: LightningDataModule, plan: LDSPlan,
                       max_models: Optional[int] = None) -> Path:
        """Retrain without each method's top-k, completions (FID, L2), forgetting, seed consistency, feature formation.

        Args:
            plan: the evaluation plan (cf_step, forget_step, cf_ks, cf_methods, cf_delta, num_completions,
                formation_steps, formation_targets).
            max_models: retrain at most this many models now (resumable, like lds_train).

        Each phase shows a progress bar; each measured result is written as it finishes under
        ``counterfactual/results/`` and a rerun reads the finished ones (the tables are built from them).
        """
        out = plan.root / "counterfactual"
        saved_path = plan.root / "report" / "chosen_scores.pt"
        saved = torch.load(saved_path, weights_only=False)
        missing = [m for m in plan.cf_methods if m not in saved["scores"]]
        if missing:  # before any work
            raise ValueError(f"Expected every method of `plan.cf_methods` scored by the last lds_report, but "
                             f"{missing} are not in {saved_path} (it has {sorted(saved['scores'])}); run lds_report "
                             f"with them in `plan.methods` first")
        targets = load_targets(plan.targets, saved["target_ids"])
        steps, report = saved["steps"], saved["report"].tolist()
        report_targets = [targets[b] for b in report]
        formation_targets = report_targets[:plan.formation_targets] if plan.formation_targets is not None \
            else report_targets
        formation_steps = plan.formation_steps or steps
        cf.check_formation_steps(formation_targets, formation_steps)  # before any work
        removal = cf.removal_jobs(plan, saved["scores"], targets, steps, report, datamodule.num_examples)
        consistency = cf.consistency_jobs(plan)
        jobs = removal + consistency
        rank_zero_info(f"counterfactual: retraining {len(jobs)} models ({len(removal)} removals, {len(consistency)} "
                       f"with other seeds; {sum(job.done for job in jobs)} finished) through `plan.launcher` = "
                       f"{plan.launch_with}")
        trained = cf.retrain(jobs, plan, max_models)
        rank_zero_info(f"counterfactual: trained {len(trained)} models now; {sum(job.done for job in jobs)} of "
                       f"{len(jobs)} finished")
        if plan.launch_with == "slurm" and not all(job.done for job in jobs):
            rank_zero_info(f"counterfactual: retraining submitted to SLURM ({plan.root / 'launcher'}); rerun "
                           f"`counterfactual` once the array has finished to measure the models")
            return out
        original = load_diffusion_module(targets[0].info["checkpoint"])
        classifier = dataset_classifier(datamodule, plan, plan.root / "report" / "cache")
        n_steps = targets[0].info.get("num_inference_steps")
        results = cf.ResultCache(out / "results")

        def phase(name: str, measure):
            start = time.perf_counter()
            value = measure()
            reused, computed = results.counts.get(name, [0, 0])
            rank_zero_info(f"counterfactual: {name}: {computed} measured, {reused} reused in "
                           f"{time.perf_counter() - start:.1f} s")
            return value

        rows = phase("removal", lambda: cf.measure_removals(plan, removal, targets, original, classifier, n_steps,
                                                            results))
        consistency_rows = phase("consistency", lambda: cf.seed_consistency(plan, consistency, targets, original,
                                                                            n_steps, results))
        rank_zero_info(f"counterfactual: feature formation over {len(formation_targets)} targets x "
                       f"{len(formation_steps)} steps x {plan.num_completions} completions (plan.formation_targets, "
                       f"plan.formation_steps, plan.num_completions)")
        formation = phase("formation", lambda: cf.feature_formation(plan, formation_targets, formation_steps,
                                                                    original, classifier, n_steps, results))
        versus = [m for m in dict.fromkeys(["random", *plan.paired_versus]) if m in plan.cf_methods]
        cf.write_counterfactual(out, rows, cf.summarize(rows), consistency_rows, formation, formation_steps,
                                formation_targets, versus)
        rank_zero_info(f"counterfactual: {results.reused} of {results.total} results reused; {len(rows)} retrained "
                       f"models measured -> {out}")
        return out


def _check_first(jobs: list[FitJob], model: LightningModule, datamodule: LightningDataModule) -> None:
    """The trained checkpoints must belong to the configured model and data (`--config` vs `plan.fit_config`)."""
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
