"""Seeded DDPM sampling: per-sample determinism, recording, resuming from a recorded x_t."""
import pytest
import torch
from diffusers import DDPMScheduler

from attribution.sampling import ddpm_sample


def toy_predict_noise(x, t):
    """A fixed, deterministic 'denoiser' so that the sampler alone is tested."""
    return 0.3 * x + 1e-3 * t.view(-1, 1, 1, 1).float()


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000)


def test_sample_is_a_function_of_its_own_seed(scheduler):
    alone = ddpm_sample(toy_predict_noise, scheduler, (1, 4, 4), [7], num_inference_steps=20).images
    batch = ddpm_sample(toy_predict_noise, scheduler, (1, 4, 4), [3, 7, 9], num_inference_steps=20).images
    assert torch.equal(alone[0], batch[1])
    assert not torch.allclose(batch[0], batch[1])


def test_recorded_x0_hat_follows_the_one_step_formula(scheduler):
    res = ddpm_sample(toy_predict_noise, scheduler, (1, 4, 4), [1, 2], num_inference_steps=10, record=True)
    assert res.x_t.shape == (2, 10, 1, 4, 4) and res.x0_hat.shape == (2, 10, 1, 4, 4)
    assert res.timesteps.tolist() == list(range(900, -1, -100))  # DDPM with 10 of 1000 steps
    assert torch.equal(res.x_t[:, 0], ddpm_sample(toy_predict_noise, scheduler, (1, 4, 4), [1, 2],
                                                  num_inference_steps=10, record=True).x_t[:, 0])
    t = int(res.timesteps[3])
    abar = scheduler.alphas_cumprod[t]
    x = res.x_t[:, 3]
    eps = toy_predict_noise(x, torch.full((2,), t))
    assert torch.allclose(res.x0_hat[:, 3], (x - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-5)


def test_record_steps_must_be_on_the_schedule(scheduler):
    with pytest.raises(ValueError, match="record_steps"):
        ddpm_sample(toy_predict_noise, scheduler, (1, 4, 4), [0], num_inference_steps=10, record=True,
                    record_steps=[901])


def test_resuming_from_a_recorded_step_reaches_a_clean_image(scheduler):
    full = ddpm_sample(toy_predict_noise, scheduler, (1, 4, 4), [5], num_inference_steps=10, record=True)
    t = int(full.timesteps[4])
    again = ddpm_sample(toy_predict_noise, scheduler, (1, 4, 4), [5], num_inference_steps=10,
                        start=full.x_t[:, 4], start_step=t)
    other = ddpm_sample(toy_predict_noise, scheduler, (1, 4, 4), [6], num_inference_steps=10,
                        start=full.x_t[:, 4], start_step=t)
    assert again.images.shape == (1, 1, 4, 4)
    assert not torch.allclose(again.images, other.images)  # completions differ by their seeds
    with pytest.raises(ValueError, match="start_step"):
        ddpm_sample(toy_predict_noise, scheduler, (1, 4, 4), [5], num_inference_steps=10,
                    start=full.x_t[:, 4], start_step=3)
