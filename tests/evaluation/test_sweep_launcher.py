"""The sweep on submitit: two invocations at once through the local executor train each model exactly once;
a failed job is reported after the others have trained, and retried by the next run; claims of live owners
are respected and stale ones broken (only the holder clears a folder, and marks it done only while it holds
the claim); the SLURM job array it would submit (sbatch script and per-task pickles, captured with a fake
``sbatch``); devices and plan fields are validated before any work."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from submitit.core.utils import DelayedSubmission

from evaluation.plan import LDSPlan
from evaluation.sweep import (DONE, FitJob, claim_is_stale, local_devices, run_jobs, slurm_parameters,
                              train_claimed, try_claim, FitSettings)


@pytest.fixture
def by_value():
    """Pickle this module's functions by value: submitit's workers (other processes) cannot import a test file."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def recording_fit(job: FitJob, settings: FitSettings, stop: threading.Event) -> float:
    """A stand-in for `cli.py fit`: logs the call (name, pid) and saves a checkpoint the sweep marks done."""
    with open(job.folder.parent.parent / "fits.log", "a") as f:  # one short O_APPEND write per call
        f.write(f"{job.name} {os.getpid()}\n")
    torch.save({"global_step": 3}, job.folder / "step3.ckpt")
    return 1.0


def competing_fit(job: FitJob, settings: FitSettings, stop: threading.Event) -> float:
    """``recording_fit`` that first waits until two fits have started, so the invocations really overlap."""
    log = job.folder.parent.parent / "fits.log"
    with open(log, "a") as f:
        f.write(f"{job.name} {os.getpid()}\n")
    deadline = time.monotonic() + 120
    while len(log.read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    torch.save({"global_step": 3}, job.folder / "step3.ckpt")
    return 1.0


def _jobs(root: Path, n: int = 4) -> list[FitJob]:
    return [FitJob(f"mask_{j:03d}_seed_0", None, j, root / "models" / f"mask_{j:03d}_seed_0", {"mask": j})
            for j in range(n)]


def _plan(root: Path, **kwargs) -> LDSPlan:
    return LDSPlan(out_dir=str(root), num_masks=4, replicate_masks=0, fit_config=["unused.yaml"], **kwargs)


def test_two_sweeps_at_once_through_the_local_executor_train_each_model_once(tmp_path, by_value):
    plan = _plan(tmp_path, launcher="local", workers=2, runner="subprocess")
    jobs = _jobs(tmp_path)
    results, errors = {}, []

    def sweep(key):
        try:
            results[key] = run_jobs(_jobs(tmp_path), plan, train=competing_fit)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=sweep, args=(key,)) for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and set(results) == {"a", "b"}
    calls = [line.split() for line in (tmp_path / "fits.log").read_text().splitlines()]
    names = sorted(job.name for job in jobs)
    assert sorted(name for name, _ in calls) == names  # every model fitted exactly once
    assert all(pid != str(os.getpid()) for _, pid in calls)  # by the submitit workers, not this process
    trained = [r["name"] for key in ("a", "b") for r in results[key]]
    assert sorted(trained) == names  # and reported by exactly one of the two invocations
    for job in jobs:
        record = json.loads((job.folder / DONE).read_text())
        assert record["global_step"] == 3 and not job.claim_file.exists()
    assert run_jobs(jobs, plan, train=recording_fit) == []  # a third call: nothing left to train
    assert len((tmp_path / "fits.log").read_text().splitlines()) == 4


def failing_fit(job: FitJob, settings: FitSettings, stop: threading.Event) -> float:
    if job.name.startswith("mask_000"):
        raise ValueError("a broken fit config")
    return recording_fit(job, settings, stop)


def test_a_failed_job_is_reported_after_the_others_have_trained(tmp_path, by_value):
    plan = _plan(tmp_path, launcher="local", workers=1)
    bad, good = _jobs(tmp_path, 2)
    with pytest.raises(RuntimeError, match="1 failed.*mask_000_seed_0: ValueError: a broken fit config"):
        run_jobs([bad, good], plan, train=failing_fit)
    assert good.done and not bad.done and not bad.claim_file.exists()  # released: the next run retries it
    assert [r["name"] for r in run_jobs([bad, good], plan, train=recording_fit)] == [bad.name]


def _claim(job: FitJob, **record) -> None:
    job.folder.parent.mkdir(parents=True, exist_ok=True)
    job.claim_file.write_text(json.dumps({"token": "other", "heartbeat": time.time(), **record}))


