"""Gram (dual) scores: equal to the dense primal formula in float64, for all rows and for a members-only kernel
(non-members get the predicted effect of adding them); ridge independent of the feature dimension."""
import pytest
import torch

from attribution import FeatureStore
from attribution.dual import finalize_gram, gram_scores, gram_scores_sweep, load_gram
from attribution.scoring import dense_scores_float64

F64 = torch.float64


def _store(path, Phi):
    store = FeatureStore.open(path, {"N": Phi.shape[0], "d": Phi.shape[1], "dtype": "float32"})
    store.write(torch.arange(Phi.shape[0]), Phi)
    return store


def _primal_members(Phi, G, members, lam):
    """phi_i^T (Phi_M^T Phi_M + lam I)^-1 g for every row i: the slow, obvious reference."""
    Phi, G = Phi.to(F64), G.to(F64)
    PM = Phi[members]
    A = PM.T @ PM + lam * torch.eye(Phi.shape[1], dtype=F64)
    return Phi @ torch.linalg.solve(A, G.T)


@pytest.mark.parametrize("N,d", [(40, 300), (60, 12)])   # d >> N (unprojected) and d < N
def test_gram_scores_equal_the_dense_primal_formula(tmp_path, N, d):
    g = torch.Generator().manual_seed(N + d)
    Phis = [torch.randn(N, d, generator=g) for _ in range(2)]
    Gs = [torch.randn(5, d, generator=g) for _ in range(2)]
    stores = [_store(tmp_path / f"m{m}", P) for m, P in enumerate(Phis)]
    read = [s.read(0, N, F64) for s in stores]   # what the store holds (float32 rounding of Phi)
    for store in stores:
        finalize_gram(store, block_rows=7)
    got = gram_scores(stores, Gs, relative_lam=0.3, block_rows=9)
    kernels = [load_gram(s) for s in stores]
    lams = [k.ridge(0.3) for k in kernels]
    want = sum(dense_scores_float64(P, G, lam) for P, G, lam in zip(read, Gs, lams)) / 2
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * scale)
    assert lams[0] == pytest.approx(0.3 * float((read[0] ** 2).sum()) / N, rel=1e-12)


def test_members_only_kernel_and_non_members_as_added(tmp_path):
    N, d = 50, 200
    g = torch.Generator().manual_seed(1)
    Phi, G = torch.randn(N, d, generator=g), torch.randn(3, d, generator=g)
    members = torch.randperm(N, generator=g)[:23]
    store = _store(tmp_path / "s", Phi)
    finalize_gram(store, members=members, block_rows=16)
    kernel = load_gram(store, members=members)
    got = gram_scores([store], [G], relative_lam=0.05, kernels=[kernel])
    want = _primal_members(store.read(0, N, F64), G, kernel.members, kernel.ridge(0.05))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    full = gram_scores([store], [G], relative_lam=0.05, kernels=[kernel._replace(
        members=torch.arange(N), eigenvalues=torch.linalg.eigvalsh(kernel.gram),
        eigenvectors=torch.linalg.eigh(kernel.gram).eigenvectors)])
    assert not torch.allclose(full, got)   # the members-only kernel is a different estimator
    with pytest.raises(ValueError, match="members"):
        load_gram(store)                    # made for other members: refused


def test_ridge_is_independent_of_a_projection(tmp_path):
    """trace(K_MM)/|M| is preserved in expectation by a JL projection, unlike trace/d."""
    N, p = 30, 4000
    g = torch.Generator().manual_seed(2)
    Phi = torch.randn(N, p, generator=g, dtype=F64)
    P = torch.randn(p, 512, generator=g, dtype=F64) / 512 ** 0.5
    full = _store(tmp_path / "full", Phi)
    proj = _store(tmp_path / "proj", Phi @ P)
    lam_full = finalize_gram(full).ridge(1.0)
    lam_proj = finalize_gram(proj).ridge(1.0)
    assert lam_proj == pytest.approx(lam_full, rel=0.1)


def test_bad_members_are_refused(tmp_path):
    store = _store(tmp_path / "s", torch.randn(5, 3))
    for bad in ([], [0, 0], [5], [-1]):
        with pytest.raises(ValueError, match="members"):
            finalize_gram(store, members=bad)
    with pytest.raises(ValueError, match="relative_lam"):
        finalize_gram(store).ridge(0.0)


def test_sweep_equals_one_ridge_at_a_time(tmp_path):
    N, d = 25, 90
    g = torch.Generator().manual_seed(3)
    stores = [_store(tmp_path / f"m{m}", torch.randn(N, d, generator=g)) for m in range(2)]
    Gs = [torch.randn(4, d, generator=g) for _ in stores]
    for store in stores:
        finalize_gram(store)
    lams = [1e-3, 0.1, 10.0]
    swept = gram_scores_sweep(stores, Gs, lams)
    assert swept.shape == (3, N, 4)
    for i, lam in enumerate(lams):
        torch.testing.assert_close(swept[i], gram_scores(stores, Gs, lam), rtol=0, atol=0)
    with pytest.raises(ValueError, match="relative_lams"):
        gram_scores_sweep(stores, Gs, [])


def test_a_store_too_wide_for_the_primal_kernel_gets_the_gram_kernel(tmp_path, monkeypatch):
    """finalize of an unprojected store forms K = Phi Phi^T (N x N), never d x d; primal scoring refuses it."""
    import attribution.scoring as scoring
    from attribution.errors import SettingsError

    monkeypatch.setattr(scoring, "PRIMAL_MAX_DIM", 64)
    N, d = 12, 100
    Phi = torch.randn(N, d, generator=torch.Generator().manual_seed(4))
    store = _store(tmp_path / "wide", Phi)
    kernel = scoring.finalize(store)
    assert store.is_finalized and not (store.path / "kernel_eigenvectors.npy").exists()
    read = store.read(0, N, F64)
    torch.testing.assert_close(kernel.gram, read @ read.T, rtol=1e-12, atol=0)
    store.verify()                                        # the Gram files' checksums are recorded
    for load in (scoring.load_kernel, scoring.load_spectrum):
        with pytest.raises(SettingsError, match="unprojected features .* dual@"):
            load(store)
    torch.testing.assert_close(gram_scores([store], [Phi[:2]], 0.1), gram_scores([store], [Phi[:2]], 0.1,
                                                                                  kernels=[load_gram(store)]))
