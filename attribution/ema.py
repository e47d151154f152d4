"""EMA weights: which network is featurized and scored, and the common ways projects keep an EMA.

``use_ema`` (featurize and score settings) is three-valued:

* ``None``: the EMA weights when the module keeps them, else the raw weights (what was used is recorded);
* ``True``: the EMA weights, and an error (:class:`MissingEMAError`) when the module keeps none, never the
  raw weights labelled EMA;
* ``False``: the raw (trained) weights.

A module keeps an EMA when its ``attribution_denoiser(ema=True)`` returns another network than
``attribution_denoiser(ema=False)`` (ours raise :class:`MissingEMAError` instead). Gradients are taken on
the EMA network although its parameters are frozen (``requires_grad=False``): see
:func:`attribution.gradients.parameter_order`.

:func:`ema_network` turns the usual EMA holders into the ``nn.Module`` that ``attribution_denoiser(ema=True)``
returns: ``torch.optim.swa_utils.AveragedModel`` (its ``.module``), diffusers'
``diffusers.training_utils.EMAModel`` (a copy of the network holding the shadow parameters) and the
``AveragedModel`` of Lightning's ``WeightAveraging`` callback (which averages the whole LightningModule: the
averaged copy's submodule at the network's path). With ``WeightAveraging`` the checkpoint's ``state_dict``
*is* the averaged weights; ``TrakFeaturizeCallback`` therefore featurizes that averaged copy as saved, with no
getter needed (``use_ema`` None or False).
"""
from __future__ import annotations

import copy
from typing import Any, NamedTuple, Optional

import torch

__all__ = ["MissingEMAError", "ResolvedDenoiser", "resolve_denoiser", "ema_network", "check_use_ema"]


class MissingEMAError(ValueError):
    """EMA weights were asked for (``use_ema=True``), but the module keeps none."""


class ResolvedDenoiser(NamedTuple):
    """The network that is featurized or scored, and whether it is the module's EMA copy."""

    model: torch.nn.Module
    ema: bool


def check_use_ema(use_ema: Any, name: str = "use_ema") -> Optional[bool]:
    """Return ``use_ema`` if it is None, True or False, else raise a TypeError naming ``name``."""
    if use_ema is not None and not isinstance(use_ema, bool):
        raise TypeError(f"Expected `{name}` to be None (EMA when kept), True or False, but got {use_ema!r}")
    return use_ema


def resolve_denoiser(module: Any, use_ema: Optional[bool]) -> ResolvedDenoiser:
    """The denoiser of ``module`` (an ``AttributableDiffusion``) that ``use_ema`` selects; see the module docstring.

    Raises:
        MissingEMAError: ``use_ema=True`` and the module keeps no EMA (its getter raises it, or returns the
            same network for ``ema=True`` as for ``ema=False``).
    """
    check_use_ema(use_ema)
    raw = module.attribution_denoiser(False)
    if use_ema is False:
        return ResolvedDenoiser(raw, False)
    try:
        ema = module.attribution_denoiser(True)
    except MissingEMAError:
        if use_ema:
            raise
        return ResolvedDenoiser(raw, False)
    if ema is raw:
        if use_ema:
            raise MissingEMAError(
                f"Expected EMA weights (use_ema=True), but {type(module).__name__}.attribution_denoiser(ema=True) "
                "returned the same network as ema=False: the module keeps no EMA (or its getter ignores `ema`). "
                "Pass use_ema=False, or None (the EMA weights when kept); with Lightning's WeightAveraging the "
                "checkpoint holds the averaged weights themselves (use_ema None or False).")
        return ResolvedDenoiser(raw, False)
    return ResolvedDenoiser(ema, True)


def ema_network(ema: Any, like: Optional[torch.nn.Module] = None,
                root: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """The network holding the EMA weights of a common EMA holder.

    Args:
        ema: ``torch.optim.swa_utils.AveragedModel``; diffusers ``EMAModel``; or an object with an
            ``AveragedModel`` in ``_average_model`` (Lightning's ``WeightAveraging`` callback).
        like: the raw network (needed for ``EMAModel``: the copy is built from it; for an
            ``AveragedModel`` of a larger ``root`` module: selects the averaged copy of this submodule).
        root: the module ``like`` belongs to, when the ``AveragedModel`` averages ``root`` (WeightAveraging
            averages the whole LightningModule).

    Returns:
        An ``nn.Module`` with the EMA weights. For ``EMAModel`` it is a fresh frozen copy of ``like``
        (the shadow parameters copied in), built at every call.
    """
    from torch.optim.swa_utils import AveragedModel

    if isinstance(getattr(ema, "_average_model", None), AveragedModel):
        ema = ema._average_model
    if isinstance(ema, AveragedModel):
        return _submodule_at(ema.module, like, root) if root is not None else ema.module
    if hasattr(ema, "shadow_params") and callable(getattr(ema, "copy_to", None)):
        if like is None:
            raise ValueError("Expected `like` (the raw network) to build the network of a diffusers EMAModel, "
                             "but got None")
        params = list(like.parameters())
        if len(ema.shadow_params) != len(params):
            raise ValueError(f"Expected the EMAModel to hold one shadow parameter per parameter of `like` "
                             f"({len(params)}), but it holds {len(ema.shadow_params)}")
        net = copy.deepcopy(like)
        for p in net.parameters():
            p.grad = None
        ema.copy_to(net.parameters())
        return net.requires_grad_(False)
    raise TypeError(f"Expected `ema` to be a torch AveragedModel, a diffusers EMAModel or a Lightning "
                    f"WeightAveraging callback, but got {type(ema).__name__}")


def _submodule_at(copy_root: torch.nn.Module, like: Optional[torch.nn.Module], root: torch.nn.Module) -> torch.nn.Module:
    if like is None or like is root:
        return copy_root
    for name, module in root.named_modules():
        if module is like:
            return copy_root.get_submodule(name)
    raise ValueError(f"Expected `like` to be a submodule of `root` ({type(root).__name__}), but it is not")
