r"""TRAK through the N x N Gram matrix: exact (unprojected) scores, and a kernel over the model's members.

The primal scores of :mod:`attribution.scoring` solve a d x d system,
``tau = Phi (Phi^T Phi + lambda I)^-1 g``. When the features are not projected (d = p, the number of
parameters, far larger than N) the same scores come from the N x N Gram matrix ``K = Phi Phi^T`` by the
push-through identity::

    Phi (Phi^T Phi + lambda I)^-1 g = (Phi Phi^T + lambda I)^-1 Phi g          (N,)

so no projection noise enters: ``h = Phi g`` is one pass over the stored per-example gradients.

Members only. A model trained on a subset mask was influenced only by the examples in it, so the
curvature stand-in is ``K_M = Phi_M^T Phi_M`` over the members ``M``. With ``a = (K_MM + lambda I)^-1 h_M``
(``K_MM = Phi_M Phi_M^T``):

* member ``i``: ``phi_i^T (K_M + lambda I)^-1 g = a_i``;
* non-member ``i`` (the predicted effect of *adding* it):
  ``phi_i^T (K_M + lambda I)^-1 g = (h_i - K_iM a) / lambda``.

Both follow from the Woodbury identity and are tested against the dense primal formula in float64.

The ridge is ``lambda = relative_lam * trace(K_MM) / |M|``: relative to the members' mean squared
feature norm, which a Johnson-Lindenstrauss projection preserves in expectation, so the same
``relative_lam`` means the same estimator whatever d (unlike ``trace / d``, the primal's
:func:`~attribution.scoring.relative_lambda`).

Files (in the store folder, written atomically): ``gram.npy`` (N x N float64), ``gram.json`` (N, d,
members hash, trace), ``gram_eigenvalues.npy`` / ``gram_eigenvectors.npy`` (of ``K_MM``).
"""
from __future__ import annotations

import hashlib
import json
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_save_npy, atomic_write_json
from .store import FeatureStore

__all__ = ["GramKernel", "GRAM_FILES", "finalize_gram", "load_gram", "gram_scores", "gram_scores_sweep", "members_hash"]

GRAM_FILES = ("gram.npy", "gram_eigenvalues.npy", "gram_eigenvectors.npy", "gram_members.npy")


class GramKernel(NamedTuple):
    """``gram (N, N)`` float64, ``members (n,)`` int64 (sorted), eigenvalues ``(n,)`` and eigenvectors
    ``(n, n)`` of the members' block ``K_MM``."""

    gram: Tensor
    members: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor

    def ridge(self, relative_lam: float) -> float:
        """``relative_lam * trace(K_MM) / |M|``, the members' mean squared feature norm times ``relative_lam``."""
        if not isinstance(relative_lam, (int, float)) or relative_lam <= 0:
            raise ValueError(f"Expected `relative_lam` > 0, but got {relative_lam!r}")
        return float(relative_lam) * float(self.eigenvalues.clamp(min=0).sum()) / len(self.members)

    def solve_members(self, h_members: Tensor, lam: float) -> Tensor:
        """``(K_MM + lam I)^-1 h_M`` for ``h_M (n, B)``; ``(n, B)`` float64."""
        V = self.eigenvectors
        return V @ ((V.T @ h_members) / (self.eigenvalues + lam).unsqueeze(1))


def members_hash(members: Tensor, num_examples: int) -> str:
    digest = hashlib.sha256(f"members:v1:{num_examples}:".encode())
    digest.update(np.ascontiguousarray(members.numpy().astype(np.int64)).tobytes())
    return digest.hexdigest()[:16]


def _members(members: Optional[Sequence[int] | Tensor], N: int) -> Tensor:
    if members is None:
        return torch.arange(N)
    m = torch.as_tensor(members, dtype=torch.long).reshape(-1)
    if m.numel() == 0 or int(m.min()) < 0 or int(m.max()) >= N or len(m.unique()) != len(m):
        raise ValueError(f"Expected `members` to be distinct indices in [0, {N}) (at least one), but got "
                         f"{m.numel()} values in [{int(m.min()) if m.numel() else '-'}, "
                         f"{int(m.max()) if m.numel() else '-'}]")
    return m.sort().values


