"""Targets: recorded trajectories round-trip through files; real images become targets reproducibly."""
import pytest
import torch
from diffusers import DDPMScheduler

from attribution import add_noise
from attribution.sampling import ddpm_sample
from attribution.trajectory import Trajectory, from_samples, load_targets, real_image_target, save_targets


def toy(x, t):
    return 0.2 * x


def test_sampled_targets_round_trip(tmp_path):
    result = ddpm_sample(toy, DDPMScheduler(), (1, 4, 4), [5, 6], num_inference_steps=10, record=True,
                         record_steps=[900, 400, 0])
    save_targets(from_samples(result, info={"checkpoint": "x.ckpt"}), tmp_path)
    loaded = load_targets(tmp_path)
    assert [t.target_id for t in loaded] == [0, 1] and [t.seed for t in loaded] == [5, 6]
    assert torch.equal(loaded[1].x_t, result.x_t[1]) and torch.equal(loaded[1].final, result.images[1])
    assert loaded[0].timesteps.tolist() == [900, 400, 0] and loaded[0].info["checkpoint"] == "x.ckpt"
    with pytest.raises(KeyError, match="target ids"):
        load_targets(tmp_path, [7])
    with pytest.raises(FileNotFoundError, match="targets"):
        load_targets(tmp_path / "nothing")


def test_a_real_image_is_noised_reproducibly_from_its_seed(tmp_path):
    abar = DDPMScheduler().alphas_cumprod
    image = torch.rand(1, 4, 4) * 2 - 1
    a = real_image_target(toy, abar, image, [700, 100], seed=3, target_id=9, index=42)
    b = real_image_target(toy, abar, image, [700, 100], seed=3, target_id=9, index=42)
    c = real_image_target(toy, abar, image, [700, 100], seed=4, target_id=9, index=42)
    assert torch.equal(a.x_t, b.x_t) and not torch.allclose(a.x_t, c.x_t)
    assert a.source == "real:42" and torch.equal(a.final, image)
    noise = (a.x_t - abar[[700, 100]].sqrt().view(-1, 1, 1, 1) * image) / (1 - abar[[700, 100]]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(add_noise(image.expand(2, -1, -1, -1), noise, torch.tensor([700, 100]), abar), a.x_t, atol=1e-5)
    assert abs(float(noise.std()) - 1) < 0.5  # the recorded x_t holds unit Gaussian noise at the right level
    eps = toy(a.x_t, None)
    expected = (a.x_t - (1 - abar[[700, 100]]).sqrt().view(-1, 1, 1, 1) * eps) / abar[[700, 100]].sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(a.x0_hat, expected, atol=1e-5)
    save_targets([a], tmp_path)
    assert Trajectory.load(tmp_path / "target_0009.pt").source == "real:42"
