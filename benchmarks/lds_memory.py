"""Peak memory of the ``lds_report`` scoring work at N = 10^5 (synthetic stores and data), before and after.

Run:  .venv/bin/python benchmarks/lds_memory.py [--n 100000] [--d 1024] [--targets 32] [--steps 5]
      [--lambdas 6] [--masks 32] [--root /tmp/journey_trak_bench_lds]

What ``cli.py lds_report`` does once targets, gradients and actual outputs exist, with the digits plan's methods
(trak, trak_1ckpt, trak_square over M = 2 float16 stores; pixel, embedding, random over 32 x 32 x 3 images of an
``ArrayDataModule``), ``build_report`` and the chosen scores that ``chosen_scores.pt`` keeps:

* after: ``evaluation.methods`` as it is (one pass over the stores per TRAK method for every lambda, the
  predictions ``masks @ scores`` accumulated while streaming, the scores on disk; images streamed from the
  datamodule, labels without decoding);
* before: the same report from the pre-change arrays: per TRAK method an (L, N, B, S) float32 array built by one
  pass per lambda and kept for the report, every training image as float32 (``dataset_arrays``), the
  embedding of all N training images at once (the shapes the old code held, built here with the current
  functions' tensor paths).

Each runs in a fresh process; peak RSS (``VmHWM``, reset after the data, stores and gradients are ready) is
reported above that baseline, beside the process's RSS baseline itself (the datamodule's uint8 images,
torch). The classifier is an untrained ``SmallConvClassifier`` (its training is not what is measured).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.scoring import ensure_stores, open_store, peak_rss, reset_peak_rss, rss_bytes  # noqa: E402


def make_data(root: Path, N: int) -> Path:
    path = root / f"images{N}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, images=rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8),
                 labels=rng.integers(0, 10, N).astype(np.int64))
    return path


def child(spec: dict) -> dict:
    from attribution import SmallConvClassifier, embedding_cosine_scores, pixel_cosine_scores, random_scores
    from attribution.scoring import load_spectrum, relative_lambda, score
    from datamodules import ArrayDataModule
    from evaluation.methods import baseline_scores, dataset_images, dataset_labels, trak_scores
    from evaluation.report import build_report, chosen_scores

    dm = ArrayDataModule(path=spec["data"])
    dm.setup()
    stores = [open_store(p) for p in spec["stores"]]
    N, d, B, S, L, J = stores[0].N, stores[0].d, spec["targets"], spec["steps"], spec["lambdas"], spec["masks"]
    lambdas = [10.0 ** k for k in range(-3, -3 + L)]
    gen = torch.Generator().manual_seed(0)
    grads = {kind: [torch.randn(B * S, d, generator=gen) for _ in stores] for kind in ("loss", "square")}
    masks = torch.rand(J, N, generator=gen) < 0.5
    actual = torch.randn(J, B, S, generator=gen, dtype=torch.float64)
    x0 = torch.rand(B * S, 3, 32, 32, generator=gen) * 2 - 1
    classifier = SmallConvClassifier(3, 10, 32)
    trak = {"trak": (stores, grads["loss"]), "trak_1ckpt": (stores[-1:], grads["loss"][-1:]),
            "trak_square": (stores, grads["square"])}
    baseline = rss_bytes("VmRSS")
    reset = reset_peak_rss()
    rss0 = peak_rss(reset)
    started = time.perf_counter()
    if spec["mode"] == "after":
        images = dataset_images(dm)
        dataset_labels(dm)
        scores = {m: trak_scores(s, g, lambdas, B, S, masks, Path(spec["scratch"])) for m, (s, g) in trak.items()}
        scores["pixel"] = baseline_scores(pixel_cosine_scores(images, x0), masks, B, S)
        scores["embedding"] = baseline_scores(embedding_cosine_scores(classifier.embed, images, x0), masks, B, S)
        scores["random"] = baseline_scores(random_scores(N, B * S, seed=1), masks, B, S)
    else:
        images = dm.images(range(N))
        scores = {}
        for m, (s, g) in trak.items():
            per_store = [[relative_lambda(load_spectrum(st), lam) for st in s] for lam in lambdas]
            scores[m] = torch.stack([score(s, g, lam) for lam in per_store]).reshape(L, N, B, S)
        scores["pixel"] = pixel_cosine_scores(images, x0).reshape(N, B, S)
        with torch.no_grad():  # the old embedding baseline: every training image encoded at once
            train = torch.cat([classifier.embed(images[i:i + 256]).double() for i in range(0, N, 256)])
            train = train / train.norm(dim=1, keepdim=True)
            targets = classifier.embed(x0).double()
            scores["embedding"] = (train @ (targets / targets.norm(dim=1, keepdim=True)).T).float().reshape(N, B, S)
        scores["random"] = random_scores(N, B * S, seed=1).reshape(N, B, S)
    report = build_report(scores, masks, actual, None, list(range(S)), lambdas, 0, 0.5, False, 1, ("pixel",))
    chosen = {m: chosen_scores(scores[m], report["results"][m]) for m in scores}
    seconds = time.perf_counter() - started
    output = sum(c.numel() * c.element_size() for c in chosen.values())
    return {"mode": spec["mode"], "N": N, "d": d, "M": len(stores), "B": B, "S": S, "L": L, "J": J,
            "baseline_rss": int(baseline), "peak_delta": peak_rss(reset) - rss0, "output_bytes": output,
            "seconds": seconds, "lds_trak": [float(v) for v in report["results"]["trak"].report.mean]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--targets", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lambdas", type=int, default=6)
    parser.add_argument("--masks", type=int, default=32)
    parser.add_argument("--root", default="/tmp/journey_trak_bench_lds")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    try:
        spec = {"stores": [str(p) for p in ensure_stores(root, args.n, args.d, 2)], "data": str(make_data(root, args.n)),
                "targets": args.targets, "steps": args.steps, "lambdas": args.lambdas, "masks": args.masks,
                "scratch": str(root)}
        mb = 1 << 20
        for mode in ("before", "after"):
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "mode": mode})],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{mode:>6}: N={r['N']} d={r['d']} M={r['M']} targets x steps = {r['B']} x {r['S']}, "
                  f"{r['L']} lambdas, {r['J']} masks | peak RSS above baseline {r['peak_delta'] / mb:7.0f} MB "
                  f"(baseline {r['baseline_rss'] / mb:.0f} MB: torch + the datamodule's uint8 images) | output "
                  f"(chosen scores) {r['output_bytes'] / mb:.0f} MB | {r['seconds']:.1f} s | trak LDS "
                  f"{[round(v, 4) for v in r['lds_trak']]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
