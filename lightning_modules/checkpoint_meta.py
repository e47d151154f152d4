"""The data identity stamped into every checkpoint, and the check that a checkpoint matches its data.

A checkpoint's ``"attribution"`` entry records N (the size of the *full* training set, not of the
subset), the subset mask's hash and the dataset fingerprint. Featurizing and scoring refuse a
checkpoint whose identity does not match the data they are given.
"""
from __future__ import annotations

from typing import Any, Optional

KEY = "attribution"


class CheckpointMismatchError(ValueError):
    """A checkpoint was made with other data than the one given now."""


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
