"""LDS: torch Spearman vs scipy, synthetic known answers, seed-noise ceiling, held-out lambda, tables."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from attribution.lds import (LDSResult, choose_lambda_heldout, lds, lds_per_lambda, lds_table, nan_mean_se,
                             paired_difference, predicted_outputs, rank_average, seed_noise_ceiling,
                             spearman_columns, split_targets, write_table)

F64 = torch.float64


def _problem(J=64, N=200, B=12, S=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(J, N, generator=g) < 0.5
    tau = torch.randn(N, B, S, generator=g, dtype=F64)
    return g, masks, tau


# ----------------------------------------------------------------------------- rank correlation
def test_rank_average_matches_scipy_rankdata_with_ties():
    from scipy.stats import rankdata

    x = torch.randint(0, 5, (30, 7)).to(F64)
    np.testing.assert_allclose(rank_average(x).numpy(), rankdata(x.numpy(), axis=0, method="average"))


@pytest.mark.parametrize("levels", [3, 10, None])
def test_spearman_matches_scipy_on_random_data_with_ties(levels):
    g = torch.Generator().manual_seed(1)
    J, M = 40, 25
    if levels is None:
        x, y = torch.randn(J, M, generator=g, dtype=F64), torch.randn(J, M, generator=g, dtype=F64)
    else:
        x = torch.randint(0, levels, (J, M), generator=g).to(F64)
        y = (x + torch.randint(0, levels, (J, M), generator=g)).to(F64)
    got = spearman_columns(x, y)
    expected = [spearmanr(x[:, m].numpy(), y[:, m].numpy()).statistic for m in range(M)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_spearman_constant_or_nonfinite_column_is_nan():
    x = torch.randn(10, 3, dtype=F64)
    y = torch.randn(10, 3, dtype=F64)
    x[:, 0] = 2.0
    y[4, 1] = math.nan
    r = spearman_columns(x, y)
    assert math.isnan(r[0]) and math.isnan(r[1]) and math.isfinite(r[2])


# ----------------------------------------------------------------------------- predictions and LDS
def test_predicted_outputs_is_subset_sum():
    _, masks, tau = _problem(J=5, N=17, B=2, S=3)
    got = predicted_outputs(tau, masks)
    for j in range(5):
        torch.testing.assert_close(got[j], tau[masks[j]].sum(0))
    assert predicted_outputs(tau[:, :, 0], masks).shape == (5, 2)


def test_lds_near_one_for_negated_datamodel_and_minus_one_for_the_opposite_sign():
    g, masks, tau = _problem()
    exact = predicted_outputs(tau, masks)
    noise = 0.05 * exact.std() * torch.randn(exact.shape, generator=g, dtype=F64)
    good = lds(tau, masks, -exact + noise)              # including i lowers f_t by tau_i: LDS ~ +1
    bad = lds(tau, masks, exact)                         # wrong sign: LDS = -1
    assert good.per_target.shape == (12, 3) and good.mean.shape == (3,)
    assert (good.mean > 0.99).all() and (good.n_targets == 12).all()
    torch.testing.assert_close(bad.mean, torch.full((3,), -1.0, dtype=F64))


def test_lds_of_independent_noise_is_zero_within_three_standard_errors():
    g, masks, tau = _problem(J=64, B=40, S=2, seed=3)
    res = lds(tau, masks, torch.randn(64, 40, 2, generator=g, dtype=F64))
    assert (res.mean.abs() < 3 * res.se).all(), (res.mean, res.se)
    assert (res.se > 0.01).all()


def test_lds_per_target_equals_scipy_and_summary_skips_nan_targets():
    g, masks, tau = _problem(J=20, N=50, B=5, S=2)
    actual = torch.randn(20, 5, 2, generator=g, dtype=F64)
    actual[:, 3, 1] = 7.0                                # a constant column: undefined correlation
    res = lds(tau, masks, actual)
    pred = predicted_outputs(tau, masks)
    for b in range(5):
        for s in range(2):
            if (b, s) == (3, 1):
                assert math.isnan(res.per_target[b, s])
                continue
            ref = spearmanr(pred[:, b, s].numpy(), -actual[:, b, s].numpy()).statistic
            assert abs(float(res.per_target[b, s]) - ref) < 1e-12
    assert res.n_targets.tolist() == [5, 4]
    finite = res.per_target[[0, 1, 2, 4], 1].numpy()
    assert abs(float(res.mean[1]) - finite.mean()) < 1e-12
    assert abs(float(res.se[1]) - finite.std(ddof=1) / 2.0) < 1e-12


def test_lds_accepts_two_dimensional_scores():
    g, masks, tau = _problem(B=4, S=1)
    res = lds(tau[:, :, 0], masks, -predicted_outputs(tau[:, :, 0], masks))
    assert res.per_target.shape == (4, 1)
    torch.testing.assert_close(res.mean, torch.ones(1, dtype=F64))


def test_lds_errors_name_the_argument():
    _, masks, tau = _problem(J=8, N=20, B=3, S=2)
    with pytest.raises(TypeError, match="`masks`"):
        lds(tau, masks.float(), torch.zeros(8, 3, 2))
    with pytest.raises(ValueError, match="`scores`.*N = 20"):
        lds(tau[:10], masks, torch.zeros(8, 3, 2))
    with pytest.raises(ValueError, match="`actual`.*\\(8, 3, 2\\)"):
        lds(tau, masks, torch.zeros(8, 3, 5))


def test_lds_per_lambda_stacks():
    g, masks, tau = _problem(J=16, N=30, B=3, S=2)
    actual = torch.randn(16, 3, 2, generator=g, dtype=F64)
    got = lds_per_lambda(torch.stack([tau, -tau]), masks, actual)
    torch.testing.assert_close(got[0], lds(tau, masks, actual).per_target)
    torch.testing.assert_close(got[1], -got[0])


# ----------------------------------------------------------------------------- seed-noise ceiling
@pytest.mark.parametrize("sigma_b,sigma_w", [(1.0, 2.0), (1.0, 0.5)])
def test_seed_noise_ceiling_matches_analytic_value(sigma_b, sigma_w):
    g = torch.Generator().manual_seed(7)
    R, J, B, S = 4, 200, 16, 2
    mask_effect = sigma_b * torch.randn(1, J, B, S, generator=g, dtype=F64)
    y = 5.0 + mask_effect + sigma_w * torch.randn(R, J, B, S, generator=g, dtype=F64)
    for r_avg in (1, 5):
        est = seed_noise_ceiling(y, num_seeds=r_avg)
        rel = sigma_b ** 2 / (sigma_b ** 2 + sigma_w ** 2 / r_avg)
        assert est.ceiling.shape == (B, S) and est.ceiling_mean.shape == (S,)
        np.testing.assert_allclose(est.ceiling_mean.numpy(), math.sqrt(rel), atol=0.03)
    noise = sigma_w ** 2 / (sigma_b ** 2 + sigma_w ** 2)
    np.testing.assert_allclose(est.noise_fraction_mean.numpy(), noise, atol=0.03)
    np.testing.assert_allclose(est.within_var.mean().item(), sigma_w ** 2, rtol=0.03)


def test_seed_noise_ceiling_bounds_the_correlation_of_the_true_effect():
    """The exact mask effect, correlated with one seed's output, reaches the ceiling and no more."""
    g = torch.Generator().manual_seed(8)
    R, J, B = 3, 400, 30
    effect = torch.randn(J, B, generator=g, dtype=F64)
    y = effect + 1.5 * torch.randn(R, J, B, generator=g, dtype=F64)
    ceiling = seed_noise_ceiling(y).ceiling_mean
    # N = J examples, subset j = {j}: the prediction of model j is exactly effect[j]
    rho = lds(effect, torch.eye(J, dtype=torch.bool), -y[0]).mean
    assert abs(float(rho) - float(ceiling[0])) < 0.04


