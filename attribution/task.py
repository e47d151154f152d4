"""``DiffusionTask``: the small extension point telling the core how to call a denoiser.

The core never assumes more about a user's model than what this class says (in the spirit of
kronfluence's ``Task``): the noise schedule (``alphas_cumprod``, ``num_train_timesteps``) and
how to get the predicted noise ``eps_theta(x_t, t, cond)``.

The default :meth:`DiffusionTask.predict_noise` calls a diffusers ``UNet2DModel`` or
``UNet2DConditionModel``. To plug in another model, subclass and override ``predict_noise``;
for a v-prediction model, for example, return the noise implied by the velocity::

    class VPredictionTask(DiffusionTask):
        def predict_noise(self, model, x_t, t, cond=None):
            v = super().predict_noise(model, x_t, t, cond)
            a, b = schedule_coefficients(t, self.alphas_cumprod, x_t)
            return b * x_t + a * v

``model`` passed to ``predict_noise`` is any callable with the model's call signature: the
module itself (reference loops) or a ``torch.func.functional_call`` wrapper (vmap gradients).
``predict_noise`` must be vmap-safe: no ``.item()``, no data-dependent Python control flow.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .diffusion import alphas_cumprod_from

__all__ = ["DiffusionTask", "math_attention"]

log = logging.getLogger(__name__)


class DiffusionTask:
    """How the attribution core calls a diffusion model.

    Args:
        alphas_cumprod: ``(T,)`` cumulative alpha products of the training noise schedule.
        num_train_timesteps: ``T``; defaults to ``len(alphas_cumprod)`` and must match it.
    """

    def __init__(self, alphas_cumprod: Tensor, num_train_timesteps: Optional[int] = None) -> None:
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
        self.alphas_cumprod = abar.detach().to("cpu", torch.float32)
        self.num_train_timesteps = int(T)

    @classmethod
    def from_scheduler(cls, scheduler) -> "DiffusionTask":
        """Build from a diffusers scheduler (uses ``scheduler.alphas_cumprod``)."""
        return cls(alphas_cumprod_from(scheduler))

    def predict_noise(self, model: Callable, x_t: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """Predicted noise ``eps_theta(x_t, t[, cond])``.

        Args:
            model: callable with a diffusers UNet's signature.
            x_t: ``(K, C, H, W)`` noisy samples.
            t: ``(K,)`` integer timesteps.
            cond: ``None`` or conditioning ``(K, L, D)`` passed as ``encoder_hidden_states``.

        Returns:
            ``(K, C, H, W)`` predicted noise.
        """
        out = model(x_t, t) if cond is None else model(x_t, t, encoder_hidden_states=cond)
        return _unwrap_sample(out)

    def describe(self) -> dict:
        """Settings to record in store metadata."""
        return {"task": type(self).__name__, "num_train_timesteps": self.num_train_timesteps}


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
