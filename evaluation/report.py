"""The LDS report: per method and step, LDS on the report targets (mean, s.e.), the seed-noise
ceiling beside it, the TRAK lambda sweep (chosen on held-out targets; the oracle only beside it,
labelled), paired differences against pixel similarity; CSV/JSON tables, PNG plots, TensorBoard.

Tables written to ``<out_dir>/report``: ``lds.csv|json`` (the figures to report), ``lambda_sweep.csv|json``
(held-out and report means per lambda; ``oracle_*`` columns are optimistic, never the method's LDS),
``paired.csv|json`` (method minus each of ``plan.paired_versus``, paired over report targets), ``ceiling.csv|json``
(with its s.e. over report targets), ``comparison.csv|json`` (one row per method: LDS per step and mean over steps,
paired differences against TRAK Eq. 3 and pixel, ratio to TRAK, chosen ridge, cost). A ridge chosen at the edge
of its grid is flagged (``lambda_at_grid_edge``); ``lds_report`` extends the grid past it first.

Everything here works on datamodel predictions ``(J, B, S)`` (TRAK ``(L, J, B, S)``): the methods hand them
over already summed over each subset (``evaluation.methods.MethodScores``), so the report never holds a
lambdas x N x targets x steps array; score tensors are still accepted (their predictions are computed here).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from attribution import (choose_lambda_heldout, lds_table, paired_difference, predicted_outputs, seed_noise_ceiling,
                         split_targets, write_table)
from attribution.lds import (LambdaChoice, LDSResult, combined_se, lds_from_predictions, lds_per_lambda_from_predictions,
                             lds_specific_from_predictions, leave_one_mask_out, mask_jackknife_se, nan_mean_se,
                             target_specific)
from attribution.plots import plot_lambda_sweep, plot_lds_vs_step
from evaluation.plan import TRAK_METHODS  # noqa: F401 (kept name)


def masks_matrix(mask_files: Sequence[Path]) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.stack([np.load(p) for p in mask_files])).bool()


def method_predictions(scores, masks: torch.Tensor) -> torch.Tensor:
    """Predictions ``(J, B, S)`` / ``(L, J, B, S)`` of a method: its ``.predictions`` (``MethodScores``), or those
    of score tensors ``(N, B, S)`` / ``(L, N, B, S)``."""
    if hasattr(scores, "predictions"):
        return scores.predictions
    if scores.ndim == 4:
        return torch.stack([predicted_outputs(s, masks) for s in scores])
    return predicted_outputs(scores, masks)


def evaluate_predictions(predictions: torch.Tensor, actual: torch.Tensor, lambdas: Sequence[float],
                         heldout: torch.Tensor, report: torch.Tensor, per_step: bool):
    """A :class:`LambdaChoice` for ``(L, J, B, S)`` predictions, an :class:`LDSResult` on the report targets else."""
    if predictions.ndim == 4:
        per_lambda = lds_per_lambda_from_predictions(predictions, actual)
        return choose_lambda_heldout(per_lambda, lambdas, heldout, report, per_step=per_step)
    return lds_from_predictions(predictions[:, report], actual[:, report])


def evaluate_method(scores: torch.Tensor, masks: torch.Tensor, actual: torch.Tensor, lambdas: Sequence[float],
                    heldout: torch.Tensor, report: torch.Tensor, per_step: bool):
    """:func:`evaluate_predictions` of a method's scores (or ``MethodScores``) under ``masks (J, N)``."""
    return evaluate_predictions(method_predictions(scores, masks), actual, lambdas, heldout, report, per_step)


def report_lds(result) -> LDSResult:
    return result.report if isinstance(result, LambdaChoice) else result


