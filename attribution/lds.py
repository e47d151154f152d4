r"""Linear datamodeling score (LDS) and the statistics around it.

Counterfactual check of attribution scores (SPEC, "How attributions are validated"). Models are
trained on J random subsets ``S_j`` (boolean ``masks (J, N)``). For target ``b`` and step ``s``:

* prediction ``p_j = sum_{i in S_j} tau_i`` (:func:`predicted_outputs`, a matmul);
* actual ``a_j = f_t(x0hat_t(full model), theta(S_j))`` (measured, seed-averaged upstream);
* ``LDS(b, s) = spearman_j(p_j, -a_j)``. Sign convention: a *positive* score means including the
  example *lowers* ``f_t``, so predictions are correlated with ``-f_t``.

Also here: a torch Spearman (average ranks for ties; tested against ``scipy.stats.spearmanr``),
the seed-noise ceiling from replicate models, lambda selection on held-out targets (the
report targets never influence the choice), paired method differences and table writers.

NaN policy: a (target, step) column whose predictions or actuals are constant, or contain a
non-finite value, has an undefined correlation and gives NaN; means and standard errors over
targets skip NaNs and report how many targets they used.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

from . import _checks
from .atomic import atomic_write_text

__all__ = ["LDSResult", "SeedNoiseCeiling", "LambdaChoice", "rank_average", "spearman_columns",
           "predicted_outputs", "lds", "linear_datamodeling_score", "lds_from_predictions", "lds_per_lambda",
           "target_specific", "lds_specific_from_predictions", "leave_one_mask_out", "mask_jackknife_se",
           "combined_se",
           "lds_per_lambda_from_predictions", "nan_mean_se", "seed_noise_ceiling",
           "split_targets", "choose_lambda_heldout", "paired_difference", "lds_table", "write_table"]

F64 = torch.float64
Indices = Union[Tensor, Sequence[int]]


# ----------------------------------------------------------------------------- rank correlation
def rank_average(x: Tensor) -> Tensor:
    """1-based ranks along dim 0 with ties given their average rank (scipy's ``'average'``).

    ``x (J, M)`` -> ``(J, M)`` float64. Rank of ``v`` = ``(#{< v} + #{<= v} + 1) / 2``.
    """
    cols = x.to(F64).T.contiguous()                       # (M, J)
    ordered = torch.sort(cols, dim=1).values
    below = torch.searchsorted(ordered, cols, right=False)
    upto = torch.searchsorted(ordered, cols, right=True)
    return ((below + upto + 1).to(F64) / 2).T


def _pearson_columns(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = torch.sqrt((a * a).sum(0) * (b * b).sum(0))
    r = (a * b).sum(0) / denom
    return torch.where(denom > 0, r.clamp(-1.0, 1.0), torch.full_like(r, math.nan))


def spearman_columns(x: Tensor, y: Tensor) -> Tensor:
    """Spearman correlation of each column pair: ``x, y (J, M)`` -> ``(M,)`` float64.

    NaN for a constant column or one holding a non-finite value.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"Expected `x` and `y` of the same shape (J, M), but got {tuple(x.shape)} and {tuple(y.shape)}")
    bad = ~(torch.isfinite(x).all(0) & torch.isfinite(y).all(0))
    r = _pearson_columns(rank_average(torch.nan_to_num(x)), rank_average(torch.nan_to_num(y)))
    return torch.where(bad, torch.full_like(r, math.nan), r)


def nan_mean_se(values: Tensor, dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, standard error (``std(ddof=1) / sqrt(n)``) and count ``n`` of the finite entries along ``dim``.

    Mean is NaN where ``n = 0``; the s.e. is NaN where ``n < 2``.
    """
    values = values.to(F64)
    ok = torch.isfinite(values)
    n = ok.sum(dim)
    filled = torch.where(ok, values, torch.zeros_like(values))
    mean = filled.sum(dim) / n
    dev = torch.where(ok, values - mean.unsqueeze(dim), torch.zeros_like(values))
    var = (dev * dev).sum(dim) / (n - 1)
    se = torch.sqrt(var / n)
    nan = torch.full_like(mean, math.nan)
    return torch.where(n > 0, mean, nan), torch.where(n > 1, se, nan), n


# ----------------------------------------------------------------------------- LDS
@dataclass
class LDSResult:
    """LDS per (target, step) and its summary per step.

    Attributes:
        per_target: ``(B, S)`` Spearman(prediction, -actual) across the J subset models.
        mean: ``(S,)`` mean over the targets with a defined correlation.
        se: ``(S,)`` standard error over those targets (``std(ddof=1) / sqrt(n)``).
        n_targets: ``(S,)`` how many targets entered the mean (the others were NaN).
    """

    per_target: Tensor
    mean: Tensor
    se: Tensor
    n_targets: Tensor


def _check_masks(masks: Tensor) -> Tensor:
    _checks.tensor_ndim("masks", masks, 2, " (J, N) bool")
    if masks.dtype != torch.bool:
        raise TypeError(f"Expected `masks` to be a bool tensor (J, N), but got dtype {masks.dtype}")
    return masks


def predicted_outputs(scores: Tensor, masks: Tensor) -> Tensor:
    """Datamodel predictions ``sum_{i in S_j} tau_i``.

    Args:
        scores: ``(N, B, S)`` (targets x steps) or ``(N, B)`` attribution scores.
        masks: ``(J, N)`` bool, ``masks[j, i]`` = example ``i`` is in subset ``S_j``.

    Returns:
        ``(J, B, S)`` or ``(J, B)`` float64.
    """
    _check_masks(masks)
    if not isinstance(scores, Tensor) or scores.ndim not in (2, 3):
        raise ValueError(f"Expected `scores` to be a tensor (N, B, S) or (N, B), but got "
                         f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}")
    if scores.shape[0] != masks.shape[1]:
        raise ValueError(f"Expected `scores` with N = {masks.shape[1]} rows (masks are (J, N) = "
                         f"{tuple(masks.shape)}), but got shape {tuple(scores.shape)}")
    flat = scores.to(F64).reshape(scores.shape[0], -1)
    return (masks.to(F64) @ flat).reshape(masks.shape[0], *scores.shape[1:])


def _as_bs(name: str, t: Tensor, lead: int) -> Tensor:
    """Bring ``(lead.., B)`` to ``(lead.., B, 1)``; check ``(lead.., B, S)``."""
    if t.ndim == lead + 1:
        return t.unsqueeze(-1)
    if t.ndim != lead + 2:
        raise ValueError(f"Expected `{name}` to have {lead + 2} dims (..., B, S), but got shape {tuple(t.shape)}")
    return t


def lds(scores: Tensor, masks: Tensor, actual: Tensor) -> LDSResult:
    """Linear datamodeling score per (target, step).

    Args:
        scores: ``(N, B, S)`` or ``(N, B)`` scores (positive = including the example lowers ``f_t``).
        masks: ``(J, N)`` bool subset masks of the J subset models, ``J >= 3``.
        actual: ``(J, B, S)`` or ``(J, B)``: ``f_t(x0hat_t(full model), theta(S_j))`` per subset model,
            target and step (averaged over training seeds upstream if several).

    Returns:
        :class:`LDSResult` with ``per_target (B, S)`` (``S = 1`` for 2-D input), ``mean/se/n_targets (S,)``.
    """
    return lds_from_predictions(predicted_outputs(scores, masks), actual)


def lds_from_predictions(predictions: Tensor, actual: Tensor) -> LDSResult:
    """:func:`lds` from the datamodel predictions ``(J, B, S)`` (or ``(J, B)``) already summed over each subset
    (:func:`predicted_outputs`, or accumulated while streaming the scores: no N x B x S array is needed).
    """
    if not isinstance(predictions, Tensor):
        raise TypeError(f"Expected `predictions` to be a torch.Tensor (J, B, S), but got {type(predictions).__name__}")
    pred = _as_bs("predictions", predictions.to(F64), 1)
    if not isinstance(actual, Tensor):
        raise TypeError(f"Expected `actual` to be a torch.Tensor (J, B, S), but got {type(actual).__name__}")
    actual = _as_bs("actual", actual, 1)
    if actual.shape != pred.shape:
        raise ValueError(f"Expected `actual` of shape (J, B, S) = {tuple(pred.shape)} to match masks (J, N) and "
                         f"scores (N, B, S), but got {tuple(actual.shape)}")
    if pred.shape[0] < 3:
        raise ValueError(f"Expected at least 3 subset models (`masks` rows) for a rank correlation, but got {pred.shape[0]}")
    J, B, S = pred.shape
    rho = spearman_columns(pred.reshape(J, -1), -actual.to(F64).reshape(J, -1)).reshape(B, S)
    mean, se, n = nan_mean_se(rho, 0)
    return LDSResult(rho, mean, se, n)


linear_datamodeling_score = lds   # the package-level name (``attribution.lds`` is this module)


def lds_per_lambda(scores_per_lambda: Tensor, masks: Tensor, actual: Tensor) -> Tensor:
    """``(L, N, B, S)`` scores (one slice per ridge lambda) -> ``(L, B, S)`` per-target LDS."""
    _checks.tensor_ndim("scores_per_lambda", scores_per_lambda, 4, " (L, N, B, S)")
    return torch.stack([lds(s, masks, actual).per_target for s in scores_per_lambda])


def lds_per_lambda_from_predictions(predictions_per_lambda: Tensor, actual: Tensor) -> Tensor:
    """``(L, J, B, S)`` predictions (one slice per ridge lambda) -> ``(L, B, S)`` per-target LDS."""
    _checks.tensor_ndim("predictions_per_lambda", predictions_per_lambda, 4, " (L, J, B, S)")
    return torch.stack([lds_from_predictions(p, actual).per_target for p in predictions_per_lambda])


# ----------------------------------------------------------------------------- uncertainty over masks
def target_specific(values: Tensor) -> Tensor:
    """``(J, B, S)`` -> the part of each (target, step) column that is not shared by the other targets: every
    column standardized over the J models (``(x - mean_j) / std_j``), then the mean over the targets of the
    standardized columns removed, per model and step. What remains is how a subset moves this target
    relative to the others; the common part (a subset model better or worse at everything: training noise
    and whole-mask effects) is gone. Invariant to an affine rescaling of any one target's predictions, as
    the Spearman LDS is. Columns that are constant or hold a non-finite value give NaN and stay out of the mean.
    """
    x = _as_bs("values", values.to(F64), 1)
    sd = x.std(0, correction=1, keepdim=True)
    z = (x - x.mean(0, keepdim=True)) / sd
    ok = torch.isfinite(z).all(0, keepdim=True) & (sd > 0)
    z = torch.where(ok, z, torch.full_like(z, math.nan))
    common = torch.where(ok, z, torch.zeros_like(z)).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
    return z - common


def lds_specific_from_predictions(predictions: Tensor, actual: Tensor) -> LDSResult:
    """Target-specific LDS: :func:`lds_from_predictions` of the :func:`target_specific` parts of the
    predictions and of the actual outputs (same sign convention)."""
    return lds_from_predictions(target_specific(predictions), target_specific(actual))


def leave_one_mask_out(predictions: Tensor, actual: Tensor, specific: bool = False) -> Tensor:
    """``(J, S)``: the mean over targets of the LDS per step with subset model ``j`` left out (the jackknife
    replicates of :func:`mask_jackknife_se`); ``specific``: of the target-specific LDS."""
    pred, act = _as_bs("predictions", predictions.to(F64), 1), _as_bs("actual", actual.to(F64), 1)
    J = pred.shape[0]
    if J < 4:
        raise ValueError(f"Expected at least 4 subset models to leave one out, but got {J}")
    measure = lds_specific_from_predictions if specific else lds_from_predictions
    keep = torch.ones(J, dtype=torch.bool)
    out = []
    for j in range(J):
        keep[j] = False
        out.append(measure(pred[keep], act[keep]).mean)
        keep[j] = True
    return torch.stack(out)


def mask_jackknife_se(replicates: Tensor) -> Tensor:
    """Jackknife standard error over subset models from leave-one-out replicates ``(J, ...)``:
    ``sqrt((J - 1) / J * sum_j (theta_j - mean theta)^2)``, per trailing entry (NaN where a replicate is).

    The s.e. over targets alone treats the J masks as fixed; every target shares them, so a few
    influential models move every target's LDS together. This is the part of the uncertainty that
    more masks (not more targets) remove: report ``sqrt(se_targets^2 + se_masks^2)``.
    """
    theta = replicates.to(F64)
    J = theta.shape[0]
    return torch.sqrt((J - 1) / J * ((theta - theta.mean(0)) ** 2).sum(0))


def combined_se(se_targets, se_masks):
    """``sqrt(se_targets^2 + se_masks^2)``: targets and subset models both sampled (tensors or floats)."""
    if isinstance(se_targets, Tensor) or isinstance(se_masks, Tensor):
        return torch.sqrt(torch.as_tensor(se_targets, dtype=F64) ** 2 + torch.as_tensor(se_masks, dtype=F64) ** 2)
    return math.sqrt(se_targets ** 2 + se_masks ** 2)


# ----------------------------------------------------------------------------- seed-noise ceiling
@dataclass
class SeedNoiseCeiling:
    r"""How far training-seed noise caps any method's LDS.

    Model per (target, step): ``y_{r j} = m_j + e_{r j}`` (replicate ``r``, mask ``j``), with mask
    effects of variance ``sigma_b^2`` and seed noise of variance ``sigma_w^2``. Estimators (one-way
    ANOVA / ICC(1)): ``sigma_w^2`` = mean over masks of the replicate variance (ddof=1);
    ``sigma_b^2 = var_j(mean_r y) - sigma_w^2 / R`` (ddof=1, clipped at 0, since the variance of
    R-seed means carries ``sigma_w^2 / R`` of noise). For an output averaged over ``R'`` seeds,
    ``reliability = sigma_b^2 / (sigma_b^2 + sigma_w^2 / R')`` and ``ceiling = sqrt(reliability)``:
    the correlation of even the exact mask effect ``m_j`` with that noisy output (Pearson; the
    Spearman LDS follows it closely).

    Attributes:
        num_seeds: ``R'``, the number of seeds averaged in the output the ceiling applies to.
        within_var, between_var: ``(B, S)`` estimates of ``sigma_w^2`` and ``sigma_b^2``.
        noise_fraction: ``(B, S)`` share of a *single-seed* output's variance across masks that is
            seed noise, ``sigma_w^2 / (sigma_b^2 + sigma_w^2)``.
        reliability, ceiling: ``(B, S)`` for ``R'``-seed averages.
        noise_fraction_mean, ceiling_mean: ``(S,)`` means over targets (NaN-safe).
    """

    num_seeds: int
    within_var: Tensor
    between_var: Tensor
    noise_fraction: Tensor
    reliability: Tensor
    ceiling: Tensor
    noise_fraction_mean: Tensor
    ceiling_mean: Tensor


def seed_noise_ceiling(actual_replicates: Tensor, num_seeds: int = 1) -> SeedNoiseCeiling:
    """Seed-noise share and LDS ceiling from replicate models (same mask, other training seeds).

    Args:
        actual_replicates: ``(R, J, B, S)`` (or ``(R, J, B)``) outputs ``f_t`` of R >= 2 seeds per
            mask, J >= 3 masks, B targets, S steps.
        num_seeds: ``R'`` >= 1, the seeds averaged per mask in the LDS this ceiling is reported beside.

    Returns:
        :class:`SeedNoiseCeiling` (see it for the estimator). NaN where the total variance is 0.
    """
    if not isinstance(actual_replicates, Tensor):
        raise TypeError(f"Expected `actual_replicates` to be a tensor (R, J, B, S), but got {type(actual_replicates).__name__}")
    y = _as_bs("actual_replicates", actual_replicates, 2).to(F64)
    R, J = y.shape[:2]
    if R < 2 or J < 3:
        raise ValueError(f"Expected `actual_replicates` of shape (R, J, B, S) with R >= 2 seeds and J >= 3 masks, "
                         f"but got {tuple(actual_replicates.shape)}")
    _checks.positive_int("num_seeds", num_seeds)
    within = y.var(dim=0, correction=1).mean(0)                     # (B, S)
    between = (y.mean(0).var(dim=0, correction=1) - within / R).clamp(min=0)
    total = between + within

    def ratio(num, den):
        return torch.where(den > 0, num / den, torch.full_like(num, math.nan))

    noise = ratio(within, total)
    reliability = ratio(between, between + within / num_seeds)
    ceiling = reliability.sqrt()
    return SeedNoiseCeiling(num_seeds, within, between, noise, reliability, ceiling,
                            nan_mean_se(noise, 0)[0], nan_mean_se(ceiling, 0)[0])


# ----------------------------------------------------------------------------- lambda on held-out targets
def split_targets(num_targets: int, seed: int, heldout_fraction: float = 0.5) -> tuple[Tensor, Tensor]:
    """Deterministic split of ``range(num_targets)`` into ``(heldout, report)`` sorted int64 indices.

    ``round(heldout_fraction * num_targets)`` targets (at least 1, at most ``num_targets - 1``) go
    to the held-out half; the permutation comes from ``torch.Generator().manual_seed(seed)``.
    """
    _checks.positive_int("num_targets", num_targets)
    _checks.int_seed("seed", seed)
    if num_targets < 2:
        raise ValueError(f"Expected `num_targets` >= 2 to split into held-out and report targets, but got {num_targets}")
    if not (isinstance(heldout_fraction, float) and 0.0 < heldout_fraction < 1.0):
        raise ValueError(f"Expected `heldout_fraction` to be a float in (0, 1), but got {heldout_fraction!r}")
    k = min(max(round(heldout_fraction * num_targets), 1), num_targets - 1)
    perm = torch.randperm(num_targets, generator=torch.Generator().manual_seed(seed))
    return perm[:k].sort().values, perm[k:].sort().values


@dataclass
class LambdaChoice:
    """Ridge lambda chosen on held-out targets, and the LDS it gives on the report targets.

    Attributes:
        lambdas: ``(L,)`` candidate values.
        per_step: whether a lambda was chosen per step (else one for all steps).
        heldout_targets, report_targets: disjoint int64 indices into the B targets.
        heldout_mean: ``(L, S)`` mean LDS over the held-out targets (the only input to the choice).
        chosen_index, chosen_lambda: ``(S,)`` the choice (equal across steps if not ``per_step``).
        report: :class:`LDSResult` on the report targets at the chosen lambda: THE figure to report.
        oracle_index, oracle_lambda, oracle_mean: ``(S,)`` ORACLE, for reference only: the best
            lambda chosen on the report targets themselves (optimistic, D-TRAK's convention) and its
            mean LDS on them (index -1 and NaN where undefined). Never report it as the method's LDS.
    """

    lambdas: Tensor
    per_step: bool
    heldout_targets: Tensor
    report_targets: Tensor
    heldout_mean: Tensor
    chosen_index: Tensor
    chosen_lambda: Tensor
    report: LDSResult
    oracle_index: Tensor
    oracle_lambda: Tensor
    oracle_mean: Tensor


def _target_indices(name: str, idx: Indices, num_targets: int) -> Tensor:
    idx = torch.as_tensor(idx)
    _checks.long_vector(name, idx)
    if idx.numel() == 0:
        raise ValueError(f"Expected `{name}` to hold at least one target index, but got none")
    if int(idx.min()) < 0 or int(idx.max()) >= num_targets:
        raise ValueError(f"Expected `{name}` indices in [0, {num_targets}), but got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"Expected `{name}` without duplicates, but got {idx.tolist()}")
    return idx.long()


def _argmax_lambda(mean_ls: Tensor, per_step: bool, what: str, strict: bool = True) -> Tensor:
    """``(L, S)`` means -> ``(S,)`` indices; NaN never wins; ties go to the first (smallest index).

    Where every lambda is NaN: raise if ``strict``, else index -1.
    """
    score = mean_ls if per_step else nan_mean_se(mean_ls, 1)[0].unsqueeze(1).expand_as(mean_ls)
    undefined = torch.isnan(score).all(0)
    if strict and bool(undefined.any()):
        where = "at every step" if per_step else "averaged over steps"
        raise ValueError(f"Expected a finite mean LDS over the {what} for at least one lambda {where}, "
                         f"but all lambdas give NaN")
    best = torch.nan_to_num(score, nan=-math.inf).argmax(0)
    return torch.where(undefined, torch.full_like(best, -1), best)


def _at(values: Tensor, index: Tensor) -> Tensor:
    """``values (L, S)`` at ``index (S,)``; NaN where the index is -1."""
    got = values.gather(0, index.clamp(min=0).unsqueeze(0))[0]
    return torch.where(index >= 0, got, torch.full_like(got, math.nan))


def choose_lambda_heldout(lds_per_lambda: Tensor, lambdas: Sequence[float], heldout_targets: Indices,
                          report_targets: Indices, per_step: bool = False) -> LambdaChoice:
    """Choose the ridge lambda on held-out targets; report the LDS on disjoint report targets.

    Args:
        lds_per_lambda: ``(L, B, S)`` per-target LDS for each candidate lambda (see :func:`lds_per_lambda`).
        lambdas: the L candidate values (same order).
        heldout_targets: indices of the targets that choose lambda.
        report_targets: indices of the targets that are reported; must not overlap ``heldout_targets``.
        per_step: choose one lambda per step (else the one maximising the mean over steps).

    The choice is computed from ``lds_per_lambda[:, heldout_targets]`` alone, so the report
    targets' values cannot change it. The oracle figure is returned separately, labelled.
    """
    _checks.tensor_ndim("lds_per_lambda", lds_per_lambda, 3, " (L, B, S)")
    lambdas = torch.as_tensor(lambdas, dtype=F64).flatten()
    L, B, S = lds_per_lambda.shape
    if lambdas.numel() != L:
        raise ValueError(f"Expected `lambdas` to have L = {L} values (lds_per_lambda is {tuple(lds_per_lambda.shape)}), "
                         f"but got {lambdas.numel()}")
    held = _target_indices("heldout_targets", heldout_targets, B)
    rep = _target_indices("report_targets", report_targets, B)
    overlap = sorted(set(held.tolist()) & set(rep.tolist()))
    if overlap:
        raise ValueError(f"Expected `heldout_targets` and `report_targets` to be disjoint, but both contain {overlap}")
    heldout_mean = nan_mean_se(lds_per_lambda[:, held].to(F64), 1)[0]          # (L, S)
    chosen = _argmax_lambda(heldout_mean, per_step, "held-out targets")
    report_values = lds_per_lambda[:, rep].to(F64)                              # (L, B_r, S)
    at_choice = report_values.gather(0, chosen.view(1, 1, S).expand(1, rep.numel(), S))[0]
    report = LDSResult(at_choice, *nan_mean_se(at_choice, 0))
    report_mean = nan_mean_se(report_values, 1)[0]
    oracle = _argmax_lambda(report_mean, per_step, "report targets", strict=False)
    oracle_lambda = _at(lambdas.unsqueeze(1).expand(L, S), oracle)
    return LambdaChoice(lambdas, per_step, held, rep, heldout_mean, chosen, lambdas[chosen], report,
                        oracle, oracle_lambda, _at(report_mean, oracle))


# ----------------------------------------------------------------------------- comparisons, tables
def paired_difference(lds_a: Tensor, lds_b: Tensor) -> tuple[Tensor, Tensor]:
    """Paired difference of two methods over the same targets: ``(B, S)`` each -> ``(mean (S,), se (S,))``.

    Per step, the mean and standard error (ddof=1) of ``lds_a - lds_b`` over the targets where both
    are finite.
    """
    if not isinstance(lds_a, Tensor) or not isinstance(lds_b, Tensor) or lds_a.shape != lds_b.shape:
        raise ValueError(f"Expected `lds_a` and `lds_b` of the same shape (B, S), but got "
                         f"{getattr(lds_a, 'shape', type(lds_a))} and {getattr(lds_b, 'shape', type(lds_b))}")
    diff = _as_bs("lds_a", lds_a, 0).to(F64) - _as_bs("lds_b", lds_b, 0).to(F64)
    mean, se, _ = nan_mean_se(diff, 0)
    return mean, se


def _per_step(name: str, value, S: int) -> list:
    if value is None:
        return [math.nan] * S
    if isinstance(value, SeedNoiseCeiling):
        value = value.ceiling_mean
    value = torch.as_tensor(value, dtype=F64).flatten()
    if value.numel() != S:
        raise ValueError(f"Expected `{name}` with one value per step ({S}), but got {value.numel()}")
    return value.tolist()


def lds_table(results: Mapping[str, Union[LDSResult, LambdaChoice]], steps: Sequence[int],
              ceiling: Union[None, Tensor, Sequence[float], SeedNoiseCeiling] = None) -> list[dict]:
    """Rows ``{method, step, lds_mean, lds_se, ceiling, n_targets}`` (plus ``lambda`` for a LambdaChoice).

    Args:
        results: method name -> :class:`LDSResult` (or :class:`LambdaChoice`, whose *report* LDS is used).
        steps: the S step values (e.g. ``[900, 700, 500, 300, 100]``).
        ceiling: ``(S,)`` seed-noise ceiling per step, a :class:`SeedNoiseCeiling`, or None (NaN).
    """
    steps = [int(t) for t in steps]
    ceil = _per_step("ceiling", ceiling, len(steps))
    rows = []
    for method, res in results.items():
        lam = res.chosen_lambda.tolist() if isinstance(res, LambdaChoice) else None
        res = res.report if isinstance(res, LambdaChoice) else res
        if res.mean.numel() != len(steps):
            raise ValueError(f"Expected results for {len(steps)} steps, but `{method}` has {res.mean.numel()}")
        for s, t in enumerate(steps):
            row = {"method": str(method), "step": t, "lds_mean": float(res.mean[s]), "lds_se": float(res.se[s]),
                   "ceiling": float(ceil[s]), "n_targets": int(res.n_targets[s])}
            if lam is not None:
                row["lambda"] = float(lam[s])
            rows.append(row)
    return rows


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_table(rows: Sequence[Mapping], path_csv, path_json) -> None:
    """Write rows to CSV and JSON, each atomically (temp file + ``os.replace``).

    Columns are the union of the rows' keys in first-seen order. Non-finite floats become an empty
    CSV cell and JSON ``null`` (strict JSON).
    """
    if not rows:
        raise ValueError("Expected `rows` to hold at least one row, but got none")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    clean = [{k: _finite_or_none(r.get(k)) for k in columns} for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in clean)
    atomic_write_text(Path(path_csv), buf.getvalue())
    atomic_write_text(Path(path_json), json.dumps(clean, indent=2, allow_nan=False) + "\n")
