"""Scoring cost: the one-pass scorer that ``cli.py score`` runs, against the read floor, and the old path.

Run:  .venv/bin/python benchmarks/scoring.py [--root /tmp/journey_trak_bench_scoring] [--max-n 1000000]
      [--cases full|quick] [--no-before] [--keep]

Synthetic finalized stores (float16 Gaussian features, written and finalized by ``FeatureStore`` /
``finalize``; the M stores of one (N, d) are copies of one store, so they are M separate files) and seeded
target gradients. Each measurement runs in a fresh process (its peak RSS is its own). Per case (N, d, M, pairs):

* after: what ``AttributionModule.predict_step`` does once it has the gradients: per checkpoint the solve
  (``attribution.scoring.solve_targets``, eigenvectors loaded and dropped), then ``score_pass`` with the
  scores written to the on-disk column scratch (float32 products, this machine's CPU), then every pair's
  column read back (what ``ScoreWriter`` saves as pair files; the torch.save of the pair files is not timed).
* before: the pre-change module path, frozen below (``legacy_batches``: per batch of ``pair_batch_size`` = 4
  pairs, ``iter_score_blocks`` reloading every kernel and streaming every store through its memory map in
  float64). It is timed on a few batches and EXTRAPOLATED linearly (every batch is one full pass; marked ``x``).

Columns: wall time and time per pair; ``read floor`` = one sequential read of the stores' bytes (``preadv``
into a 16 MiB buffer, page cache as warm as for the case) and the ratio to it; bytes read by the scorer
(``FeatureStore.read``, or the memmap slices of the old path) over the stores' bytes; peak RSS growth over the
process's state before scoring, and its floor: one d x d float64 eigenvector matrix + the M d x pairs float32
solves + one (N,) column; ``mm floor`` = the products' FLOPs at this machine's measured float32 matmul rate.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attribution.store import FeatureStore, read_json  # noqa: E402

FULL = [(10_000, 1024, 1, [4, 64, 640]), (10_000, 4096, 4, [4, 64, 640]), (100_000, 1024, 1, [64]),
        (100_000, 4096, 4, [4, 64, 640]), (1_000_000, 1024, 1, [64]), (1_000_000, 1024, 4, [4, 64, 640])]
QUICK = [(10_000, 1024, 1, [4, 64]), (10_000, 1024, 2, [64])]
RELATIVE_LAM = 0.1
PAIR_BATCH = 4


# ----------------------------------------------------------------------------- stores
def make_store(folder: Path, N: int, d: int, seed: int = 0, chunk: int = 65536) -> None:
    """A finalized float16 store of N x d Gaussian features / sqrt(d), written in chunks."""
    from attribution.scoring import finalize
    store = FeatureStore.open(folder, {"N": N, "d": d, "dtype": "float16", "synthetic": f"gaussian seed {seed}"})
    rng = np.random.default_rng(seed)
    for start in range(0, N, chunk):
        rows = min(chunk, N - start)
        block = rng.standard_normal((rows, d), dtype=np.float32) / math.sqrt(d)
        store.write(torch.arange(start, start + rows), torch.from_numpy(block))
    finalize(store)


def ensure_stores(root: Path, N: int, d: int, M: int) -> list[Path]:
    base = root / f"N{N}_d{d}"
    first = base / "ckpt0"
    if not (first / "kernel.json").exists():
        shutil.rmtree(first, ignore_errors=True)
        started = time.perf_counter()
        make_store(first, N, d)
        print(f"  made {first} in {time.perf_counter() - started:.0f} s", flush=True)
    paths = [first]
    for m in range(1, M):
        copy = base / f"ckpt{m}"
        if not (copy / "kernel.json").exists():
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(first, copy)
        paths.append(copy)
    return paths


def open_store(path: str) -> FeatureStore:
    return FeatureStore.open(path, read_json(Path(path) / "meta.json"), create=False, writable=False)


# ----------------------------------------------------------------------------- the old path, frozen
def legacy_read(store: FeatureStore, start: int, stop: int, dtype) -> torch.Tensor:
    """FeatureStore.read before this change: through the memory map."""
    return torch.from_numpy(np.array(store._features[start:stop], dtype=np.float32)).to(dtype)


def legacy_iter_score_blocks(stores, grads, lams, counter, block_rows=8192):
    """``iter_score_blocks`` before this change (each call loads every kernel and streams every store)."""
    from attribution.scoring import load_kernel
    targets = [G.detach().cpu().to(torch.float64) for G in grads]
    kernels = [load_kernel(s) for s in stores]
    solved = [k.solve(G, lam) for k, G, lam in zip(kernels, targets, lams)]
    for start in range(0, stores[0].N, block_rows):
        stop = min(start + block_rows, stores[0].N)
        acc = torch.zeros(stop - start, targets[0].shape[0], dtype=torch.float64)
        for store, V in zip(stores, solved):
            counter[0] += (stop - start) * store.d * np.dtype(store.meta["dtype"]).itemsize
            acc += legacy_read(store, start, stop, torch.float64) @ V
        yield start, stop, acc / len(stores)


def legacy_batches(stores, grads, lams, pairs: int, budget_s: float, counter) -> tuple[float, int]:
    """The old ``predict_step`` loop on batches of 4 pairs until ``budget_s`` is spent: (seconds, batches run)."""
    started, batches = time.perf_counter(), 0
    for first in range(0, pairs, PAIR_BATCH):
        rows = slice(first, first + PAIR_BATCH)
        scores = torch.cat([b for _, _, b in legacy_iter_score_blocks(stores, [G[rows] for G in grads], lams,
                                                                      counter)]).float()
        del scores
        batches += 1
        if time.perf_counter() - started > budget_s:
            break
    return time.perf_counter() - started, batches


# ----------------------------------------------------------------------------- one measurement (child)
def read_floor(paths: list[str]) -> tuple[float, int]:
    """Seconds and bytes of one sequential read of the stores' feature data."""
    buffer = np.empty(16 << 20, dtype=np.uint8)
    total, started = 0, time.perf_counter()
    for path in paths:
        fd = os.open(Path(path) / "features.npy", os.O_RDONLY)
        try:
            offset = 0
            while True:
                got = os.preadv(fd, [buffer], offset)
                if got <= 0:
                    break
                offset += got
            total += offset
        finally:
            os.close(fd)
    return time.perf_counter() - started, total


def rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0); False where not allowed (then the
    peak so far, ``ru_maxrss``, is the baseline and the peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss(reset: bool) -> int:
    return rss_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_rate() -> float:
    """This machine's float32 matmul rate (FLOP/s): the best of 7 timings of an 8192 x 1024 @ 1024 x 640 product
    (the machine is shared: the best timing is the least disturbed one)."""
    a, b = torch.randn(8192, 1024), torch.randn(1024, 640)
    a @ b
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 8192 * 1024 * 640 / best


def child(spec: dict) -> dict:
    from attribution.scoring import load_spectrum, relative_lambda, score_pass, solve_targets
    stores = [open_store(p) for p in spec["paths"]]
    N, d, M, P = stores[0].N, stores[0].d, len(stores), spec["pairs"]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(P, d, generator=gen) for _ in stores]
    lams = [relative_lambda(load_spectrum(s), RELATIVE_LAM) for s in stores]
    floor_s, floor_bytes = read_floor(spec["paths"])
    rate = spec["rate"]
    reset = reset_peak_rss()
    rss0 = peak_rss(reset)
    out = {"N": N, "d": d, "M": M, "pairs": P, "mode": spec["mode"], "floor_s": floor_s, "floor_bytes": floor_bytes,
           "mm_floor_s": 2 * N * d * P * M / rate, "gflops": rate / 1e9}
    if spec["mode"] == "after":
        read_bytes = [0]
        original = FeatureStore.read

        def counted(self, start=0, stop=None, dtype=torch.float32, out=None):
            tensor = original(self, start, stop, dtype, out)
            read_bytes[0] += tensor.shape[0] * self.d * np.dtype(self.meta["dtype"]).itemsize
            return tensor

        FeatureStore.read = counted
        started = time.perf_counter()
        solved = [solve_targets(s, G, lam).float() for s, G, lam in zip(stores, grads, lams)]
        solved_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory(dir=spec["scratch"]) as scratch:
            result = score_pass(stores, solved, columns=True, scratch_dir=scratch)
            pass_s = time.perf_counter() - started - solved_s
            for j in range(P):
                result.columns.column(j)
            result.columns.close()
        out.update(seconds=time.perf_counter() - started, solve_s=solved_s, pass_s=pass_s,
                   bytes=read_bytes[0], extrapolated=False)
    else:
        counter = [0]
        seconds, batches = legacy_batches(stores, grads, lams, P, spec["budget"], counter)
        total_batches = math.ceil(P / PAIR_BATCH)
        out.update(seconds=seconds / batches * total_batches, bytes=counter[0] // batches * total_batches,
                   batches_run=batches, extrapolated=batches < total_batches)
    out["rss_delta"] = peak_rss(reset) - rss0
    out["rss_floor"] = d * d * 8 + M * d * P * 4 + N * 4
    return out


