"""Estimator settings of the training side (issue 16): D-TRAK's l2 / avg outputs, stratified and even
timesteps, timestep-normalized draws; each against a slow, obvious float64 reference."""
import pytest
import torch

from attribution import IdentityProjector, StepOutput, TrainLoss, featurize_batch, loop_gradients, num_parameters
from attribution.featurize import FeaturizeSettings
from attribution.layerwise import _rows_loss
from attribution.outputs import Draws
from attribution.testing import random_inputs, tiny_unet

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps   # the features are float64 results cast to float32


@pytest.mark.parametrize("kind", ["l2", "avg"])
def test_l2_and_avg_values_and_gradients(task, kind):
    model = tiny_unet(dtype=F64)
    x0, _ = random_inputs(3)
    out = TrainLoss(num_draws=2, seed=4, kind=kind)
    draws = out.draws(torch.arange(3), x0.shape[1:], num_train_timesteps=1000, dtype=F64)
    with torch.no_grad():   # the value, written out by hand from the network output
        for i in range(3):
            values = []
            for k in range(2):
                t = draws.timesteps[i, k:k + 1]
                abar = task.alphas_cumprod.to(F64)[t].reshape(1, 1, 1, 1)
                x_t = abar.sqrt() * x0[i:i + 1] + (1 - abar).sqrt() * draws.noise[i, k:k + 1]
                net = model(x_t, t).sample
                values.append(net.pow(2).sum().sqrt() if kind == "l2" else net.mean())
            got = out.per_example(task, model, x0[i], draws.select(i), None)
            torch.testing.assert_close(got, torch.stack(values).mean(), rtol=1e-12, atol=0)
    p = num_parameters(model)
    fast = featurize_batch(task, model, out, IdentityProjector(p), x0, torch.arange(3), gradient_path="vmap")
    slow = loop_gradients(task, model, out, x0, draws, out_dtype=F64)
    assert float(slow.abs().max()) > 1e-4
    torch.testing.assert_close(fast.to(F64), slow, rtol=0, atol=float(slow.abs().max()) * EPS32)
    # the batched rows total (layerwise / EK-FAC paths) is the sum of the per-example values
    with torch.no_grad():
        total = _rows_loss(task, model, out, x0, draws, None)
        each = sum(out.per_example(task, model, x0[i], draws.select(i), None) for i in range(3))
    torch.testing.assert_close(total, each, rtol=1e-12, atol=0)


def test_stratified_and_even_timesteps():
    T, K = 1000, 8
    strat = TrainLoss(num_draws=K, seed=3, timesteps="stratified")
    t = strat.draws(torch.arange(50), (1, 4, 4), num_train_timesteps=T).timesteps
    stratum = torch.arange(K) * T // K
    assert ((t >= stratum) & (t < stratum + T // K)).all()          # one draw in each stratum
    assert len({tuple(r) for r in t.tolist()}) == 50                  # per example
    again = strat.draws(torch.tensor([7, 3]), (1, 4, 4), num_train_timesteps=T).timesteps
    assert torch.equal(again, t[[7, 3]])                              # a function of (seed, index) only
    even = TrainLoss(num_draws=4, seed=0, timesteps="even").draws(torch.arange(3), (1, 2, 2), num_train_timesteps=T)
    assert even.timesteps.tolist() == [[125, 375, 625, 875]] * 3
    uniform = TrainLoss(num_draws=K, seed=3).draws(torch.arange(50), (1, 4, 4), num_train_timesteps=T).timesteps
    assert not ((uniform >= stratum) & (uniform < stratum + T // K)).all()
    with pytest.raises(ValueError, match="timesteps"):
        TrainLoss(num_draws=2, timesteps="random")
    with pytest.raises(ValueError, match="timesteps"):
        FeaturizeSettings(timesteps="grid")


def test_timestep_range_draws_inside_the_window_and_keeps_the_whole_range_default():
    T, K, keys = 1000, 8, torch.arange(40)
    for scheme in ("uniform", "stratified", "even"):
        whole = TrainLoss(num_draws=K, seed=3, timesteps=scheme)
        assert "timestep_range" not in whole.describe()      # stores of the whole range keep their metadata
        same = TrainLoss(num_draws=K, seed=3, timesteps=scheme, timestep_range=[0, T])
        assert torch.equal(same.draws(keys, (1, 2, 2), num_train_timesteps=T).timesteps,
                           whole.draws(keys, (1, 2, 2), num_train_timesteps=T).timesteps)
        band = TrainLoss(num_draws=K, seed=3, timesteps=scheme, timestep_range=[200, 400])
        t = band.draws(keys, (1, 2, 2), num_train_timesteps=T).timesteps
        assert ((t >= 200) & (t < 400)).all() and len(set(t.flatten().tolist())) > K // 2
        assert band.describe()["timestep_range"] == [200, 400]
        if scheme == "stratified":                                  # one draw in each 25-step stratum
            stratum = 200 + torch.arange(K) * 25
            assert ((t >= stratum) & (t < stratum + 25)).all()
    even = TrainLoss(num_draws=4, timesteps="even", timestep_range=[0, 200]).draws(keys[:2], (1, 2, 2),
                                                                                   num_train_timesteps=T)
    assert even.timesteps.tolist() == [[25, 75, 125, 175]] * 2
    for bad in ([300, 300], [-1, 10], [0], (0.0, 10)):
        with pytest.raises(ValueError, match="timestep_range"):
            TrainLoss(num_draws=2, timestep_range=bad)
        with pytest.raises(ValueError, match="timestep_range"):
            FeaturizeSettings(timestep_range=bad)
    with pytest.raises(ValueError, match=r"timestep_range.*T = 1000"):   # the window past T, before any draw
        TrainLoss(num_draws=2, timestep_range=[900, 1100]).draws(keys, (1, 2, 2), num_train_timesteps=T)


@pytest.mark.parametrize("output", [TrainLoss(num_draws=3, seed=2), StepOutput(num_draws=2, seed=5)])
def test_normalized_draws_equal_a_loop_over_single_draws(task, output):
    model = tiny_unet(dtype=F64)
    x0, _ = random_inputs(2)
    steps = None if isinstance(output, TrainLoss) else torch.tensor([200, 700])
    draws = output.draws(torch.arange(2), x0.shape[1:], steps, num_train_timesteps=1000, dtype=F64)
    p = num_parameters(model)
    got = featurize_batch(task, model, output, IdentityProjector(p), x0, torch.arange(2), steps=steps,
                          normalize_draws=True, gradient_path="loop")
    for i in range(2):   # reference: one backward pass per (example, draw), unit norm, then the reduction
        units = []
        for k in range(output.num_draws):
            one = Draws(draws.timesteps[i:i + 1, k:k + 1], draws.noise[i:i + 1, k:k + 1])
            g = loop_gradients(task, model, output, x0[i:i + 1], one, out_dtype=F64)[0]
            units.append(g / g.norm())
        want = torch.stack(units).mean(0) if output.reduction == "mean" else torch.stack(units).sum(0)
        torch.testing.assert_close(got[i].to(F64), want, rtol=0, atol=EPS32 * float(want.abs().max()))
    plain = featurize_batch(task, model, output, IdentityProjector(p), x0, torch.arange(2), steps=steps)
    assert not torch.allclose(plain, got)
    with pytest.raises(ValueError, match="normalize_draws"):
        FeaturizeSettings(projector="layerwise", normalize_draws=True)
