"""``AttributionModule(estimator="kfac" | "ekfac")``: K-FAC / EK-FAC influence in the predict loop. The factors of each
checkpoint are fitted on its members only (the subset mask its checkpoint records), with its store's training-side
function, cached and reused; every row's score equals a slow float64 reference (per-example autograd gradients of
the training loss and of the step output, preconditioned with the same factors, averaged over the checkpoints);
resume keeps its unit; DDP gives the one-process scores; bad settings are refused before any work."""
from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Trainer

import lightning_modules.attribution_module as attribution_module
import lightning_modules.influence as influence
from attribution import StepOutput
from attribution.ekfac import EKFACFactors, fit_ekfac, precondition
from attribution.errors import SettingsError
from attribution.identity import tensors_hash
from attribution.outputs import Draws
from callbacks.score_writer import load_target_scores
from evaluation.methods import store_denoiser
from lightning_modules.influence import TrainingRows, store_train_output
from lightning_modules.loading import load_diffusion_module
from helpers import subset_scorer
from tolerances import EPS32, assert_float32_close

SCORE = dict(num_draws=2, topk=5, pair_batch_size=3, damping=0.1)
N = 120


@pytest.fixture(scope="module")
def run(subset_fit):
    return subset_fit  # the shared tiny model fit on a 50% subset mask


def module(run, out, **kw):
    return subset_scorer(run, out, **{**SCORE, **kw})


def score(run, out, devices=1, **kw):
    scorer = module(run, out, **kw)
    Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto", logger=False,
            enable_progress_bar=False, inference_mode=False).predict(scorer.attach_data(run[1]),
                                                                       return_predictions=False)
    return scorer


def pair_scores(run, out, scorer):
    """(N, pairs) scores of the assembled target files, targets then steps."""
    return torch.cat([load_target_scores(run[0] / out / f"target_{t.target_id:04d}.pt")["scores"]
                      for t in scorer.trajectories], dim=1)


def _layer_grads(model64, factors, scalar):
    """``{module: (out, in')}`` autograd gradient of ``scalar`` for the factors' layers (bias as last column)."""
    params = dict(model64.named_parameters())
    names = [n for lf in factors.layers for n in (lf.spec.weight, lf.spec.bias) if n is not None]
    grads = dict(zip(names, torch.autograd.grad(scalar, [params[n] for n in names], allow_unused=True)))
    out = {}
    for lf in factors.layers:
        w = grads[lf.spec.weight]
        w = torch.zeros_like(params[lf.spec.weight]) if w is None else w
        parts = [w.reshape(lf.spec.out_dim, -1)]
        if lf.spec.bias is not None:
            b = grads[lf.spec.bias]
            parts.append((torch.zeros_like(params[lf.spec.bias]) if b is None else b).unsqueeze(1))
        out[lf.spec.module] = torch.cat(parts, dim=1)
    return out


