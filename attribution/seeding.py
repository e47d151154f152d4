"""Deterministic seed mixing shared by draws and projectors.

Every random quantity in the core is generated on the CPU from a ``torch.Generator`` whose seed
is a hash of a tuple of integers (a global seed, a stream tag, an example key, a block index,
...). The hash does not depend on the device, the batch composition, the rank or the chunk
size, so every checkpoint / process / device sees exactly the same random numbers.

A projection for checkpoint ``m`` of an experiment with seed ``s`` is seeded with
``checkpoint_seed(s, m)``.
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["mix_seed", "cpu_generator", "checkpoint_seed"]

_MASK63 = (1 << 63) - 1


def _as_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value)
        raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__} {value!r}")
    return value


def mix_seed(*values: int) -> int:
    """Hash a tuple of ints into a 63-bit seed (blake2b; stable across runs and machines).

    Example: ``mix_seed(seed, tag, key)``.
    """
    ints = [_as_int(f"values[{i}]", v) for i, v in enumerate(values)]
    data = ",".join(str(v) for v in ints).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def cpu_generator(*values: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``mix_seed(*values)``."""
    return torch.Generator(device="cpu").manual_seed(mix_seed(*values))


def checkpoint_seed(seed: int, checkpoint_id: int) -> int:
    """The projection seed for one checkpoint: a hash of (experiment seed, checkpoint id)."""
    return mix_seed(_as_int("seed", seed), 0x5EED, _as_int("checkpoint_id", checkpoint_id))