def test_seed_noise_ceiling_needs_replicates():
    with pytest.raises(ValueError, match="R >= 2"):
        seed_noise_ceiling(torch.zeros(1, 10, 2, 2))
    zero = seed_noise_ceiling(torch.zeros(2, 10, 2, 2))
    assert torch.isnan(zero.ceiling).all()


# ----------------------------------------------------------------------------- lambda on held-out targets
def test_split_targets_is_deterministic_disjoint_and_complete():
    held, rep = split_targets(17, seed=3)
    held2, rep2 = split_targets(17, seed=3)
    assert torch.equal(held, held2) and torch.equal(rep, rep2)
    assert sorted(held.tolist() + rep.tolist()) == list(range(17))
    assert len(held) == 8 or len(held) == 9
    assert not torch.equal(split_targets(17, seed=4)[0], held)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_targets(10, 0, heldout_fraction=1.0)


def _sweep(L=5, B=16, S=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(L, B, S, generator=g, dtype=F64) - 0.3


@pytest.mark.parametrize("per_step", [False, True])
def test_report_targets_cannot_influence_the_choice(per_step):
    sweep = _sweep()
    held, rep = split_targets(16, seed=1)
    lambdas = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    base = choose_lambda_heldout(sweep, lambdas, held, rep, per_step=per_step)
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        other = sweep.clone()
        other[:, rep] = 100 * torch.randn(5, len(rep), 3, generator=g, dtype=F64)
        if trial % 4 == 0:
            other[:, rep] = math.nan
        got = choose_lambda_heldout(other, lambdas, held, rep, per_step=per_step)
        assert torch.equal(got.chosen_index, base.chosen_index)
        torch.testing.assert_close(got.heldout_mean, base.heldout_mean)


def test_choice_maximises_heldout_mean_and_reports_at_it():
    sweep = _sweep()
    held, rep = split_targets(16, seed=2)
    lambdas = torch.tensor([0.0, 0.1, 1.0, 10.0, 100.0])
    res = choose_lambda_heldout(sweep, lambdas, held, rep)
    held_means = sweep[:, held].mean(1)                    # (L, S)
    best = int(held_means.mean(1).argmax())
    assert res.chosen_index.tolist() == [best] * 3 and res.chosen_lambda.tolist() == [lambdas[best].item()] * 3
    torch.testing.assert_close(res.report.mean, sweep[best][rep].mean(0))
    torch.testing.assert_close(res.report.se, sweep[best][rep].std(0) / math.sqrt(len(rep)))
    per = choose_lambda_heldout(sweep, lambdas, held, rep, per_step=True)
    assert per.chosen_index.tolist() == held_means.argmax(0).tolist()
    oracle = sweep[:, rep].mean(1).max(0).values
    torch.testing.assert_close(per.oracle_mean, oracle)
    assert (per.oracle_mean >= per.report.mean - 1e-12).all()


def test_choose_lambda_rejects_overlap_and_bad_shapes():
    sweep = _sweep()
    with pytest.raises(ValueError, match="disjoint.*\\[3\\]"):
        choose_lambda_heldout(sweep, [1, 2, 3, 4, 5], [0, 1, 3], [3, 4])
    with pytest.raises(ValueError, match="`lambdas`.*L = 5"):
        choose_lambda_heldout(sweep, [1, 2], [0], [1])
    with pytest.raises(ValueError, match="`report_targets`.*\\[0, 16\\)"):
        choose_lambda_heldout(sweep, [1, 2, 3, 4, 5], [0], [16])


# ----------------------------------------------------------------------------- paired differences, tables
def test_paired_difference_matches_numpy_and_skips_nan():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 2, generator=g, dtype=F64), torch.randn(10, 2, generator=g, dtype=F64)
    a[2, 0] = math.nan
    mean, se = paired_difference(a, b)
    d0 = (a[:, 0] - b[:, 0]).numpy()
    d0 = d0[np.isfinite(d0)]
    assert abs(float(mean[0]) - d0.mean()) < 1e-12
    assert abs(float(se[0]) - d0.std(ddof=1) / 3.0) < 1e-12
    d1 = (a[:, 1] - b[:, 1]).numpy()
    assert abs(float(se[1]) - d1.std(ddof=1) / math.sqrt(10)) < 1e-12
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(a, b[:5])