def reference(run, scorer, strategy, damping):
    """Slow float64 reference ``(N, pairs)`` from each checkpoint's factors, and the parameters it sums over.

    Per checkpoint: a float64 copy of the denoiser; the target gradient ``G_t`` of the step output at x0_hat_t and
    each training example's gradient ``G_i`` of its training loss, one autograd call per example; the score
    ``sum_layers <G_i, P G_t>`` with ``P`` the damped inverse curvature (:func:`precondition`, itself checked
    against the explicit inverse in tests/attribution/test_ekfac.py)."""
    _, dm, mask = run
    pairs = [(traj, s, t) for traj in scorer.trajectories for s, t in scorer.selected_steps(traj)]
    total, p = 0, 0
    for store, factors in zip(scorer.stores, scorer.factors):
        module64 = load_diffusion_module(store.meta["checkpoint"]["file"])
        task = module64.attribution_task()
        model64 = copy.deepcopy(store_denoiser(module64, store)).double().eval()
        train = store_train_output(store)
        target_grads = {lf.spec.module: [] for lf in factors.layers}
        with torch.enable_grad():
            for traj, s, t in pairs:
                high = scorer.hparams.square_from is not None and t >= scorer.hparams.square_from * task.num_train_timesteps
                step_output = StepOutput(SCORE["num_draws"], 0, kind="square" if high else scorer.hparams.output)
                x_t, steps = traj.x_t[s:s + 1].double(), torch.tensor([t])
                with torch.no_grad():
                    x0 = task.x0_hat(model64, x_t, steps, None)
                draws = step_output.draws(torch.tensor([traj.target_id]), x0.shape[1:], steps,
                                          num_train_timesteps=task.num_train_timesteps, dtype=torch.float64)
                f = step_output.per_example(task, model64, x0[0], Draws(draws.timesteps[0], draws.noise[0]), None)
                for name, g in _layer_grads(model64, factors, f).items():
                    target_grads[name].append(g)
            target_grads = {k: torch.stack(v) for k, v in target_grads.items()}
            pre = precondition(factors, target_grads, damping, strategy=strategy)  # (pairs, out, in') float64
            images = dm.images(range(N)).double()
            draws = train.draws(torch.arange(N), images.shape[1:], num_train_timesteps=task.num_train_timesteps,
                                dtype=torch.float64)
            train_grads = {lf.spec.module: [] for lf in factors.layers}
            for i in range(N):
                f = train.per_example(task, model64, images[i], Draws(draws.timesteps[i], draws.noise[i]), None)
                for name, g in _layer_grads(model64, factors, f).items():
                    train_grads[name].append(g)
        train_grads = {k: torch.stack(v) for k, v in train_grads.items()}
        scores = sum(g.flatten(1) @ pre[name].flatten(1).T for name, g in train_grads.items())
        total, p = total + scores, max(p, factors.p)
    return total / len(scorer.stores), p


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_scores_equal_the_float64_reference_with_factors_over_the_members(run, strategy):
    root, dm, mask = run
    scorer = score(run, strategy, estimator=strategy)
    assert len(scorer.factors) == len(scorer.stores) == 2
    members = mask.nonzero().reshape(-1)
    for store, factors in zip(scorer.stores, scorer.factors):
        # fitted on the members only, with the store's training-side draws
        assert factors.meta["num_examples"] == int(mask.sum()) and factors.meta["strategy"] == strategy
        assert factors.meta["keys_hash"] == tensors_hash([("keys", members)])
        assert factors.meta["train_output"] == store_train_output(store).describe()
        module64 = load_diffusion_module(store.meta["checkpoint"]["file"])
        task, model = module64.attribution_task(), store_denoiser(module64, store).eval()
        fresh = fit_ekfac(task, model, store_train_output(store), TrainingRows(dm, module64, 64, rows=members.tolist()),
                          strategy=strategy)
        for a, b in zip(factors.layers, fresh.layers):  # the cached factors are that fit, bit for bit
            assert torch.equal(a.activation_covariance, b.activation_covariance)
            assert torch.equal(a.gradient_covariance, b.gradient_covariance)
    want, p = reference(run, scorer, strategy, SCORE["damping"])
    got = pair_scores(run, strategy, scorer)
    assert got.shape == (N, 4) and EPS32 * p < 0.02
    assert_float32_close(got, want, reduction_length=p)  # float32 gradients, dot products over p parameters
    if strategy == "kfac":  # factors over all N rows give other scores: the test sees the members
        all_rows = score(run, "kfac_all", estimator="kfac", members="all", rank="all")
        assert all_rows.factors[0].meta["num_examples"] == N
        other = pair_scores(run, "kfac_all", all_rows).double()
        assert float((other - want).abs().max()) > 2 * EPS32 * p * float(want.abs().max())  # beyond the tolerance


def test_high_noise_steps_take_the_square_target_side_by_default(run):
    """``square_from="auto"`` (the default for kfac / ekfac): t = 900 of T = 1000 is scored with the square output on
    the target side and t = 0 with the loss, each pair as a run of that one output at that one step gives it;
    ``square_from=None`` keeps the loss everywhere, and the setting is part of the pairs' keys."""
    default = score(run, "sq_default", estimator="kfac")
    assert default.hparams.square_from == 0.6 and default.hparams.output == "loss"
    p = max(f.p for f in default.factors)
    got = pair_scores(run, "sq_default", default)                       # pairs: target 0 (900, 0), target 1 (...)
    square = score(run, "sq_square", estimator="kfac", output="square", square_from=None, steps=[900])
    loss = score(run, "sq_loss", estimator="kfac", square_from=None)
    assert square.hparams.square_from is None and loss.hparams.square_from is None
    high = pair_scores(run, "sq_square", square).double()               # (N, targets) at t = 900
    everywhere = pair_scores(run, "sq_loss", loss).double()             # (N, targets x 2)
    assert_float32_close(got[:, 0::2], high, reduction_length=p)
    assert_float32_close(got[:, 1::2], everywhere[:, 1::2], reduction_length=p)
    scale = float(everywhere[:, 0::2].abs().max())
    assert float((got[:, 0::2].double() - everywhere[:, 0::2]).abs().max()) > 2 * EPS32 * p * scale  # not the loss
    saved = load_target_scores(run[0] / "sq_default" / f"target_{default.trajectories[0].target_id:04d}.pt")
    assert saved["timesteps"].tolist() == [900, 0] and saved["target_outputs"] == ["square", "loss"]
    assert module(run, "x", estimator="kfac").pair_keys != module(run, "x", estimator="kfac", square_from=None).pair_keys
    assert module(run, "x").hparams.square_from is None                 # trak: the paper's method, untouched
    assert module(run, "x", estimator="kfac", square_from=0.95).target_kind(900, 1000) == "loss"
    with pytest.raises(SettingsError, match="`square_from`"):
        module(run, "x", estimator="kfac", square_from=1.5)


