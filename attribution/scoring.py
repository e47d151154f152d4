r"""TRAK scores from finalized feature stores, with a cheap ridge ``lambda``.

Per checkpoint ``m`` with features ``Phi_m`` (N x d) and target gradients ``G_m`` (B x d)::

    tau = 1/M sum_m  W_m Phi_m (Phi_m^T Phi_m + lambda I)^-1 G_m^T            (N x B)

where ``W_m = diag(train_weights)`` (TRAK's Q) or the identity. :func:`finalize` accumulates
``K = Phi^T Phi`` over row chunks in float64 and stores its eigendecomposition
``K = U diag(s) U^T``; then ``(K + lambda I)^-1 = U diag(1/(s + lambda)) U^T`` for any lambda,
and scoring streams over row blocks of ``Phi`` (never N x d in memory, and N x B only when asked).

Sign convention (SPEC): a *positive* score means including the training example *lowers* the
target output ``f_t``.

Loss-gradient form (the paper's Algorithm 1; the diffusion default). Features are gradients of
the training loss, ``phi_i = grad L_i``, and the kernel ``Phi^T Phi`` stands in for the Hessian
``H`` of the total loss ``sum_j L_j``. Removing example ``i`` moves the optimum by a Newton step:
the gradient of ``sum_{j != i} L_j`` at ``theta*`` is ``-phi_i``, so
``theta_{-i} ~ theta* + H^-1 phi_i``, i.e. including ``i`` moves ``theta`` by ``-H^-1 phi_i``
and changes ``f_t`` by ``-g^T H^-1 phi_i`` (``g = grad f_t``). "Lowers ``f_t``" is therefore
``+g^T H^-1 phi_i``, which is exactly ``tau = Phi (Phi^T Phi + lambda I)^-1 g`` with unit weights.

Output-gradient form (the original TRAK). Features are gradients of the model *output*,
``x_i = grad out_i``, and ``train_weights`` are ``Q_i = dLoss_i/dout_i``. For least squares
``L_i = 1/2 (y_i - x_i^T theta)^2``, ``Q_i = -e_i`` with residual ``e_i = y_i - x_i^T theta*``,
and ``score_i = Q_i x_i^T (X^T X)^-1 g = -g^T (X^T X)^-1 x_i e_i``. The exact leave-one-out
change is ``theta* - theta_{-i} = (X^T X)^-1 x_i e_i / (1 - h_ii)`` with leverage
``h_ii = x_i^T (X^T X)^-1 x_i``, so ``f(theta_{-i}) - f(theta*) = -g^T (X^T X)^-1 x_i e_i / (1 - h_ii)``:
the score equals the exact effect up to the factor ``1/(1 - h_ii)`` (close to 1 for N >> p), and
it is positive exactly when removing ``i`` raises ``f_t``, i.e. including ``i`` lowers it.
(Note ``phi_i = Q_i x_i``: the two forms share the numerator but use different kernels,
``sum_j e_j^2 x_j x_j^T`` versus ``X^T X``.)

Weights and checkpoints: each checkpoint's scores are multiplied by that checkpoint's weights
and then averaged (TRAK instead multiplies the averaged scores by averaged weights).
"""
from __future__ import annotations

import logging
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .atomic import atomic_save_npy, atomic_write_json
from .errors import SettingsError
from .integrity import check_file_sha256, check_npy_file, file_sha256, require_finite
from .store import KERNEL_FORMAT, FeatureStore

__all__ = ["KernelEigen", "finalize", "load_kernel", "relative_lambda", "score", "iter_score_blocks", "topk_scores", "TopK",
           "lambda_sweep", "dense_scores_float64"]

log = logging.getLogger(__name__)
Weights = Union[None, Tensor, Sequence[Optional[Tensor]]]


class KernelEigen(NamedTuple):
    """Eigendecomposition of ``Phi^T Phi``: ``eigenvalues (d,)``, ``eigenvectors (d, d)``, float64."""

    eigenvalues: Tensor
    eigenvectors: Tensor

    def solve(self, G: Tensor, lam: float) -> Tensor:
        """``(K + lam I)^-1 G^T`` for ``G (B, d)``; returns ``(d, B)`` float64."""
        _check_lambda(self, lam)
        U = self.eigenvectors
        coeff = (U.T @ G.to(torch.float64).T) / (self.eigenvalues + lam).unsqueeze(1)
        return U @ coeff


def _check_lambda(kernel: KernelEigen, lam: float) -> None:
    if not isinstance(lam, (int, float)) or not lam >= 0 or lam == float("inf"):
        raise SettingsError(f"Expected `lam` to be a finite float >= 0, but got {lam!r}")
    s = kernel.eigenvalues
    tol = s.numel() * torch.finfo(torch.float64).eps * float(s.abs().max())
    if lam == 0 and float(s.min()) <= tol:
        raise SettingsError(f"Expected a non-singular kernel Phi^T Phi for `lam` = 0, but its smallest eigenvalue is "
                         f"{float(s.min()):.3e} (largest {float(s.max()):.3e}); pass lam > 0 (a ridge term)")


