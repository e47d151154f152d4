"""Featurizing throughput on CPU: every projector against the batched forward+backward floor.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/featurize.py [--threads 2] [--reps 2] [--out FILE]
      [--dattri-python /tmp/dattri-venv/bin/python]

One run, per model: the same examples (B), the same K draws each, the same d = 4096. Rows:

* floor: ONE batched forward+backward of the summed loss over the B*K rows (parameters require
  grad; no per-example anything). Every ratio is against this.
* layerwise (``LayerwiseProjector``, straight to d, and with the default inner 16 d + CountSketch):
  ``featurize_batch_layerwise`` end to end (draws, forward, backward, hooks, projection) plus the
  store write (float16 memmap row write, as the FeatureStore does).
* per-example gradients (``fastpath.choose_gradient_path``: vmap for the digits UNet, a loop of
  backward passes for the CIFAR UNet), then: our sparse JL (``SparseProjector``), the hashed blocked
  sparse JL (``HashedSparseProjector``), our dense Gaussian, traker's CPU ``BasicProjector``
  (normal) and dattri's CPU ``random_project`` where it runs. Dense / traker / dattri projections
  of the 35.7M-parameter gradients are EXTRAPOLATED linearly in p from a slice of the columns
  (the cost is generating p x d random numbers); the note column says so.

Ratios: ms per example / floor ms per example. The machine is a shared 2-core CPU: each timing is
the min over ``--reps`` repetitions after one warm-up; expect 10-30% noise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attribution import (DenseProjector, DiffusionTask, SparseProjector, TrainLoss, loop_gradients,  # noqa: E402
                         num_parameters, per_example_gradients)
from attribution.fastpath import choose_gradient_path  # noqa: E402
from attribution.layerwise import LayerwiseProjector, _Capture, _rows_loss, featurize_batch_layerwise  # noqa: E402
from attribution.sparse_fast import HashedSparseProjector  # noqa: E402
from attribution.testing import cifar_unet, digits_unet  # noqa: E402

D = 4096
DATTRI_SNIPPET = """
import sys, time, torch
from dattri.func.projection import random_project
torch.set_num_threads(int(sys.argv[4]))
B, p, d = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = torch.randn(B, p)
proj = random_project(g, B, d, 32, 0, "normal", device="cpu")
proj(g)
t = time.perf_counter(); proj(g); print(time.perf_counter() - t)
"""


def _min_time(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _floor(task, model, out_fn, x0, keys):
    draws = out_fn.draws(keys, x0.shape[1:], num_train_timesteps=task.num_train_timesteps)

    def run():
        model.zero_grad(set_to_none=True)
        _rows_loss(task, model, out_fn, x0, draws, None).backward()
    return run


def _store_writer(B, d):
    path = os.path.join(tempfile.mkdtemp(), "features.f16")
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(B, d))

    def write(features):
        mm[:, :features.shape[1]] = features.numpy().astype(np.float16)
        mm.flush()
    return write


def _slice_extrapolated(project_cols, p, cols):
    """Time a projection of the first ``cols`` columns, scale to ``p``."""
    t = _min_time(lambda: project_cols(cols), 1)
    return t * p / cols


def _traker(grads, p, cols):
    from trak.projectors import BasicProjector, ProjectionType
    proj = BasicProjector(cols, D, 0, ProjectionType.normal, torch.device("cpu"), block_size=128)
    sub = grads[:, :cols].contiguous()
    return _min_time(lambda: proj.project(sub, model_id=0), 1) * p / cols


def _dattri(python, B, p, cols, threads):
    if not python or not os.path.exists(python):
        return None, "not installed (separate venv missing)"
    try:
        res = subprocess.run([python, "-c", DATTRI_SNIPPET, str(B), str(cols), str(D), str(threads)],
                             capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, "timed out (> 300 s)"
    if res.returncode != 0:
        return None, "failed: " + res.stderr.strip().splitlines()[-1][:80]
    return float(res.stdout.strip().splitlines()[-1]) * p / cols, ""


def bench_model(name, model, shape, B, K, reps, dattri_python, rows, profile):
    task = DiffusionTask(torch.linspace(0.9999, 0.0001, 1000))
    p = num_parameters(model)
    out_fn = TrainLoss(num_draws=K, seed=0)
    x0 = torch.randn(B, *shape, generator=torch.Generator().manual_seed(0))
    keys = torch.arange(B)
    t_floor = _min_time(_floor(task, model, out_fn, x0, keys), reps)
    model.zero_grad(set_to_none=True)

    def add(what, seconds, note=""):
        rows.append((name, p, what, B, K, 1e3 * seconds / B, seconds / t_floor, note))
    add("floor: batched fwd+bwd (B*K rows)", t_floor, "no per-example gradients")

    write = _store_writer(B, D)
    for label, inner in (("layerwise, straight to d", None), ("layerwise, inner 16d + CountSketch", "auto")):
        proj = LayerwiseProjector(model, d=D, seed=1, inner_d=inner)

        def run():
            write(featurize_batch_layerwise(task, model, out_fn, proj, x0, keys))
        add(label, _min_time(run, reps), f"d={proj.d}, inner={proj.inner_dim}, store incl.")
        if profile and inner == "auto":
            profile_layerwise(name, task, model, out_fn, proj, x0, keys, t_floor, write)

    path = choose_gradient_path(model, shape)
    draws = out_fn.draws(keys, shape, num_train_timesteps=task.num_train_timesteps)
    if path == "vmap":
        grads_fn = lambda: per_example_gradients(task, model, out_fn, x0, draws)  # noqa: E731
    else:
        grads_fn = lambda: loop_gradients(task, model, out_fn, x0, draws)  # noqa: E731
    t_grad = _min_time(grads_fn, 1 if p > 5e6 else reps)
    grads = grads_fn()
    add(f"per-example grads ({path}), no projection", t_grad)

    sparse, hashed = SparseProjector(p, D, seed=1), HashedSparseProjector(p, D, seed=1)
    add("grads + our sparse JL (SparseProjector)", t_grad + _min_time(lambda: sparse.project(grads), reps))
    add("grads + hashed blocked sparse JL", t_grad + _min_time(lambda: hashed.project(grads), reps))
    dense = DenseProjector(p, D, seed=1)
    cols = min(p, 16 * dense.tile_rows)
    t_dense = _slice_extrapolated(lambda c: grads[:, :c] @ dense.matrix_block(0, c // dense.tile_rows), p, cols)
    add("grads + our dense gaussian", t_grad + t_dense, _extrap(cols, p, "generating p x d"))
    t_trak = _traker(grads, p, min(p, 16384))
    add("grads + traker BasicProjector (CPU)", t_grad + t_trak, _extrap(min(p, 16384), p, "normal, block 128"))
    t_dat, why = _dattri(dattri_python, B, p, min(p, 16384), torch.get_num_threads())
    if t_dat is None:
        rows.append((name, p, "grads + dattri random_project (CPU)", B, K, float("nan"), float("nan"), why))
    else:
        add("grads + dattri random_project (CPU)", t_grad + t_dat, _extrap(min(p, 16384), p, "subprocess"))
    del grads


def _extrap(cols, p, what):
    return f"EXTRAPOLATED from {cols:,} of {p:,} columns ({what})" if cols < p else "measured"


def profile_layerwise(name, task, model, out_fn, proj, x0, keys, t_floor, write):
    """Where the layerwise time goes: forward, dgrad-only backward, hooks, sketch, store."""
    B = x0.shape[0]
    draws = out_fn.draws(keys, x0.shape[1:], num_train_timesteps=task.num_train_timesteps)

    def fwd():
        with torch.no_grad():
            _rows_loss(task, model, out_fn, x0, draws, None)
    flags = [q.requires_grad for q in model.parameters()]

    def dgrad_only():
        for q in model.parameters():
            q.requires_grad_(False)
        x = x0.clone().requires_grad_(True)
        _rows_loss(task, model, out_fn, x, draws, None).backward()
        for q, f in zip(model.parameters(), flags):
            q.requires_grad_(f)
    timers = {"input projection (fwd hooks)": 0.0, "grad hooks (proj + outer)": 0.0}
    orig_in, orig_grad = _Capture._project_input, _Capture._on_grad

    def timed(key, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - start
        return wrapper
    _Capture._project_input = timed("input projection (fwd hooks)", orig_in)
    _Capture._on_grad = timed("grad hooks (proj + outer)", orig_grad)
    try:
        start = time.perf_counter()
        features = featurize_batch_layerwise(task, model, out_fn, proj, x0, keys)
        total = time.perf_counter() - start
    finally:
        _Capture._project_input, _Capture._on_grad = orig_in, orig_grad
    inner = torch.randn(B, proj.inner_dim)
    parts = {"forward only (no grad)": _min_time(fwd, 1), "forward + dgrad-only backward, no hooks": _min_time(dgrad_only, 1),
             **timers, "CountSketch inner->d": _min_time(lambda: proj.finish(inner), 1),
             "store write (float16 memmap)": _min_time(lambda: write(features), 1), "layerwise total (this run)": total}
    print(f"-- profile {name} (B={B}, K={out_fn.num_draws}; floor {1e3 * t_floor / B:.1f} ms/example)")
    for k, v in parts.items():
        print(f"   {k:<42} {1e3 * v / B:9.1f} ms/example  {v / t_floor:5.2f}x floor")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dattri-python", default="/tmp/dattri-venv/bin/python")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    bench_model("digits", digits_unet(), (1, 8, 8), 32, 4, args.reps + 1, args.dattri_python, rows, False)
    if not args.skip_cifar:
        bench_model("cifar", cifar_unet(), (3, 32, 32), 8, 1, args.reps, args.dattri_python, rows, True)
    lines = [f"torch {torch.__version__}, threads={torch.get_num_threads()}, OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY')}, d={D}, shared 2-core CPU (noisy; min of reps)",
             f"{'model':<7} {'params':>11}  {'what':<40} {'B':>3} {'K':>2} {'ms/ex':>9} {'x floor':>8}  note"]
    lines += [f"{m:<7} {p:>11,}  {w:<40} {b:>3} {k:>2} {ms:>9.1f} {r:>8.2f}  {note}"
              for m, p, w, b, k, ms, r, note in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
