"""`cli.py score --model.estimator=kfac|ekfac` against the LDS report's `kfac_1ckpt` / `ekfac_1ckpt` scores on a
ground truth: the same influence, from the predict loop instead of the report. Prints, per (target, step), the
largest difference relative to the report's largest score and the Spearman correlation, plus the wall time of the
score run. The score run uses the report's chosen damping, its draws (`--plan` num_draws, draw_seed) and all N
rows as members (the full model was trained on all of them).

    .venv/bin/python benchmarks/kfac_score_vs_report.py --report runs/lds_digits/estimators/report \
        --features runs/lds_digits/features --targets runs/lds_digits/targets --target_ids 0 1 2 3

The report must have scored `<estimator>_1ckpt` (its `chosen_scores.pt` and `lds.csv`).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.score_writer import load_target_scores  # noqa: E402
from cli import main as cli_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, help="the lds_report folder (chosen_scores.pt, lds.csv)")
    parser.add_argument("--features", required=True, help="the plan's features folder (its last store is used)")
    parser.add_argument("--targets", required=True)
    parser.add_argument("--target_ids", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--estimator", default="kfac", choices=["kfac", "ekfac"])
    parser.add_argument("--num_draws", type=int, default=16, help="the plan's num_draws")
    parser.add_argument("--draw_seed", type=int, default=0, help="the plan's draw_seed")
    parser.add_argument("--out_dir", default=None, help="default: <report>/score_<estimator>")
    args = parser.parse_args()
    report, method = Path(args.report), f"{args.estimator}_1ckpt"
    saved = torch.load(report / "chosen_scores.pt", weights_only=False)
    if method not in saved["scores"]:
        raise SystemExit(f"{report / 'chosen_scores.pt'} has no {method!r} (it has {sorted(saved['scores'])})")
    dampings = {float(r["lambda"]) for r in csv.DictReader(open(report / "lds.csv")) if r["method"] == method}
    if len(dampings) != 1:
        raise SystemExit(f"Expected one chosen damping of {method} in {report / 'lds.csv'}, but got {sorted(dampings)}")
    damping = dampings.pop()
    store = sorted(p for p in Path(args.features).iterdir() if (p / "meta.json").is_file())[-1]
    out = Path(args.out_dir or report / f"score_{args.estimator}")
    start = time.perf_counter()
    cli_main(["score", "--config", str(ROOT / "configs" / "score_digits.yaml"), f"--model.features={store}",
              f"--model.targets={args.targets}", f"--model.target_ids={args.target_ids}",
              f"--model.num_draws={args.num_draws}", f"--model.draw_seed={args.draw_seed}",
              f"--model.estimator={args.estimator}", f"--model.damping={damping}", "--model.members=all",
              "--model.rank=all", f"--model.out_dir={out}", "--trainer.logger=false",
              f"--trainer.default_root_dir={out}"])
    seconds = time.perf_counter() - start
    ref, ids, steps = saved["scores"][method], list(saved["target_ids"]), list(saved["steps"])
    worst = 1.0
    for tid in args.target_ids:
        got = load_target_scores(out / f"target_{tid:04d}.pt")
        for s, t in enumerate(got["timesteps"].tolist()):
            r, g = ref[:, ids.index(tid), steps.index(t)].double(), got["scores"][:, s].double()
            rel, rho = float((g - r).abs().max() / r.abs().max()), float(spearmanr(g, r).statistic)
            worst = min(worst, rho)
            print(f"target {tid} t={t}: max |score - report| / max |report| = {rel:.2e}, Spearman {rho:.6f}")
    print(f"{args.estimator} score of {len(args.target_ids)} targets (damping {damping:g}, store {store.name}): "
          f"{seconds:.0f} s; lowest Spearman against the report {worst:.6f}")


if __name__ == "__main__":
    main()
