"""The training sweep on a job launcher (submitit): one `cli.py fit` per job (a subset mask and a seed),
resumable, and safe to run from several invocations, processes or machines at once.

Jobs. A job is finished when its folder holds ``done.json`` (written atomically after the final checkpoint
exists); finished jobs are skipped. A job runs as `python cli.py fit --config <fit config>
--data.subset_mask=<mask> --seed_everything=<seed> --data.seed=<seed> --trainer.default_root_dir=<folder>`
(``runner: subprocess``) or with the same arguments in the worker's own process (``runner: inprocess``).

Claims. Before a worker touches a job's folder it claims the job: ``<folder>.claim`` is created with
``O_CREAT | O_EXCL`` and holds the owner's host, pid (and the pid's start time), a token and a heartbeat
time, refreshed every ``claim_stale_min / 4`` while the job trains. A claim is stale when its owner process
is dead on this host (gone, a zombie, or its pid reused), or when its owner is on another host and the
heartbeat is older than ``claim_stale_min``; only a stale claim is broken (logged) and replaced. Every claim
change (create, break, refresh, release) holds an ``flock`` on ``<models folder>/.claims.lock``, so two
workers never both break one stale claim. Only the claim holder clears an unfinished folder (a killed run)
and trains it; it writes ``done.json`` only while it still holds the claim, and releases the claim at the end
(also on failure: the next run trains the job again). File-system assumption: ``O_EXCL`` creation and
``flock`` are atomic across every host that shares ``out_dir`` (a local disk; NFS v3 with lockd or v4;
Lustre or GPFS with flock enabled), and the hosts' clocks agree to well within ``claim_stale_min``.

Launchers (``plan.launcher``):
* ``inprocess``: the jobs one after another in this process (the tests; one small machine).
* ``local``: submitit's ``LocalExecutor``: ``plan.workers`` worker processes on this machine, side by side,
  each pinned to its devices (``CUDA_VISIBLE_DEVICES``: worker k gets GPUs ``[k g, (k + 1) g)`` of those this
  process sees, g = ``gpus_per_job``; none when g = 0) and ``threads_per_worker`` threads; each worker claims
  and trains the pending jobs in order until none is left. The call waits for the workers.
* ``slurm``: submitit's ``SlurmExecutor``: one job array over the pending (mask, seed) jobs (one task per
  job, ``slurm_array_parallelism`` at a time, ``gpus_per_job`` GPUs, ``cpus_per_job`` CPUs, ``timeout_min``,
  ``slurm_partition`` ...); each task claims its job. The call submits and returns (the array's job ids go to
  ``<out_dir>/launcher/slurm_<array id>.json``); rerun the subcommand once the array has finished.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import submitit
import torch
from submitit.core.utils import FailedJobError, UncompletedJobError

from attribution.atomic import atomic_write_json
from evaluation.plan import LDSPlan

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
DONE = "done.json"
CLAIMS_LOCK = ".claims.lock"


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

    @property
    def claim_file(self) -> Path:
        return self.folder.with_name(self.folder.name + ".claim")


@dataclass(frozen=True)
class FitSettings:
    """How every job of a sweep is trained; it travels (pickled) to the launcher's workers.

    Args:
        fit_config: config files of `cli.py fit`.
        fit_args: extra `cli.py fit` flags.
        runner: "subprocess" (`python cli.py fit ...`) or "inprocess" (the same arguments in the worker).
        threads: OMP/MKL/torch threads of a worker and its fits.
        keep_checkpoints: keep every checkpoint (else only the final one).
        timeout_s: a subprocess fit still running after this many seconds is stopped (None: no limit).
        stale_s: a claim of another host whose heartbeat is older than this is stale.
        cwd: working directory of the subprocess fits (relative paths of the configs resolve there).
    """

    fit_config: tuple[str, ...]
    fit_args: tuple[str, ...] = ()
    runner: str = "subprocess"
    threads: int = 1
    keep_checkpoints: bool = True
    timeout_s: Optional[float] = None
    stale_s: float = 600.0
    cwd: str = "."

    @classmethod
    def from_plan(cls, plan: LDSPlan) -> "FitSettings":
        return cls(tuple(plan.fit_config), tuple(plan.fit_args), plan.runner, plan.threads_per_worker,
                   plan.keep_checkpoints, 60.0 * plan.timeout_min, 60.0 * plan.claim_stale_min, os.getcwd())


TrainFn = Callable[[FitJob, FitSettings, threading.Event], float]
"""Trains one claimed job in its emptied folder and returns seconds; stops early when the event is set."""


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


def done_record(folder: Path) -> Optional[dict]:
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


# ----------------------------------------------------------------------------- claims
@contextlib.contextmanager
def _claims_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<folder's parent>/.claims.lock``, held by every claim change of its jobs."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / CLAIMS_LOCK, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first, start time at index 19); None when the pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _owner_alive(pid: int, start: Optional[str]) -> bool:
    """Whether process ``pid`` of this host is still the claim's owner (not gone, a zombie or a reused pid)."""
    if not Path("/proc/self/stat").exists():  # no procfs: signal 0 only tells whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and (start is None or stat[19] == start)


