"""Identities: of the data a checkpoint was trained on, of a checkpoint's weights, and the checks.

A checkpoint's ``"attribution"`` entry records N (the size of the *full* training set, not of the
subset), the subset mask's hash and the dataset fingerprint. Featurizing and scoring refuse a
checkpoint whose identity does not match the data they are given, or whose state dict does not fit
the configured model. :func:`tensors_hash` is the one hash of tensor bytes (weights of a denoiser,
a VAE's state dict) that stores, latent caches and checkpoints record.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

KEY = "attribution"


from .errors import CheckpointMismatchError  # noqa: E402  (re-exported: part of the project's error family)


def data_identity(datamodule: Any) -> dict[str, Any]:
    """N and fingerprint of a datamodule with ``num_examples`` and ``fingerprint`` ({} for other data), and the
    subset's size and mask hash when it has ``subset_indices`` and ``mask_hash`` (None otherwise)."""
    if datamodule is None or not hasattr(datamodule, "fingerprint") or not hasattr(datamodule, "num_examples"):
        return {}
    subset = getattr(datamodule, "subset_indices", None)
    mask = getattr(datamodule, "mask_hash", None)
    return {
        "num_examples": int(datamodule.num_examples),
        "subset_size": None if subset is None else int(len(subset)),
        "mask_hash": None if mask is None else str(mask),
        "dataset_fingerprint": str(datamodule.fingerprint),
    }


def write_identity(checkpoint: dict[str, Any], identity: dict[str, Any]) -> None:
    checkpoint[KEY] = dict(identity)


def read_identity(checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
    return checkpoint.get(KEY)


def check_identity(checkpoint: dict[str, Any], datamodule: Any, source: str = "checkpoint") -> None:
    """Raise ``CheckpointMismatchError`` when the checkpoint's N or dataset fingerprint differ from the data's.

    A diffusers pipeline folder (``"pretrained"`` entry, see :mod:`attribution.pretrained`) records no data: the
    datamodule names it, and only the datamodule's identity is required.
    """
    stamped, current = read_identity(checkpoint), data_identity(datamodule)
    if not current:
        raise CheckpointMismatchError(
            f"Cannot check {source!s} against the data: the datamodule ({type(datamodule).__name__}) carries no data "
            "identity: expected `num_examples` (N of the full training set) and `fingerprint` (see "
            "attribution/protocol.py, DATAMODULE_MEMBERS)")
    if not stamped and checkpoint.get("pretrained"):
        return
    if not stamped:
        raise CheckpointMismatchError(
            f"Cannot check {source!s} against the data: it records no data identity (N and dataset fingerprint): it "
            "was saved neither by a module of this project nor by a fit with TrakFeaturizeCallback (which stamps the "
            "checkpoints of any module); featurize while training with the callback, or give a diffusers pipeline "
            "folder (save_pretrained), whose data the datamodule names")
    for key in ("num_examples", "dataset_fingerprint"):
        if stamped.get(key) != current.get(key):
            raise CheckpointMismatchError(
                f"{source} was trained on other data: expected {key} = {current.get(key)!r} (the data given now), "
                f"but the checkpoint records {stamped.get(key)!r}")


def tensors_hash(named_tensors: Iterable[tuple[str, torch.Tensor]], prefix: str = "") -> str:
    """sha256 (16 hex digits) of ``prefix`` and each (name, tensor bytes) in the order given."""
    h = hashlib.sha256(prefix.encode())
    for name, tensor in named_tensors:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()[:16]


def weights_hash(model: torch.nn.Module, param_names: Optional[list[str]] = None) -> str:
    """The hash of every parameter of ``model`` in ``named_parameters()`` order: a checkpoint's identity in a store.

    All parameters, whatever ``param_names`` differentiates (it is checked to name parameters of the model):
    the frozen ones (a LoRA adapter's base weights) shape the gradients too. When every parameter is
    differentiated this is the hash of the differentiated parameters in parameter order.
    """
    from attribution.gradients import parameter_order
    parameter_order(model, param_names)  # unknown names raise
    return tensors_hash(model.named_parameters())


def check_checkpoint(path: Path, model: torch.nn.Module, datamodule: Any) -> dict:
    """Refuse a checkpoint made with other data (N, fingerprint) or for another model configuration;
    returns the checkpoint (read once, checked readable, finite and matching its stamped checksum)."""
    from attribution.integrity import read_checkpoint  # readable, finite, matching its stamped checksum
    checkpoint = read_checkpoint(path)
    check_identity(checkpoint, datamodule, source=f"checkpoint {path}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    if expected != given:
        missing = sorted(set(expected) - set(given))[:3]
        unexpected = sorted(set(given) - set(expected))[:3]
        shapes = [f"{k}: {given[k]} vs {expected[k]}" for k in sorted(set(expected) & set(given))
                  if given[k] != expected[k]][:3]
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the model configuration: expected its state_dict to have the "
            f"model's parameters, but missing {missing}, unexpected {unexpected}, shape differences {shapes}"
            + ("; build the model from the folder: --model=lightning_modules.PretrainedDiffusion "
               f"--model.path={path}" if checkpoint.get("pretrained") else ""))
    if checkpoint.get("pretrained") and callable(getattr(model, "attribution_task", None)):
        from attribution.pretrained import check_pretrained_task
        check_pretrained_task(checkpoint, model.attribution_task(), source=f"checkpoint {path}")
    if callable(getattr(model, "check_checkpoint", None)):  # module-specific checks (the LDM's VAE identity)
        model.check_checkpoint(checkpoint, source=f"checkpoint {path}")
    return checkpoint
