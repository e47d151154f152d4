"""Prediction types (epsilon, v_prediction, sample) and schedulers: the core's x0_hat against diffusers'
``pred_original_sample`` for DDPM, DDIM, DPM-Solver++ and Euler on three beta schedules; featurized per-example
gradients against a loop of backward passes of the model's own training loss (float64, diffusers' add_noise and
get_velocity as the independent reference); refusals of what is not supported."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)

from attribution import (PREDICTION_TYPES, DiffusionTask, StepOutput, TrainLoss, add_noise, loop_gradients,
                         per_example_gradients, prediction_target, split_prediction)
from attribution.layerwise import LayerwiseProjector, featurize_batch_layerwise
from attribution.sampling import ddpm_sample
from attribution.task import math_attention
from attribution.testing import random_inputs, tiny_unet
from attribution.trajectory import real_image_target

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _scheduler(kind: str, prediction_type: str, beta_schedule: str):
    common = dict(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)
    if kind == "ddpm":
        return DDPMScheduler(clip_sample=False, **common)
    if kind == "ddim":
        return DDIMScheduler(clip_sample=False, **common)
    if kind == "dpmsolver":
        return DPMSolverMultistepScheduler(**common)
    if kind == "euler":
        return EulerDiscreteScheduler(timestep_spacing="trailing", **common)
    return EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **common)


# ------------------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_split_inverts_the_training_target(prediction_type):
    """A perfect network (its output is its own training target) gives back the true noise and x0."""
    abar = DiffusionTask.from_scheduler(DDPMScheduler(beta_schedule="squaredcos_cap_v2")).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 4, 4, generator=g, dtype=F64), torch.randn(4, 1, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 250, 700, 999])
    x_t = add_noise(x0, noise, t, abar)
    eps_hat, x0_hat = split_prediction(prediction_target(x0, noise, t, abar, prediction_type), x_t, t, abar,
                                       prediction_type)
    # float64 rounding of x_t and of the few products, amplified by 1 / sqrt(abar_t) or 1 / sqrt(1 - abar_t)
    a, b = abar[t].double().sqrt().view(-1, 1, 1, 1), (1 - abar[t].double()).sqrt().view(-1, 1, 1, 1)
    bound = 8 * torch.finfo(F64).eps * (x_t.abs() + noise.abs() + x0.abs()) / torch.minimum(a, b)
    assert bool(((x0_hat - x0).abs() <= bound).all()) and bool(((eps_hat - noise).abs() <= bound).all())
    v = DDPMScheduler(beta_schedule="squaredcos_cap_v2").get_velocity(x0, noise, t)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(prediction_target(x0, noise, t, abar, prediction_type), v, rtol=1e-12, atol=1e-12)


def test_split_works_inside_vmap():
    task = DiffusionTask.from_scheduler(DDPMScheduler(prediction_type="v_prediction"))
    g = torch.Generator().manual_seed(1)
    out, x_t = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([3, 500, 999])
    mapped = torch.func.vmap(task.split)(out, x_t, t)
    for a, b in zip(mapped, task.split(out, x_t, t)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ schedulers
@torch.no_grad()
def _reference_loop(scheduler, net, shape, seeds, steps):
    """diffusers' own pipeline loop (same per-sample generators as ``ddpm_sample``): the network input and
    the scheduler's x0 (``pred_original_sample``; DPM-Solver++ keeps its converted x0 in ``model_outputs``)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]) * scheduler.init_noise_sigma
    inputs, x0s, outs = [], [], []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = net(x_in, t).sample
        res = scheduler.step(out, t, x, generator=gens)
        x0 = scheduler.model_outputs[-1] if isinstance(scheduler, DPMSolverMultistepScheduler) \
            else res.pred_original_sample
        inputs.append(x_in), x0s.append(x0.clone()), outs.append(out)
        x = res.prev_sample
    return torch.stack(inputs, 1), torch.stack(x0s, 1), torch.stack(outs, 1), x


