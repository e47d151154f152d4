"""Cost of the EK-FAC / K-FAC influence estimator (attribution.ekfac) on the digits UNet, per 1000 training examples.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ekfac_cost.py [--examples 512] [--targets 32] [--threads 2]

Model: the UNet of configs/lds_digits.yaml (read from the config: channels 16, 32, one layer per block, no
attention, 1x8x8; ~160k parameters) at its seeded initialization; data: the real sklearn digits (the first
``--examples``). Training side: TrainLoss with K = ``--draws`` (default 10) draws; target side: StepOutput
with K' = ``--draws`` at steps spread over [0, 1000). Timed separately (each once, after a warm-up batch):
  fit, covariance pass (A, S), eigendecompositions, eigenvalue-correction pass (EK-FAC only);
  target gradients (per target); preconditioning; scoring pass (one pass over the training examples, all
  targets at once). For reference, TRAK's layerwise featurize of the same examples (d = 2048) is timed too.
The machine is shared (2 cores), so the figures are noisy; OMP_WAIT_POLICY defaults to PASSIVE (see
benchmarks/core_timing.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from attribution import DiffusionTask, StepOutput, TrainLoss, featurize_batch  # noqa: E402
from attribution.ekfac import ekfac_gradients, ekfac_scores, fit_ekfac, precondition  # noqa: E402
from attribution.layerwise import LayerwiseProjector  # noqa: E402


def digits_unet_from_config():
    from diffusers import UNet2DModel

    config = yaml.safe_load((ROOT / "configs" / "lds_digits.yaml").read_text())
    init = config["model"]["init_args"]["unet"]["init_args"]
    torch.manual_seed(0)
    return UNet2DModel(**init).eval(), init


def digits(n: int) -> torch.Tensor:
    """The first ``n`` sklearn digits as (n, 1, 8, 8) in [-1, 1] (the datamodule's uint8 scaling)."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:n]).float()
    return ((images * (255.0 / 16.0)).round().clamp(0, 255) / 127.5 - 1.0).unsqueeze(1)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--targets", type=int, default=32)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler

    model, init = digits_unet_from_config()
    task = DiffusionTask.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    x0 = digits(args.examples)
    keys = torch.arange(args.examples)
    batches = [(x0[s:s + args.batch_size], keys[s:s + args.batch_size]) for s in range(0, len(keys), args.batch_size)]
    train, target = TrainLoss(num_draws=args.draws, seed=0), StepOutput(num_draws=args.draws, seed=0)
    xq, qkeys = x0[:args.targets].clone(), torch.arange(args.targets)
    steps = torch.linspace(10, 990, args.targets).long()
    p = sum(q.numel() for q in model.parameters())
    print(f"digits UNet {init['block_out_channels']} (p = {p}), N = {args.examples}, K = K' = {args.draws}, "
          f"T = {args.targets} targets, batch {args.batch_size}, {args.threads} threads")
    fit_ekfac(task, model, train, batches[:1], strategy="kfac")  # warm-up
    per_k = 1000.0 / args.examples
    rows = []
    for strategy in ("kfac", "ekfac"):
        fit_s, factors = timed(lambda: fit_ekfac(task, model, train, batches, strategy=strategy))
        grad_s, grads = timed(lambda: ekfac_gradients(task, model, target, factors, xq, qkeys, steps=steps))
        pre_s, _ = timed(lambda: precondition(factors, grads, 0.1, strategy=strategy))
        score_s, scores = timed(lambda: ekfac_scores(factors, task, model, train, batches, grads, 0.1,
                                                     strategy=strategy))
        assert scores.shape == (args.examples, args.targets) and bool(torch.isfinite(scores).all())
        rows.append((strategy, fit_s * per_k, score_s * per_k, grad_s / args.targets, pre_s))
        coverage = factors.p / p
    projector = LayerwiseProjector(model, d=2048, seed=0)
    feat_s, _ = timed(lambda: [featurize_batch(task, model, train, projector, x, k) for x, k in batches])
    print(f"covered parameters: {coverage:.4f} of p (GroupNorm affine excluded)")
    print(f"{'strategy':<8} {'fit s/1000 ex':>14} {'score s/1000 ex':>16} {'target grad s/target':>21} "
          f"{'precondition s':>15}")
    for strategy, fit_k, score_k, grad_t, pre in rows:
        print(f"{strategy:<8} {fit_k:>14.2f} {score_k:>16.2f} {grad_t:>21.4f} {pre:>15.3f}")
    print(f"reference: TRAK layerwise featurize (d = 2048) {feat_s * per_k:.2f} s/1000 ex")


if __name__ == "__main__":
    main()
