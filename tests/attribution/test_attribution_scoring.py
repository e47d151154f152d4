"""Scoring: streamed == dense float64, lambda sweep, top-k, exact least-squares ground truth."""
import pytest
import torch
from scipy.stats import spearmanr

import attribution.scoring as scoring
from attribution import FeatureStore, dense_scores_float64, finalize, lambda_sweep, relative_lambda, score, topk_scores
from attribution.errors import CorruptFileError
from attribution.masks import mask_hash
from attribution.scoring import (load_kernel, load_member_kernel, member_kernel, member_kernel_files, score_pass,
                                 solve_targets)


F64 = torch.float64


def _store(path, Phi, weights=None, dtype="float32"):
    meta = {"N": Phi.shape[0], "d": Phi.shape[1], "dtype": dtype, "with_weights": weights is not None}
    store = FeatureStore.open(path, meta)
    store.write(torch.arange(Phi.shape[0]), Phi, weights)
    finalize(store, block_rows=37)
    return store


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    Phis = [torch.randn(500, 16, generator=g) for _ in range(2)]
    Gs = [torch.randn(6, 16, generator=g) for _ in range(2)]
    root = tmp_path_factory.mktemp("scoring")
    stores = [_store(root / f"ckpt{m}", Phi) for m, Phi in enumerate(Phis)]
    return stores, Phis, Gs


def _dense_mean(Phis, Gs, lam, weights=None):
    return sum(dense_scores_float64(P, G, lam, weights) for P, G in zip(Phis, Gs)) / len(Phis)


@pytest.mark.parametrize("lam", [0.0, 0.5, 100.0])
def test_streamed_scores_equal_dense_float64(problem, lam):
    stores, Phis, Gs = problem
    got = score(stores, Gs, lam, block_rows=64, dtype=F64)
    assert got.shape == (500, 6)
    torch.testing.assert_close(got, _dense_mean(Phis, Gs, lam), rtol=1e-9, atol=1e-12)


