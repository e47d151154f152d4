"""The training sweep: one `cli.py fit` per job (a subset mask and a seed), resumable.

A job is finished when its folder holds ``done.json`` (written atomically after the final
checkpoint exists): finished jobs are skipped, unfinished folders (a killed run) are cleared and
trained again. Jobs run as `python cli.py fit --config <fit config> --data.subset_mask=<mask>
--seed_everything=<seed> --data.seed=<seed> --trainer.default_root_dir=<folder>` subprocesses, several
one-thread processes side by side (faster in total on a small CPU than one multi-thread process),
or in this process through ``cli.main`` with the same arguments.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from attribution.atomic import atomic_write_json
from evaluation.plan import LDSPlan

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
DONE = "done.json"


@dataclass
class FitJob:
    """One model to train: ``mask_file`` (None: the full data), ``seed``, and its ``folder``."""

    name: str
    mask_file: Optional[Path]
    seed: int
    folder: Path
    info: dict

    @property
    def done(self) -> bool:
        return (self.folder / DONE).exists()


def fit_arguments(job: FitJob, fit_config: Sequence[str], fit_args: Sequence[str]) -> list[str]:
    """The `cli.py fit` command line of a job (without the interpreter and script)."""
    args = ["fit"]
    for config in fit_config:
        args += ["--config", str(config)]
    args += list(fit_args)
    if job.mask_file is not None:
        args.append(f"--data.subset_mask={job.mask_file}")
    return args + [f"--seed_everything={job.seed}", f"--data.seed={job.seed}",
                   f"--trainer.default_root_dir={job.folder}", "--trainer.logger=false",
                   "--trainer.enable_progress_bar=false"]


def final_checkpoint(folder: Path) -> Path:
    """The checkpoint with the highest global step under ``folder``; error when there is none."""
    found = [p for p in folder.rglob("*.ckpt") if not p.stem.startswith("last")]
    if not found:
        raise FileNotFoundError(f"Expected the fit in {folder} to save a checkpoint (configure a ModelCheckpoint "
                                f"whose every_n_train_steps divides max_steps), but it saved none; see {folder}/fit.log")
    steps = {p: int(torch.load(p, map_location="cpu", weights_only=False).get("global_step", -1)) for p in found}
    return max(found, key=lambda p: (steps[p], p.name))


def _mark_done(job: FitJob, seconds: float, keep_checkpoints: bool) -> None:
    ckpt = final_checkpoint(job.folder)
    if not keep_checkpoints:
        for other in job.folder.rglob("*.ckpt"):
            if other != ckpt:
                other.unlink()
    global_step = int(torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step", -1))
    atomic_write_json(job.folder / DONE, {**job.info, "seed": job.seed, "mask_file": str(job.mask_file),
                                          "checkpoint": str(ckpt), "global_step": global_step,
                                          "seconds": round(seconds, 2)})


def run_job(job: FitJob, fit_config: Sequence[str], fit_args: Sequence[str], runner: str, threads: int,
            keep_checkpoints: bool = True) -> float:
    """Train one job from scratch (its unfinished folder is cleared first); returns seconds."""
    if job.folder.exists():
        shutil.rmtree(job.folder)
    job.folder.mkdir(parents=True)
    args = fit_arguments(job, fit_config, fit_args)
    start = time.perf_counter()
    if runner == "subprocess":
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
               "HF_HUB_OFFLINE": "1"}
        with open(job.folder / "fit.log", "w") as logfile:
            proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=os.getcwd(), env=env,
                                  stdout=logfile, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"`cli.py {' '.join(args)}` failed with exit code {proc.returncode}; "
                               f"see {job.folder / 'fit.log'}")
    else:  # the same `fit` in this process (plain LightningCLI: `fit` needs none of the project's subcommands)
        LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     save_config_kwargs={"overwrite": True}, args=args)
    seconds = time.perf_counter() - start
    _mark_done(job, seconds, keep_checkpoints)
    return seconds


def run_jobs(jobs: Sequence[FitJob], fit_config: Sequence[str], fit_args: Sequence[str], runner: str = "subprocess",
             workers: int = 1, threads: int = 1, max_models: Optional[int] = None,
             keep_checkpoints: bool = True) -> list[dict]:
    """Train the unfinished jobs (at most ``max_models`` of them), ``workers`` at a time.

    Returns one record per job trained here: ``{"name", "seconds"}``.
    """
    pending = [job for job in jobs if not job.done]
    if max_models is not None:
        pending = pending[:max_models]
    log.info("%d of %d models to train (%d finished)", len(pending), len(jobs), len(jobs) - len([j for j in jobs if not j.done]))

    def one(job: FitJob) -> dict:
        seconds = run_job(job, fit_config, fit_args, runner, threads, keep_checkpoints)
        log.info("trained %s in %.1f s", job.name, seconds)
        return {"name": job.name, "seconds": seconds}

    if runner == "inprocess" or workers == 1:
        return [one(job) for job in pending]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, pending))


def done_record(folder: Path) -> Optional[dict]:
    import json
    path = Path(folder) / DONE
    return json.loads(path.read_text()) if path.exists() else None


def sweep_jobs(plan: LDSPlan, mask_files: list[Path], mask_start: int, mask_stop: Optional[int]) -> list[FitJob]:
    stop = plan.num_masks if mask_stop is None else min(mask_stop, plan.num_masks)
    if not 0 <= mask_start < stop:
        raise ValueError(f"Expected 0 <= `mask_start` < `mask_stop` <= num_masks = {plan.num_masks}, "
                         f"but got {mask_start} and {mask_stop}")
    return [FitJob(f"mask_{j:03d}_seed_{r}", mask_files[j], plan.training_seed(j, r), plan.model_dir(j, r),
                   {"mask": j, "seed_index": r})
            for r in range(max(plan.seeds_for(j) for j in range(plan.num_masks)))
            for j in range(mask_start, stop) if r < plan.seeds_for(j)]
