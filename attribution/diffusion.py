"""DDPM schedule helpers that work inside ``torch.func.vmap``.

Notation (SPEC): ``abar_t`` is the cumulative product of alphas at training step ``t``;
forward noising is ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and the one-step estimate
of the final image is ``x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)``.

vmap safety: ``alphas_cumprod[t]`` with a tensor ``t`` calls ``.item()`` inside vmap and fails,
so coefficients are looked up with ``index_select``. ``t`` may be a 0-d tensor (one example,
e.g. inside vmap) or a 1-D tensor ``(B,)`` matching the leading dimension of ``x``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["alphas_cumprod_from", "schedule_coefficients", "add_noise", "x0_hat"]


def alphas_cumprod_from(scheduler) -> Tensor:
    """Return the scheduler's cumulative alpha products as a float32 CPU tensor of shape ``(T,)``.

    ``scheduler`` is a diffusers scheduler (``DDPMScheduler``, ``DDIMScheduler``, ...) or any
    object with an ``alphas_cumprod`` attribute (tensor or array).
    """
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(
            "Expected `scheduler` to have an `alphas_cumprod` attribute (a diffusers DDPM-type "
            f"scheduler), but got {type(scheduler).__name__}"
        )
    abar = torch.as_tensor(scheduler.alphas_cumprod).detach().to("cpu", torch.float32).reshape(-1)
    if abar.numel() == 0 or not bool(((abar > 0) & (abar <= 1)).all()):
        raise ValueError("Expected `scheduler.alphas_cumprod` to be non-empty with values in (0, 1]")
    return abar


def schedule_coefficients(t: Tensor, alphas_cumprod: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """Look up ``(sqrt(abar_t), sqrt(1 - abar_t))`` shaped to broadcast against ``like``.

    Args:
        t: integer timesteps, 0-d (one example) or ``(B,)`` with ``B == like.shape[0]``.
        alphas_cumprod: ``(T,)``.
        like: the tensor the coefficients multiply, ``(*sample_shape)`` or ``(B, *sample_shape)``.

    Returns:
        Two tensors of ``like.dtype`` on ``like.device``, of shape ``()`` for 0-d ``t`` or
        ``(B, 1, ..., 1)`` for ``(B,)`` ``t``.
    """
    if t.ndim > 1:
        raise ValueError(f"Expected `t` to be 0-d or (B,), but got shape {tuple(t.shape)}")
    abar = alphas_cumprod.to(like.device).index_select(0, t.reshape(-1).long().to(like.device))
    abar = abar.to(like.dtype)
    shape = () if t.ndim == 0 else (-1,) + (1,) * (like.ndim - 1)
    abar = abar.reshape(shape)
    return abar.sqrt(), (1 - abar).sqrt()


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward noising ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Args:
        x0: ``(B, *S)`` with ``t`` of shape ``(B,)``, or ``(*S)`` with 0-d ``t``.
        noise: same shape as ``x0``.
        t: integer timesteps in ``[0, T)``.
        alphas_cumprod: ``(T,)``.

    Returns:
        ``x_t`` with the shape of ``x0``.
    """
    a, b = schedule_coefficients(t, alphas_cumprod, x0)
    return a * x0 + b * noise


def x0_hat(x_t: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """One-step estimate ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``.

    Shapes as in :func:`add_noise`; it inverts ``add_noise`` when ``eps`` is the true noise.
    """
    a, b = schedule_coefficients(t, alphas_cumprod, x_t)
    return (x_t - b * eps) / a
