r"""TRAK scores from finalized feature stores, with a cheap ridge ``lambda``.

Per checkpoint ``m`` with features ``Phi_m`` (N x d) and target gradients ``G_m`` (B x d)::

    tau = 1/M sum_m  W_m Phi_m (Phi_m^T Phi_m + lambda I)^-1 G_m^T            (N x B)

where ``W_m = diag(train_weights)`` (TRAK's Q) or the identity. :func:`finalize` accumulates
``K = Phi^T Phi`` over row chunks in float64 and stores its eigendecomposition
``K = U diag(s) U^T``; then ``(K + lambda I)^-1 = U diag(1/(s + lambda)) U^T`` for any lambda,
and scoring streams over row blocks of ``Phi`` (never N x d in memory, and N x B only when asked).

One pass (:func:`score_pass`, what ``cli.py score`` and the LDS report run): first, per checkpoint, the
``(d, C)`` solve ``V_m = (K_m + lambda_m I)^-1 G_m^T`` of every pending column (:func:`solve_targets`; one
eigenvector matrix resident at a time, dropped after its solve; C columns may be several ridges side by side,
:func:`sweep_solves`); then ONE sequential read of every store, row block by row block, each block of each
store multiplied by its ``V_m`` (float32 on the accelerator when there is one; float64 is the reference
option) and averaged. What the pass keeps is chosen by the caller: the scores on disk column by column
(:class:`ScoreColumns`, flat memory), in memory (N x C, only when asked), a streaming top-k, or subset-mask
predictions ``masks @ scores`` (J x C, for the LDS). Resident: the M solves (``M d C``), one block of one
store and the one read ahead, the eigenvalues.

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

Members (``attribution.members``): a model fit on a subset mask ``M`` was influenced only by its members, so
its kernel is ``K_M = Phi_M^T Phi_M`` over the member rows (:func:`finalize_members`, saved beside the store
under names keyed by the members' hash; :func:`member_kernel` forms it once and then loads it). Every row ``i``
still gets ``phi_i^T (K_M + lambda I)^-1 g``: for a non-member, the predicted effect of *adding* it. With all
N rows as members the store's own kernel (:func:`finalize`) is that kernel.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .atomic import atomic_save_npy, atomic_write_json
from .errors import CorruptFileError, SettingsError
from .integrity import check_file_sha256, check_npy_file, file_sha256, require_finite
from .store import KERNEL_FORMAT, FeatureStore, read_json

__all__ = ["KernelEigen", "KernelSpectrum", "finalize", "load_kernel", "load_spectrum", "relative_lambda", "solve_targets",
           "finalize_members", "load_member_kernel", "member_kernel", "member_kernel_files",
           "iter_pass_blocks", "score_pass", "ScorePass", "ScoreColumns", "default_block_rows", "default_device",
           "score", "iter_score_blocks", "topk_scores", "TopK", "sweep_solves", "lambda_sweep", "dense_scores_float64"]

log = logging.getLogger(__name__)
Weights = Union[None, Tensor, Sequence[Optional[Tensor]]]


class KernelEigen(NamedTuple):
    """Eigendecomposition of ``Phi^T Phi``: ``eigenvalues (d,)``, ``eigenvectors (d, d)``, float64."""

    eigenvalues: Tensor
    eigenvectors: Tensor

    def solve(self, G: Tensor, lam) -> Tensor:
        """``(K + lam I)^-1 G^T`` for ``G (B, d)``; returns ``(d, B)`` float64.

        ``lam``: one ridge for every column, or one per column (a ``(B,)`` tensor or sequence).
        """
        U, s = self.eigenvectors, self.eigenvalues.unsqueeze(1)
        if isinstance(lam, (int, float)):
            _check_lambda(self, lam)
            return U @ ((U.T @ G.to(torch.float64).T) / (s + lam))
        lams = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)
        if lams.numel() != G.shape[0]:
            raise ValueError(f"Expected one `lam` or one per column ({G.shape[0]}), but got {lams.numel()} values")
        for value in lams.unique().tolist():
            _check_lambda(self, value)
        return U @ ((U.T @ G.to(torch.float64).T) / (s + lams.to(s.device).unsqueeze(0)))


def _check_lambda(kernel: KernelEigen, lam: float) -> None:
    if not isinstance(lam, (int, float)) or not lam >= 0 or lam == float("inf"):
        raise SettingsError(f"Expected `lam` to be a finite float >= 0, but got {lam!r}")
    s = kernel.eigenvalues
    tol = s.numel() * torch.finfo(torch.float64).eps * float(s.abs().max())
    if lam == 0 and float(s.min()) <= tol:
        raise SettingsError(f"Expected a non-singular kernel Phi^T Phi for `lam` = 0, but its smallest eigenvalue is "
                         f"{float(s.min()):.3e} (largest {float(s.max()):.3e}); pass lam > 0 (a ridge term)")


_KERNEL_FILES = ("kernel_eigenvalues.npy", "kernel_eigenvectors.npy")
PRIMAL_MAX_DIM = 32768  # wider stores (unprojected features) get the N x N Gram kernel: d x d float64 > 8 GiB


def finalize(store: FeatureStore, block_rows: int = 8192) -> KernelEigen:
    """Accumulate ``Phi^T Phi`` in float64 over row chunks, eigendecompose, save, return it.

    Saves ``kernel_eigenvalues.npy``, ``kernel_eigenvectors.npy`` and, last, ``kernel.json`` (with the
    sha256 of every file of the store) into the store folder (atomically). Non-finite features or
    eigenvalues are refused before anything is written. Re-run after features change.
    """
    if not store.is_complete:
        raise ValueError(f"Expected a complete `store`, but {len(store.missing_rows())} of {store.N} rows are missing")
    if store.d > PRIMAL_MAX_DIM:
        return _finalize_gram(store)
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


def _finalize_gram(store: FeatureStore):
    """A store too wide for the ``d x d`` kernel (unprojected features, d > PRIMAL_MAX_DIM): the ``N x N``
    Gram kernel of :mod:`attribution.dual` instead, with ``kernel.json`` recording ``"kernel": "gram"`` and
    the checksums of the store and Gram files (so the store counts as finalized and is verified on open)."""
    from .dual import GRAM_FILES, finalize_gram

    kernel = finalize_gram(store)
    checksums = {**store.file_checksums(), **{name: file_sha256(store.path / name) for name in GRAM_FILES}}
    atomic_write_json(store.path / "kernel.json", {"N": store.N, "d": store.d, "kernel": "gram",
                                                   "trace": float(kernel.eigenvalues.clamp(min=0).sum()),
                                                   "format": KERNEL_FORMAT, "checksums": checksums})
    log.info("finalized %s with the N x N Gram kernel (d = %d > %d)", store.path, store.d, PRIMAL_MAX_DIM)
    return kernel


def _refuse_gram(store: FeatureStore, record: dict) -> None:
    if record.get("kernel") == "gram":
        raise SettingsError(f"Store {store.path} holds unprojected features (d = {store.d} > {PRIMAL_MAX_DIM}): its "
                            "kernel is the N x N Gram matrix, not Phi^T Phi; score it with the exact estimator "
                            "(LDS method dual@<name>, attribution.dual.gram_scores), or featurize with a projection")


def load_kernel(store: FeatureStore) -> KernelEigen:
    """The kernel saved by :func:`finalize`: sizes and (when recorded) checksums checked, eigenvalues finite."""
    record = store.kernel_record()
    if record is None:
        raise FileNotFoundError(f"Expected a finalized `store` at {store.path}; call finalize(store) first")
    _refuse_gram(store, record)
    shapes = {"kernel_eigenvalues.npy": (store.d,), "kernel_eigenvectors.npy": (store.d, store.d)}
    for name, shape in shapes.items():
        check_npy_file(store.path / name, shape, np.float64, f"the store's width d = {store.d}")
        if name in record.get("checksums", {}):
            check_file_sha256(store.path / name, record["checksums"][name], str(store.path / "kernel.json"))
    s = torch.from_numpy(np.load(store.path / "kernel_eigenvalues.npy"))
    U = torch.from_numpy(np.load(store.path / "kernel_eigenvectors.npy"))
    require_finite(s, "kernel eigenvalues", f"in {store.path}")
    return KernelEigen(s, U)


class KernelSpectrum(NamedTuple):
    """The eigenvalues ``(d,)`` float64 of ``Phi^T Phi`` (what :func:`relative_lambda` reads)."""

    eigenvalues: Tensor


def load_spectrum(store: FeatureStore) -> KernelSpectrum:
    """The eigenvalues saved by :func:`finalize` alone (size and, when recorded, checksum checked; finite):
    all that a relative lambda needs, without the ``d x d`` eigenvectors."""
    record = store.kernel_record()
    if record is None:
        raise FileNotFoundError(f"Expected a finalized `store` at {store.path}; call finalize(store) first")
    _refuse_gram(store, record)
    name = "kernel_eigenvalues.npy"
    check_npy_file(store.path / name, (store.d,), np.float64, f"the store's width d = {store.d}")
    if name in record.get("checksums", {}):
        check_file_sha256(store.path / name, record["checksums"][name], str(store.path / "kernel.json"))
    s = torch.from_numpy(np.load(store.path / name))
    require_finite(s, "kernel eigenvalues", f"in {store.path}")
    return KernelSpectrum(s)


# ----------------------------------------------------------------------------- the members' kernel
def member_kernel_files(members_hash: str) -> tuple[str, str, str]:
    """``(eigenvalues, eigenvectors, record)`` file names of the members' kernel keyed by ``members_hash``."""
    stem = f"kernel_members_{members_hash}"
    return f"{stem}_eigenvalues.npy", f"{stem}_eigenvectors.npy", f"{stem}.json"