def _owner(token: str) -> dict:
    pid, now = os.getpid(), time.time()
    stat = _proc_stat(pid)
    return {"token": token, "host": socket.gethostname(), "pid": pid, "start": stat[19] if stat else None,
            "claimed": now, "heartbeat": now}


def read_claim(path: Path) -> Optional[dict]:
    """The claim record at ``path`` (None: unclaimed). A torn record (its owner killed while writing it)
    reads as an owner of unknown host whose heartbeat is the file's modification time."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    return record if isinstance(record, dict) else {"heartbeat": mtime}


def claim_is_stale(record: dict, stale_s: float, now: Optional[float] = None) -> bool:
    """A claim is stale when its owner process on this host is dead, or, for an owner on another host (or
    unknown), when its heartbeat is older than ``stale_s`` seconds. A live owner on this host is never stale."""
    if record.get("host") == socket.gethostname() and record.get("pid") is not None:
        return not _owner_alive(int(record["pid"]), record.get("start"))
    return (time.time() if now is None else now) - float(record.get("heartbeat", 0.0)) > stale_s


def try_claim(job: FitJob, stale_s: float) -> Optional[str]:
    """Claim ``job`` for this process: the claim's token, or None when the job is finished or held by a live
    owner. A stale claim is broken and replaced."""
    path = job.claim_file
    with _claims_lock(job.folder):
        if job.done:
            return None
        record = read_claim(path)
        if record is not None:
            if not claim_is_stale(record, stale_s):
                return None
            log.warning("%s: breaking the stale claim %s (%s)", job.name, path, record)
            path.unlink()
        token = uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # a writer that does not take the lock; its claim stands
            return None
        with os.fdopen(fd, "w") as f:
            json.dump(_owner(token), f)
            f.flush()
            os.fsync(f.fileno())
        return token


def refresh_claim(job: FitJob, token: str) -> bool:
    """Renew the heartbeat of a held claim; False when the claim is no longer this token's (it was broken)."""
    with _claims_lock(job.folder):
        record = read_claim(job.claim_file)
        if record is None or record.get("token") != token:
            return False
        atomic_write_json(job.claim_file, {**record, "heartbeat": time.time()})
        return True


def release_claim(job: FitJob, token: str) -> None:
    with _claims_lock(job.folder):
        record = read_claim(job.claim_file)
        if record is not None and record.get("token") == token:
            job.claim_file.unlink()


class Heartbeat:
    """Refreshes a held claim every ``interval`` seconds from a daemon thread; ``lost`` is set if it was broken."""

    def __init__(self, job: FitJob, token: str, interval: float):
        self.lost, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(job, token, interval), daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self, job: FitJob, token: str, interval: float) -> None:
        while not self._stop.wait(interval):
            if not refresh_claim(job, token):
                log.error("%s: lost the claim %s (broken as stale by another worker)", job.name, job.claim_file)
                self.lost.set()
                return