def sweep_rows(method: str, choice: LambdaChoice, steps: Sequence[int], per_lambda_report: torch.Tensor) -> list[dict]:
    """One row per (lambda, step): held-out mean (the choice's only input), report mean, chosen/oracle flags."""
    rows = []
    for i, lam in enumerate(choice.lambdas.tolist()):
        for s, t in enumerate(steps):
            rows.append({"method": method, "lambda": lam, "step": int(t),
                         "heldout_lds_mean": float(choice.heldout_mean[i, s]),
                         "report_lds_mean_for_reference": float(per_lambda_report[i, s]),
                         "chosen_on_heldout": bool(int(choice.chosen_index[s]) == i),
                         "oracle_on_report_targets": bool(int(choice.oracle_index[s]) == i)})
    return rows


def build_report(scores: dict, masks: torch.Tensor, actual: torch.Tensor, replicates: Optional[torch.Tensor],
                 steps: Sequence[int], lambdas: Sequence[float], split_seed: int, heldout_fraction: float,
                 per_step: bool, seeds_per_mask: int, versus: Sequence[str] = ("pixel",)) -> dict:
    """Every table of the report as rows (see the module docstring), plus the per-method results.

    Args:
        scores: method -> ``MethodScores`` (its predictions are used), or scores ``(N, B, S)`` or, for TRAK,
            ``(L, N, B, S)``.
        masks: ``(J, N)`` bool; actual: ``(J, B, S)`` seed-averaged outputs (NaN rows = models missing).
        replicates: ``(R, J_rep, B, S)`` replicate outputs for the ceiling, or None.
        versus: methods every other method is compared with, paired over the report targets.
    """
    trained = torch.isfinite(actual).all(-1).all(-1)
    heldout, report = split_targets(actual.shape[1], split_seed, heldout_fraction)

    def heldout_mean(p: torch.Tensor) -> torch.Tensor:   # (L, J, B, S) -> (L, S) mean LDS on the held-out targets
        return nan_mean_se(lds_per_lambda_from_predictions(p[:, trained], actual[trained])[:, heldout], 1)[0]

    for s in scores.values():   # a `_stepwise` method: its target side per step, on the held-out targets only
        if callable(getattr(s, "choose_kinds", None)):
            s.choose_kinds(heldout_mean)
    sides = {m: s.chosen for m, s in scores.items() if getattr(s, "chosen", None) is not None}
    predictions = {m: method_predictions(s, masks)[..., trained, :, :] for m, s in scores.items()}
    grids = {m: list(getattr(s, "lambdas", None) or lambdas) for m, s in scores.items()}
    masks, actual = masks[trained], actual[trained]
    results = {m: evaluate_predictions(p, actual, grids[m], heldout, report, per_step) for m, p in predictions.items()}
    spread = {m: mask_uncertainty(chosen_predictions(predictions[m], results[m], report), actual[:, report])
              for m in results}
    ceiling = seed_noise_ceiling(replicates, num_seeds=seeds_per_mask) if replicates is not None else None
    ceiling_report, ceiling_se = (None, None) if ceiling is None else nan_mean_se(ceiling.ceiling[report], 0)[:2]
    specific_ceiling = None   # the same ceiling for the target-specific LDS (each replicate's common part removed)
    if replicates is not None and report.numel() >= 2:
        parts = torch.stack([target_specific(r[:, report]) for r in replicates])
        specific_ceiling = nan_mean_se(seed_noise_ceiling(parts, num_seeds=seeds_per_mask).ceiling, 0)[0]
    rows = lds_table(results, steps, ceiling_report)
    for row in rows:
        s = list(steps).index(row["step"])
        u = spread[row["method"]]
        se_masks, specific_se_masks = _at(_jackknife(u["loo"]), s), _at(_jackknife(u["specific_loo"]), s)
        row.update(lds_se_masks=se_masks, lds_se_total=float(combined_se(row["lds_se"], se_masks)),
                   specific_mean=float(u["specific"].mean[s]),
                   specific_se_total=float(combined_se(float(u["specific"].se[s]), specific_se_masks)),
                   specific_ceiling=_at(specific_ceiling, s),
                   ceiling_se=math.nan if ceiling_se is None else float(ceiling_se[s]),
                   num_models=int(masks.shape[0]), seeds_per_mask=seeds_per_mask, targets="report")
        if row["method"] in sides:   # a `_stepwise` method: the target side chosen at this step (held-out)
            row["target_output"] = sides[row["method"]][s]
        choice = results[row["method"]]
        if isinstance(choice, LambdaChoice):
            row["lambda_at_grid_edge"] = bool(at_grid_edge(choice)[s])
            row["oracle_lambda_NOT_REPORTED"] = float(choice.oracle_lambda[s])
            row["oracle_lds_mean_NOT_REPORTED"] = float(choice.oracle_mean[s])
    tables = {"lds": rows, "lambda_sweep": [], "paired": [], "ceiling": [],
              "comparison": comparison_rows(results, steps, {m: getattr(sc, "cost", {}) for m, sc in scores.items()},
                                            spread=spread)}
    for row in tables["comparison"]:
        if row["method"] in sides:
            row["target_output_per_step"] = "/".join(sides[row["method"]])
    for method, choice in results.items():
        if isinstance(choice, LambdaChoice):
            per_lambda = lds_per_lambda_from_predictions(predictions[method], actual)[:, report]
            tables["lambda_sweep"] += sweep_rows(method, choice, steps, nan_mean_se(per_lambda, 1)[0])
    for baseline in [b for b in versus if b in results]:
        base = report_lds(results[baseline]).per_target
        for method, res in results.items():
            if method == baseline:
                continue
            mean, se = paired_difference(report_lds(res).per_target, base)
            se_masks = _jackknife(spread[method]["loo"], spread[baseline]["loo"])
            tables["paired"] += [{"method": method, "versus": baseline, "step": int(t), "diff_mean": float(mean[s]),
                                  "diff_se": float(se[s]), "diff_se_masks": _at(se_masks, s),
                                  "diff_se_total": float(combined_se(float(se[s]), _at(se_masks, s))),
                                  "n_targets": int(report.numel())}
                                 for s, t in enumerate(steps)]
    if ceiling is not None:
        tables["ceiling"] = [{"step": int(t), "ceiling": float(ceiling_report[s]), "ceiling_se": float(ceiling_se[s]),
                              "noise_fraction_single_seed": float(nan_mean_se(ceiling.noise_fraction[report], 0)[0][s]),
                              "specific_ceiling": _at(specific_ceiling, s),
                              "replicate_seeds": int(replicates.shape[0]), "replicate_masks": int(replicates.shape[1]),
                              "seeds_averaged": seeds_per_mask} for s, t in enumerate(steps)]
    return {"tables": tables, "results": results, "heldout": heldout, "report": report}


