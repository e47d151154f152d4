"""Projectors: JL inner-product preservation, determinism, block independence, sparse ~ dense scores."""
import math

import pytest
import torch
from scipy.stats import spearmanr

from attribution import (DenseProjector, IdentityProjector, SparseProjector, checkpoint_seed, dense_scores_float64,
                         make_projector)


def _vectors(n, p, seed=0):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("proj", [DenseProjector(3000, 512, seed=1, block_size=2048),
                                  DenseProjector(3000, 512, seed=1, kind="rademacher", block_size=1024),
                                  SparseProjector(3000, 512, seed=1), SparseProjector(3000, 512, seed=1, s=4)],
                         ids=["gaussian", "rademacher", "sparse1", "sparse4"])
def test_inner_products_preserved_within_jl_bounds(proj):
    X = _vectors(40, proj.p)
    X[20:] = X[20:] + 0.8 * X[:20]  # correlated pairs, so inner products are not all ~0
    Y = proj.project(X)
    exact, approx = X @ X.T, Y @ Y.T
    norms = exact.diagonal()
    sd = torch.sqrt((norms[:, None] * norms[None, :] + exact ** 2) / proj.d)  # sd of one JL inner product
    z = (approx - exact) / sd
    assert float(z.abs().max()) < 5.0                # no entry beyond 5 sd
    assert 0.6 < float(z.std()) < 1.4                # errors have the predicted size
    assert abs(float(z.mean())) < 0.3                 # unbiased: E<Px,Py> = <x,y>
    ratio = approx.diagonal() / norms
    assert float((ratio - 1).abs().max()) < 5 * math.sqrt(2 / proj.d)


def test_same_seed_identical_different_seed_different():
    X = _vectors(3, 2500).float()
    for make in (lambda s: DenseProjector(2500, 64, s, block_size=1024), lambda s: SparseProjector(2500, 64, s)):
        assert torch.equal(make(5).project(X), make(5).project(X))
        assert not torch.allclose(make(5).project(X), make(6).project(X))


def test_dense_projector_independent_of_block_size_and_matches_explicit_matrix():
    X = _vectors(4, 5000)
    a = DenseProjector(5000, 96, seed=3, block_size=1024).project(X)
    b = DenseProjector(5000, 96, seed=3, block_size=8192).project(X)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    proj = DenseProjector(5000, 96, seed=3)
    P = proj.matrix_block(0, proj.num_tiles()).double()
    assert P.shape == (5000, 96)
    torch.testing.assert_close(a, X @ P, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="block_size"):
        DenseProjector(5000, 96, seed=3, block_size=1000)


def test_sparse_projector_structure_and_tile_independence():
    proj = SparseProjector(3000, 60, seed=2, s=3, tile_cols=1024)
    S = proj.project(torch.eye(3000, dtype=torch.float64))  # rows are the columns of S^T
    assert torch.equal((S != 0).sum(dim=1), torch.full((3000,), 3))
    torch.testing.assert_close(S.abs()[S != 0], torch.full((9000,), 1 / math.sqrt(3), dtype=torch.float64))
    for block in range(3):  # one nonzero in each of the s blocks of width d/s
        assert torch.equal((S[:, block * 20:(block + 1) * 20] != 0).sum(dim=1), torch.ones(3000, dtype=torch.long))
    X = _vectors(2, 3000)
    small_tiles = proj.project(X)
    assert torch.equal(small_tiles, SparseProjector(3000, 60, seed=2, s=3, tile_cols=1024).project(X))
    with pytest.raises(ValueError, match="divisible"):
        SparseProjector(3000, 61, seed=2, s=3)


def test_sparse_scores_rank_correlate_with_dense_scores():
    g = torch.Generator().manual_seed(0)
    N, p, r, B = 400, 4000, 40, 3
    basis = torch.randn(r, p, generator=g, dtype=torch.float64)
    Phi = torch.randn(N, r, generator=g, dtype=torch.float64) @ basis + 0.05 * torch.randn(N, p, generator=g, dtype=torch.float64)
    G = torch.randn(B, r, generator=g, dtype=torch.float64) @ basis
    dense = DenseProjector(p, 256, seed=1, block_size=1024)
    sparse = SparseProjector(p, 256, seed=1)
    lam = 1e-3 * float((Phi ** 2).sum()) / 256
    s_dense = dense_scores_float64(dense.project(Phi), dense.project(G), lam)
    s_sparse = dense_scores_float64(sparse.project(Phi), sparse.project(G), lam)
    for b in range(B):
        assert spearmanr(s_dense[:, b], s_sparse[:, b]).statistic > 0.99  # measured ~0.998


def test_identity_and_factory_and_describe():
    X = _vectors(2, 10)
    assert torch.equal(IdentityProjector(10).project(X), X)
    assert isinstance(make_projector("sparse", 100, 10, 0), SparseProjector)
    assert make_projector("rademacher", 100, 10, 0).kind == "rademacher"
    assert make_projector("gaussian", 100, 10, 7).describe() == {"kind": "gaussian", "p": 100, "d": 10, "seed": 7,
                                                                  "tile_rows": 1024, "version": 1}
    with pytest.raises(ValueError, match="`d`"):
        make_projector("identity", 10, 5, 0)
    with pytest.raises(ValueError, match=r"Expected `d` to be a positive int, but got -3"):
        DenseProjector(10, -3, 0)
    with pytest.raises(ValueError, match="p = 10"):
        IdentityProjector(10).project(_vectors(1, 11))
    assert checkpoint_seed(1, 0) != checkpoint_seed(1, 1) and checkpoint_seed(1, 0) == checkpoint_seed(1, 0)