# ----------------------------------------------------------------------------- one job
def worker_env(threads: int) -> dict:
    """The environment of a subprocess worker: ``threads`` OMP/MKL threads that yield the core when idle
    (``OMP_WAIT_POLICY=PASSIVE``: workers side by side do not spin on each other's cores), no hub access."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def run_job(job: FitJob, settings: FitSettings, stop: Optional[threading.Event] = None) -> float:
    """`cli.py fit` of one job in its (empty) folder; returns seconds. A subprocess fit is stopped when
    ``stop`` is set (its claim was lost) or after ``settings.timeout_s``."""
    args = fit_arguments(job, settings.fit_config, settings.fit_args)
    start = time.perf_counter()
    if settings.runner == "subprocess":
        env = worker_env(settings.threads)
        with open(job.folder / "fit.log", "w") as logfile:
            proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=settings.cwd, env=env,
                                    stdout=logfile, stderr=subprocess.STDOUT)
            failure = _wait(proc, stop or threading.Event(), settings.timeout_s, start)
        if failure:
            raise RuntimeError(f"`cli.py {' '.join(args)}` {failure}; see {job.folder / 'fit.log'}")
    else:  # the same `fit` in this process (plain LightningCLI: `fit` needs none of the project's subcommands)
        from lightning.pytorch import LightningDataModule, LightningModule  # here: a subprocess worker needs none
        from lightning.pytorch.cli import LightningCLI

        LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     save_config_kwargs={"overwrite": True}, args=args)
    return time.perf_counter() - start


def _wait(proc: subprocess.Popen, stop: threading.Event, timeout_s: Optional[float], start: float) -> Optional[str]:
    """Wait for a fit; stop it when ``stop`` is set or it runs past ``timeout_s``. Returns what went wrong."""
    while True:
        try:
            code = proc.wait(timeout=1.0)
            return None if code == 0 else f"failed with exit code {code}"
        except subprocess.TimeoutExpired:
            pass
        late = timeout_s is not None and time.perf_counter() - start > timeout_s
        if stop.is_set() or late:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return ("was stopped: its claim was broken by another worker" if stop.is_set() else
                    f"was stopped after `plan.timeout_min` = {timeout_s / 60:g} min")


def train_claimed(job: FitJob, settings: FitSettings, train: Optional[TrainFn] = None) -> Optional[dict]:
    """Claim ``job`` and train it (``train``, default :func:`run_job`); returns ``{"name", "seconds"}``, or
    None when it is finished or another live worker holds it."""
    token = try_claim(job, settings.stale_s)
    if token is None:
        return None
    try:
        with Heartbeat(job, token, settings.stale_s / 4) as beat:
            if job.folder.exists():  # an unfinished folder (a killed run): cleared by the claim holder only
                shutil.rmtree(job.folder)
            job.folder.mkdir(parents=True)
            seconds = (train or run_job)(job, settings, beat.lost)
        if not refresh_claim(job, token):
            raise RuntimeError(f"Expected to hold the claim {job.claim_file} until {job.name} was trained, but "
                               f"another worker broke it as stale (raise `plan.claim_stale_min`); not marked done")
        _mark_done(job, seconds, settings.keep_checkpoints)
    finally:
        release_claim(job, token)
    log.info("trained %s in %.1f s", job.name, seconds)
    return {"name": job.name, "seconds": seconds}


# ----------------------------------------------------------------------------- workers and launchers
def pin_worker(devices: Optional[str], threads: int) -> None:
    """Pin this worker process: ``CUDA_VISIBLE_DEVICES = devices`` (None: as given, e.g. by SLURM) and
    ``threads`` OMP/MKL/torch threads. Called before anything initialises CUDA."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def work(jobs: Sequence[FitJob], settings: FitSettings, devices: Optional[str],
         train: Optional[TrainFn] = None) -> dict:
    """One local worker: pins itself, then claims and trains ``jobs`` in order (finished and held ones are
    skipped). A failed job is recorded and the worker goes on. Returns ``{"trained": [...], "failed": [...]}``."""
    pin_worker(devices, settings.threads)
    trained, failed = [], []
    for job in jobs:
        try:
            record = train_claimed(job, settings, train)
        except Exception as error:  # noqa: BLE001 - reported by the launcher after every worker has finished
            log.exception("%s failed", job.name)
            failed.append({"name": job.name, "error": f"{type(error).__name__}: {error}"})
            continue
        if record is not None:
            trained.append(record)
    return {"trained": trained, "failed": failed}