def chosen_predictions(predictions: torch.Tensor, result, report: torch.Tensor) -> torch.Tensor:
    """``(J, B_report, S)``: a method's predictions on the report targets at the ridge chosen per step on the
    held-out targets (``(L, J, B, S)`` predictions with a :class:`LambdaChoice`), else as they are."""
    if isinstance(result, LambdaChoice):
        index = result.chosen_index.tolist()
        return torch.stack([predictions[int(index[s]), :, :, s] for s in range(len(index))], dim=-1)[:, report]
    return predictions[:, report]


def mask_uncertainty(predictions: torch.Tensor, actual: torch.Tensor) -> dict:
    """What the s.e. over targets leaves out: leave-one-model-out LDS means ``loo (J, S)`` (None below 4 models;
    their jackknife s.e. is :func:`_jackknife`), and the same ``specific_loo`` for the target-specific LDS
    (``specific``: an :class:`LDSResult`)."""
    enough = predictions.shape[0] >= 4
    return {"specific": lds_specific_from_predictions(predictions, actual),
            "loo": leave_one_mask_out(predictions, actual) if enough else None,
            "specific_loo": leave_one_mask_out(predictions, actual, specific=True) if enough else None}


def _jackknife(loo: Optional[torch.Tensor], minus: Optional[torch.Tensor] = None, over_steps: bool = False):
    """Jackknife s.e. over models of a method's LDS (of its difference from ``minus``'s, paired by left-out
    model) per step, or of its mean over the steps where it is defined (NaN steps skipped, as the row's mean over
    steps skips them per target); None below 4 models (no replicates)."""
    if loo is None:
        return None
    theta = loo if minus is None else loo - minus
    return mask_jackknife_se(theta.nanmean(1) if over_steps else theta)


