"""Schedule helpers (vmap-safe) and DiffusionTask / math_attention."""
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from attribution import DiffusionTask, add_noise, alphas_cumprod_from, math_attention, x0_hat
from attribution.testing import tiny_unet


@pytest.fixture(scope="module")
def abar():
    return alphas_cumprod_from(DDPMScheduler(num_train_timesteps=1000))


def test_alphas_cumprod_from_matches_scheduler(abar):
    s = DDPMScheduler(num_train_timesteps=1000)
    assert abar.shape == (1000,) and abar.dtype == torch.float32
    torch.testing.assert_close(abar, s.alphas_cumprod.float())
    with pytest.raises(TypeError, match="alphas_cumprod"):
        alphas_cumprod_from(object())


def test_add_noise_matches_formula_and_scheduler(abar):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = add_noise(x0, eps, t, abar)
    expected = abar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(xt, expected)
    torch.testing.assert_close(xt, DDPMScheduler(num_train_timesteps=1000).add_noise(x0, eps, t))


def test_x0_hat_inverts_add_noise(abar):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 300, 900])
    torch.testing.assert_close(x0_hat(add_noise(x0, eps, t, abar), eps, t, abar), x0, rtol=1e-10, atol=1e-10)


def test_helpers_work_inside_vmap_with_0d_t(abar):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([1, 2, 700, 999])
    xt_v = torch.func.vmap(lambda a, b, s: add_noise(a, b, s, abar))(x0, eps, t)
    torch.testing.assert_close(xt_v, add_noise(x0, eps, t, abar))
    back = torch.func.vmap(lambda a, b, s: x0_hat(a, b, s, abar))(xt_v, eps, t)
    torch.testing.assert_close(back, x0, rtol=1e-4, atol=1e-4)


def test_task_validates_and_describes(abar):
    task = DiffusionTask(abar)
    assert task.num_train_timesteps == 1000 and task.describe()["num_train_timesteps"] == 1000
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DiffusionTask(abar, num_train_timesteps=10)


def test_predict_noise_calls_unet_and_unwraps_sample(abar):
    model = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    eps = DiffusionTask(abar).predict_noise(model, x, t)
    torch.testing.assert_close(eps, model(x, t).sample)


def test_math_attention_switches_and_restores():
    model = tiny_unet(dtype=torch.float64)
    from diffusers.models.attention_processor import Attention

    attn = [m for m in model.modules() if isinstance(m, Attention)]
    assert attn and all(isinstance(m.processor, AttnProcessor2_0) for m in attn)
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([3, 700])
    fused = model(x, t).sample
    with math_attention(model) as n:
        assert n == len(attn) and all(type(m.processor) is AttnProcessor for m in attn)
        math = model(x, t).sample
    assert all(isinstance(m.processor, AttnProcessor2_0) for m in attn)
    torch.testing.assert_close(math, fused, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError):
        with math_attention(model):
            raise RuntimeError("boom")
    assert all(isinstance(m.processor, AttnProcessor2_0) for m in attn)
