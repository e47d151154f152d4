"""Time the attribution core on CPU: per-example gradients and projections.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/core_timing.py [--threads 2] [--out FILE]

(a) per-example gradient of TrainLoss (K = 1 draw) on a batch: vmap (``per_example_gradients``)
    vs one batched forward+backward of the summed loss (no per-example gradients; a lower bound)
    vs a loop of ordinary backward passes (``loop_gradients``);
(b) projecting the per-example gradients to d = 4096: dense Gaussian (tile-generated; only a
    fraction of the tiles is timed and the cost is EXTRAPOLATED to all p rows) vs sparse JL (s = 1).

Models: the project's digits UNet (1x8x8) and the google/ddpm-cifar10-32 architecture (35.7M
parameters, built from its config; nothing is downloaded). The machine is shared (2 cores), so
timings are noisy. OMP_WAIT_POLICY defaults to PASSIVE here: with OpenMP spin-waiting, two
intra-op threads next to another busy process ran 20-60x slower.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from attribution import (DenseProjector, DiffusionTask, SparseProjector, TrainLoss, loop_gradients,  # noqa: E402
                         num_parameters, per_example_gradients)
from attribution.task import math_attention  # noqa: E402
from attribution.testing import CIFAR_UNET_PARAMS, cifar_unet, digits_unet  # noqa: E402

D = 4096


def _timed(fn, repeats=1):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def _batched_forward_backward(task, model, x0, draws):
    """One forward+backward of the summed loss over the batch (K = 1 draw per example)."""
    t, noise = draws.timesteps[:, 0], draws.noise[:, 0]
    abar = task.alphas_cumprod.index_select(0, t).view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def run():
        model.zero_grad(set_to_none=True)
        with math_attention(model):
            ((noise - model(x_t, t).sample) ** 2).sum().backward()
    return run


def bench_model(name, model, shape, batch, loop_examples, dense_tiles, rows):
    task = DiffusionTask(torch.linspace(0.9999, 0.0001, 1000))
    p = num_parameters(model)
    out_fn = TrainLoss(num_draws=1, seed=0)
    x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    draws = out_fn.draws(torch.arange(batch), shape, num_train_timesteps=1000)
    reps = 3 if p < 5_000_000 else 1
    t_vmap, grads = _timed(lambda: per_example_gradients(task, model, out_fn, x0, draws), reps)
    t_batch, _ = _timed(_batched_forward_backward(task, model, x0, draws), reps)
    n = loop_examples
    t_loop, _ = _timed(lambda: loop_gradients(task, model, out_fn, x0[:n], draws.select(slice(0, n))))
    rows.append((name, p, "grad: vmap per-example", batch, 1e3 * t_vmap / batch, ""))
    rows.append((name, p, "grad: batched fwd+bwd (no per-ex.)", batch, 1e3 * t_batch / batch, "lower bound"))
    rows.append((name, p, "grad: loop of backward", n, 1e3 * t_loop / n, ""))
    model.zero_grad(set_to_none=True)

    sparse = SparseProjector(p, D, seed=1)
    t_sparse, _ = _timed(lambda: sparse.project(grads), repeats=2)
    rows.append((name, p, f"proj: sparse JL s=1, d={D}", batch, 1e3 * t_sparse / batch, ""))
    dense = DenseProjector(p, D, seed=1)
    tiles = min(dense_tiles, dense.num_tiles())
    r1 = tiles * dense.tile_rows

    def dense_part():
        block = dense.matrix_block(0, tiles)
        return grads[:, :r1] @ block
    t_part, _ = _timed(dense_part)
    t_dense = t_part * dense.num_tiles() / tiles
    note = f"EXTRAPOLATED from {tiles}/{dense.num_tiles()} tiles" if tiles < dense.num_tiles() else "measured"
    note += f"; {t_dense:.1f} s per batch of {batch}, mostly generating P"
    rows.append((name, p, f"proj: dense gaussian, d={D}", batch, 1e3 * t_dense / batch, note))
    return grads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    bench_model("digits", digits_unet(), (1, 8, 8), batch=32, loop_examples=16, dense_tiles=64, rows=rows)
    model = cifar_unet()
    p = num_parameters(model)
    assert p == CIFAR_UNET_PARAMS, f"expected {CIFAR_UNET_PARAMS} parameters, got {p}"
    bench_model("cifar", model, (3, 32, 32), batch=4, loop_examples=2, dense_tiles=16, rows=rows)
    lines = [f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, shared 2-core CPU (noisy)",
             f"{'model':<7} {'params':>11}  {'what':<36} {'batch':>5} {'ms/example':>11}  note"]
    lines += [f"{m:<7} {p:>11,}  {w:<36} {b:>5} {ms:>11.2f}  {note}" for m, p, w, b, ms, note in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
