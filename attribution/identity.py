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
    """N, mask hash, subset size and fingerprint of a datamodule of this project ({} for other data)."""
    if datamodule is None or not hasattr(datamodule, "fingerprint"):
        return {}
    return {
        "num_examples": int(datamodule.num_examples),
        "subset_size": int(len(datamodule.subset_indices)),
        "mask_hash": str(datamodule.mask_hash),
        "dataset_fingerprint": str(datamodule.fingerprint),
    }


def write_identity(checkpoint: dict[str, Any], identity: dict[str, Any]) -> None:
    checkpoint[KEY] = dict(identity)


def read_identity(checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
    return checkpoint.get(KEY)


def check_identity(checkpoint: dict[str, Any], datamodule: Any, source: str = "checkpoint") -> None:
    """Raise ``CheckpointMismatchError`` when the checkpoint's N or dataset fingerprint differ from the data's."""
    stamped, current = read_identity(checkpoint), data_identity(datamodule)
    if not stamped or not current:
        missing = "the checkpoint" if not stamped else "the datamodule"
        raise CheckpointMismatchError(
            f"Cannot check {source!s} against the data: {missing} carries no data identity "
            f"(N and dataset fingerprint). Train with a datamodule of this project, or featurize with one.")
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
    """The hash of the differentiated parameters, in parameter order: the checkpoint's identity in a store."""
    from attribution.gradients import parameter_order
    params = dict(model.named_parameters())
    return tensors_hash((name, params[name]) for name in parameter_order(model, param_names))


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
            f"model's parameters, but missing {missing}, unexpected {unexpected}, shape differences {shapes}")
    if callable(getattr(model, "check_checkpoint", None)):  # module-specific checks (the LDM's VAE identity)
        model.check_checkpoint(checkpoint, source=f"checkpoint {path}")
    return checkpoint
