"""The protocol a LightningModule and its datamodule implement to be featurized, sampled and scored: all of it.

**Module** (:data:`MODULE_METHODS`), three cheap methods; our ``DDPMModule`` and ``LDMModule`` implement them::

    def attribution_task(self) -> attribution.DiffusionTask:
        return DiffusionTask.from_scheduler(self.scheduler)  # schedule + prediction_type (scheduler.config)
    def attribution_denoiser(self, ema: bool = True) -> torch.nn.Module:
        return self.ema.module if ema else self.unet        # the network whose gradients are taken
    def attribution_inputs(self, batch) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        return batch["pixels"], batch["idx"], None           # x0 (B, ...), global index (B,), conditioning

``attribution_inputs`` turns one batch of the datamodule's ``featurize_dataloader`` into (the clean sample x0 in
the space the denoiser works in, e.g. VAE latents for an LDM; the global training index of each row; the
conditioning, e.g. text states ``(B, L, D)``, or None). ``attribution_denoiser(ema)``: see :mod:`attribution.ema`
(return the EMA network for ``ema=True`` when the module keeps one; the same network for both when it keeps
none, or raise ``MissingEMAError``; never the raw weights for ``ema=True`` when an EMA exists).

**Datamodule** (:data:`DATAMODULE_MEMBERS`), two attributes and one method::

    num_examples: int    # N of the *full* training set (every example is featurized, not only the subset)
    fingerprint: str     # changes whenever the examples (pixels, captions, order) change
    def featurize_dataloader(self, indices, batch_size=None):  # batches of exactly these global indices,
        ...                                                    # in this order, never shuffled or augmented

Optional members, used when present: the datamodule's ``images(indices)`` (pictures ``(k, C, H, W)`` in
[-1, 1] of training examples in score reports), ``subset_indices`` and ``mask_hash`` (recorded in checkpoint
stamps); the module's ``record_targets``/``real_target`` (``cli.py sample``; without them it samples with
:func:`attribution.trajectory.sample_targets`, a DDPM sampler on the module's task).

:func:`check_protocol` names every missing member in one error; :func:`check_inputs_fit` refuses data whose
samples do not fit the denoiser's ``in_channels``/``sample_size``. ``TrakFeaturizeCallback`` runs both in its
``setup``, before any training step.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch

from attribution import DiffusionTask
from attribution.errors import ProtocolError, SettingsError

__all__ = ["MODULE_METHODS", "DATAMODULE_MEMBERS", "METHODS", "AttributableDiffusion", "AttributableData",
           "missing_members", "check_protocol", "check_sample_shape", "check_inputs_fit", "first_inputs"]

MODULE_METHODS = ("attribution_task", "attribution_denoiser", "attribution_inputs")
DATAMODULE_MEMBERS = ("num_examples", "fingerprint", "featurize_dataloader")
METHODS = MODULE_METHODS  # the module's side (kept name)
_NO_DATA = object()


@runtime_checkable
class AttributableDiffusion(Protocol):
    def attribution_task(self) -> DiffusionTask: ...

    def attribution_denoiser(self, ema: bool = True) -> torch.nn.Module: ...

    def attribution_inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]: ...


@runtime_checkable
class AttributableData(Protocol):
    num_examples: int
    fingerprint: str

    def featurize_dataloader(self, indices: Optional[Sequence[int]] = None, batch_size: Optional[int] = None): ...


def _has(obj: Any, name: str) -> bool:
    """Whether ``obj`` has ``name`` without evaluating a property (a datamodule's may load the data)."""
    try:
        inspect.getattr_static(obj, name)
        return True
    except AttributeError:
        return False


def _takes_batch_size(method: Any) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return True
    return any(p.name == "batch_size" or p.kind is p.VAR_KEYWORD for p in params) and len(params) >= 2


def missing_members(module: Any, datamodule: Any = _NO_DATA) -> list[str]:
    """``"Class.member"`` for every protocol member ``module`` (and ``datamodule``, when given) lacks."""
    missing = [f"{type(module).__name__}.{name}()" for name in MODULE_METHODS
               if not callable(getattr(module, name, None))]
    if datamodule is _NO_DATA:
        return missing
    if datamodule is None:
        return missing + ["a datamodule (none was given: pass `datamodule=` to fit) with "
                          + ", ".join(DATAMODULE_MEMBERS)]
    name = type(datamodule).__name__
    missing += [f"{name}.{member}" for member in ("num_examples", "fingerprint") if not _has(datamodule, member)]
    loader = getattr(datamodule, "featurize_dataloader", None)
    if not callable(loader):
        missing.append(f"{name}.featurize_dataloader(indices, batch_size=None)")
    elif not _takes_batch_size(loader):
        missing.append(f"{name}.featurize_dataloader(indices, batch_size=None) with a `batch_size` argument")
    return missing


def check_protocol(module: Any, datamodule: Any = _NO_DATA) -> AttributableDiffusion:
    """Return ``module`` if it (and ``datamodule``, when given) implement the protocol, else raise ONE
    :class:`~attribution.errors.ProtocolError` naming every missing member."""
    missing = missing_members(module, datamodule)
    if missing:
        sides = "LightningModule" + ("" if datamodule is _NO_DATA else " and datamodule")
        raise ProtocolError(
            f"Expected the {sides} to implement the attribution protocol (module: {', '.join(MODULE_METHODS)}; "
            f"datamodule: {', '.join(DATAMODULE_MEMBERS)}), but missing: {'; '.join(missing)}. See "
            "attribution/protocol.py and the README section \"Plugging the callback into your own Lightning project\"")
    return module


def _pair(size: Any) -> tuple[int, ...]:
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


def check_sample_shape(shape: Sequence[int], denoiser: torch.nn.Module, source: str) -> None:
    """Refuse samples of shape ``(C, H, W)`` that do not fit ``denoiser.config`` (``in_channels``, ``sample_size``;
    a diffusers UNet); nothing is checked for a network without such a config."""
    config = getattr(denoiser, "config", None)
    channels, size = getattr(config, "in_channels", None), getattr(config, "sample_size", None)
    shape = tuple(int(s) for s in shape)
    if channels is None or len(shape) != 3:
        return
    fits = shape[0] == channels and (size is None or shape[1:] == _pair(size))
    if not fits:
        raise SettingsError(
            f"Expected {source} to fit the UNet (in_channels = {channels}, sample_size = {size}), but it has "
            f"(channels, height, width) = {shape}: set the UNet's in_channels/sample_size to the data's, or change "
            "the data (image_size, pad, grayscale; for an LDM the VAE's latents)")


def first_inputs(module: Any, datamodule: Any,
                 index: int = 0) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``attribution_inputs`` of one example (global ``index``, default the first), as a batch of one.

    The global RNG is left as it was (a DataLoader draws its base seed from it): checking costs training nothing.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        batch = next(iter(datamodule.featurize_dataloader([index], batch_size=1)))
        return module.attribution_inputs(batch)


def check_inputs_fit(module: Any, datamodule: Any) -> None:
    """Refuse a datamodule whose samples (``attribution_inputs`` of example 0) do not fit the module's denoiser."""
    x0 = first_inputs(module, datamodule)[0]
    check_sample_shape(x0.shape[1:], module.attribution_denoiser(False),
                       f"the data of {type(datamodule).__name__} (as {type(module).__name__}.attribution_inputs "
                       "gives it)")