def _start_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_live_claims_are_respected_and_stale_ones_taken_over(tmp_path):
    plan = _plan(tmp_path, launcher="inprocess")
    live, dead, remote_fresh, remote_old = _jobs(tmp_path)
    owner = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        host = socket.gethostname()
        _claim(live, host=host, pid=owner.pid, start=_start_of(owner.pid))
        _claim(dead, host=host, pid=gone.pid)
        _claim(remote_fresh, host="node-that-is-not-here", pid=1)
        _claim(remote_old, host="node-that-is-not-here", pid=1, heartbeat=time.time() - 3600)
        for job in (live, dead):  # unfinished folders: a live owner's must survive, a dead owner's is cleared
            job.folder.mkdir(parents=True)
            (job.folder / "partial.ckpt").write_bytes(b"half")
        trained = run_jobs([live, dead, remote_fresh, remote_old], plan, train=recording_fit)
        assert sorted(r["name"] for r in trained) == sorted([dead.name, remote_old.name])
        assert (live.folder / "partial.ckpt").read_bytes() == b"half" and not live.done
        assert json.loads(live.claim_file.read_text())["pid"] == owner.pid
        assert not remote_fresh.done and remote_fresh.claim_file.exists()
        assert dead.done and not (dead.folder / "partial.ckpt").exists() and not dead.claim_file.exists()
        assert remote_old.done
    finally:
        owner.kill()
        owner.wait()
    assert claim_is_stale(json.loads(live.claim_file.read_text()), stale_s=600)  # its owner is gone now
    assert [r["name"] for r in run_jobs([live, remote_fresh], plan, train=recording_fit)] == [live.name]
    # a torn record (owner killed while writing it) is judged by the file's age
    torn = _jobs(tmp_path / "torn", 1)[0]
    torn.folder.parent.mkdir(parents=True)
    torn.claim_file.write_text("")
    assert try_claim(torn, stale_s=600) is None
    os.utime(torn.claim_file, (time.time() - 3600,) * 2)
    assert try_claim(torn, stale_s=600) is not None


def test_a_holder_whose_claim_was_broken_does_not_mark_the_model_done(tmp_path):
    job = _jobs(tmp_path, 1)[0]
    settings = FitSettings(("unused.yaml",), stale_s=0.4)  # heartbeat every 0.1 s

    def taken_over(job, settings, stop):
        job.claim_file.write_text(json.dumps({"token": "someone else", "host": "elsewhere", "heartbeat": time.time()}))
        assert stop.wait(10), "the heartbeat should notice the lost claim"
        torch.save({"global_step": 3}, job.folder / "step3.ckpt")
        return 1.0

    with pytest.raises(RuntimeError, match="broke it as stale"):
        train_claimed(job, settings, taken_over)
    assert not job.done and json.loads(job.claim_file.read_text())["token"] == "someone else"


def _fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """``srun`` and ``sbatch`` on PATH: sbatch keeps a copy of the script it was given and answers a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "submitted.sh"


def test_slurm_job_array_specification(tmp_path, monkeypatch, by_value):
    script = _fake_slurm(tmp_path, monkeypatch)
    plan = _plan(tmp_path / "sweep", launcher="slurm", gpus_per_job=1, cpus_per_job=8, timeout_min=90.5,
                 slurm_partition="gpu", slurm_account="lab", slurm_mem_gb=32, slurm_array_parallelism=2,
                 slurm_setup=["module load cuda/12.4"], slurm_extra={"qos": "high"}, threads_per_worker=4)
    jobs = _jobs(tmp_path / "sweep")
    assert run_jobs(jobs, plan, train=recording_fit) == []  # submitted, not waited for
    lines = script.read_text().splitlines()
    flags = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in lines if line.startswith("#SBATCH --")}
    assert flags["#SBATCH --array"] == "0-3%2"  # one task per (mask, seed), 2 at a time
    assert (flags["#SBATCH --partition"], flags["#SBATCH --account"], flags["#SBATCH --qos"]) == ("gpu", "lab", "high")
    assert (flags["#SBATCH --gpus-per-node"], flags["#SBATCH --cpus-per-task"]) == ("1", "8")
    assert (flags["#SBATCH --time"], flags["#SBATCH --mem"], flags["#SBATCH --ntasks-per-node"]) == ("91", "32GB", "1")
    assert flags["#SBATCH --job-name"] == "sweep"  # the plan's out_dir
    setup = lines.index("# setup")
    assert lines[setup + 1].startswith(f"export PYTHONPATH={Path(__file__).resolve().parents[2]}")
    assert lines[setup + 2] == "module load cuda/12.4"
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    record = json.loads((tmp_path / "sweep" / "launcher" / "slurm_4242.json").read_text())
    assert record["jobs"] == {f"4242_{a}": job.name for a, job in enumerate(jobs)}
    for a, job in enumerate(jobs):  # each array task carries its own job
        task = DelayedSubmission.load(tmp_path / "sweep" / "launcher" / f"4242_{a}" / f"4242_{a}_submitted.pkl")
        assert task.function.__name__ == "train_one" and task.args[0].name == job.name
        assert task.args[1].threads == 4 and task.args[1].timeout_s == 90.5 * 60
    assert not any(job.done for job in jobs)
    # an array task, run here: it claims and trains its own job
    task = DelayedSubmission.load(tmp_path / "sweep" / "launcher" / "4242_1" / "4242_1_submitted.pkl")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the task pins its threads: restored after the test
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    assert task.result()["name"] == jobs[1].name and jobs[1].done and not jobs[0].done
    assert slurm_parameters(_plan(tmp_path, launcher="slurm"))["cpus_per_task"] == 1  # threads_per_worker


def test_devices_and_launcher_settings_are_checked_before_any_work(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert local_devices(2, 2) == ["3,5", "6,7"] and local_devices(4, 1) == ["3", "5", "6", "7"]
    assert local_devices(2, 0) == ["", ""]
    with pytest.raises(ValueError, match="plan.workers. x .plan.gpus_per_job"):
        local_devices(3, 2)
    for bad in ({"launcher": "kubernetes"}, {"gpus_per_job": -1}, {"timeout_min": 0},
                {"slurm_array_parallelism": 0}, {"cpus_per_job": 0}):
        with pytest.raises(ValueError, match=f"plan.{next(iter(bad))}"):
            LDSPlan(**bad)
    assert LDSPlan(runner="inprocess").launch_with == "inprocess" and LDSPlan().launch_with == "local"
    assert LDSPlan(runner="inprocess", launcher="slurm").launch_with == "slurm"


class _Target:
    """What the outputs' cache key reads of a target (its id)."""

    def __init__(self, target_id: int) -> None:
        self.target_id = target_id


