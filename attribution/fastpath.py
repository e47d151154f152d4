"""Pick the fastest featurizing path: layerwise hooks, vmap, or a loop of backward passes.

* ``projector.kind == "layerwise"``: :func:`~attribution.layerwise.featurize_batch_layerwise`
  (one batched backward, no per-example gradient vector).
* otherwise per-example gradients are needed; :func:`choose_gradient_path` picks ``"vmap"``
  (:func:`~attribution.gradients.per_example_gradients`) or ``"loop"``
  (:func:`~attribution.gradients.loop_gradients`), then ``projector.project``.

Threshold (measured on the 2-core CPU machine, benchmarks/core_timing.py and
benchmarks/featurize.py): vmap wins for small models (700k params: ~4.5 ms vs 15-22 ms per
example; digits UNet 650k params likewise) and loses at 35.7M parameters (CIFAR UNet: ~416 ms vs
~316 ms per example), because vmap materializes and reduces a batch of weight gradients per
layer. On CPU the switch is at ``CPU_VMAP_MAX_PARAMS`` = 8M parameters (between the measured
points); on an accelerator vmap is kept (batched kernels, no measurement here says otherwise).
``choose_gradient_path(..., probe=...)`` instead times both paths on two examples.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _checks
from .gradients import loop_gradients, num_parameters, per_example_gradients

__all__ = ["CPU_VMAP_MAX_PARAMS", "choose_gradient_path", "featurize_batch"]

log = logging.getLogger(__name__)

CPU_VMAP_MAX_PARAMS = 8_000_000


def choose_gradient_path(model: torch.nn.Module, sample_shape: Sequence[int], device=None,
                         param_names: Optional[Sequence[str]] = None,
                         probe: Optional[Callable[[str], None]] = None) -> str:
    """``"vmap"`` or ``"loop"`` for per-example gradients of ``model``.

    Args:
        model: the denoiser.
        sample_shape: shape of one sample (recorded in the log; the threshold is on ``p``).
        device: where the gradients run (default: the model's parameters' device).
        param_names: differentiated parameters (None = all trainable).
        probe: optional ``probe(path)`` that runs a small featurization with that path; when
            given, both paths are timed once each (after one warm-up) and the faster wins.
    """
    if probe is not None:
        timings = {}
        for path in ("vmap", "loop"):
            probe(path)
            start = time.perf_counter()
            probe(path)
            timings[path] = time.perf_counter() - start
        choice = min(timings, key=timings.get)
        log.info("gradient path by probe: %s (%s)", choice, {k: f"{v:.3f}s" for k, v in timings.items()})
        return choice
    p = num_parameters(model, param_names)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    choice = "vmap" if dev.type != "cpu" or p <= CPU_VMAP_MAX_PARAMS else "loop"
    log.info("gradient path: %s (p = %d, device %s, sample %s)", choice, p, dev, tuple(sample_shape))
    return choice


def featurize_batch(task, model: torch.nn.Module, output_fn, projector, x0: Tensor, keys: Tensor,
                    cond: Optional[Tensor] = None, steps: Optional[Tensor] = None,
                    param_names: Optional[Sequence[str]] = None, chunk_size: Optional[int] = None,
                    gradient_path: str = "auto", normalize_draws: bool = False) -> Tensor:
    """Draws -> per-example gradients -> projection, for the training or the target side: the one
    featurize entry point, on the fastest path for ``projector``.

    Training side: ``x0`` = training samples, ``keys`` = global indices, ``output_fn`` = TrainLoss.
    Target side: ``x0`` = ``x0_hat_t`` (detached), ``keys`` = target ids, ``steps`` = t,
    ``output_fn`` = StepOutput.

    Args:
        x0: ``(B, *sample_shape)``; keys: ``(B,)``; cond: ``None`` or ``(B, L, D)``; steps: ``(B,)``.
        projector: a :class:`~attribution.projectors.Projector` with ``p`` = number of selected params
            (a layerwise projector defines its own parameters: ``param_names`` must then be None).
        gradient_path: ``"auto"`` (:func:`choose_gradient_path`), ``"vmap"`` or ``"loop"``.
        normalize_draws: timestep normalization (Diffusion-ReTrac): each (example, draw) gradient is
            projected on its own and scaled to unit norm before the draws are averaged (summed for a
            ``StepOutput``), so no timestep dominates by the size of its gradient. The norm is the projected
            one (a JL projection preserves norms in expectation; exact with the identity projector).

    Returns:
        ``(B, d)`` float32 features, identical (up to float rounding) whatever the path.
    """
    _checks.one_of("gradient_path", gradient_path, ("auto", "vmap", "loop"))
    if getattr(projector, "kind", None) == "layerwise":
        if normalize_draws:
            raise ValueError("Expected `normalize_draws` False with a layerwise projector (it forms no per-draw "
                             "gradient), but got True; use a sparse or dense projector")
        if param_names is not None:
            raise ValueError("Expected `param_names` None with a layerwise projector (it selects its own), "
                             f"but got {list(param_names)[:3]}")
        from .layerwise import featurize_batch_layerwise
        return featurize_batch_layerwise(task, model, output_fn, projector, x0, keys, cond, steps,
                                         chunk_size=chunk_size)
    keys = _checks.long_vector("keys", keys, x0.shape[0])
    p = num_parameters(model, param_names)
    if projector.p != p:
        raise ValueError(f"Expected `projector.p` to equal the number of differentiated parameters {p}, "
                         f"but got {projector.p}")
    path = choose_gradient_path(model, x0.shape[1:], x0.device, param_names) if gradient_path == "auto" \
        else gradient_path
    draws = output_fn.draws(keys, x0.shape[1:], steps, num_train_timesteps=task.num_train_timesteps,
                            device=x0.device, dtype=x0.dtype)
    if normalize_draws:
        return _normalized_draws(task, model, output_fn, projector, x0, draws, cond, path, param_names, chunk_size)
    if path == "vmap":
        grads = per_example_gradients(task, model, output_fn, x0.detach(), draws, cond, param_names, chunk_size)
    else:
        grads = loop_gradients(task, model, output_fn, x0.detach(), draws, cond, param_names)
    return projector.project(grads).float()


def _normalized_draws(task, model, output_fn, projector, x0: Tensor, draws, cond, path: str, param_names,
                      chunk_size) -> Tensor:
    """Each draw as its own row (one draw per row), projected, scaled to unit norm, then reduced over draws."""
    from .outputs import Draws

    B, K = draws.timesteps.shape
    rows = Draws(draws.timesteps.reshape(B * K, 1), draws.noise.reshape(B * K, 1, *draws.noise.shape[2:]))
    x0_rows = x0.detach().repeat_interleave(K, dim=0)
    cond_rows = None if cond is None else cond.repeat_interleave(K, dim=0)
    if path == "vmap":
        grads = per_example_gradients(task, model, output_fn, x0_rows, rows, cond_rows, param_names, chunk_size)
    else:
        grads = loop_gradients(task, model, output_fn, x0_rows, rows, cond_rows, param_names)
    feats = projector.project(grads).to(torch.float64).reshape(B, K, -1)
    unit = feats / feats.norm(dim=2, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    reduced = unit.mean(dim=1) if output_fn.reduction == "mean" else unit.sum(dim=1)
    return reduced.float()
