"""Draws are deterministic per (key, seed); per_example matches the written formulas."""
import pytest
import torch
from diffusers import DDPMScheduler

from attribution import DiffusionTask, StepOutput, TrainLoss, make_output
from attribution.testing import tiny_unet


SHAPE = (1, 8, 8)


def test_draws_deterministic_and_independent_of_batch_composition():
    out = TrainLoss(num_draws=4, seed=7)
    a = out.draws(torch.tensor([3, 10, 42]), SHAPE, num_train_timesteps=1000)
    b = out.draws(torch.tensor([42, 5, 3, 99, 10]), SHAPE, num_train_timesteps=1000)
    assert a.timesteps.shape == (3, 4) and a.noise.shape == (3, 4, *SHAPE)
    for i, j in [(0, 2), (1, 4), (2, 0)]:
        assert torch.equal(a.timesteps[i], b.timesteps[j]) and torch.equal(a.noise[i], b.noise[j])
    assert not torch.equal(a.noise[0], a.noise[1])
    assert int(a.timesteps.min()) >= 0 and int(a.timesteps.max()) < 1000
    c = TrainLoss(num_draws=4, seed=8).draws(torch.tensor([3]), SHAPE, num_train_timesteps=1000)
    assert not torch.equal(c.noise[0], a.noise[0])


def test_draws_timesteps_cover_range_uniformly():
    d = TrainLoss(num_draws=20, seed=0).draws(torch.arange(500), (1, 1, 1), num_train_timesteps=1000)
    counts = torch.bincount(d.timesteps.reshape(-1) // 100, minlength=10).float()
    assert d.timesteps.unique().numel() > 900
    assert float((counts - 1000).abs().max()) < 150  # 10000 draws, 10 bins, sd ~ 30


def test_draws_do_not_use_the_global_rng():
    torch.manual_seed(0)
    a = TrainLoss(num_draws=2, seed=1).draws(torch.tensor([5]), SHAPE, num_train_timesteps=1000)
    torch.manual_seed(123)
    torch.randn(10)
    b = TrainLoss(num_draws=2, seed=1).draws(torch.tensor([5]), SHAPE, num_train_timesteps=1000)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)


def test_share_noise_same_noise_across_keys_and_sides():
    train = TrainLoss(num_draws=3, seed=4, share_noise=True)
    target = StepOutput(num_draws=3, seed=4, share_noise=True)
    a = train.draws(torch.tensor([0, 1, 2]), SHAPE, num_train_timesteps=1000)
    b = target.draws(torch.tensor([9]), SHAPE, torch.tensor([400]), num_train_timesteps=1000)
    assert torch.equal(a.noise[0], a.noise[1]) and torch.equal(a.noise[0], b.noise[0])
    assert not torch.equal(a.noise[0, 0], a.noise[0, 1])  # draws differ among themselves
    unshared = StepOutput(num_draws=3, seed=4).draws(torch.tensor([0, 1]), SHAPE, torch.tensor([400, 400]))
    assert not torch.equal(unshared.noise[0], unshared.noise[1])


def test_step_output_uses_given_steps_and_fresh_noise_per_step():
    out = StepOutput(num_draws=5, seed=0)
    d = out.draws(torch.tensor([1, 1]), SHAPE, torch.tensor([100, 400]), num_train_timesteps=1000)
    assert d.timesteps.tolist() == [[100] * 5, [400] * 5]
    assert not torch.equal(d.noise[0], d.noise[1])
    with pytest.raises(ValueError, match="steps"):
        out.draws(torch.tensor([1]), SHAPE, torch.tensor([1000]), num_train_timesteps=1000)
    with pytest.raises(ValueError, match="steps"):
        TrainLoss(num_draws=2, seed=0).draws(torch.tensor([1]), SHAPE, torch.tensor([3]), num_train_timesteps=1000)


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"Expected `num_draws` to be a positive int, but got -3"):
        TrainLoss(num_draws=-3)
    with pytest.raises(ValueError, match="`kind`"):
        StepOutput(kind="nope")
    with pytest.raises(ValueError, match="`name`"):
        make_output("nope")
    with pytest.raises(TypeError, match="`keys`"):
        TrainLoss().draws(torch.tensor([0.5]), SHAPE, num_train_timesteps=10)


@pytest.fixture(scope="module")
def setup():
    task = DiffusionTask.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    model = tiny_unet(dtype=torch.float64)
    x0 = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return task, model, x0


def _manual(task, model, x0, draws_i, kind, mask=None):
    t, noise = draws_i
    abar = task.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    eps = model(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t).sample
    err = (noise - eps) ** 2 if kind == "loss" else eps ** 2
    if mask is not None:
        err = err * mask
    return err.sum(dim=(1, 2, 3))


def test_per_example_matches_formulas(setup):
    task, model, x0 = setup
    mask = torch.zeros(1, 8, 8, dtype=torch.float64)
    mask[:, :4, :4] = 1
    train = TrainLoss(num_draws=3, seed=1)
    d = train.draws(torch.tensor([0]), SHAPE, num_train_timesteps=1000, dtype=torch.float64).select(0)
    torch.testing.assert_close(train.per_example(task, model, x0, d, None), _manual(task, model, x0, d, "loss").mean())
    for kind in ("loss", "square"):
        step = make_output(kind, num_draws=4, seed=2, mask=mask)
        assert isinstance(step, StepOutput) and step.kind == kind
        d = step.draws(torch.tensor([0]), SHAPE, torch.tensor([250]), dtype=torch.float64).select(0)
        expected = _manual(task, model, x0, d, kind, mask).sum()
        torch.testing.assert_close(step.per_example(task, model, x0, d, None), expected)
    unmasked = StepOutput(num_draws=4, seed=2)
    assert float(unmasked.per_example(task, model, x0, d, None).detach()) > float(expected.detach())


def test_describe_records_settings():
    desc = TrainLoss(num_draws=3, seed=9, share_noise=True, timesteps="stratified").describe()
    assert desc == {"output": "TrainLoss", "num_draws": 3, "seed": 9, "kind": "loss", "share_noise": True,
                    "reduction": "mean", "mask": None, "timesteps": "stratified"}