def _features_checksums(store: FeatureStore) -> dict[str, str]:
    """The sha256 of the store's array files (features, done flags, weights), as ``kernel.json`` records them."""
    names = {name for name, _, _ in store._layout()}
    recorded = {k: v for k, v in ((store.kernel_record() or {}).get("checksums") or {}).items() if k in names}
    return recorded if set(recorded) == names else store.file_checksums()


def _member_rows(member_rows, N: int) -> Tensor:
    rows = torch.as_tensor(np.asarray(member_rows), dtype=torch.long).reshape(-1)
    if not rows.numel() or int(rows.min()) < 0 or int(rows.max()) >= N or rows.unique().numel() != rows.numel():
        raise ValueError(f"Expected `member_rows` to be distinct indices in [0, {N}) (at least one), but got "
                         f"{rows.numel()} values")
    return rows


def finalize_members(store: FeatureStore, member_rows, members_hash: str, folder=None,
                     block_rows: int = 8192) -> KernelEigen:
    """The primal kernel of the members only, ``K_M = Phi_M^T Phi_M`` (d x d, float64 over row chunks, the other
    rows skipped), eigendecomposed and saved like :func:`finalize`'s, under names keyed by ``members_hash``
    (:func:`member_kernel_files`) in ``folder`` (default: the store's own), atomically; the record, written last,
    holds N, d, the number of members, their hash, the trace, the checksums of the store's features it was
    formed from (a kernel of other features is never read) and of its own two files.
    """
    if not store.is_complete:
        raise ValueError(f"Expected a complete `store`, but {len(store.missing_rows())} of {store.N} rows are missing")
    rows = _member_rows(member_rows, store.N)
    inside = torch.zeros(store.N, dtype=torch.bool)
    inside[rows] = True
    K = torch.zeros(store.d, store.d, dtype=torch.float64)
    for start, stop in store.row_blocks(block_rows):
        keep = inside[start:stop]
        if bool(keep.any()):
            block = store.read(start, stop, torch.float64)[keep]
            require_finite(block, "features", f"in store {store.path}", rows=torch.arange(start, stop)[keep])
            K.addmm_(block.T, block)
    s, U = torch.linalg.eigh(K)
    require_finite(s, "members' kernel eigenvalues", f"of store {store.path}")
    folder = Path(folder or store.path)
    folder.mkdir(parents=True, exist_ok=True)
    values, vectors, record = member_kernel_files(members_hash)
    atomic_save_npy(folder / vectors, U.numpy())
    atomic_save_npy(folder / values, s.numpy())
    atomic_write_json(folder / record, {
        "N": store.N, "d": store.d, "members": int(rows.numel()), "members_hash": members_hash,
        "trace": float(K.trace()), "format": KERNEL_FORMAT, "store": str(store.path),
        "features_checksums": _features_checksums(store),
        "checksums": {name: file_sha256(folder / name) for name in (values, vectors)}})
    log.info("members' kernel of %s (%d of %d rows, hash %s): eigenvalues in [%.3e, %.3e]", store.path,
             rows.numel(), store.N, members_hash, float(s.min()), float(s.max()))
    return KernelEigen(s, U)