def _at(value: Optional[torch.Tensor], s: Optional[int] = None) -> float:
    if value is None:
        return math.nan
    return float(value if s is None else value[s])


def at_grid_edge(choice: LambdaChoice) -> torch.Tensor:
    """``(S,)`` bool: the held-out choice is the first or the last value of its grid (the optimum may lie beyond)."""
    L = len(choice.lambdas)
    return (choice.chosen_index == 0) | (choice.chosen_index == L - 1) if L > 1 else torch.zeros_like(
        choice.chosen_index, dtype=torch.bool)


def edge_methods(report: dict) -> dict[str, list[str]]:
    """Methods whose held-out ridge choice sits at an edge of the grid: name -> ["low"] / ["high"] edges."""
    out = {}
    for method, choice in report["results"].items():
        if isinstance(choice, LambdaChoice):
            L = len(choice.lambdas)
            edges = sorted({("low" if int(i) == 0 else "high") for i in choice.chosen_index.tolist()
                            if L > 1 and int(i) in (0, L - 1)})
            if edges:
                out[method] = edges
    return out


def extended_grid(grid: Sequence[float], edges: Sequence[str]) -> list[float]:
    """``grid`` with one more value a factor 10 past each edge in ``edges``."""
    values = sorted(float(v) for v in grid)
    if "low" in edges:
        values.insert(0, values[0] / 10.0)
    if "high" in edges:
        values.append(values[-1] * 10.0)
    return values


COMPARED_WITH = ("trak", "pixel")


def comparison_rows(results: dict, steps: Sequence[int], costs: dict, versus: Sequence[str] = COMPARED_WITH,
                    spread: Optional[dict] = None) -> list[dict]:
    """One row per method: report LDS per step (lambda chosen on held-out targets), its mean over steps with
    s.e. over report targets, paired differences of that mean against TRAK Eq. 3 (``trak``) and pixel
    similarity (with s.e.), the ratio to TRAK, the chosen ridge, whether it sits at a grid edge, and the cost
    (featurize seconds per 1000 examples of the stores used; seconds of scoring in the report).

    With ``spread`` (method -> :func:`mask_uncertainty`) every s.e. gets its jackknife over the subset models
    (``*_se_masks``) and the total ``*_se_total = sqrt(se^2 + se_masks^2)``, and the target-specific LDS
    (``specific_*``: mean over steps, total s.e., paired differences) stands beside the paper's."""
    def step_mean(lds) -> torch.Tensor:                      # (B_r,) mean over steps per report target
        return nan_mean_se(lds.per_target.T, 0)[0]

    spread = spread or {}
    means = {m: step_mean(report_lds(r)) for m, r in results.items()}
    specific = {m: step_mean(u["specific"]) for m, u in spread.items()}
    base = float(nan_mean_se(means["trak"], 0)[0]) if "trak" in means else math.nan
    rows = []
    for method, res in results.items():
        lds = report_lds(res)
        mean, se, n = nan_mean_se(means[method], 0)
        u = spread.get(method, {})
        row = {"method": method}
        for s, t in enumerate(steps):
            row[f"lds_t{int(t)}"] = float(lds.mean[s])
            row[f"se_t{int(t)}"] = float(lds.se[s])
        se_masks = _at(_jackknife(u.get("loo"), over_steps=True))
        row.update(lds_mean_over_steps=float(mean), lds_mean_se=float(se), lds_mean_se_masks=se_masks,
                   lds_mean_se_total=float(combined_se(float(se), se_masks)), n_targets=int(n))
        if method in specific:
            s_mean, s_se, _ = nan_mean_se(specific[method], 0)
            s_masks = _at(_jackknife(u.get("specific_loo"), over_steps=True))
            row.update(specific_mean_over_steps=float(s_mean), specific_se_total=float(combined_se(float(s_se), s_masks)))
        for other in versus:
            if other in means and other != method:
                d_mean, d_se = paired_difference(means[method].unsqueeze(1), means[other].unsqueeze(1))
                d_masks = _at(_jackknife(u.get("loo"), spread[other]["loo"], over_steps=True)) if u else math.nan
                row[f"minus_{other}"], row[f"minus_{other}_se"] = float(d_mean[0]), float(d_se[0])
                row[f"minus_{other}_se_total"] = float(combined_se(float(d_se[0]), d_masks))
                if method in specific and other in specific:
                    sd_mean, sd_se = paired_difference(specific[method].unsqueeze(1), specific[other].unsqueeze(1))
                    sd_masks = _at(_jackknife(u.get("specific_loo"), spread[other]["specific_loo"], over_steps=True))
                    row[f"specific_minus_{other}"] = float(sd_mean[0])
                    row[f"specific_minus_{other}_se_total"] = float(combined_se(float(sd_se[0]), sd_masks))
            else:
                row[f"minus_{other}"] = row[f"minus_{other}_se"] = row[f"minus_{other}_se_total"] = math.nan
        row["ratio_to_trak"] = float(mean) / base if base not in (0.0,) and math.isfinite(base) else math.nan
        if isinstance(res, LambdaChoice):
            row["lambda"] = ";".join(f"{v:g}" for v in res.chosen_lambda.tolist())
            row["lambda_at_grid_edge"] = bool(at_grid_edge(res).any())
        cost = costs.get(method, {})
        row["featurize_s_per_1000"] = float(cost.get("featurize_s_per_1000", math.nan))
        row["score_seconds"] = float(cost.get("score_seconds", math.nan))
        rows.append(row)
    return rows


