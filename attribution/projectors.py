"""Random projections ``(B, p) -> (B, d)`` of per-example gradients (TRAK's JL step).

All matrices are generated on the CPU from ``torch.Generator`` seeds derived from
``(seed, tile index)`` (:mod:`attribution.seeding`), then moved to the gradients' device, so a
projection is the same on CPU and GPU, in any process, for any batch. Seed a checkpoint's
projector with ``checkpoint_seed(seed, checkpoint_id)``.

* :class:`DenseProjector`: ``P`` is ``p x d`` Gaussian or Rademacher scaled by ``1/sqrt(d)``, so
  ``E[<P^T x, P^T y>] = <x, y>``. It is never held whole: rows come in tiles of ``tile_rows``
  (each tile seeded by ``(seed, tile)``) and are multiplied ``block_size`` rows at a time, so
  the result does not depend on ``block_size``. Cost: generating ``p x d`` numbers per call
  (hopeless on CPU for tens of millions of parameters; see benchmarks/core_timing.py).
* :class:`SparseProjector`: a sparse JL transform (Kane & Nelson's block construction). The
  ``d`` outputs form ``s`` blocks of ``d/s``; every input coordinate goes to one random
  position in each block with a random sign ``+-1/sqrt(s)``. ``s = 1`` is CountSketch.
  ``E[<Sx, Sy>] = <x, y>``; cost ``O(B p s)`` with ``index_add_``. (On CUDA ``index_add_``
  accumulates with atomics, so results may differ in the last bits between runs there.)
* :class:`IdentityProjector`: no projection (``d = p``); for tests and small ``p``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from . import _checks
from .seeding import cpu_generator

__all__ = ["Projector", "DenseProjector", "SparseProjector", "IdentityProjector", "make_projector"]

_DENSE_STREAM = 11
_SPARSE_STREAM = 12


class Projector(ABC):
    """Interface: ``project(grads (B, p)) -> (B, d)``, with ``p``, ``d``, ``seed``, ``kind``."""

    p: int
    d: int
    seed: int
    kind: str

    @abstractmethod
    def project(self, grads: Tensor) -> Tensor:
        """Project ``(B, p)`` gradients to ``(B, d)`` (same dtype and device as ``grads``)."""

    def describe(self) -> dict:
        """Everything that defines the matrix, for store metadata."""
        return {"kind": self.kind, "p": self.p, "d": self.d, "seed": self.seed}

    def _check(self, grads: Tensor) -> None:
        _checks.tensor_ndim("grads", grads, 2, " (B, p)")
        if grads.shape[1] != self.p:
            raise ValueError(f"Expected `grads` with p = {self.p} columns, but got {grads.shape[1]}")


class DenseProjector(Projector):
    """Dense Gaussian / Rademacher projection generated tile by tile.

    Args:
        p: input dimension; d: output dimension; seed: projection seed.
        kind: ``"gaussian"`` or ``"rademacher"``.
        block_size: rows of ``P`` per matmul (memory/speed only); a multiple of ``tile_rows``.
        tile_rows: rows per generator seed (defines the matrix; recorded by ``describe``).
    """

    def __init__(self, p: int, d: int, seed: int, kind: str = "gaussian", block_size: int = 8192,
                 tile_rows: int = 1024) -> None:
        self.p = _checks.positive_int("p", p)
        self.d = _checks.positive_int("d", d)
        self.seed = _checks.int_seed("seed", seed)
        self.kind = _checks.one_of("kind", kind, ("gaussian", "rademacher"))
        self.tile_rows = _checks.positive_int("tile_rows", tile_rows)
        self.block_size = _checks.positive_int("block_size", block_size)
        if block_size % tile_rows:
            raise ValueError(f"Expected `block_size` to be a multiple of tile_rows = {tile_rows}, but got {block_size}")

    def tile(self, index: int) -> Tensor:
        """Rows ``[index * tile_rows, ...)`` of ``P`` (scaled), float32 on the CPU, ``(rows, d)``."""
        rows = min(self.tile_rows, self.p - index * self.tile_rows)
        g = cpu_generator(self.seed, _DENSE_STREAM, index)
        if self.kind == "gaussian":
            m = torch.randn(rows, self.d, generator=g)
        else:
            m = torch.randint(0, 2, (rows, self.d), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
        return m.mul_(1.0 / math.sqrt(self.d))

    def num_tiles(self) -> int:
        """Number of tiles covering the ``p`` rows."""
        return -(-self.p // self.tile_rows)

    def matrix_block(self, start_tile: int, stop_tile: int) -> Tensor:
        """Rows of ``P`` for tiles ``[start_tile, stop_tile)``, ``(rows, d)`` float32 CPU."""
        return torch.cat([self.tile(i) for i in range(start_tile, stop_tile)])

    def project(self, grads: Tensor) -> Tensor:
        """``grads (B, p) @ P (p, d) -> (B, d)``, block by block."""
        self._check(grads)
        out = grads.new_zeros(grads.shape[0], self.d)
        per_block = self.block_size // self.tile_rows
        for t0 in range(0, self.num_tiles(), per_block):
            t1 = min(t0 + per_block, self.num_tiles())
            r0, r1 = t0 * self.tile_rows, min(t1 * self.tile_rows, self.p)
            block = self.matrix_block(t0, t1).to(device=grads.device, dtype=grads.dtype)
            out.addmm_(grads[:, r0:r1], block)
        return out

    def describe(self) -> dict:
        return {**super().describe(), "tile_rows": self.tile_rows, "version": 1}


class SparseProjector(Projector):
    """Sparse JL: ``s`` nonzeros ``+-1/sqrt(s)`` per input coordinate (one in each of ``s`` blocks).

    Args:
        p, d, seed: as for :class:`DenseProjector`; ``d`` must be divisible by ``s``.
        s: nonzeros per input coordinate (1 = CountSketch).
        tile_cols: input coordinates per generator seed (defines the matrix).
    """

    def __init__(self, p: int, d: int, seed: int, s: int = 1, tile_cols: int = 1 << 20) -> None:
        self.p = _checks.positive_int("p", p)
        self.d = _checks.positive_int("d", d)
        self.seed = _checks.int_seed("seed", seed)
        self.s = _checks.positive_int("s", s)
        self.kind = "sparse"
        self.tile_cols = _checks.positive_int("tile_cols", tile_cols)
        if d % s:
            raise ValueError(f"Expected `d` to be divisible by s = {s}, but got d = {d}")
        self._cache: dict = {}

    def tile(self, index: int) -> tuple[Tensor, Tensor]:
        """Output rows ``(s, cols)`` int64 (where each input coordinate lands) and signs ``(s, cols)`` float32
        (scaled) for one input tile."""
        cols = min(self.tile_cols, self.p - index * self.tile_cols)
        g = cpu_generator(self.seed, _SPARSE_STREAM, index)
        width = self.d // self.s
        rows = torch.randint(0, width, (self.s, cols), generator=g)
        rows += torch.arange(self.s).unsqueeze(1) * width
        signs = torch.randint(0, 2, (self.s, cols), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
        return rows, signs.mul_(1.0 / math.sqrt(self.s))

    def _tile_on(self, index: int, device, dtype) -> tuple[Tensor, Tensor]:
        key = (index, str(device), dtype)
        if key not in self._cache:
            rows, signs = self.tile(index)
            self._cache[key] = (rows.to(device), signs.to(device=device, dtype=dtype))
        return self._cache[key]

    def project(self, grads: Tensor) -> Tensor:
        """``out[:, targets[j, i]] += signs[j, i] * grads[:, i]`` for every coordinate ``i``."""
        self._check(grads)
        out = grads.new_zeros(grads.shape[0], self.d)
        for index in range(-(-self.p // self.tile_cols)):
            c0 = index * self.tile_cols
            targets, signs = self._tile_on(index, grads.device, grads.dtype)
            block = grads[:, c0:c0 + targets.shape[1]]
            for j in range(self.s):
                out.index_add_(1, targets[j], block * signs[j])
        return out

    def describe(self) -> dict:
        return {**super().describe(), "s": self.s, "tile_cols": self.tile_cols, "version": 1}


class IdentityProjector(Projector):
    """No projection: ``d = p`` and ``project(g) = g``."""

    def __init__(self, p: int, seed: int = 0) -> None:
        self.p = self.d = _checks.positive_int("p", p)
        self.seed = _checks.int_seed("seed", seed)
        self.kind = "identity"

    def project(self, grads: Tensor) -> Tensor:
        self._check(grads)
        return grads


def make_projector(kind: str, p: int, d: int, seed: int, **kw) -> Projector:
    """``kind`` in ``"gaussian"``, ``"rademacher"`` (dense), ``"sparse"``, ``"identity"`` (``d`` must be ``p``)."""
    _checks.one_of("kind", kind, ("gaussian", "rademacher", "sparse", "identity"))
    if kind == "sparse":
        return SparseProjector(p, d, seed, **kw)
    if kind == "identity":
        if d != p:
            raise ValueError(f"Expected `d` to equal p = {p} for the identity projection, but got {d}")
        return IdentityProjector(p, seed)
    return DenseProjector(p, d, seed, kind=kind, **kw)