_KERNEL_FILES = ("kernel_eigenvalues.npy", "kernel_eigenvectors.npy")


def finalize(store: FeatureStore, block_rows: int = 8192) -> KernelEigen:
    """Accumulate ``Phi^T Phi`` in float64 over row chunks, eigendecompose, save, return it.

    Saves ``kernel_eigenvalues.npy``, ``kernel_eigenvectors.npy`` and, last, ``kernel.json`` (with the
    sha256 of every file of the store) into the store folder (atomically). Non-finite features or
    eigenvalues are refused before anything is written. Re-run after features change.
    """
    if not store.is_complete:
        raise ValueError(f"Expected a complete `store`, but {len(store.missing_rows())} of {store.N} rows are missing")
    K = torch.zeros(store.d, store.d, dtype=torch.float64)
    for start, stop in store.row_blocks(block_rows):
        block = store.read(start, stop, torch.float64)
        require_finite(block, "features", f"in store {store.path}", rows=torch.arange(start, stop))
        K.addmm_(block.T, block)
    s, U = torch.linalg.eigh(K)
    require_finite(s, "kernel eigenvalues", f"of store {store.path}")
    atomic_save_npy(store.path / "kernel_eigenvectors.npy", U.numpy())
    atomic_save_npy(store.path / "kernel_eigenvalues.npy", s.numpy())
    checksums = {**store.file_checksums(), **{name: file_sha256(store.path / name) for name in _KERNEL_FILES}}
    atomic_write_json(store.path / "kernel.json", {"N": store.N, "d": store.d, "trace": float(K.trace()),
                                                   "format": KERNEL_FORMAT, "checksums": checksums})
    log.info("finalized %s: eigenvalues in [%.3e, %.3e]", store.path, float(s.min()), float(s.max()))
    return KernelEigen(s, U)


def load_kernel(store: FeatureStore) -> KernelEigen:
    """The kernel saved by :func:`finalize`: sizes and (when recorded) checksums checked, eigenvalues finite."""
    record = store.kernel_record()
    if record is None:
        raise FileNotFoundError(f"Expected a finalized `store` at {store.path}; call finalize(store) first")
    shapes = {"kernel_eigenvalues.npy": (store.d,), "kernel_eigenvectors.npy": (store.d, store.d)}
    for name, shape in shapes.items():
        check_npy_file(store.path / name, shape, np.float64, f"the store's width d = {store.d}")
        if name in record.get("checksums", {}):
            check_file_sha256(store.path / name, record["checksums"][name], str(store.path / "kernel.json"))
    s = torch.from_numpy(np.load(store.path / "kernel_eigenvalues.npy"))
    U = torch.from_numpy(np.load(store.path / "kernel_eigenvectors.npy"))
    require_finite(s, "kernel eigenvalues", f"in {store.path}")
    return KernelEigen(s, U)


def _per_store_weights(stores, train_weights: Weights) -> list[Optional[Tensor]]:
    if train_weights is None:
        return [s.weights() for s in stores]
    if isinstance(train_weights, Tensor):
        train_weights = [train_weights] * len(stores)
    if len(train_weights) != len(stores):
        raise ValueError(f"Expected `train_weights` for {len(stores)} stores, but got {len(train_weights)}")
    for w, s in zip(train_weights, stores):
        if w is not None and tuple(w.shape) != (s.N,):
            raise ValueError(f"Expected `train_weights` of shape ({s.N},), but got {tuple(w.shape)}")
    return [None if w is None else w.to(torch.float64).cpu() for w in train_weights]


def _check_targets(stores, targets) -> list[Tensor]:
    if not stores:
        raise ValueError("Expected `stores` to hold at least one FeatureStore, but got none")
    if len(targets) != len(stores):
        raise ValueError(f"Expected one target-gradient matrix per store ({len(stores)}), but got {len(targets)}")
    if len({s.N for s in stores}) != 1:
        raise ValueError(f"Expected stores with the same N, but got {[s.N for s in stores]}")
    B = None
    for s, G in zip(stores, targets):
        _checks.tensor_ndim("target_grads", G, 2, " (B, d)")
        if G.shape[1] != s.d or (B is not None and G.shape[0] != B):
            raise ValueError(f"Expected target gradients of shape ({B or 'B'}, {s.d}), but got {tuple(G.shape)}")
        B = G.shape[0]
    return [G.detach().cpu().to(torch.float64) for G in targets]


def _per_store_lambdas(lam, num_stores: int) -> list[float]:
    if isinstance(lam, (int, float)):
        return [lam] * num_stores
    lams = list(lam)
    if len(lams) != num_stores:
        raise ValueError(f"Expected `lam` to be one float or one per store ({num_stores}), but got {len(lams)} values")
    return lams


