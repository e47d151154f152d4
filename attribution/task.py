"""``DiffusionTask``: the small extension point telling the core how to call a denoiser.

The core never assumes more about a user's model than what this class says (in the spirit of
kronfluence's ``Task``): the noise schedule (``alphas_cumprod``, ``num_train_timesteps``), what the
network predicts (``prediction_type``: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``, as diffusers'
``scheduler.config.prediction_type``) and how to call it (:meth:`DiffusionTask.model_output`).

Everything else is derived, in one place (:func:`attribution.diffusion.split_prediction`):
:meth:`~DiffusionTask.denoise` gives ``(eps_hat, x0_hat)`` for any prediction type, and
:meth:`~DiffusionTask.target` is what the network is trained to output, so the training loss the core
differentiates is the model's own, in its own parameterization (``||eps - eps_hat||^2``,
``||v - v_hat||^2`` or ``||x_0 - x0_hat||^2``).

The default :meth:`DiffusionTask.model_output` calls a diffusers ``UNet2DModel`` or
``UNet2DConditionModel`` and returns its ``.sample``. To plug in another network, subclass and
override ``model_output`` (return the raw output, in the parameterization ``prediction_type`` names)::

    class MyTask(DiffusionTask):
        def model_output(self, model, x_t, t, cond=None):
            return model(x_t, t.float() / self.num_train_timesteps, cond)

``model`` passed to ``model_output`` is any callable with the model's call signature: the
module itself (reference loops) or a ``torch.func.functional_call`` wrapper (vmap gradients).
``model_output`` must be vmap-safe: no ``.item()``, no data-dependent Python control flow.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .diffusion import (alphas_cumprod_from, check_alphas_cumprod, check_prediction_type, prediction_target,
                        split_prediction)

__all__ = ["DiffusionTask", "math_attention"]

log = logging.getLogger(__name__)


class DiffusionTask:
    """How the attribution core calls a diffusion model.

    Args:
        alphas_cumprod: ``(T,)`` cumulative alpha products of the training noise schedule, in (0, 1].
        num_train_timesteps: ``T``; defaults to ``len(alphas_cumprod)`` and must match it.
        prediction_type: what the network outputs: ``"epsilon"`` (the noise), ``"v_prediction"``
            (``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``) or ``"sample"`` (``x_0``).
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "predict_noise" in vars(cls) and "model_output" not in vars(cls):
            raise TypeError(f"{cls.__name__} overrides `predict_noise`, which the core no longer calls: override "
                            "`model_output` (the raw network output) and set `prediction_type` instead")

    def __init__(self, alphas_cumprod: Tensor, num_train_timesteps: Optional[int] = None,
                 prediction_type: str = "epsilon") -> None:
        abar = torch.as_tensor(alphas_cumprod)
        if abar.ndim != 1 or abar.numel() == 0:
            raise ValueError(
                f"Expected `alphas_cumprod` to be a non-empty 1-D tensor (T,), but got shape {tuple(abar.shape)}"
            )
        T = abar.numel() if num_train_timesteps is None else num_train_timesteps
        if T != abar.numel():
            raise ValueError(
                f"Expected `num_train_timesteps` to equal len(alphas_cumprod) = {abar.numel()}, but got {T}"
            )
        self.alphas_cumprod = check_alphas_cumprod(abar.detach().to("cpu", torch.float32), "alphas_cumprod")
        self.num_train_timesteps = int(T)
        self.prediction_type = check_prediction_type(prediction_type)

    @classmethod
    def from_scheduler(cls, scheduler, prediction_type: Optional[str] = None) -> "DiffusionTask":
        """Build from a diffusers scheduler: ``scheduler.alphas_cumprod`` and ``scheduler.config.prediction_type``.

        ``prediction_type`` is needed only for a scheduler-like object without ``config.prediction_type``;
        given beside one, it must agree with it.
        """
        configured = getattr(getattr(scheduler, "config", None), "prediction_type", None)
        if configured is None and prediction_type is None:
            raise ValueError(f"Expected `scheduler.config.prediction_type` (a diffusers scheduler) or an explicit "
                             f"`prediction_type`, but {type(scheduler).__name__} has neither")
        if configured is not None and prediction_type is not None and configured != prediction_type:
            raise ValueError(f"Expected `prediction_type` to match `scheduler.config.prediction_type` "
                             f"({configured!r}), but got {prediction_type!r}")
        return cls(alphas_cumprod_from(scheduler),
                   prediction_type=check_prediction_type(configured or prediction_type,
                                                         "scheduler.config.prediction_type"))

    def model_output(self, model: Callable, x_t: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """The network's raw output (in its own parameterization, ``prediction_type``) at ``(x_t, t[, cond])``.

        Args:
            model: callable with a diffusers UNet's signature.
            x_t: ``(K, C, H, W)`` noisy samples.
            t: ``(K,)`` integer timesteps.
            cond: ``None`` or conditioning ``(K, L, D)`` passed as ``encoder_hidden_states``.

        Returns:
            ``(K, C, H, W)``: eps_hat, v_hat or x0_hat according to ``prediction_type``.
        """
        out = model(x_t, t) if cond is None else model(x_t, t, encoder_hidden_states=cond)
        return _unwrap_sample(out)

    def split(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps_hat, x0_hat)`` implied by a network output ``out`` at ``(x_t, t)`` (shapes of ``x_t``)."""
        return split_prediction(out, x_t, t, self.alphas_cumprod, self.prediction_type)

    def denoise(self, model: Callable, x_t: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(eps_hat, x0_hat)`` of the network at ``(x_t, t[, cond])``, for any prediction type."""
        return self.split(self.model_output(model, x_t, t, cond), x_t, t)

    def predict_noise(self, model: Callable, x_t: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """Predicted noise ``eps_hat(x_t, t[, cond])`` (the raw output for an epsilon-prediction model)."""
        return self.denoise(model, x_t, t, cond)[0]

    def x0_hat(self, model: Callable, x_t: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """The one-step estimate ``x0_hat(x_t, t[, cond])`` of the final sample."""
        return self.denoise(model, x_t, t, cond)[1]

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output at ``x_t = add_noise(x0, noise, t)`` (the regression target
        of its own loss): ``noise``, ``v`` or ``x0``; shapes as in :func:`~attribution.diffusion.add_noise`."""
        return prediction_target(x0, noise, t, self.alphas_cumprod, self.prediction_type)

    def describe(self) -> dict:
        """Settings to record in store metadata."""
        return {"task": type(self).__name__, "num_train_timesteps": self.num_train_timesteps,
                "prediction_type": self.prediction_type}


def _unwrap_sample(out) -> Tensor:
    """Return ``out.sample`` for diffusers outputs, ``out[0]`` for tuples, else ``out``."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _attention_modules(model: torch.nn.Module) -> list:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a runtime dependency
        return []
    return [m for m in model.modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def math_attention(model: torch.nn.Module) -> Iterator[int]:
    """Temporarily switch every diffusers ``Attention`` in ``model`` to ``AttnProcessor``.

    The fused scaled-dot-product kernel has no vmap batching rule on CPU (vmap falls back to a
    slow loop and warns); the classic processor uses plain matmul + softmax, which vmaps.
    The original processors are restored on exit, also after an exception.

    Yields:
        The number of attention modules switched (0 for models without diffusers attention).
    """
    modules = _attention_modules(model)
    if modules:
        from diffusers.models.attention_processor import AttnProcessor
    saved = [m.processor for m in modules]
    try:
        for m in modules:
            m.set_processor(AttnProcessor())
        if modules:
            log.debug("switched %d attention modules to AttnProcessor", len(modules))
        yield len(modules)
    finally:
        for m, p in zip(modules, saved):
            m.set_processor(p)