def competing_outputs(job, plan, targets, steps) -> None:
    """A stand-in for evaluating a model: logs the call (name, pid), waits for a second worker, writes the cache."""
    log = plan.root / "outputs.log"
    with open(log, "a") as f:
        f.write(f"{job.name} {os.getpid()}\n")
    deadline = time.monotonic() + 120
    while len(log.read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    torch.save({"outputs": torch.zeros(len(targets), len(steps))}, job.result)


def quick_outputs(job, plan, targets, steps) -> None:
    torch.save({"outputs": torch.zeros(len(targets), len(steps))}, job.result)


def test_two_lds_outputs_at_once_through_the_local_executor_evaluate_each_model_once(tmp_path, by_value):
    """lds_outputs runs on the same launcher as the fits: the models' evaluations are claimed, so two
    invocations at once (each with 2 local submitit workers) evaluate every finished model exactly once."""
    from evaluation.outputs import evaluate_outputs, output_jobs

    plan = _plan(tmp_path, launcher="local", workers=2)
    for j in range(4):
        folder = plan.model_dir(j, 0)
        folder.mkdir(parents=True)
        (folder / DONE).write_text(json.dumps({"checkpoint": "unused.ckpt"}))
    targets, steps = [_Target(0), _Target(3)], [500]
    assert len(output_jobs(plan, targets, steps)) == 4
    results, errors = {}, []

    def invocation(key):
        try:
            results[key] = evaluate_outputs(plan, targets, steps, evaluate=competing_outputs)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=invocation, args=(key,)) for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and set(results) == {"a", "b"}
    calls = [line.split() for line in (tmp_path / "outputs.log").read_text().splitlines()]
    names = sorted(f"mask_00{j}_seed_0" for j in range(4))
    assert sorted(name for name, _ in calls) == names                       # every model evaluated exactly once
    assert all(pid != str(os.getpid()) for _, pid in calls)                  # by the submitit workers
    assert sorted(results["a"]["evaluated"] + results["b"]["evaluated"]) == names
    assert output_jobs(plan, targets, steps) == [] and not list(tmp_path.rglob("*.claim"))
    assert evaluate_outputs(plan, targets, steps, evaluate=competing_outputs)["evaluated"] == []


def test_lds_outputs_slurm_array_specification(tmp_path, monkeypatch, by_value):
    """On SLURM, lds_outputs submits one array task per unevaluated model (the plan's sbatch flags) and returns."""
    from evaluation.outputs import evaluate_outputs

    script = _fake_slurm(tmp_path, monkeypatch)
    plan = _plan(tmp_path / "sweep", launcher="slurm", gpus_per_job=1, slurm_partition="gpu")
    for j in range(3):
        plan.model_dir(j, 0).mkdir(parents=True)
        (plan.model_dir(j, 0) / DONE).write_text(json.dumps({"checkpoint": "unused.ckpt"}))
    assert evaluate_outputs(plan, [_Target(1)], [500], evaluate=quick_outputs) == {"evaluated": [], "submitted": 3}
    flags = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in script.read_text().splitlines()
             if line.startswith("#SBATCH --")}
    assert flags["#SBATCH --array"] == "0-2%3" and flags["#SBATCH --partition"] == "gpu"
    task = DelayedSubmission.load(tmp_path / "sweep" / "launcher" / "outputs" / "4242_2" / "4242_2_submitted.pkl")
    assert task.function.__name__ == "task_work" and task.args[0][0].name == "mask_002_seed_0"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    assert task.result() == ["mask_002_seed_0"] and task.args[0][0].done   # the task claims and evaluates its model
