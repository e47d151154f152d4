"""Members: the training examples a checkpoint was fit on (its subset mask), which scoring ranks by default.

A model fit on a subset mask was influenced only by the examples in it, so its kernel ``Phi_M^T Phi_M`` is
formed over those rows (``attribution.scoring.member_kernel``). ``members`` (of ``AttributionModule``) says
which rows they are:

* ``"auto"``: the checkpoint's own training set. A checkpoint of this project records the mask's hash (the
  ``"attribution"`` identity stamp, or the datamodule's saved state) and the mask file
  (``datamodule_hyper_parameters["subset_mask"]``, saved by Lightning); the file is read and its hash checked
  against the recorded one. A checkpoint that records no mask (or the hash of all N rows) was trained on all N.
* ``"all"`` (or None): every row (the kernel over all N, as before members existed).
* a mask file (``.npy``/``.pt``, as ``--data.subset_mask``): those rows, checked against the recorded hash
  when the checkpoint records one.

A recorded mask that cannot be found, or a file whose hash differs from the recorded one, is a
:class:`MembersError` naming the file, both hashes and the fix (``--model.members=<mask file>``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from .errors import MembersError, SettingsError, SubsetMaskError
from .identity import read_identity
from .masks import MASK_SUFFIXES, load_subset_mask, mask_hash

__all__ = ["Members", "MembersError", "check_members_setting", "recorded_membership", "resolve_members",
           "RANKS"]

RANKS = ("members", "all", "nonmembers")
_FIX = "pass --model.members=<mask file> (the subset mask the model was fit on), or --model.members=all"


class Members(NamedTuple):
    """The rows a checkpoint was trained on: sorted global ``indices (n,)`` int64 of ``num_examples`` (N), their
    ``hash`` (:func:`attribution.masks.mask_hash`, the one checkpoints record) and where they came from."""

    indices: np.ndarray
    hash: str
    num_examples: int
    source: str

    @property
    def all_rows(self) -> bool:
        return len(self.indices) == self.num_examples

    def mask(self) -> torch.Tensor:
        """``(N,)`` bool: True for the members."""
        out = torch.zeros(self.num_examples, dtype=torch.bool)
        out[torch.from_numpy(self.indices)] = True
        return out


def check_members_setting(members: Optional[str]) -> None:
    """Refuse a ``members`` that is neither "auto", "all", None nor a mask file name (before any file is read)."""
    if members is None or members in ("auto", "all"):
        return
    if not isinstance(members, (str, Path)) or Path(members).suffix.lower() not in MASK_SUFFIXES:
        raise SettingsError(f"Expected `members` to be 'auto', 'all' or a subset mask file ({', '.join(MASK_SUFFIXES)}"
                            f"), but got {members!r}")


def recorded_membership(checkpoint: Mapping) -> dict[str, Any]:
    """What a checkpoint records about its training set: ``{"mask_hash", "subset_size", "subset_mask"}`` (each
    None when not recorded). ``subset_mask`` is the mask file the datamodule was given (Lightning saves the
    datamodule's hyperparameters as ``datamodule_hyper_parameters``)."""
    stamp = read_identity(checkpoint) if isinstance(checkpoint, dict) else None
    found = {"mask_hash": None, "subset_size": None, "subset_mask": None}
    if stamp:
        found.update(mask_hash=stamp.get("mask_hash"), subset_size=stamp.get("subset_size"))
    else:  # a project datamodule's state_dict, saved under its class name
        for value in checkpoint.values():
            if isinstance(value, Mapping) and {"num_examples", "fingerprint", "mask_hash"} <= set(value):
                found["mask_hash"] = value["mask_hash"]
                break
    hparams = checkpoint.get("datamodule_hyper_parameters")
    if isinstance(hparams, Mapping) and hparams.get("subset_mask") is not None:
        found["subset_mask"] = str(hparams["subset_mask"])
    return found


def resolve_members(members: Optional[str], recorded: Mapping, num_examples: int, source: str) -> Members:
    """The :class:`Members` of a checkpoint for the ``members`` setting (see the module docstring).

    Args:
        members: "auto", "all", None (= "all") or a mask file.
        recorded: :func:`recorded_membership` of the checkpoint.
        num_examples: N of the features.
        source: how messages name the checkpoint (e.g. "checkpoint <file> of store <folder>").
    """
    check_members_setting(members)
    everyone = np.arange(num_examples, dtype=np.int64)
    all_hash = mask_hash(None, num_examples)
    expected = recorded.get("mask_hash")
    if members is None or members == "all":
        return Members(everyone, all_hash, num_examples, "all rows (`members`='all')")
    if members == "auto":
        if expected is None or expected == all_hash:
            size = recorded.get("subset_size")
            if expected is None and size is not None and int(size) != num_examples:
                raise MembersError(f"Expected {source} to record the subset mask it was trained on (`members`="
                                   f"'auto'), but it records a subset of {size} of {num_examples} examples and no "
                                   f"mask hash; {_FIX}")
            return Members(everyone, all_hash, num_examples, f"all rows ({source} records no subset mask)")
        path = recorded.get("subset_mask")
        if path is None:
            raise MembersError(f"Expected {source} to record the file of the subset mask it was trained on (hash "
                               f"{expected}), but it records none; {_FIX}")
        if not Path(path).is_file():
            raise MembersError(f"Expected the subset mask {path} that {source} was trained on (hash {expected}; "
                               f"`members`='auto'), but the file is missing (found no file); {_FIX}")
        return _from_file(path, expected, num_examples, source, "the checkpoint's own subset mask")
    return _from_file(str(members), expected, num_examples, source, "`members`")


def _from_file(path: str, expected: Optional[str], num_examples: int, source: str, what: str) -> Members:
    try:
        indices = load_subset_mask(path, num_examples)
    except SubsetMaskError as err:
        raise MembersError(f"Expected {what} {path} to be a subset mask of the {num_examples} training examples of "
                           f"{source}, but it is not: {err}") from None
    found = mask_hash(indices, num_examples)
    if expected is not None and found != expected:
        raise MembersError(f"Expected {what} {path} to be the subset mask {source} was trained on (expected hash "
                           f"{expected}), but the file has hash {found}; {_FIX}")
    return Members(indices, found, num_examples, f"{what} {path} ({len(indices)} of {num_examples} rows)")