def relative_lambda(kernel: KernelEigen, lam: float) -> float:
    """An absolute ridge from one relative to the kernel's scale: ``lam * mean eigenvalue`` (= trace / d)."""
    return float(lam) * float(kernel.eigenvalues.clamp(min=0).mean())


def iter_score_blocks(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], lam: float,
                      train_weights: Weights = None, block_rows: int = 8192,
                      kernels: Optional[Sequence[KernelEigen]] = None) -> Iterator[tuple[int, int, Tensor]]:
    """Stream the checkpoint-averaged scores: yields ``(start, stop, scores (rows, B) float64)``.

    ``lam`` is one ridge for every store or a sequence with one per store (see :func:`relative_lambda`).
    """
    targets = _check_targets(stores, target_grads_per_store)
    kernels = kernels or [load_kernel(s) for s in stores]
    lams = _per_store_lambdas(lam, len(stores))
    solved = [k.solve(G, lam_m) for k, G, lam_m in zip(kernels, targets, lams)]
    weights = _per_store_weights(stores, train_weights)
    for start, stop in stores[0].row_blocks(block_rows):
        acc = torch.zeros(stop - start, targets[0].shape[0], dtype=torch.float64)
        for store, V, w in zip(stores, solved, weights):
            part = store.read(start, stop, torch.float64) @ V
            acc += part if w is None else part * w[start:stop].unsqueeze(1)
        yield start, stop, acc / len(stores)


def score(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], lam: float,
          train_weights: Weights = None, block_rows: int = 8192, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(N, B)`` scores ``1/M sum_m W_m Phi_m (Phi_m^T Phi_m + lam I)^-1 G_m^T``.

    Args:
        stores: M finalized stores (one per checkpoint), same N.
        target_grads_per_store: M tensors ``(B, d_m)``, projected with each store's projector.
        lam: ridge ``lambda >= 0`` (0 needs a non-singular kernel).
        train_weights: None (use the stores' weights if any), one ``(N,)`` tensor, or one per store.
        block_rows: rows of ``Phi`` per block.
    """
    blocks = list(iter_score_blocks(stores, target_grads_per_store, lam, train_weights, block_rows))
    return torch.cat([b.to(dtype) for _, _, b in blocks])


class TopK(NamedTuple):
    """Top-k per target: ``*_values (k, B)`` and ``*_indices (k, B)``; ``positive`` = largest scores."""

    positive_values: Tensor
    positive_indices: Tensor
    negative_values: Tensor
    negative_indices: Tensor


def _merge(best_v, best_i, v, start, k, largest):
    v_all = v if best_v is None else torch.cat([best_v, v])
    i_all = torch.arange(start, start + v.shape[0]).unsqueeze(1).expand_as(v)
    i_all = i_all if best_i is None else torch.cat([best_i, i_all])
    top_v, pos = torch.topk(v_all, min(k, v_all.shape[0]), dim=0, largest=largest)
    return top_v, torch.gather(i_all, 0, pos)


def topk_scores(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], lam: float, k: int,
                train_weights: Weights = None, block_rows: int = 8192) -> TopK:
    """Streaming top-k positive (largest) and negative (smallest) scores per target, without N x B."""
    _checks.positive_int("k", k)
    pv = pi = nv = ni = None
    for start, _, block in iter_score_blocks(stores, target_grads_per_store, lam, train_weights, block_rows):
        pv, pi = _merge(pv, pi, block, start, k, largest=True)
        nv, ni = _merge(nv, ni, block, start, k, largest=False)
    return TopK(pv, pi, nv, ni)


def lambda_sweep(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], lams: Sequence[float],
                 train_weights: Weights = None, block_rows: int = 8192, dtype: torch.dtype = torch.float32,
                 relative: bool = False) -> Tensor:
    """Scores for several ridge values from the one stored eigendecomposition: ``(L, N, B)``.

    ``lams`` are absolute ridges, or with ``relative=True`` multiples of each store's mean eigenvalue
    (:func:`relative_lambda`), one value for every store.
    """
    kernels = [load_kernel(s) for s in stores]
    out = []
    for lam in lams:
        if relative:
            lam = [relative_lambda(k, lam) for k in kernels]
        blocks = iter_score_blocks(stores, target_grads_per_store, lam, train_weights, block_rows, kernels)
        out.append(torch.cat([b.to(dtype) for _, _, b in blocks]))
    return torch.stack(out)


def dense_scores_float64(Phi: Tensor, G: Tensor, lam: float, train_weights: Optional[Tensor] = None) -> Tensor:
    """Reference: ``diag(w) Phi (Phi^T Phi + lam I)^-1 G^T`` with a dense float64 solve. ``(N, B)``."""
    Phi, G = Phi.to(torch.float64), G.to(torch.float64)
    A = Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=torch.float64)
    out = Phi @ torch.linalg.solve(A, G.T)
    return out if train_weights is None else out * train_weights.to(torch.float64).unsqueeze(1)