def _member_record(store: FeatureStore, members_hash: str, folder, members: Optional[int] = None) -> Optional[dict]:
    """The record of the saved members' kernel; None when there is none or it was formed from other features."""
    path = Path(folder or store.path) / member_kernel_files(members_hash)[2]
    if not path.exists():
        return None
    record = read_json(path, "members' kernel record")
    expected = {"N": store.N, "d": store.d, "members_hash": members_hash, "format": KERNEL_FORMAT}
    if members is not None:
        expected["members"] = members
    differ = {k: record.get(k) for k, v in expected.items() if record.get(k) != v}
    if differ or not isinstance(record.get("checksums"), dict):
        raise CorruptFileError(f"Expected {path} to record the members' kernel of store {store.path} ({expected}), "
                               f"but it records {differ or 'no checksums'}; delete it (it is formed again)")
    return record if record.get("features_checksums") == _features_checksums(store) else None


def load_member_kernel(store: FeatureStore, members_hash: str, folder=None,
                       eigenvectors: bool = True) -> Union[KernelEigen, KernelSpectrum]:
    """The members' kernel saved by :func:`finalize_members` for these features: sizes and checksums checked,
    eigenvalues finite; only the eigenvalues (a :class:`KernelSpectrum`) unless ``eigenvectors``."""
    record = _member_record(store, members_hash, folder)
    folder = Path(folder or store.path)
    if record is None:
        raise FileNotFoundError(f"Expected the members' kernel (hash {members_hash}) of the current features of "
                                f"store {store.path} in {folder}; form it with finalize_members")
    values, vectors, name = member_kernel_files(members_hash)
    shapes = {values: (store.d,), **({vectors: (store.d, store.d)} if eigenvectors else {})}
    for file, shape in shapes.items():
        check_npy_file(folder / file, shape, np.float64, f"the store's width d = {store.d}")
        check_file_sha256(folder / file, record["checksums"].get(file, ""), str(folder / name),
                          fix=f"delete {folder / name} (the members' kernel is formed again)")
    s = torch.from_numpy(np.load(folder / values))
    require_finite(s, "members' kernel eigenvalues", f"in {folder / values}")
    return KernelEigen(s, torch.from_numpy(np.load(folder / vectors))) if eigenvectors else KernelSpectrum(s)


