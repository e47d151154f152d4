"""Subset masks: which training examples a model was trained on.

A subset mask file (``.npy`` or ``.pt``) holds one 1-D vector, in one of two forms:

* a **mask**: a boolean vector of length ``N`` (one entry per training example), or an
  integer/float vector of length exactly ``N`` whose values are all 0 or 1;
* an **index list**: integer global indices in ``[0, N)``, without duplicates, any order.

Ambiguity rules (documented, not guessed):

* a float vector is always read as a 0/1 mask; index lists must have an integer dtype;
* an integer vector with only 0/1 values and length ``!= N`` is read as an index list only
  when it is a valid one (no duplicates, so at most two entries such as ``[0, 1]``); otherwise it
  is rejected as "a 0/1 mask of the wrong length", the most likely mistake.

Everything is validated before any work and reported as :class:`SubsetMaskError`, a
``ValueError`` whose message names ``subset_mask``, the file, what was expected and what was found.

This module is Lightning-free (numpy, torch, hashlib, pathlib only).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .atomic import atomic_save_npy, atomic_write_text

__all__ = [
    "SubsetMaskError",
    "load_subset_mask",
    "indices_to_mask",
    "mask_hash",
    "write_random_masks",
    "dataset_fingerprint",
]

PathLike = Union[str, Path]
MASK_SUFFIXES = (".npy", ".pt", ".pth")
_HASH_CHARS = 16
_SHOW = 5  # how many offending values an error message names


from .errors import SubsetMaskError  # noqa: E402  (re-exported: part of the project's error family)


def _expected(num_examples: int) -> str:
    return (
        f"expected a boolean vector of length {num_examples} (one entry per training example) "
        f"or a list of integer indices in [0, {num_examples})"
    )


def _fail(path: PathLike, num_examples: int, found: str) -> SubsetMaskError:
    return SubsetMaskError(f"subset_mask '{path}': {_expected(num_examples)}, but got {found}")


def _first(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:_SHOW].tolist())
    more = f" and {len(values) - _SHOW} more" if len(values) > _SHOW else ""
    return shown + more


def _kind_name(array: np.ndarray) -> str:
    return {"b": "boolean", "i": "integer", "u": "integer", "f": "float"}.get(
        array.dtype.kind, f"{array.dtype}"
    )


def _read_file(path: Path, num_examples: int) -> np.ndarray:
    """Load the raw content of a mask file as a numpy array (no validation of values)."""
    if path.suffix.lower() not in MASK_SUFFIXES:
        raise _fail(path, num_examples, f"a file with extension '{path.suffix}' (use .npy or .pt)")
    if not path.is_file():
        raise _fail(path, num_examples, "no such file")
    try:
        if path.suffix.lower() == ".npy":
            content = np.load(path, allow_pickle=False)
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is reported the same way
        raise _fail(path, num_examples, f"an unreadable file ({type(err).__name__}: {err})")
    if isinstance(content, torch.Tensor):
        return content.detach().cpu().numpy()
    if isinstance(content, (list, tuple, np.ndarray)):
        try:
            return np.asarray(content)
        except ValueError as err:
            raise _fail(path, num_examples, f"a ragged {type(content).__name__} ({err})")
    raise _fail(path, num_examples, f"an object of type {type(content).__name__}")


def _check_mask_values(array: np.ndarray, path: PathLike, num_examples: int) -> np.ndarray:
    """Float vectors: must be all 0/1 and of length N; returns the boolean mask."""
    finite = np.isfinite(array)
    non_integer = array[~finite | (array != np.round(np.where(finite, array, 0)))]
    if non_integer.size:
        raise _fail(
            path, num_examples,
            f"a float vector with non-integer values (first: {_first(non_integer)}); "
            "a float vector is read as a 0/1 mask and index lists must have an integer dtype",
        )
    other = array[(array != 0) & (array != 1)]
    if other.size:
        raise _fail(
            path, num_examples,
            f"a float vector with values other than 0 and 1 (first: {_first(other)}); "
            "a float vector is read as a 0/1 mask and index lists must have an integer dtype",
        )
    if len(array) != num_examples:
        raise _fail(path, num_examples, f"a 0/1 float vector of length {len(array)}")
    return array.astype(bool)


def _check_indices(array: np.ndarray, path: PathLike, num_examples: int) -> np.ndarray:
    """Integer index lists: in range and without duplicates; returns sorted int64 indices."""
    array = array.astype(np.int64)
    bad = array[(array < 0) | (array >= num_examples)]
    if bad.size:
        raise _fail(path, num_examples, f"{bad.size} out-of-range indices (first: {_first(bad)})")
    values, counts = np.unique(array, return_counts=True)
    duplicates = values[counts > 1]
    if duplicates.size:
        raise _fail(
            path, num_examples,
            f"{duplicates.size} duplicated indices (first: {_first(duplicates)})",
        )
    return values  # np.unique sorts


def _to_indices(array: np.ndarray, path: PathLike, num_examples: int) -> np.ndarray:
    """Classify a 1-D vector as mask or index list and return sorted int64 indices."""
    kind = array.dtype.kind
    if kind == "b":
        if len(array) != num_examples:
            raise _fail(path, num_examples, f"a boolean vector of length {len(array)}")
        return np.flatnonzero(array).astype(np.int64)
    if kind == "f":
        return np.flatnonzero(_check_mask_values(array, path, num_examples)).astype(np.int64)
    if kind not in "iu":
        raise _fail(path, num_examples, f"a vector of non-integer values (dtype {array.dtype})")
    is_01 = bool(np.all((array == 0) | (array == 1)))
    if is_01 and len(array) == num_examples:
        return np.flatnonzero(array).astype(np.int64)
    if is_01 and np.unique(array).size != array.size:
        raise _fail(
            path, num_examples,
            f"an integer vector of 0/1 values of length {len(array)}: it looks like a 0/1 mask "
            f"of the wrong length (expected {num_examples}, got {len(array)})",
        )
    if len(array) == num_examples and np.unique(array).size != array.size:  # a mask's length, not a permutation
        other = array[(array != 0) & (array != 1)]
        raise _fail(
            path, num_examples,
            f"an integer vector of length {num_examples} (a mask's length) with values other than 0 and 1 "
            f"(first: {_first(other)}); a mask holds only 0/1",
        )
    return _check_indices(array, path, num_examples)


def load_subset_mask(path: PathLike, num_examples: int) -> np.ndarray:
    """Read and validate a subset mask file.

    Args:
        path: ``.npy`` or ``.pt`` file holding a boolean/0-1 mask of length ``num_examples`` or a
            vector of integer global indices (see the module docstring for the exact rules).
        num_examples: ``N``, the size of the full training set.

    Returns:
        Sorted ``int64`` global indices of the examples in the subset, shape ``(k,)``, ``k >= 1``.

    Raises:
        SubsetMaskError: for every malformed input, before any work is done.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) \
            or num_examples < 1:
        raise ValueError(f"Expected `num_examples` to be a positive int, but got {num_examples!r}")
    if not isinstance(path, (str, Path)):
        raise SubsetMaskError(
            f"subset_mask: expected a path to a .npy or .pt file, but got {type(path).__name__}"
        )
    array = _read_file(Path(path), num_examples)
    if array.ndim != 1:
        shape = tuple(array.shape)
        found = "a scalar" if array.ndim == 0 else f"a {array.ndim}-dimensional array of shape {shape}"
        raise _fail(path, num_examples, found)
    if array.size == 0:
        raise _fail(path, num_examples, f"an empty {_kind_name(array)} vector (empty subset)")
    indices = _to_indices(array, path, num_examples)
    if indices.size == 0:
        raise _fail(path, num_examples, "a mask that selects no example (empty subset)")
    return indices


