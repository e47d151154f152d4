"""Per-example gradients with ``torch.func`` (``functional_call`` + ``vmap(grad(...))``).

The differentiated function is ``output_fn.per_example`` (see :mod:`attribution.outputs`).
Parameters not in ``param_names`` are passed to ``functional_call`` as plain, non-differentiated
tensors (like buffers): ``grad`` only tracks the selected parameters, so no gradient work is
done for the excluded ones (backward stops where no selected parameter lies upstream).

Gradients are flattened in a fixed order (:func:`parameter_order`: the model's
``named_parameters()`` order restricted to the selection) into ``(B, p)``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from . import _checks
from .outputs import Draws, ModelOutput
from .task import DiffusionTask, math_attention

__all__ = ["parameter_order", "adapter_parameters", "split_parameters", "per_example_gradients", "loop_gradients",
           "num_parameters"]

log = logging.getLogger(__name__)


def parameter_order(model: torch.nn.Module, param_names: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the differentiated parameters, in ``model.named_parameters()`` order.

    ``param_names=None`` selects every parameter with ``requires_grad`` (for a PEFT-adapted network, e.g. a
    LoRA UNet, only its adapter parameters); a network none of whose parameters requires grad (a frozen
    copy, such as the EMA weights of ``AveragedModel`` or of our modules, which are never optimized
    directly) has all of them differentiated, or only its adapter parameters when it has PEFT adapter
    layers (the EMA copy of a LoRA network): gradients are taken on frozen weights too, ``requires_grad``
    only says what training updates. Unknown names raise.
    """
    named = [n for n, p in model.named_parameters()]
    if param_names is None:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        adapters = set() if trainable else adapter_parameters(model)
        return trainable or [n for n in named if n in adapters] or named
    wanted = set(param_names)
    unknown = sorted(wanted - set(named))
    if unknown:
        raise ValueError(f"Expected `param_names` to name parameters of the model, but got unknown {unknown[:5]}")
    if not wanted:
        raise ValueError("Expected `param_names` to name at least one parameter, but got an empty list")
    return [n for n in named if n in wanted]


def adapter_parameters(model: torch.nn.Module) -> set[str]:
    """Names of the adapter parameters of the PEFT tuner layers in ``model`` (LoRA's ``lora_A``/``lora_B``, ...).

    Duck-typed on peft's ``BaseTunerLayer.adapter_layer_names`` (no import of peft): empty for other networks.
    """
    names: set[str] = set()
    for prefix, module in model.named_modules():
        for attr in getattr(type(module), "adapter_layer_names", ()) or ():
            container = getattr(module, attr, None)
            if isinstance(container, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
                names.update(f"{prefix}.{attr}.{n}".lstrip(".") for n, _ in container.named_parameters())
    return names


def num_parameters(model: torch.nn.Module, param_names: Optional[Sequence[str]] = None) -> int:
    """p: the number of differentiated scalars (the width of the gradient matrix)."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in parameter_order(model, param_names))


def split_parameters(model: torch.nn.Module, param_names: Optional[Sequence[str]] = None):
    """Split into ``(differentiated, frozen)`` dicts of detached tensors.

    ``frozen`` holds the excluded parameters *and* the buffers; none of them requires grad.
    """
    order = parameter_order(model, param_names)
    selected = set(order)
    params = dict(model.named_parameters())
    diff = {n: params[n].detach() for n in order}
    frozen = {n: p.detach() for n, p in params.items() if n not in selected}
    frozen.update({n: b.detach() for n, b in model.named_buffers()})
    return diff, frozen


def _flatten(grads: dict, order: list[str], dtype) -> Tensor:
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1).to(dtype) for n in order], dim=1)


def _check_inputs(model, x0, draws, cond):
    if model.training:
        raise ValueError("Expected `model` in eval mode (call model.eval() first), but got training mode")
    _checks.tensor_ndim("x0", x0, x0.ndim, "")
    if draws.noise.shape[0] != x0.shape[0] or draws.noise.shape[2:] != x0.shape[1:]:
        raise ValueError(f"Expected `draws.noise` of shape (B, K, *{tuple(x0.shape[1:])}) with B = {x0.shape[0]}, "
                         f"but got {tuple(draws.noise.shape)}")
    if cond is not None and cond.shape[0] != x0.shape[0]:
        raise ValueError(f"Expected `cond` with leading dimension {x0.shape[0]}, but got {tuple(cond.shape)}")


def per_example_gradients(task: DiffusionTask, model: torch.nn.Module, output_fn: ModelOutput, x0: Tensor,
                          draws: Draws, cond: Optional[Tensor] = None, param_names: Optional[Sequence[str]] = None,
                          chunk_size: Optional[int] = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-example gradients of ``output_fn.per_example`` with vmap, in chunks.

    Args:
        task: how to call the model.
        model: the denoiser (eval mode).
        output_fn: a :class:`~attribution.outputs.ModelOutput`.
        x0: ``(B, *sample_shape)`` clean samples.
        draws: ``Draws(timesteps (B, K), noise (B, K, *sample_shape))`` on ``x0``'s device.
        cond: ``None`` or ``(B, L, D)``.
        param_names: differentiated parameters (None = all trainable).
        chunk_size: examples per vmap call (bounds memory); None = the whole batch.
        out_dtype: dtype of the result (float32 by default).

    Returns:
        ``(B, p)`` gradients in :func:`parameter_order`.
    """
    _check_inputs(model, x0, draws, cond)
    B = x0.shape[0]
    chunk = B if chunk_size is None else _checks.positive_int("chunk_size", chunk_size)
    diff, frozen = split_parameters(model, param_names)
    order = list(diff)

    def f(params, x0_i, draws_i, cond_i):
        def call(*args, **kwargs):
            return functional_call(model, (params, frozen), args, kwargs)
        return output_fn.per_example(task, call, x0_i, draws_i, cond_i)

    g = vmap(grad(f), in_dims=(None, 0, 0, None if cond is None else 0))
    out = []
    with math_attention(model):
        for s in range(0, B, chunk):
            c = None if cond is None else cond[s:s + chunk]
            out.append(_flatten(g(diff, x0[s:s + chunk], draws.select(slice(s, s + chunk)), c), order, out_dtype))
    return torch.cat(out) if out else x0.new_zeros((0, sum(v.numel() for v in diff.values())), dtype=out_dtype)


def loop_gradients(task: DiffusionTask, model: torch.nn.Module, output_fn: ModelOutput, x0: Tensor, draws: Draws,
                   cond: Optional[Tensor] = None, param_names: Optional[Sequence[str]] = None,
                   out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Slow reference: one ordinary ``loss.backward()`` per example. Same shapes as
    :func:`per_example_gradients`; the model's ``requires_grad`` flags are restored afterwards.

    It runs inside :func:`~attribution.task.math_attention` like the vmap path, so both evaluate
    the same function (the fused SDPA kernel differs from the math kernel by ~1e-9 relative,
    even in float64).
    """
    _check_inputs(model, x0, draws, cond)
    order = parameter_order(model, param_names)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    rows = []
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(math_attention(model))
        for n, p in params.items():
            p.requires_grad_(n in set(order))
        for i in range(x0.shape[0]):
            model.zero_grad(set_to_none=True)
            c = None if cond is None else cond[i]
            output_fn.per_example(task, model, x0[i], draws.select(i), c).backward()
            rows.append(torch.cat([params[n].grad.reshape(-1).to(out_dtype) for n in order]))
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
        stack.close()
    return torch.stack(rows)