def member_kernel(store: FeatureStore, member_rows, members_hash: str, folder=None, eigenvectors: bool = True,
                  block_rows: int = 8192) -> Union[KernelEigen, KernelSpectrum]:
    """The members' kernel of ``store``: loaded (checked) when one of these features and members is saved in
    ``folder``, else formed and saved (:func:`finalize_members`)."""
    if _member_record(store, members_hash, folder, members=int(np.asarray(member_rows).size)) is None:
        kernel = finalize_members(store, member_rows, members_hash, folder, block_rows)
        return kernel if eigenvectors else KernelSpectrum(kernel.eigenvalues)
    return load_member_kernel(store, members_hash, folder, eigenvectors)


def _weight_sources(stores, train_weights: Weights) -> list:
    """Per store, ``(start, stop) -> (rows,) float64 weights or None``: given tensors are sliced, the stores'
    own weights are read block by block (never all N at once)."""
    if train_weights is None:
        return [(lambda a, b, s=s: s.weights(a, b)) if s.has_weights else (lambda a, b: None) for s in stores]
    if isinstance(train_weights, Tensor):
        train_weights = [train_weights] * len(stores)
    if len(train_weights) != len(stores):
        raise ValueError(f"Expected `train_weights` for {len(stores)} stores, but got {len(train_weights)}")
    for w, s in zip(train_weights, stores):
        if w is not None and tuple(w.shape) != (s.N,):
            raise ValueError(f"Expected `train_weights` of shape ({s.N},), but got {tuple(w.shape)}")
    held = [None if w is None else w.detach().to(torch.float64).cpu() for w in train_weights]
    return [(lambda a, b, w=w: None if w is None else w[a:b]) for w in held]


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


def relative_lambda(kernel: Union[KernelEigen, KernelSpectrum], lam: float) -> float:
    """An absolute ridge from one relative to the kernel's scale: ``lam * mean eigenvalue`` (= trace / d)."""
    return float(lam) * float(kernel.eigenvalues.clamp(min=0).mean())