# ----------------------------------------------------------------------------- driver
def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"benchmark case {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(r: dict) -> str:
    mb = 1 << 20
    mark = "x" if r.get("extrapolated") else " "
    return (f"{r['mode']:>6} {r['N']:>9} {r['d']:>5} {r['M']:>2} {r['pairs']:>5} | {r['seconds']:8.2f}{mark} "
            f"{1000 * r['seconds'] / r['pairs']:9.1f} | {r['floor_s']:6.2f} {r['seconds'] / r['floor_s']:7.1f}x "
            f"{r['mm_floor_s']:7.2f} | {r['bytes'] / r['floor_bytes']:6.1f}x | {r['rss_delta'] / mb:8.0f} "
            f"{r['rss_floor'] / mb:7.0f} {r['rss_delta'] / r['rss_floor']:6.1f}x")


HEADER = ("  mode         N     d  M pairs |  time s  ms/pair | floor s   ratio mm fl s |  bytes | "
          "dRSS MB floorMB  ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/journey_trak_bench_scoring", help="where the synthetic stores live")
    parser.add_argument("--max-n", type=int, default=1_000_000, help="skip cases with a larger N")
    parser.add_argument("--cases", choices=("full", "quick"), default="full")
    parser.add_argument("--no-before", action="store_true", help="skip the old path")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of old-path batches per case")
    parser.add_argument("--keep", action="store_true", help="keep the stores for the next run")
    parser.add_argument("--out", help="also write the rows as JSON lines to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    cases = [c for c in (FULL if args.cases == "full" else QUICK) if c[0] <= args.max_n]
    print(f"uptime: {os.popen('uptime').read().strip()}")
    rate = matmul_rate()
    print(HEADER, flush=True)
    rows, started = [], time.perf_counter()
    try:
        for N, d, M, pair_counts in cases:
            paths = [str(p) for p in ensure_stores(root, N, d, M)]
            if not args.no_before:  # every old batch is a full pass: measure once at the largest count
                spec = {"paths": paths, "pairs": max(pair_counts), "mode": "before", "budget": args.budget,
                        "rate": rate}
                first = run_child(spec)
                per_batch = first["seconds"] / math.ceil(first["pairs"] / PAIR_BATCH)
                for P in pair_counts:
                    scaled = {**first, "pairs": P, "seconds": per_batch * math.ceil(P / PAIR_BATCH),
                              "bytes": first["bytes"] // math.ceil(first["pairs"] / PAIR_BATCH) * math.ceil(P / PAIR_BATCH),
                              "extrapolated": first["batches_run"] < math.ceil(P / PAIR_BATCH),
                              "mm_floor_s": first["mm_floor_s"] * P / first["pairs"],
                              "rss_floor": d * d * 8 + M * d * P * 4 + N * 4}
                    rows.append(scaled)
                    print(row(scaled), flush=True)
            for P in pair_counts:
                result = run_child({"paths": paths, "pairs": P, "mode": "after", "scratch": str(root), "rate": rate})
                rows.append(result)
                print(row(result), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"total {time.perf_counter() - started:.0f} s; x = extrapolated from the batches run; float32 matmul rate "
          f"{rate / 1e9:.0f} GFLOP/s" if rows else "no case")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