def finalize_gram(store: FeatureStore, members: Optional[Sequence[int] | Tensor] = None,
                  block_rows: int = 1024) -> GramKernel:
    """Accumulate ``K = Phi Phi^T`` in float64 over pairs of row blocks, eigendecompose the members'
    block, save both, return them. ``members``: the model's training indices (None: all N rows)."""
    if not store.is_complete:
        raise ValueError(f"Expected a complete `store`, but {len(store.missing_rows())} of {store.N} rows are missing")
    m = _members(members, store.N)
    K = torch.zeros(store.N, store.N, dtype=torch.float64)
    blocks = list(store.row_blocks(block_rows))
    for i, (a0, a1) in enumerate(blocks):
        rows_a = store.read(a0, a1, torch.float64)
        for b0, b1 in blocks[i:]:
            rows_b = rows_a if b0 == a0 else store.read(b0, b1, torch.float64)
            block = rows_a @ rows_b.T
            K[a0:a1, b0:b1] = block
            if b0 != a0:
                K[b0:b1, a0:a1] = block.T
    s, V = torch.linalg.eigh(K[m][:, m])
    atomic_save_npy(store.path / "gram.npy", K.numpy())
    atomic_save_npy(store.path / "gram_eigenvalues.npy", s.numpy())
    atomic_save_npy(store.path / "gram_eigenvectors.npy", V.numpy())
    atomic_save_npy(store.path / "gram_members.npy", m.numpy())
    atomic_write_json(store.path / "gram.json", {"N": store.N, "d": store.d, "members": len(m),
                                                 "members_hash": members_hash(m, store.N),
                                                 "trace": float(K[m, m].sum())})
    return GramKernel(K, m, s, V)


def load_gram(store: FeatureStore, members: Optional[Sequence[int] | Tensor] = None) -> GramKernel:
    """The Gram kernel saved by :func:`finalize_gram`; refused when it was made for other members."""
    info_path = store.path / "gram.json"
    if not info_path.exists():
        raise FileNotFoundError(f"Expected a Gram kernel in {store.path} (gram.json); call finalize_gram(store) first")
    info = json.loads(info_path.read_text())
    m = _members(members, store.N)
    if info["N"] != store.N or info["members_hash"] != members_hash(m, store.N):
        raise ValueError(f"Expected the Gram kernel in {store.path} to be made for these {len(m)} members, but it "
                         f"records {info['members']} members (hash {info['members_hash']}); re-run finalize_gram")
    K = torch.from_numpy(np.load(store.path / "gram.npy"))
    s = torch.from_numpy(np.load(store.path / "gram_eigenvalues.npy"))
    V = torch.from_numpy(np.load(store.path / "gram_eigenvectors.npy"))
    if K.shape != (store.N, store.N) or s.shape != (len(m),) or V.shape != (len(m), len(m)):
        raise ValueError(f"Expected Gram files of N = {store.N} and {len(m)} members in {store.path}, but got "
                         f"{tuple(K.shape)}, {tuple(s.shape)}, {tuple(V.shape)}; re-run finalize_gram")
    return GramKernel(K, m, s, V)


def _projected_targets(store: FeatureStore, G: Tensor, block_rows: int) -> Tensor:
    """``h = Phi G^T`` ``(N, B)`` float64: one pass over the store."""
    G = G.detach().cpu().to(torch.float64)
    if G.ndim != 2 or G.shape[1] != store.d:
        raise ValueError(f"Expected target gradients of shape (B, {store.d}), but got {tuple(G.shape)}")
    h = torch.empty(store.N, G.shape[0], dtype=torch.float64)
    for start, stop in store.row_blocks(block_rows):
        h[start:stop] = store.read(start, stop, torch.float64) @ G.T
    return h


def gram_scores(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], relative_lam: float,
                kernels: Optional[Sequence[GramKernel]] = None, block_rows: int = 1024) -> Tensor:
    """``(N, B)`` float64 checkpoint-averaged scores ``1/M sum_m phi_i^T (K_M,m + lambda_m I)^-1 g_m``.

    Members of each checkpoint's kernel get the exact dual solve; non-members get the predicted effect of
    adding them (see the module docstring). ``kernels``: from :func:`load_gram` (default: load them).
    """
    return gram_scores_sweep(stores, target_grads_per_store, [relative_lam], kernels, block_rows)[0]


def gram_scores_sweep(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor],
                      relative_lams: Sequence[float], kernels: Optional[Sequence[GramKernel]] = None,
                      block_rows: int = 1024) -> Tensor:
    """:func:`gram_scores` for every ridge of ``relative_lams`` from ONE pass over each store: ``(L, N, B)``."""
    if not stores or len(stores) != len(target_grads_per_store):
        raise ValueError(f"Expected one target-gradient matrix per store, but got {len(stores)} stores and "
                         f"{len(target_grads_per_store)} matrices")
    if not relative_lams:
        raise ValueError("Expected at least one relative ridge in `relative_lams`, but got none")
    kernels = kernels or [load_gram(s) for s in stores]
    total = None
    for store, G, kern in zip(stores, target_grads_per_store, kernels):
        h = _projected_targets(store, G, block_rows)
        cross = kern.gram[:, kern.members]
        per_lambda = []
        for relative_lam in relative_lams:
            lam = kern.ridge(relative_lam)
            a = kern.solve_members(h[kern.members], lam)
            scores = (h - cross @ a) / lam
            scores[kern.members] = a
            per_lambda.append(scores)
        stacked = torch.stack(per_lambda)
        total = stacked if total is None else total + stacked
    return total / len(stores)
