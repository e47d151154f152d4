"""A ``_stepwise`` method picks its target side (the step output's loss or D-TRAK's square) per step on the
held-out targets only, like lambda; its LDS at each step is the chosen side's, and its scores are that side's."""
from __future__ import annotations

import torch

from attribution import predicted_outputs
from attribution.lds import lds_from_predictions, split_targets
from evaluation.methods import KindChoiceScores, component_method, swept_scores
from evaluation.report import build_report, chosen_scores

F64 = torch.float64
N, B, S, J = 120, 10, 2, 16
LAMBDAS = [0.1, 1.0]


def _parts(good_loss: torch.Tensor, good_square: torch.Tensor, g: torch.Generator, masks: torch.Tensor) -> dict:
    """Loss side: ``good_loss`` at step 0, noise at step 1; square side: noise at step 0, ``good_square`` at
    step 1 (each with a second, noisier ridge slice)."""
    def sweep(step0, step1):
        base = torch.stack([step0, step1], dim=-1)                       # (N, B, S)
        slices = torch.stack([base, base + 2.0 * torch.randn(base.shape, generator=g)])
        return swept_scores(slices.reshape(len(LAMBDAS), N, B * S), masks, LAMBDAS, B, S)

    return {"loss": sweep(good_loss, torch.randn(N, B, generator=g)),
            "square": sweep(torch.randn(N, B, generator=g), good_square)}


def test_component_method_names():
    assert component_method("kfac_1ckpt_stepwise@even32", "loss") == "kfac_1ckpt@even32"
    assert component_method("kfac_1ckpt_stepwise@even32", "square") == "kfac_1ckpt_square@even32"
    assert component_method("trak_stepwise", "square") == "trak_square"


def test_the_target_side_is_chosen_per_step_on_heldout_targets_only():
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(J, N, generator=g) < 0.5
    good_loss, good_square = torch.randn(N, B, generator=g), torch.randn(N, B, generator=g)
    heldout, report = split_targets(B, 0, 0.5)
    # actual outputs: what the good scores predict (LDS sign: actual = -prediction), plus a little noise
    actual = torch.stack([-predicted_outputs(good_loss.unsqueeze(-1), masks)[..., 0],
                          -predicted_outputs(good_square.unsqueeze(-1), masks)[..., 0]], dim=-1).to(F64)
    actual = actual + 0.01 * torch.randn(actual.shape, generator=g, dtype=F64)
    # on the REPORT targets at step 0, the square side's noise is what predicts: a choice that saw them would
    # pick "square" there; the held-out targets still say "loss"
    parts = _parts(good_loss, good_square, g, masks)
    square0 = parts["square"].predictions[0, :, :, 0]
    actual[:, report, 0] = -square0[:, report].to(F64)
    from attribution.lds import lds_per_lambda_from_predictions, nan_mean_se
    on_report = KindChoiceScores.of(parts).choose_kinds(
        lambda p: nan_mean_se(lds_per_lambda_from_predictions(p, actual)[:, report], 1)[0])
    assert on_report[0] == "square"   # what a choice on the report targets would pick: the test can tell
    stepwise = KindChoiceScores.of(parts)
    result = build_report({"trak_stepwise": stepwise}, masks, actual, None, [900, 500], LAMBDAS, 0, 0.5, False, 1)
    assert stepwise.chosen == ["loss", "square"]
    rows = {r["step"]: r for r in result["tables"]["lds"]}
    assert rows[900]["target_output"] == "loss" and rows[500]["target_output"] == "square"
    assert result["tables"]["comparison"][0]["target_output_per_step"] == "loss/square"
    choice = result["results"]["trak_stepwise"]
    # each step's report LDS is the chosen side's at the chosen ridge (a slow, direct computation)
    for s, kind in enumerate(stepwise.chosen):
        pred = parts[kind].predictions[int(choice.chosen_index[s]), :, :, s:s + 1]
        want = lds_from_predictions(pred[:, report], actual[:, report, s:s + 1])
        torch.testing.assert_close(choice.report.per_target[:, s], want.per_target[:, 0], rtol=0, atol=0)
    # the loss side at step 0 does not predict the report targets there (they were made from the square side)
    assert float(choice.report.mean[0]) < 0.5 and float(choice.report.mean[1]) > 0.9
    scores = chosen_scores(stepwise, choice)
    for s, kind in enumerate(stepwise.chosen):
        slice_ = parts[kind].lambda_scores[int(choice.chosen_index[s]), :, :, s]
        assert torch.equal(scores[:, :, s], slice_)


def test_parts_over_other_grids_are_refused():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(J, N, generator=g) < 0.5
    a = swept_scores(torch.randn(2, N, B * S, generator=g), masks, [0.1, 1.0], B, S)
    b = swept_scores(torch.randn(2, N, B * S, generator=g), masks, [0.1, 10.0], B, S)
    try:
        KindChoiceScores.of({"loss": a, "square": b})
    except ValueError as error:
        assert "same ridges" in str(error)
    else:
        raise AssertionError("parts over other ridge grids were accepted")