def train_one(job: FitJob, settings: FitSettings, train: Optional[TrainFn] = None) -> Optional[dict]:
    """One SLURM array task: its job, claimed (devices as SLURM allocated them); a failure fails the task."""
    pin_worker(None, settings.threads)
    return train_claimed(job, settings, train)


def local_devices(workers: int, gpus_per_job: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each local worker: worker k gets the k-th group of ``gpus_per_job`` of the
    GPUs this process sees (its own ``CUDA_VISIBLE_DEVICES``, else all); "" (no GPU) when ``gpus_per_job`` = 0."""
    if gpus_per_job == 0:
        return [""] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = ([d.strip() for d in visible.split(",") if d.strip()] if visible is not None
               else [str(i) for i in range(torch.cuda.device_count())])
    if len(devices) < workers * gpus_per_job:
        raise ValueError(f"Expected `plan.workers` x `plan.gpus_per_job` = {workers} x {gpus_per_job} GPUs on this "
                         f"machine, but it has {len(devices)} ({devices})")
    return [",".join(devices[k * gpus_per_job:(k + 1) * gpus_per_job]) for k in range(workers)]


def worker_setup() -> list[str]:
    """Shell lines run before every worker: it imports this checkout's packages (not another install's)."""
    return [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]


def slurm_parameters(plan: LDSPlan) -> dict:
    """The ``SlurmExecutor`` parameters (sbatch flags) of each array task: one job, one node, one task."""
    params = {"job_name": plan.root.name, "time": int(math.ceil(plan.timeout_min)), "nodes": 1,
              "ntasks_per_node": 1, "cpus_per_task": plan.cpus_per_job or plan.threads_per_worker,
              "array_parallelism": plan.slurm_array_parallelism, "setup": worker_setup() + list(plan.slurm_setup)}
    optional = {"gpus_per_node": plan.gpus_per_job or None, "partition": plan.slurm_partition,
                "account": plan.slurm_account,
                "mem": None if plan.slurm_mem_gb is None else f"{int(math.ceil(plan.slurm_mem_gb))}GB",
                "additional_parameters": dict(plan.slurm_extra) or None}
    return {**params, **{k: v for k, v in optional.items() if v is not None}}


def _run_local(pending: list[FitJob], settings: FitSettings, plan: LDSPlan, train: Optional[TrainFn]) -> list[dict]:
    workers = min(plan.workers, len(pending))
    devices = local_devices(workers, plan.gpus_per_job)
    executor = submitit.LocalExecutor(folder=plan.root / "launcher" / "%j")
    executor.update_parameters(timeout_min=plan.timeout_min * len(pending) + 10, setup=worker_setup())
    jobs = [executor.submit(work, pending, settings, devices[k], train) for k in range(workers)]
    log.info("%d local workers (submitit jobs %s; logs in %s)", workers, [j.job_id for j in jobs],
             plan.root / "launcher")
    results, failed = [], []
    try:
        for job in jobs:
            try:
                results.append(job.result())
            except (FailedJobError, UncompletedJobError) as error:  # the worker process itself died
                failed.append({"name": f"worker {job.job_id}", "error": f"{error} (log {job.paths.stderr})"})
    except KeyboardInterrupt:
        for job in jobs:
            job.cancel(check=False)
        raise
    failed += [f for result in results for f in result["failed"]]
    if failed:
        raise RuntimeError(f"Expected every job to train, but {len(failed)} failed (finished ones are kept; rerun "
                           f"to retry the others): " + "; ".join(f"{f['name']}: {f['error']}" for f in failed))
    return [record for result in results for record in result["trained"]]


def _submit_slurm(pending: list[FitJob], settings: FitSettings, plan: LDSPlan, train: Optional[TrainFn]) -> list:
    folder = plan.root / "launcher"
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    executor.update_parameters(**slurm_parameters(plan))
    jobs = executor.map_array(train_one, pending, [settings] * len(pending), [train] * len(pending))
    array = jobs[0].job_id.split("_")[0]
    atomic_write_json(folder / f"slurm_{array}.json", {"array": array, "submitted": time.time(),
                                                        "jobs": {j.job_id: p.name for j, p in zip(jobs, pending)}})
    log.info("submitted %d jobs as SLURM array %s (logs in %s); rerun once it has finished", len(jobs), array, folder)
    return jobs


# ----------------------------------------------------------------------------- work on finished models
@dataclass
class ModelTask:
    """Work on one finished model whose product is one file (its outputs, its feature store): done when
    ``result`` exists, claimed through ``claim`` exactly like a fit (:func:`try_claim`), so several invocations,
    workers or machines at once never do one task twice."""

    name: str
    folder: Path
    result: Path
    claim: Path

    @property
    def done(self) -> bool:
        return self.result.exists()

    @property
    def claim_file(self) -> Path:
        return self.claim


TaskFn = Callable[[ModelTask], None]
"""Does one claimed task; it must create ``task.result`` (written atomically) when it succeeds."""


def run_claimed(task: ModelTask, fn: TaskFn, stale_s: float) -> bool:
    """Claim ``task`` and run ``fn`` on it; False when it is done or held by a live worker."""
    token = try_claim(task, stale_s)
    if token is None:
        return False
    try:
        with Heartbeat(task, token, stale_s / 4):
            fn(task)
        if not task.done:
            raise RuntimeError(f"Expected {task.name} to produce {task.result}, but it did not")
    finally:
        release_claim(task, token)
    return True


def task_work(tasks: Sequence[ModelTask], fn: TaskFn, devices: Optional[str], threads: int,
              stale_s: float) -> list[str]:
    """One worker: pinned to ``devices`` and ``threads``, it claims and runs ``tasks`` in order (those done or held
    by another worker are skipped); returns the names it ran."""
    pin_worker(devices, threads)
    return [task.name for task in tasks if run_claimed(task, fn, stale_s)]


def run_tasks(tasks: Sequence[ModelTask], plan: LDSPlan, fn: TaskFn, what: str, progress: bool = True) -> dict:
    """Run the unfinished ``tasks`` through ``plan.launcher``, like the fits: this process (``inprocess``),
    ``plan.workers`` pinned submitit workers on this machine (``local``), or one SLURM array task per task
    (``slurm``: submits and returns; rerun once it has finished). ``fn`` must be picklable (a module-level
    function or a ``functools.partial`` of one). Returns ``{"done": names run by this call, "submitted": n}``."""
    pending = [task for task in tasks if not task.done]
    stale_s = 60.0 * plan.claim_stale_min
    log.info("%s: %d of %d to do", what, len(pending), len(tasks))
    if not pending:
        return {"done": [], "submitted": 0}
    if plan.launch_with == "inprocess":
        from tqdm.auto import tqdm

        done = [task.name for task in tqdm(pending, desc=what, unit="model", disable=not progress)
                if run_claimed(task, fn, stale_s)]
        return {"done": done, "submitted": 0}
    folder = plan.root / "launcher" / what
    if plan.launch_with == "local":
        workers = min(plan.workers, len(pending))
        devices = local_devices(workers, plan.gpus_per_job)
        executor = submitit.LocalExecutor(folder=folder / "%j")
        executor.update_parameters(timeout_min=plan.timeout_min, setup=worker_setup())
        submitted = [executor.submit(task_work, pending, fn, devices[k], plan.threads_per_worker, stale_s)
                     for k in range(workers)]
        try:
            return {"done": [name for job in submitted for name in job.result()], "submitted": 0}
        except KeyboardInterrupt:
            for job in submitted:
                job.cancel(check=False)
            raise
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    executor.update_parameters(**slurm_parameters(plan))
    n = len(pending)
    jobs = executor.map_array(task_work, [[task] for task in pending], [fn] * n, [None] * n,
                              [plan.threads_per_worker] * n, [stale_s] * n)
    array = jobs[0].job_id.split("_")[0]
    atomic_write_json(folder / f"slurm_{array}.json", {"array": array, "submitted": time.time(),
                                                        "jobs": {j.job_id: t.name for j, t in zip(jobs, pending)}})
    log.info("%s: submitted %d tasks as SLURM array %s (logs in %s)", what, n, array, folder)
    return {"done": [], "submitted": n}


def featurize_tasks(plan: LDSPlan, mask_range: Optional[range] = None) -> list[ModelTask]:
    """One task per finished subset model: featurize its final checkpoint into ``<model>/features/<stem>``."""
    tasks = []
    for j in mask_range or range(plan.num_masks):
        for r in range(plan.seeds_for(j)):
            folder = plan.model_dir(j, r)
            record = done_record(folder)
            if record is not None:
                store = folder / "features" / Path(record["checkpoint"]).stem
                tasks.append(ModelTask(folder.name, folder, store / "kernel.json", folder / "features.claim"))
    return tasks


def featurize_arguments(record: dict, folder: Path, plan: LDSPlan) -> list[str]:
    """The `cli.py featurize` command line of a subset model's final checkpoint (without interpreter and script)."""
    args = ["featurize"]
    for config in plan.fit_config:
        args += ["--config", str(config)]
    return args + ["--checkpoints", str(record["checkpoint"]), "--out_dir", str(Path(folder) / "features"),
                   f"--trainer.default_root_dir={folder}", "--trainer.logger=false",
                   "--trainer.enable_progress_bar=false", *plan.featurize_args]


