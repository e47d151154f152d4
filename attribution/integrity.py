"""Integrity checks of stored results: file checksums, ``.npy`` sizes against metadata, finiteness, checkpoints.

* :func:`file_sha256` / :func:`check_file_sha256`: what a finished store, a kernel or a score file records
  about its files, and the check on read (a flipped byte is caught).
* :func:`check_npy_file`: an ``.npy`` file holds exactly the shape and dtype the metadata says, and the
  file has exactly the size that implies (a truncated file is refused, never extended).
* :func:`require_finite`: NaN/inf refused, naming what and where.
* :func:`read_checkpoint` / :func:`stamp_checkpoint`: a checkpoint read with a clear error when it is
  unreadable, whose weights are finite and match the checksum stamped when it was saved.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import CorruptFileError, NonFiniteError
from .identity import tensors_hash

__all__ = ["file_sha256", "check_file_sha256", "npy_layout", "check_npy_file", "require_finite", "tensor_checksum",
           "read_checkpoint", "stamp_checkpoint", "STAMP_KEY"]

STAMP_KEY = "attribution_integrity"
_CHUNK = 1 << 22


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_file_sha256(path: str | Path, expected: str, what: str, fix: str = "rerun the step that wrote it") -> None:
    """Refuse ``path`` when its sha256 differs from the one recorded (``what`` says who recorded it)."""
    if not Path(path).is_file():
        raise CorruptFileError(f"Expected {path} (recorded in {what}), but the file is missing; {fix}")
    found = file_sha256(path)
    if found != expected:
        raise CorruptFileError(f"Expected {path} to have the sha256 recorded in {what} ({expected[:16]}...), but "
                               f"got {found[:16]}...: the file changed or is corrupt; {fix}")


def npy_layout(path: str | Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` from an ``.npy`` header, without mapping the file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            return tuple(shape), dtype, f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptFileError(f"Expected {path} to be a .npy file, but its header is unreadable "
                               f"({type(err).__name__}: {err})") from None


def check_npy_file(path: str | Path, shape: Sequence[int], dtype, what: str = "the metadata") -> None:
    """Refuse an ``.npy`` file whose shape, dtype or byte size differ from ``shape``/``dtype``."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"Expected {path} (a {np.dtype(dtype)} array of shape {tuple(shape)}, as {what} "
                               "records), but the file is missing")
    found_shape, found_dtype, offset = npy_layout(path)
    if found_shape != tuple(shape) or found_dtype != np.dtype(dtype):
        raise CorruptFileError(f"Expected {path} to hold a {np.dtype(dtype)} array of shape {tuple(shape)} (as {what} "
                               f"records), but it holds {found_dtype} {found_shape}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    actual = os.path.getsize(path)
    if actual != expected:
        state = "truncated" if actual < expected else "too long"
        raise CorruptFileError(f"Expected {path} to be {expected} bytes (a {np.dtype(dtype)} array of shape "
                               f"{tuple(shape)}), but it is {actual} bytes ({state}); the file is corrupt")


def require_finite(tensor: torch.Tensor, what: str, where: str = "", rows: Optional[torch.Tensor] = None,
                   row_name: str = "rows") -> None:
    """Raise :class:`NonFiniteError` when ``tensor`` holds NaN or inf.

    With ``rows (B,)`` (e.g. global example indices), the message names the rows (of dimension 0) that are
    not finite; ``where`` says where the values come from (a checkpoint, a store, a target).
    """
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = (~finite).reshape(finite.shape[0], -1).any(1) if finite.ndim else ~finite.reshape(1)
    if rows is not None:
        named = torch.as_tensor(rows).reshape(-1)[bad.cpu()].tolist()
        detail = f"{row_name} {named[:8]}{' ...' if len(named) > 8 else ''} ({len(named)} of {len(bad)})"
    else:
        detail = f"{int((~finite).sum())} of {finite.numel()} values"
    raise NonFiniteError(f"Expected finite {what}{' ' + where if where else ''}, but got NaN/inf in {detail}")


def tensor_checksum(tensor: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and bytes (what score files record about their scores)."""
    return tensors_hash([(f"{tensor.dtype}:{tuple(tensor.shape)}", tensor)])


def _state_checksum(state_dict: dict) -> str:
    return tensors_hash((name, t) for name, t in state_dict.items() if isinstance(t, torch.Tensor))


def stamp_checkpoint(checkpoint: dict) -> None:
    """Record the checksum of ``checkpoint["state_dict"]`` (checked by :func:`read_checkpoint`)."""
    checkpoint[STAMP_KEY] = {"state_dict_hash": _state_checksum(checkpoint.get("state_dict", {}))}


def read_checkpoint(path: str | Path, argument: str = "checkpoint", map_location: Any = "cpu",
                    what: Optional[str] = None) -> dict:
    """Load a checkpoint for use: readable, its weights finite and equal to the checksum it was saved with.

    ``path`` may also be a diffusers pipeline folder (``save_pretrained``); see
    :func:`attribution.pretrained.read_pretrained`.

    Messages name the file as "`argument` <path>", or as ``what`` when given (e.g. "the checkpoint <path> of
    `features` store <folder>").

    Raises:
        FileNotFoundError: there is no such file (names ``argument``).
        CorruptFileError: unreadable, not a checkpoint, or the weights differ from their stamped checksum.
        NonFiniteError: some floating-point weight is NaN or inf.
    """
    path = Path(path)
    named = what or f"`{argument}` {path}"
    if path.is_dir():  # a diffusers pipeline folder (save_pretrained): its UNet's weights, no data identity
        from .pretrained import read_pretrained
        return _check_finite_weights(read_pretrained(path, argument), named)
    if not path.is_file():
        raise FileNotFoundError(f"Expected {what or f'`{argument}`'} to be a checkpoint file or a diffusers pipeline "
                                f"folder, but {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is not a readable checkpoint
        raise CorruptFileError(f"Expected {named} to be a readable checkpoint, but loading it failed "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CorruptFileError(f"Expected {named} to be a Lightning checkpoint with a state_dict, but "
                               f"got {type(checkpoint).__name__}{' without state_dict' if isinstance(checkpoint, dict) else ''}")
    stamp = checkpoint.get(STAMP_KEY)
    if stamp and stamp.get("state_dict_hash") != _state_checksum(state):
        raise CorruptFileError(f"Expected the weights in {named} to match the checksum stamped when it "
                               f"was saved ({stamp.get('state_dict_hash')}), but they differ: the file is corrupt")
    return _check_finite_weights(checkpoint, named)


def _check_finite_weights(checkpoint: dict, named: str) -> dict:
    bad = [name for name, t in checkpoint["state_dict"].items() if isinstance(t, torch.Tensor)
           and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"Expected finite weights in {named}, but {len(bad)} tensors hold NaN/inf "
                             f"(first: {bad[:3]}); the training diverged: retrain with a lower learning rate")
    return checkpoint
