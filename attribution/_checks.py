"""Argument checks that raise errors naming the argument, what was expected and what was given."""
from __future__ import annotations

import torch


def positive_int(name: str, value) -> int:
    """Return ``value`` if it is an int > 0, else raise ``ValueError``/``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be a positive int, but got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"Expected `{name}` to be a positive int, but got {value}")
    return value


def int_seed(name: str, value) -> int:
    """Return ``value`` if it is a non-negative int (a seed)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `{name}` to be a non-negative int seed, but got {value!r}")
    return value


def one_of(name: str, value, choices) -> str:
    """Return ``value`` if it is in ``choices``."""
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {sorted(choices)}, but got {value!r}")
    return value


def tensor_ndim(name: str, value, ndim: int, what: str = "") -> torch.Tensor:
    """Return ``value`` if it is a tensor with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor{what}, but got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(
            f"Expected `{name}` to have {ndim} dimensions{what}, but got shape {tuple(value.shape)}"
        )
    return value


def long_vector(name: str, value, length: int | None = None) -> torch.Tensor:
    """Return ``value`` as a 1-D integer tensor (optionally of a given length)."""
    tensor_ndim(name, value, 1, " (B,)")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to be an integer tensor, but got dtype {value.dtype}")
    if length is not None and value.shape[0] != length:
        raise ValueError(f"Expected `{name}` to have length {length}, but got {value.shape[0]}")
    return value.long()