def test_nan_mean_se_single_value_has_nan_se():
    mean, se, n = nan_mean_se(torch.tensor([[1.0], [math.nan]]))
    assert float(mean[0]) == 1.0 and math.isnan(se[0]) and int(n[0]) == 1


def test_lds_table_and_atomic_write(tmp_path):
    r = LDSResult(torch.zeros(4, 2), torch.tensor([0.2, math.nan]), torch.tensor([0.05, math.nan]),
                  torch.tensor([4, 0]))
    choice = choose_lambda_heldout(_sweep(L=2, B=4, S=2), [0.1, 1.0], [0, 1], [2, 3])
    rows = lds_table({"pixel": r, "trak": choice}, steps=[700, 300], ceiling=torch.tensor([0.3, 0.65]))
    assert len(rows) == 4 and rows[0] == {"method": "pixel", "step": 700, "lds_mean": pytest.approx(0.2),
                                          "lds_se": pytest.approx(0.05), "ceiling": pytest.approx(0.3),
                                          "n_targets": 4}
    assert rows[2]["lambda"] in (0.1, 1.0) and rows[3]["n_targets"] == 2
    write_table(rows, tmp_path / "t.csv", tmp_path / "t.json")
    loaded = json.loads((tmp_path / "t.json").read_text())
    assert loaded[1]["lds_mean"] is None and loaded[3]["method"] == "trak"
    with open(tmp_path / "t.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["step"] == "700" and table[1]["lds_mean"] == "" and "lambda" in table[0]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="one value per step"):
        lds_table({"pixel": r}, steps=[700, 300], ceiling=[0.1])


def test_choose_lambda_raises_when_heldout_is_all_nan():
    sweep = _sweep()
    sweep[:, [0, 1]] = math.nan
    with pytest.raises(ValueError, match="held-out targets.*NaN"):
        choose_lambda_heldout(sweep, [1, 2, 3, 4, 5], [0, 1], [2, 3])


def test_package_exports_keep_the_lds_module_reachable():
    import attribution
    import attribution.lds as module

    assert module.lds is lds and attribution.linear_datamodeling_score is lds
    assert attribution.lds is module


# ----------------------------------------------------------------------------- uncertainty over masks
def _specific_reference(values: np.ndarray) -> np.ndarray:
    """target_specific written as loops: standardize each (b, s) column over models, subtract the mean over b."""
    J, B, S = values.shape
    z = np.empty_like(values)
    for b in range(B):
        for s in range(S):
            col = values[:, b, s]
            z[:, b, s] = (col - col.mean()) / col.std(ddof=1)
    out = np.empty_like(values)
    for j in range(J):
        for s in range(S):
            out[j, :, s] = z[j, :, s] - z[j, :, s].mean()
    return out


def test_target_specific_lds_matches_loops_and_ignores_per_target_rescaling():
    from attribution.lds import lds_specific_from_predictions, target_specific

    g, masks, tau = _problem(J=20, N=50, B=6, S=2, seed=4)
    pred = predicted_outputs(tau, masks)
    actual = -pred + 3.0 * torch.randn(20, 1, 2, generator=g, dtype=F64) + torch.randn(20, 6, 2, generator=g, dtype=F64)
    np.testing.assert_allclose(target_specific(pred).numpy(), _specific_reference(pred.numpy()), rtol=0, atol=1e-12)
    got = lds_specific_from_predictions(pred, actual).per_target
    ref_p, ref_a = _specific_reference(pred.numpy()), _specific_reference(actual.numpy())
    for b in range(6):
        for s in range(2):
            want = spearmanr(ref_p[:, b, s], -ref_a[:, b, s]).statistic
            assert abs(float(got[b, s]) - want) < 1e-12
    scaled = pred * torch.tensor([1.0, 7.0, 0.1, 2.0, 3.0, 0.5], dtype=F64).reshape(1, 6, 1) + 5.0
    assert torch.allclose(lds_specific_from_predictions(scaled, actual).per_target, got, rtol=0, atol=1e-12)
    constant = pred.clone()
    constant[:, 2, 1] = 1.0                       # a constant column: NaN there, and kept out of the others' mean
    spec = target_specific(constant)
    assert torch.isnan(spec[:, 2, 1]).all() and torch.isfinite(spec[:, [0, 1, 3, 4, 5], 1]).all()


def test_leave_one_mask_out_and_jackknife_match_loops():
    from attribution.lds import combined_se, leave_one_mask_out, mask_jackknife_se

    g, masks, tau = _problem(J=12, N=40, B=5, S=2, seed=6)
    pred = predicted_outputs(tau, masks)
    actual = -pred + 2.0 * torch.randn(12, 5, 2, generator=g, dtype=F64)
    loo = leave_one_mask_out(pred, actual)
    for j in range(12):
        keep = [k for k in range(12) if k != j]
        for s in range(2):
            want = np.mean([spearmanr(pred[keep, b, s].numpy(), -actual[keep, b, s].numpy()).statistic
                            for b in range(5)])
            assert abs(float(loo[j, s]) - want) < 1e-12
    spec_loo = leave_one_mask_out(pred, actual, specific=True)
    assert spec_loo.shape == (12, 2) and torch.isfinite(spec_loo).all()
    # the jackknife of a sample mean is its textbook s.e., std(ddof=1) / sqrt(J)
    x = torch.randn(12, 3, generator=g, dtype=F64)
    means = torch.stack([x[[k for k in range(12) if k != j]].mean(0) for j in range(12)])
    torch.testing.assert_close(mask_jackknife_se(means), x.std(0, correction=1) / math.sqrt(12), rtol=1e-12, atol=0)
    assert combined_se(3.0, 4.0) == 5.0
    with pytest.raises(ValueError, match="at least 4"):
        leave_one_mask_out(pred[:3], actual[:3])