def test_resume_reuses_pairs_and_factors_and_other_settings_recompute(run, monkeypatch):
    first = score(run, "resume", estimator="kfac")
    assert first.resume_counts["missing"] == 4
    before = pair_scores(run, "resume", first)
    files = sorted((run[0] / "resume" / "influence").glob("kfac_factors_*.pt"))
    assert len(files) == 2

    def refit(*args, **kw):
        raise AssertionError("the cached factors were fitted again")
    monkeypatch.setattr(influence, "fit_ekfac", refit)
    again = score(run, "resume", estimator="kfac")
    assert again.resume_counts["ok"] == 4 and torch.equal(pair_scores(run, "resume", again), before)
    damped = score(run, "resume", estimator="kfac", damping=1.0)  # other scores, the same factors
    assert damped.resume_counts["stale"] == 4
    assert not torch.allclose(pair_scores(run, "resume", damped), before)
    assert module(run, "resume").pair_keys != module(run, "resume", estimator="kfac").pair_keys
    monkeypatch.undo()
    assert module(run, "resume", estimator="ekfac").pair_keys != module(run, "resume", estimator="kfac").pair_keys


def test_a_batch_over_the_memory_budget_takes_several_training_passes_with_the_same_scores(run, monkeypatch):
    whole = score(run, "budget_whole", estimator="kfac")
    p = max(f.p for f in whole.factors)
    monkeypatch.setattr(attribution_module, "INFLUENCE_BUDGET_BYTES", 16 * p * 3)  # 3 pairs per training pass
    passes = []
    real = attribution_module.ekfac_scores

    def counted(*args, **kw):
        passes.append(1)
        return real(*args, **kw)
    monkeypatch.setattr(attribution_module, "ekfac_scores", counted)
    split = score(run, "budget_split", estimator="kfac")
    assert len(passes) == 2 * len(split.stores)  # 4 pairs: 3 + 1, per checkpoint
    assert_float32_close(pair_scores(run, "budget_split", split), pair_scores(run, "budget_whole", whole).double(),
                         reduction_length=p)


def test_ddp_fits_the_factors_once_and_gives_the_one_process_scores(run):
    single = score(run, "single", estimator="kfac")
    ddp = score(run, "ddp", devices=2, estimator="kfac")
    for a, b in zip(sorted((run[0] / "single" / "influence").glob("*.pt")),
                    sorted((run[0] / "ddp" / "influence").glob("*.pt"))):
        assert a.name == b.name
        for la, lb in zip(EKFACFactors.load(a).layers, EKFACFactors.load(b).layers):
            assert torch.equal(la.gradient_covariance, lb.gradient_covariance)
    one = pair_scores(run, "single", single).double()
    p = max(f.p for f in single.factors)
    # each rank scores its own pairs in other batches: float32 rounding of sums over p parameters
    assert_float32_close(pair_scores(run, "ddp", ddp), one, reduction_length=2 * p)


def test_bad_influence_settings_are_refused_before_work(run):
    for kw, name in ((dict(estimator="tracin"), "`estimator`"), (dict(estimator="kfac", damping=-1.0), "`damping`"),
                     (dict(estimator="kfac", damping=float("nan")), "`damping`"),
                     (dict(estimator="kfac", fisher="true"), "`fisher`"),
                     (dict(estimator="kfac", influence_batch_size=0), "`influence_batch_size`")):
        with pytest.raises(SettingsError, match=name):
            module(run, "bad", **kw)
    from lightning_modules import AttributionModule
    root = run[0]  # the class default is K-FAC: without the training data it is refused, naming the way out
    scorer = AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"),
                               out_dir=str(root / "nodata"))
    assert scorer.hparams.estimator == "kfac"
    with pytest.raises(SettingsError, match="attach_data.*estimator='trak'"):
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False).predict(
            scorer, return_predictions=False)
    assert not (run[0] / "nodata").exists()