def solve_targets(store: FeatureStore, target_grads: Tensor, lam, kernel: Optional[KernelEigen] = None) -> Tensor:
    """``(K_m + lam I)^-1 G^T``: the ``(d, B)`` float64 solve of one checkpoint, on ``target_grads``' device.

    The store's eigenvectors are loaded (checked) for this call only, unless ``kernel`` is given: a caller that
    solves checkpoint after checkpoint keeps one ``d x d`` matrix resident at a time. ``lam``: one ridge, or one
    per column ``(B,)``.
    """
    _checks.tensor_ndim("target_grads", target_grads, 2, " (B, d)")
    if target_grads.shape[1] != store.d:
        raise ValueError(f"Expected target gradients of shape (B, {store.d}) for store {store.path}, but got "
                         f"{tuple(target_grads.shape)}")
    kernel = kernel or load_kernel(store)
    device = target_grads.device
    if device.type != "cpu":
        kernel = KernelEigen(kernel.eigenvalues.to(device), kernel.eigenvectors.to(device))
    return kernel.solve(target_grads, lam)


# ----------------------------------------------------------------------------- the one pass
_PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
_BLOCK_BYTES = 32 << 20  # ~32 MiB of compute-dtype features per block


def default_block_rows(d: int) -> int:
    """Rows per streamed block: about 32 MiB of float32 features (256 to 65536 rows)."""
    return int(min(65536, max(256, _BLOCK_BYTES // (4 * d))))


def default_device() -> torch.device:
    """The accelerator when there is one (CUDA), else the CPU: where the big products run."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _compute_dtype(precision: str) -> torch.dtype:
    if precision not in _PRECISIONS:
        raise SettingsError(f"Expected `precision` to be 'float32' or 'float64', but got {precision!r}")
    return _PRECISIONS[precision]


def _read_ahead(stores, ranges, convert: Optional[torch.dtype]) -> Iterator[tuple[int, int, int, Tensor]]:
    """``(start, stop, m, block)`` for every row range and store in turn, each store's rows read once, in order.

    A reader thread fetches the next block (``FeatureStore.read`` into one of two reused buffers, converted to
    ``convert`` when given) while the caller computes on the current one.
    """
    jobs = [(a, b, m) for a, b in ranges for m in range(len(stores))]
    raw_buffers: list = [None, None]
    out_buffers: list = [None, None]

    def load(i: int) -> Tensor:
        a, b, m = jobs[i]
        store, k = stores[m], i % 2
        width, stored = store.d, np.dtype(store.meta["dtype"])
        if raw_buffers[k] is None or raw_buffers[k].shape[1] != width or raw_buffers[k].dtype != stored \
                or raw_buffers[k].shape[0] < b - a:
            raw_buffers[k] = np.empty((max(b - a, ranges[0][1] - ranges[0][0]), width), dtype=stored)
        raw = store.read(a, b, dtype=None, out=raw_buffers[k])
        if convert is None or raw.dtype == convert:  # the caller is done with buffer k before it is refilled
            return raw
        if out_buffers[k] is None or out_buffers[k].shape[1] != width or out_buffers[k].shape[0] < b - a:
            out_buffers[k] = torch.empty(raw_buffers[k].shape, dtype=convert)
        return out_buffers[k][: b - a].copy_(raw)

    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="score-read") as pool:
        pending = pool.submit(load, 0)
        for i, (a, b, m) in enumerate(jobs):
            block = pending.result()
            if i + 1 < len(jobs):
                pending = pool.submit(load, i + 1)
            yield a, b, m, block


def iter_pass_blocks(stores: Sequence[FeatureStore], solved: Sequence[Tensor], train_weights: Weights = None,
                     block_rows: Optional[int] = None, device=None, precision: str = "float32",
                     stats: Optional[dict] = None) -> Iterator[tuple[int, int, Tensor]]:
    r"""One pass over the stores: yields ``(start, stop, scores (rows, C))`` with
    ``scores = 1/M sum_m W_m Phi_m[start:stop] V_m`` for precomputed solves ``V_m (d_m, C)``.

    Row blocks in order; inside a block the M stores in turn, so each store is read exactly once, sequentially,
    and only one block of one store (plus the one being read ahead) is resident besides the solves. The products
    run on ``device`` (default CPU) in ``precision`` ("float32", the fast path; "float64", the reference).
    ``stats`` (a dict) gets ``bytes_read`` and ``blocks`` added.
    """
    if not stores or len(solved) != len(stores):
        raise ValueError(f"Expected one solve per store ({len(stores)}), but got {len(solved)}")
    if len({s.N for s in stores}) != 1:
        raise ValueError(f"Expected stores with the same N, but got {[s.N for s in stores]}")
    for store, V in zip(stores, solved):
        if V.ndim != 2 or V.shape[0] != store.d or V.shape[1] != solved[0].shape[1]:
            raise ValueError(f"Expected solves of shape ({store.d}, {solved[0].shape[1]}) for store {store.path}, "
                             f"but got {tuple(V.shape)}")
    dtype, device = _compute_dtype(precision), torch.device(device or "cpu")
    V = [v.to(device=device, dtype=dtype) for v in solved]
    weights = _weight_sources(stores, train_weights)
    ranges = list(stores[0].row_blocks(block_rows or default_block_rows(max(s.d for s in stores))))
    stats = {} if stats is None else stats
    stats.setdefault("bytes_read", 0)
    stats.setdefault("blocks", 0)
    acc = None
    for start, stop, m, block in _read_ahead(stores, ranges, dtype if device.type == "cpu" else None):
        stats["bytes_read"] += (stop - start) * stores[m].d * np.dtype(stores[m].meta["dtype"]).itemsize
        stats["blocks"] += 1
        phi = block.to(device, non_blocking=True).to(dtype)
        if m == 0:
            acc = torch.zeros(stop - start, V[0].shape[1], dtype=dtype, device=device)
        w = weights[m](start, stop)
        if w is None:
            acc.addmm_(phi, V[m])
        else:
            acc.add_((phi @ V[m]) * w.to(device=device, dtype=dtype).unsqueeze(1))
        if m == len(stores) - 1:
            yield start, stop, acc.div_(len(stores))


class ScoreColumns:
    """Scores ``(N, C)`` float32 on disk, column after column, in an unlinked temporary file.

    Written by row blocks during the pass (:meth:`write_block`), read back one column at a time (:meth:`column`:
    one pair's ``(N,)`` scores), so resident memory stays one block or one column whatever N and C. The file
    has no name and vanishes on :meth:`close` or when the process ends (a killed run leaves nothing behind).
    """

    def __init__(self, N: int, C: int, folder=None) -> None:
        self.N, self.C = _checks.positive_int("N", N), _checks.positive_int("C", C)
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder)
        self._file.truncate(self.N * self.C * 4)

    def write_block(self, start: int, block: Tensor) -> None:
        """Rows ``[start, start + rows)`` of every column from ``block (rows, C)``."""
        columns = block.detach().to("cpu", torch.float32).T.contiguous().numpy()
        fd = self._file.fileno()
        for j in range(self.C):
            _pwrite_all(fd, columns[j], (j * self.N + start) * 4)

    def column(self, j: int) -> Tensor:
        """``(N,)`` float32 scores of column ``j``."""
        if not 0 <= j < self.C:
            raise IndexError(f"Expected a column in [0, {self.C}), but got {j}")
        out = np.empty(self.N, dtype=np.float32)
        _pread_all(self._file.fileno(), out, j * self.N * 4)
        return torch.from_numpy(out)

    def columns(self, indices: Sequence[int]) -> Tensor:
        """``(N, len(indices))`` float32: the given columns side by side."""
        return torch.stack([self.column(int(j)) for j in indices], dim=1) if len(indices) else \
            torch.empty(self.N, 0)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ScoreColumns":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
    view = memoryview(array).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _pread_all(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    while view.nbytes:
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise CorruptFileError(f"Expected {view.nbytes} more bytes of scores at offset {offset} of a scratch file, "
                                   "but it ended early")
        view, offset = view[got:], offset + got


@dataclass
class ScorePass:
    """What one pass produced (each piece only when asked for).

    Attributes:
        columns: :class:`ScoreColumns` ``(N, C)`` on disk (``columns=True``); close it when done.
        dense: ``(N, C)`` in memory (``dense=<dtype>``).
        topk: streaming :class:`TopK` per column (``topk=k``).
        predictions: ``(J, C)`` float64 ``masks @ scores`` (``masks=(J, N)``): LDS predictions without N x C.
        bytes_read: feature bytes read (each store once); blocks: (row block, store) reads.
        seconds: wall time of the pass.
    """

    columns: Optional[ScoreColumns] = None
    dense: Optional[Tensor] = None
    topk: Optional["TopK"] = None
    predictions: Optional[Tensor] = None
    bytes_read: int = 0
    blocks: int = 0
    seconds: float = 0.0


def score_pass(stores: Sequence[FeatureStore], solved: Sequence[Tensor], train_weights: Weights = None, *,
               block_rows: Optional[int] = None, device=None, precision: str = "float32", columns: bool = False,
               scratch_dir=None, dense: Optional[torch.dtype] = None, topk: Optional[int] = None,
               masks: Optional[Tensor] = None, what: str = "scores") -> ScorePass:
    """Stream the stores once (:func:`iter_pass_blocks`) and keep only what is asked for: the scores on disk
    (``columns``, in ``scratch_dir``), in memory (``dense``), their top-k (``topk``) and/or subset-mask
    predictions (``masks (J, N)`` bool). Non-finite scores are refused naming ``what`` and the examples."""
    N, C = stores[0].N, solved[0].shape[1] if solved else 0
    if topk is not None:
        _checks.positive_int("topk", topk)
    if masks is not None and (masks.ndim != 2 or masks.shape[1] != N):
        raise ValueError(f"Expected `masks` of shape (J, {N}), but got {tuple(masks.shape)}")
    result = ScorePass(columns=ScoreColumns(N, C, scratch_dir) if columns else None,
                       dense=None if dense is None else torch.empty(N, C, dtype=dense))
    stats, top, began = {}, [None] * 4, time.perf_counter()
    try:
        for start, stop, block in iter_pass_blocks(stores, solved, train_weights, block_rows, device, precision, stats):
            require_finite(block, what, rows=torch.arange(start, stop), row_name="examples")
            if result.columns is not None:
                result.columns.write_block(start, block)
            if result.dense is not None:
                result.dense[start:stop] = block.to("cpu", dense)
            if topk is not None:
                top[0], top[1] = _merge(top[0], top[1], block, start, topk, largest=True)
                top[2], top[3] = _merge(top[2], top[3], block, start, topk, largest=False)
            if masks is not None:
                part = masks[:, start:stop].to(device=block.device, dtype=torch.float64) @ block.to(torch.float64)
                result.predictions = part if result.predictions is None else result.predictions.add_(part)
    except BaseException:
        if result.columns is not None:
            result.columns.close()
        raise
    if topk is not None:
        result.topk = TopK(*(t.cpu() for t in top))
    if result.predictions is not None:
        result.predictions = result.predictions.cpu()
    result.bytes_read, result.blocks = stats["bytes_read"], stats["blocks"]
    result.seconds = time.perf_counter() - began
    return result


# ----------------------------------------------------------------------------- the classic entry points
def _solve_all(stores, target_grads_per_store, lam, kernels=None) -> list[Tensor]:
    """Per store, the ``(d, B)`` float64 solve; eigenvectors loaded one store at a time (unless given)."""
    targets = _check_targets(stores, target_grads_per_store)
    lams = _per_store_lambdas(lam, len(stores))
    return [(kernels[m] if kernels else load_kernel(store)).solve(G, lam_m)
            for m, (store, G, lam_m) in enumerate(zip(stores, targets, lams))]


def iter_score_blocks(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], lam: float,
                      train_weights: Weights = None, block_rows: int = 8192,
                      kernels: Optional[Sequence[KernelEigen]] = None, precision: str = "float64",
                      device=None) -> Iterator[tuple[int, int, Tensor]]:
    """Stream the checkpoint-averaged scores: yields ``(start, stop, scores (rows, B))`` on the CPU, float64 by
    default (``precision="float32"`` for the fast path, on ``device``), from one pass over the stores.

    ``lam`` is one ridge for every store or a sequence with one per store (see :func:`relative_lambda`).
    """
    _weight_sources(stores, train_weights)  # refuse bad weights before any solve
    solved = _solve_all(stores, target_grads_per_store, lam, kernels)
    for start, stop, block in iter_pass_blocks(stores, solved, train_weights, block_rows, device, precision):
        yield start, stop, block.cpu()


def score(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], lam: float,
          train_weights: Weights = None, block_rows: int = 8192, dtype: torch.dtype = torch.float32,
          precision: str = "float64", device=None) -> Tensor:
    """``(N, B)`` scores ``1/M sum_m W_m Phi_m (Phi_m^T Phi_m + lam I)^-1 G_m^T`` (dense: N x B in memory).

    Args:
        stores: M finalized stores (one per checkpoint), same N.
        target_grads_per_store: M tensors ``(B, d_m)``, projected with each store's projector.
        lam: ridge ``lambda >= 0`` (0 needs a non-singular kernel).
        train_weights: None (use the stores' weights if any), one ``(N,)`` tensor, or one per store.
        block_rows: rows of ``Phi`` per block.
        dtype: of the result; precision: of the products ("float64", the reference, or "float32"), on ``device``.
    """
    _weight_sources(stores, train_weights)
    solved = _solve_all(stores, target_grads_per_store, lam)
    return score_pass(stores, solved, train_weights, block_rows=block_rows, device=device, precision=precision,
                      dense=dtype).dense


class TopK(NamedTuple):
    """Top-k per target: ``*_values (k, B)`` and ``*_indices (k, B)``; ``positive`` = largest scores."""

    positive_values: Tensor
    positive_indices: Tensor
    negative_values: Tensor
    negative_indices: Tensor


def _merge(best_v, best_i, v, start, k, largest):
    v_all = v if best_v is None else torch.cat([best_v, v])
    i_all = torch.arange(start, start + v.shape[0], device=v.device).unsqueeze(1).expand_as(v)
    i_all = i_all if best_i is None else torch.cat([best_i, i_all])
    top_v, pos = torch.topk(v_all, min(k, v_all.shape[0]), dim=0, largest=largest)
    return top_v, torch.gather(i_all, 0, pos)


def topk_scores(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], lam: float, k: int,
                train_weights: Weights = None, block_rows: int = 8192, precision: str = "float64",
                device=None) -> TopK:
    """Streaming top-k positive (largest) and negative (smallest) scores per target, without N x B."""
    _checks.positive_int("k", k)
    _weight_sources(stores, train_weights)
    solved = _solve_all(stores, target_grads_per_store, lam)
    return score_pass(stores, solved, train_weights, block_rows=block_rows, device=device, precision=precision,
                      topk=k).topk


def sweep_solves(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], lams: Sequence[float],
                 relative: bool = False, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Per store, the solves of every ridge side by side: ``(d, L * B)``, lambda-major (column ``l * B + b``),
    cast to ``dtype`` as each is made (float32 for a float32 pass: half the memory).

    ``lams`` are absolute ridges, or with ``relative=True`` multiples of each store's mean eigenvalue. One
    eigenvector matrix is resident at a time; ``U^T G^T`` is formed once per store for all the ridges.
    """
    targets = _check_targets(stores, target_grads_per_store)
    if not len(lams):
        raise SettingsError("Expected `lams` to hold at least one ridge, but got none")
    solved = []
    for store, G in zip(stores, targets):
        kernel = load_kernel(store)
        per = [relative_lambda(kernel, lam) if relative else lam for lam in lams]
        for lam in per:
            _check_lambda(kernel, lam)
        U, s = kernel.eigenvectors, kernel.eigenvalues.unsqueeze(1)
        rotated = U.T @ G.T                                                    # (d, B)
        solved.append((U @ torch.cat([rotated / (s + lam) for lam in per], dim=1)).to(dtype))
        del kernel, U
    return solved


def lambda_sweep(stores: Sequence[FeatureStore], target_grads_per_store: Sequence[Tensor], lams: Sequence[float],
                 train_weights: Weights = None, block_rows: int = 8192, dtype: torch.dtype = torch.float32,
                 relative: bool = False, precision: str = "float64", device=None) -> Tensor:
    """Scores for several ridge values from the one stored eigendecomposition: ``(L, N, B)`` (dense), from ONE
    pass over the stores (the solves of every ridge side by side, :func:`sweep_solves`).

    ``lams`` are absolute ridges, or with ``relative=True`` multiples of each store's mean eigenvalue
    (:func:`relative_lambda`), one value for every store.
    """
    _weight_sources(stores, train_weights)
    solved = sweep_solves(stores, target_grads_per_store, lams, relative)
    dense = score_pass(stores, solved, train_weights, block_rows=block_rows, device=device, precision=precision,
                       dense=dtype).dense
    N, B = dense.shape[0], dense.shape[1] // len(lams)
    return dense.reshape(N, len(lams), B).permute(1, 0, 2).contiguous()


def dense_scores_float64(Phi: Tensor, G: Tensor, lam: float, train_weights: Optional[Tensor] = None) -> Tensor:
    """Reference: ``diag(w) Phi (Phi^T Phi + lam I)^-1 G^T`` with a dense float64 solve. ``(N, B)``."""
    Phi, G = Phi.to(torch.float64), G.to(torch.float64)
    A = Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=torch.float64)
    out = Phi @ torch.linalg.solve(A, G.T)
    return out if train_weights is None else out * train_weights.to(torch.float64).unsqueeze(1)