def write_report(report: dict, steps: Sequence[int], out: Path, logger=None) -> list[Path]:
    """CSV/JSON tables and PNG plots into ``out``; scalars and images to ``logger`` (TensorBoard) if given."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in report["tables"].items():
        if rows:
            write_table(rows, out / f"{name}.csv", out / f"{name}.json")
    plots = [plot_lds_vs_step(report["tables"]["lds"], out / "lds_vs_step.png",
                              title="LDS per step (report targets; lambda chosen on held-out targets)")]
    for method, choice in report["results"].items():
        if isinstance(choice, LambdaChoice):
            plots.append(plot_lambda_sweep(choice.lambdas, choice.heldout_mean, out / f"lambda_sweep_{method}.png",
                                           steps=list(steps), chosen=choice.chosen_lambda,
                                           title=f"{method}: held-out LDS against lambda"))
    _log_tensorboard(logger, report, plots)
    return [p.path for p in plots]


def _log_tensorboard(logger, report: dict, plots) -> None:
    experiment = getattr(logger, "experiment", None)
    if not hasattr(experiment, "add_scalar"):
        return
    for row in report["tables"]["lds"]:
        if math.isfinite(row["lds_mean"]):
            experiment.add_scalar(f"lds/{row['method']}", row["lds_mean"], global_step=row["step"])
    for plot in plots:
        experiment.add_image(f"lds/{plot.path.stem}", plot.image, 0)
    experiment.flush()


def chosen_scores(scores, result) -> torch.Tensor:
    """``(N, B, S)`` scores at the held-out choice of lambda (per step), or the baseline's scores; from a
    ``MethodScores`` (read from its on-disk columns, which are then released) or from score tensors."""
    if hasattr(scores, "at"):
        try:
            return scores.at(result.chosen_index if isinstance(result, LambdaChoice) else None)
        finally:
            scores.close()
    if not isinstance(result, LambdaChoice):
        return scores
    idx = result.chosen_index
    return torch.stack([scores[int(idx[s]), :, :, s] for s in range(scores.shape[-1])], dim=-1)


__all__ = ["build_report", "write_report", "chosen_scores", "masks_matrix", "comparison_rows", "edge_methods",
           "extended_grid", "TRAK_METHODS"]