def indices_to_mask(indices: Optional[Union[np.ndarray, Sequence[int]]], num_examples: int) -> np.ndarray:
    """Canonical boolean mask ``(N,)`` of a subset given as indices, as a boolean mask, or ``None`` (all)."""
    if indices is None:
        return np.ones(num_examples, dtype=bool)
    array = np.asarray(indices)
    if array.dtype == bool:
        if array.shape != (num_examples,):
            raise ValueError(
                f"Expected a boolean mask of shape ({num_examples},), but got shape {array.shape}"
            )
        return array.copy()
    array = array.astype(np.int64).reshape(-1)
    if array.size and (array.min() < 0 or array.max() >= num_examples):
        raise ValueError(f"Expected indices in [0, {num_examples}), but got {_first(array)}")
    mask = np.zeros(num_examples, dtype=bool)
    mask[array] = True
    return mask


def mask_hash(indices: Optional[Union[np.ndarray, Sequence[int]]], num_examples: int) -> str:
    """Short sha256 hex of the canonical boolean mask (``None`` means the full data).

    The same subset gives the same hash whether given as a boolean mask or as indices.
    """
    mask = indices_to_mask(indices, num_examples)
    digest = hashlib.sha256(f"subset_mask:v1:{num_examples}:".encode())
    digest.update(np.packbits(mask).tobytes())
    return digest.hexdigest()[:_HASH_CHARS]