def featurize_model(task: ModelTask, plan: LDSPlan, cwd: str) -> None:
    """`python cli.py featurize` of the task's model (a subprocess; its log in ``<model>/featurize.log``)."""
    args = featurize_arguments(done_record(task.folder), task.folder, plan)
    env = worker_env(plan.threads_per_worker)
    with open(task.folder / "featurize.log", "w") as logfile:
        code = subprocess.call([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, stdout=logfile,
                               stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"`cli.py {' '.join(args)}` exited with {code}; see {task.folder / 'featurize.log'}")


def run_jobs(jobs: Sequence[FitJob], plan: LDSPlan, max_models: Optional[int] = None,
             train: Optional[TrainFn] = None) -> list[dict]:
    """Train the unfinished jobs (at most ``max_models`` of them) through ``plan.launcher``.

    Args:
        jobs: the jobs of the sweep (finished ones are skipped).
        plan: launcher, workers, devices, threads, time limits and the fit of every job.
        max_models: train at most this many (the first pending ones) now.
        train: trains one claimed job in its emptied folder (default :func:`run_job`, `cli.py fit`).

    Returns one record per job trained by this call (``{"name", "seconds"}``); none for ``slurm``, which
    submits the array and returns.
    """
    pending = [job for job in jobs if not job.done]
    log.info("%d of %d models to train (%d finished)", len(pending), len(jobs), len(jobs) - len(pending))
    if max_models is not None:
        pending = pending[:max_models]
    if not pending:
        return []
    settings = FitSettings.from_plan(plan)
    if plan.launch_with == "inprocess":
        return [record for job in pending if (record := train_claimed(job, settings, train)) is not None]
    if plan.launch_with == "local":
        return _run_local(pending, settings, plan, train)
    _submit_slurm(pending, settings, plan, train)
    return []
