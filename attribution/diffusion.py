"""DDPM schedule helpers and prediction types, all of which work inside ``torch.func.vmap``.

Notation (SPEC): ``abar_t`` is the cumulative product of alphas at training step ``t``;
forward noising is ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and the one-step estimate
of the final image is ``x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)``.

Prediction types (diffusers' ``scheduler.config.prediction_type``; SPEC "Prediction types"), with
``a = sqrt(abar_t)``, ``b = sqrt(1 - abar_t)``:

* ``epsilon``: the network outputs ``eps_hat``; ``x0_hat = (x_t - b eps_hat) / a``.
* ``v_prediction``: it outputs ``v_hat`` (target ``v = a eps - b x_0``); ``x0_hat = a x_t - b v_hat``,
  ``eps_hat = b x_t + a v_hat``.
* ``sample``: it outputs ``x0_hat``; ``eps_hat = (x_t - a x0_hat) / b``.

:func:`split_prediction` is the one place that turns a network output into ``(eps_hat, x0_hat)``;
:func:`prediction_target` is what the network is trained to output (the target of its own loss).

vmap safety: ``alphas_cumprod[t]`` with a tensor ``t`` calls ``.item()`` inside vmap and fails,
so coefficients are looked up with ``index_select``. ``t`` may be a 0-d tensor (one example,
e.g. inside vmap) or a 1-D tensor ``(B,)`` matching the leading dimension of ``x``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PREDICTION_TYPES", "alphas_cumprod_from", "schedule_coefficients", "add_noise", "x0_hat",
           "split_prediction", "prediction_target", "check_prediction_type", "check_alphas_cumprod"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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
    return check_alphas_cumprod(abar, "scheduler.alphas_cumprod")


def check_alphas_cumprod(abar: Tensor, name: str = "alphas_cumprod") -> Tensor:
    """Return ``abar (T,)`` if it is non-empty with every value in (0, 1], else raise a ValueError naming ``name``.

    A zero (zero terminal SNR, e.g. diffusers' ``rescale_betas_zero_snr=True``) is refused: ``x_t`` then
    carries no signal and ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)`` is undefined.
    """
    if abar.numel() == 0:
        raise ValueError(f"Expected `{name}` to be non-empty, but got an empty schedule")
    bad = ((abar <= 0) | (abar > 1) | ~torch.isfinite(abar)).nonzero().reshape(-1)
    if len(bad):
        i = int(bad[0])
        zero = float(abar[i]) == 0
        raise ValueError(
            f"Expected `{name}` in (0, 1] at every timestep, but got {float(abar[i])} at t = {i}"
            + (" (zero terminal SNR, e.g. rescale_betas_zero_snr=True, is not supported: x_t carries no signal "
               "there and x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) is undefined)" if zero else ""))
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


def check_prediction_type(prediction_type: str, name: str = "prediction_type") -> str:
    """Return ``prediction_type`` if it is one of :data:`PREDICTION_TYPES`, else raise a ValueError naming ``name``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Expected `{name}` to be one of {PREDICTION_TYPES}, but got {prediction_type!r}")
    return prediction_type


def split_prediction(out: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor,
                     prediction_type: str = "epsilon") -> tuple[Tensor, Tensor]:
    """``(eps_hat, x0_hat)`` implied by the network output ``out`` at ``(x_t, t)``.

    Args:
        out: the network's output in its own parameterization, shaped like ``x_t``.
        x_t, t, alphas_cumprod: as in :func:`add_noise` (``t`` 0-d or ``(B,)``).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.

    Returns:
        Two tensors shaped like ``x_t``. For ``"epsilon"`` ``eps_hat`` is ``out`` itself and ``x0_hat`` is
        :func:`x0_hat` (the same arithmetic, bit for bit).
    """
    if prediction_type == "epsilon":
        return out, x0_hat(x_t, out, t, alphas_cumprod)
    a, b = schedule_coefficients(t, alphas_cumprod, x_t)
    if prediction_type == "v_prediction":
        return b * x_t + a * out, a * x_t - b * out
    if prediction_type == "sample":
        return (x_t - a * out) / b, out
    check_prediction_type(prediction_type)
    raise AssertionError("unreachable")  # pragma: no cover


def prediction_target(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor,
                      prediction_type: str = "epsilon") -> Tensor:
    """What the network is trained to output for ``x_t = add_noise(x0, noise, t)``: ``noise`` (epsilon),
    ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (v_prediction, diffusers' ``get_velocity``) or ``x0`` (sample).

    Shapes as in :func:`add_noise`. For ``"epsilon"`` the returned tensor is ``noise`` itself.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a, b = schedule_coefficients(t, alphas_cumprod, x0)
        return a * noise - b * x0
    if prediction_type == "sample":
        return x0
    check_prediction_type(prediction_type)
    raise AssertionError("unreachable")  # pragma: no cover