def random_mask(num_examples: int, seed: int, index: int, p: float = 0.5) -> np.ndarray:
    """Boolean mask ``(N,)`` number ``index`` of the seeded family: each example in with prob. ``p``.

    Drawn from ``default_rng([seed, index])``, so mask ``j`` does not depend on how many masks
    are drawn.
    """
    return np.random.default_rng([seed, index]).random(num_examples) < p


def _write_if_changed(path: Path, mask: np.ndarray) -> None:
    if path.exists():
        existing = np.load(path, allow_pickle=False)
        if existing.dtype == bool and np.array_equal(existing, mask):
            return
        raise FileExistsError(
            f"write_random_masks: '{path}' exists and holds a different mask; "
            "use another out_dir (or delete it) instead of mixing seeds/sizes"
        )
    atomic_save_npy(path, mask)


def write_random_masks(
    out_dir: PathLike, num_examples: int, num_masks: int, seed: int, p: float = 0.5
) -> list[Path]:
    """Write ``num_masks`` seeded random boolean masks plus a ``masks.json`` manifest.

    Files are ``mask_000.npy``, ``mask_001.npy``, ... (boolean, length ``num_examples``).
    Deterministic given ``seed``; idempotent: identical existing files are left alone, a
    different existing mask raises ``FileExistsError`` (never silently overwritten).

    Returns:
        The paths of the mask files, in order.
    """
    if num_examples < 1 or num_masks < 1:
        raise ValueError(
            f"Expected positive `num_examples` and `num_masks`, but got {num_examples}, {num_masks}"
        )
    if not 0.0 < p <= 1.0:
        raise ValueError(f"Expected `p` in (0, 1], but got {p}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, hashes = [], []
    for j in range(num_masks):
        mask = random_mask(num_examples, seed, j, p)
        if not mask.any():
            raise ValueError(
                f"write_random_masks: mask {j} is empty (num_examples={num_examples}, p={p}); raise p"
            )
        path = out / f"mask_{j:03d}.npy"
        _write_if_changed(path, mask)
        paths.append(path)
        hashes.append(mask_hash(mask, num_examples))
    manifest = {
        "num_examples": num_examples, "num_masks": num_masks, "p": p, "seed": seed,
        "files": [path.name for path in paths], "hashes": hashes,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    manifest_path = out / "masks.json"
    if not manifest_path.exists() or manifest_path.read_text() != text:
        atomic_write_text(manifest_path, text)
    return paths


def dataset_fingerprint(
    images_uint8: np.ndarray, labels: Optional[np.ndarray] = None, extra: str = ""
) -> str:
    """Short sha256 hex over shape, dtype and bytes of the images (and labels, and ``extra``).

    Lets features, checkpoints and masks be checked to belong to the same dataset.
    """
    images = np.ascontiguousarray(np.asarray(images_uint8))
    digest = hashlib.sha256(f"dataset:v1:{images.shape}:{images.dtype}:".encode())
    digest.update(memoryview(images).cast("B"))
    if labels is not None:
        label_array = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
        digest.update(f"labels:{label_array.shape}:".encode())
        digest.update(memoryview(label_array).cast("B"))
    digest.update(f"extra:{extra}".encode())
    return digest.hexdigest()[:_HASH_CHARS]