def test_train_weights_multiply_rows_per_checkpoint(problem):
    stores, Phis, Gs = problem
    w = [torch.linspace(-1, 1, 500), torch.linspace(2, 3, 500)]
    got = score(stores, Gs, 0.1, train_weights=w, dtype=F64)
    expected = sum(dense_scores_float64(P, G, 0.1, wi) for P, G, wi in zip(Phis, Gs, w)) / 2
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_lambda_sweep_equals_direct_solves(problem):
    stores, Phis, Gs = problem
    lams = [0.0, 1e-3, 1.0, 1e3]
    sweep = lambda_sweep(stores, Gs, lams, dtype=F64)
    assert sweep.shape == (4, 500, 6)
    for lam, s in zip(lams, sweep):
        torch.testing.assert_close(s, _dense_mean(Phis, Gs, lam), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(sweep[0], sweep[3])


def test_topk_equals_torch_topk_on_dense(problem):
    stores, Phis, Gs = problem
    full = _dense_mean(Phis, Gs, 0.5)
    top = topk_scores(stores, Gs, 0.5, k=7, block_rows=50)
    pv, pi = torch.topk(full, 7, dim=0)
    nv, ni = torch.topk(full, 7, dim=0, largest=False)
    assert torch.equal(top.positive_indices, pi) and torch.equal(top.negative_indices, ni)
    torch.testing.assert_close(top.positive_values, pv, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(top.negative_values, nv, rtol=1e-9, atol=1e-12)


def test_singular_kernel_needs_ridge(tmp_path):
    Phi = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    Phi[:, 7] = Phi[:, 6]  # rank 7
    store = _store(tmp_path, Phi)
    G = torch.randn(2, 8)
    with pytest.raises(ValueError, match="`lam` = 0"):
        score([store], [G], 0.0)
    torch.testing.assert_close(score([store], [G], 1e-2, dtype=F64), dense_scores_float64(Phi, G, 1e-2))
    with pytest.raises(ValueError, match="`lam`"):
        score([store], [G], -1.0)
    with pytest.raises(ValueError, match="one target-gradient matrix per store"):
        score([store], [G, G], 1.0)


def test_finalize_refuses_incomplete_store(tmp_path):
    store = FeatureStore.open(tmp_path, {"N": 4, "d": 2, "dtype": "float32"})
    store.write(torch.tensor([0]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="3 of 4 rows are missing"):
        finalize(store)


# --------------------------------------------------------------------------- exact ground truth
@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(42)
    N, p = 2000, 5
    X = torch.randn(N, p, generator=g, dtype=F64)
    y = X @ torch.randn(p, generator=g, dtype=F64) + 0.5 * torch.randn(N, generator=g, dtype=F64)
    theta = torch.linalg.solve(X.T @ X, X.T @ y)
    e = y - X @ theta
    target = torch.randn(p, generator=g, dtype=F64)  # f(theta) = target^T theta, gradient g = target
    return X, y, theta, e, target


def _refit_without_each(X, y):
    """theta_{-i} for every i by actually re-solving the normal equations without example i."""
    XtX, Xty = X.T @ X, X.T @ y
    A = XtX.unsqueeze(0) - X.unsqueeze(2) * X.unsqueeze(1)      # (N, p, p)
    b = Xty.unsqueeze(0) - X * y.unsqueeze(1)                  # (N, p)
    return torch.linalg.solve(A, b)                            # (N, p)


def test_output_gradient_form_matches_exact_leave_one_out(tmp_path, regression):
    X, y, theta, e, target = regression
    features = torch.func.vmap(torch.func.grad(lambda th, x: x @ th), in_dims=(None, 0))(theta, X)  # = X
    Q = torch.func.vmap(torch.func.grad(lambda out, yi: 0.5 * (yi - out) ** 2))(X @ theta, y)     # = -e
    torch.testing.assert_close(Q, -e)
    store = _store(tmp_path, features.float(), weights=Q.float())
    tau = score([store], [target.unsqueeze(0).float()], 0.0, dtype=F64)[:, 0]
    exact = (_refit_without_each(X, y) - theta) @ target        # f(theta_{-i}) - f(theta*)
    h = ((X @ torch.linalg.inv(X.T @ X)) * X).sum(dim=1)
    assert float(h.max()) < 0.02                                # N >> p regime
    # float32 storage of the features limits agreement to ~1e-6 relative
    torch.testing.assert_close(tau / (1 - h), exact, rtol=1e-4, atol=1e-6 * float(exact.abs().max()))
    torch.testing.assert_close(tau, exact, rtol=0.03, atol=1e-4 * float(exact.abs().max()))
    assert spearmanr(tau, exact).statistic > 0.999
    # float64 reference path is exact up to rounding
    ref = dense_scores_float64(X, target.unsqueeze(0), 0.0, -e)[:, 0]
    torch.testing.assert_close(ref / (1 - h), exact, rtol=1e-8, atol=1e-12)


def test_loss_gradient_form_matches_its_closed_form(tmp_path, regression):
    X, y, theta, e, target = regression
    phi = torch.func.vmap(torch.func.grad(lambda th, x, yi: 0.5 * (yi - x @ th) ** 2), in_dims=(None, 0, 0))(theta, X, y)
    torch.testing.assert_close(phi, -e.unsqueeze(1) * X)
    store = _store(tmp_path, phi.float())
    tau = score([store], [target.unsqueeze(0).float()], 0.0, dtype=F64)[:, 0]
    closed = -e * (X @ torch.linalg.solve(X.T @ (e.unsqueeze(1) ** 2 * X), target))
    torch.testing.assert_close(tau, closed, rtol=1e-4, atol=1e-6 * float(closed.abs().max()))
    # a different estimator, but with homoscedastic noise it ranks like the exact LOO effect
    exact = (_refit_without_each(X, y) - theta) @ target
    assert spearmanr(tau, exact).statistic > 0.99  # measured ~0.998


def test_one_lambda_per_store_equals_separate_dense_solves(tmp_path):
    from attribution import FeatureStore, finalize, iter_score_blocks, load_kernel, relative_lambda
    from attribution.scoring import dense_scores_float64

    g = torch.Generator().manual_seed(3)
    Phis = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    Gs = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    stores = []
    for m, Phi in enumerate(Phis):
        store = FeatureStore.open(tmp_path / f"s{m}", {"N": 40, "d": 6, "dtype": "float32"})
        store.write(torch.arange(40), Phi.float())
        finalize(store)
        stores.append(store)
    lams = [relative_lambda(load_kernel(s), 0.1) for s in stores]
    assert lams[0] == pytest.approx(0.1 * float(torch.linalg.eigvalsh(stores[0].read(dtype=torch.float64).T
                                                                       @ stores[0].read(dtype=torch.float64)).mean()))
    got = torch.cat([b for _, _, b in iter_score_blocks(stores, [G.float() for G in Gs], lams, block_rows=7)])
    ref = sum(dense_scores_float64(s.read(dtype=torch.float64), G, lam) for s, G, lam in zip(stores, Gs, lams)) / 2
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="one per store"):
        next(iter_score_blocks(stores, Gs, [0.1]))


# --------------------------------------------------------------------------- the members' kernel
EPS64 = torch.finfo(F64).eps


def _members_problem(tmp_path, name="members", Phi=None):
    """A store of 300 rows (d = 12) and 140 members; returns ``(store, Phi float64 as stored, members, G)``."""
    g = torch.Generator().manual_seed(5)
    members = torch.randperm(300, generator=g)[:140].sort().values
    G = torch.randn(4, 12, generator=g, dtype=F64)
    Phi = torch.randn(300, 12, generator=g) if Phi is None else Phi
    store = _store(tmp_path / name, Phi)
    return store, store.read(dtype=F64), members, G


def _members_scores(store, members, G, relative_lam=0.1):
    h = mask_hash(members.numpy(), store.N)
    kernel = member_kernel(store, members, h, block_rows=37)
    lam = relative_lambda(kernel, relative_lam)
    return score_pass([store], [solve_targets(store, G, lam, kernel=kernel)], precision="float64",
                      dense=F64).dense, lam, h


def _members_bound(Phi, members, G, lam):
    """Dense float64 LU reference over the members' kernel, and the eigen-solve's rounding bound against it."""
    K_M, d = Phi[members].T @ Phi[members], Phi.shape[1]
    V = torch.linalg.solve(K_M + lam * torch.eye(d, dtype=F64), G.T)
    s = torch.linalg.eigvalsh(K_M)
    kappa = float((s.max() + lam) / (s.min() + lam))
    return Phi @ V, (EPS64 * (d + 3) + EPS64 * kappa * d ** 2) * (Phi.abs() @ V.abs()), K_M


def test_members_kernel_scores_equal_the_dense_float64_reference(tmp_path, monkeypatch):
    store, Phi, members, G = _members_problem(tmp_path)
    own = load_kernel(store)
    got, lam, h = _members_scores(store, members, G)
    ref, bound, K_M = _members_bound(Phi, members, G, lam)
    assert lam == pytest.approx(0.1 * float(K_M.trace()) / 12, rel=12 ** 2 * EPS64)  # the members' trace / d
    assert bool(((got - ref).abs() <= bound).all())  # every row: phi_i^T (K_M + lam I)^-1 g
    assert not torch.allclose(got, dense_scores_float64(Phi, G, lam), rtol=0.05)  # not the all-rows kernel
    values, vectors, record = member_kernel_files(h)
    assert all((store.path / f).is_file() for f in (values, vectors, record))
    assert torch.equal(load_kernel(store).eigenvectors, own.eigenvectors)  # the all-rows kernel is untouched
    monkeypatch.setattr(scoring, "finalize_members", lambda *a, **k: pytest.fail("formed again"))
    assert torch.equal(member_kernel(store, members, h).eigenvalues, member_kernel(store, members, h).eigenvalues)


def test_members_kernel_of_other_features_is_formed_again_and_a_corrupt_one_refused(tmp_path):
    store, Phi, members, G = _members_problem(tmp_path)
    _, lam, h = _members_scores(store, members, G)
    values, _, record = member_kernel_files(h)
    store.write(members[:1], torch.zeros(1, 12))  # the features change, the store is finalized again
    finalize(store)
    with pytest.raises(FileNotFoundError, match="current features"):
        load_member_kernel(store, h)  # a kernel of other features is never read
    got, lam, _ = _members_scores(store, members, G)  # ... but formed again
    ref, bound, _ = _members_bound(store.read(dtype=F64), members, G, lam)
    assert bool(((got - ref).abs() <= bound).all())
    data = bytearray((store.path / values).read_bytes())
    data[-1] ^= 0x01
    (store.path / values).write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=values):
        member_kernel(store, members, h)
    with pytest.raises(CorruptFileError, match=record):  # a record of other rows under this name
        member_kernel(store, members[1:], h)


def test_non_member_features_do_not_change_the_members_scores(tmp_path):
    store, Phi, members, G = _members_problem(tmp_path, "a")
    others = torch.ones(300, dtype=torch.bool)
    others[members] = False
    changed = Phi.float().clone()
    changed[others] = 3 * torch.randn(int(others.sum()), 12, generator=torch.Generator().manual_seed(9))
    second, Phi2, _, _ = _members_problem(tmp_path, "b", Phi=changed)
    a, lam_a, _ = _members_scores(store, members, G)
    b, lam_b, _ = _members_scores(second, members, G)
    assert lam_a == lam_b  # the same member rows: the same kernel, summed in the same order
    _, bound, _ = _members_bound(Phi, members, G, lam_a)
    assert bool(((a[members] - b[members]).abs() <= bound[members]).all())
    assert not torch.allclose(a[others], b[others], rtol=0.05)  # the non-members' own scores do move