@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpmsolver", "euler", "euler_ancestral"])
def test_recorded_x0_hat_is_the_schedulers_pred_original_sample(kind, prediction_type, beta_schedule):
    if (kind, prediction_type) == ("euler_ancestral", "sample"):
        pytest.skip("diffusers' EulerAncestralDiscreteScheduler.step raises NotImplementedError for 'sample'")
    scheduler, net = _scheduler(kind, prediction_type, beta_schedule), tiny_unet(seed=3)
    res = ddpm_sample(lambda x, t: net(x, t).sample, scheduler, (1, 8, 8), [5, 6], num_inference_steps=6, record=True)
    inputs, x0s, outs, final = _reference_loop(scheduler, net, (1, 8, 8), [5, 6], 6)
    task = DiffusionTask.from_scheduler(scheduler)
    a = task.alphas_cumprod[res.timesteps].sqrt().view(1, -1, 1, 1, 1)
    # float32 rounding of both computations, bounded by their largest intermediate (x_t / a, out / a)
    scale = float((inputs.abs().amax((0, 2, 3, 4), keepdim=True) + outs.abs().amax((0, 2, 3, 4), keepdim=True) * 2)
                  .div(a).max())
    torch.testing.assert_close(res.x_t, inputs, rtol=0, atol=0)  # the same trajectory, step by step
    torch.testing.assert_close(res.x0_hat, x0s, rtol=0, atol=64 * EPS32 * scale)
    torch.testing.assert_close(res.images, final, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_resuming_an_euler_trajectory_from_a_recorded_x_t(prediction_type):
    """The recorded x_t is the network's input (variance preserving); resuming converts it back to Euler's sample."""
    scheduler, net = _scheduler("euler", prediction_type, "scaled_linear"), tiny_unet(seed=4)
    fn = lambda x, t: net(x, t).sample  # noqa: E731
    full = ddpm_sample(fn, scheduler, (1, 8, 8), [2], num_inference_steps=5, record=True)
    again = ddpm_sample(fn, scheduler, (1, 8, 8), [2], num_inference_steps=5, record=True,
                        start=full.x_t[:, 2], start_step=int(full.timesteps[2]))
    torch.testing.assert_close(again.x_t[:, 0], full.x_t[:, 2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again.images, full.images, rtol=1e-5, atol=1e-5)  # Euler is deterministic


def test_the_default_ddpm_path_records_the_epsilon_formula_exactly():
    scheduler, net = DDPMScheduler(), tiny_unet(seed=2)
    res = ddpm_sample(lambda x, t: net(x, t).sample, scheduler, (1, 8, 8), [1], num_inference_steps=4, record=True)
    abar = scheduler.alphas_cumprod[res.timesteps].view(1, -1, 1, 1, 1)
    eps = torch.stack([net(res.x_t[:, i], res.timesteps[i]).sample for i in range(4)], 1)
    assert torch.equal(res.x0_hat, (res.x_t - (1 - abar).sqrt() * eps) / abar.sqrt())


def test_real_image_targets_use_the_prediction_type():
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    task, net = DiffusionTask.from_scheduler(scheduler), tiny_unet(seed=1)
    image = random_inputs(1, dtype=torch.float32)[0][0]
    traj = real_image_target(lambda x, t: net(x, t).sample, task, image, [900, 100], seed=3, target_id=0)
    v = net(traj.x_t, traj.timesteps).sample
    abar = task.alphas_cumprod[traj.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(traj.x0_hat, abar.sqrt() * traj.x_t - (1 - abar).sqrt() * v)


# ------------------------------------------------------------------------------------------ refusals
def test_unsupported_schedules_and_types_are_refused_up_front():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DiffusionTask.from_scheduler(DDPMScheduler(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionTask(torch.linspace(0.99, 0.01, 10), prediction_type="flow")
    with pytest.raises(ValueError, match="scheduler.config.prediction_type"):
        DiffusionTask.from_scheduler(DDPMScheduler(prediction_type="v_prediction"), prediction_type="epsilon")
    fn = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="fractional"):  # Euler's default linspace spacing: t = 978.6...
        ddpm_sample(fn, EulerDiscreteScheduler(), (1, 4, 4), [0], num_inference_steps=50)
    with pytest.raises(ValueError, match="sigma"):
        ddpm_sample(fn, DPMSolverMultistepScheduler(use_karras_sigmas=True), (1, 4, 4), [0], num_inference_steps=10)
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_sample(fn, DDPMScheduler(variance_type="learned_range"), (1, 4, 4), [0], num_inference_steps=10)
    with pytest.raises(TypeError, match="model_output"):
        class OldStyle(DiffusionTask):
            def predict_noise(self, model, x_t, t, cond=None):
                return model(x_t, t)


# ------------------------------------------------------------------------------------------ gradients
def _own_loss(scheduler, net, x0, draws_i, kind):
    """The model's training loss written with diffusers only: mean over draws of the summed squared error
    against its own target (noise, get_velocity, x0), or D-TRAK's squared output norm."""
    t, noise = draws_i
    x_t = scheduler.add_noise(x0.expand_as(noise), noise, t)
    out = net(x_t, t).sample
    target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0.expand_as(noise), noise, t),
              "sample": x0.expand_as(noise)}[scheduler.config.prediction_type]
    err = (out - target) ** 2 if kind == "loss" else out ** 2
    return err.reshape(len(t), -1).sum(1)


def _reference_grads(scheduler, net, x0, draws, kind, reduce):
    rows = []
    for i in range(x0.shape[0]):
        net.zero_grad(set_to_none=True)
        per_draw = _own_loss(scheduler, net, x0[i:i + 1], draws.select(i), kind)
        (per_draw.mean() if reduce == "mean" else per_draw.sum()).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    net.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("side", ["train", "step"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_featurized_gradients_are_the_models_own_training_loss_gradients(prediction_type, side):
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    task, net = DiffusionTask.from_scheduler(scheduler), tiny_unet(seed=5, dtype=F64)
    x0, _ = random_inputs(3, seed=4)
    keys = torch.tensor([2, 11, 40])
    if side == "train":
        out, steps, reduce = TrainLoss(num_draws=3, seed=7), None, "mean"
    else:
        out, steps, reduce = StepOutput(num_draws=2, seed=7), torch.tensor([999, 600, 30]), "sum"
    draws = out.draws(keys, x0.shape[1:], steps, num_train_timesteps=1000, dtype=F64)
    with math_attention(net):
        ref = _reference_grads(scheduler, net, x0, draws, "loss", reduce)
    vmap = per_example_gradients(task, net, out, x0, draws, out_dtype=F64)
    loop = loop_gradients(task, net, out, x0, draws, out_dtype=F64)
    assert float(ref.abs().max()) > 1e-3
    torch.testing.assert_close(vmap, ref, rtol=1e-9, atol=1e-10 * float(ref.abs().max()))
    torch.testing.assert_close(loop, ref, rtol=1e-9, atol=1e-10 * float(ref.abs().max()))
    proj = LayerwiseProjector(net, d=64, seed=1)
    with math_attention(net):
        layerwise = featurize_batch_layerwise(task, net, out, proj, x0, keys, steps=steps, out_dtype=F64)
    torch.testing.assert_close(layerwise, proj.project(ref), rtol=1e-9, atol=1e-10 * float(ref.abs().max()))


def test_square_output_is_the_squared_norm_of_the_network_output():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    task, net = DiffusionTask.from_scheduler(scheduler), tiny_unet(seed=6, dtype=F64)
    x0, _ = random_inputs(2, seed=5)
    out = TrainLoss(num_draws=2, seed=1, kind="square")
    draws = out.draws(torch.tensor([0, 1]), x0.shape[1:], num_train_timesteps=1000, dtype=F64)
    with math_attention(net):
        ref = _reference_grads(scheduler, net, x0, draws, "square", "mean")
    torch.testing.assert_close(per_example_gradients(task, net, out, x0, draws, out_dtype=F64), ref,
                               rtol=1e-9, atol=1e-10 * float(ref.abs().max()))


def test_the_task_records_its_prediction_type():
    task = DiffusionTask.from_scheduler(DDPMScheduler(prediction_type="sample"))
    assert task.describe()["prediction_type"] == "sample"
