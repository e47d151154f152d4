"""One pass over the stores (attribution.scoring.score_pass): each store read once whatever the number of
columns, float32 products equal the dense float64 reference within the derived rounding bound, the float64 option
equals it to float64 rounding, every sink (columns on disk, dense, top-k, mask predictions) holds the same
numbers, one eigenvector matrix per store is loaded, and the ridge sweep is one pass."""
from __future__ import annotations

import os

import pytest
import torch

import attribution.scoring as scoring
from attribution import FeatureStore, dense_scores_float64, finalize, load_kernel, relative_lambda
from attribution.errors import NonFiniteError
from attribution.scoring import (ScoreColumns, lambda_sweep, load_spectrum, score_pass, solve_targets,
                                 sweep_solves)
from tolerances import EPS32

F64 = torch.float64
EPS64 = torch.finfo(torch.float64).eps
N, D, COLUMNS = 300, 16, 64


def _store(path, Phi, dtype="float32", weights=None):
    store = FeatureStore.open(path, {"N": Phi.shape[0], "d": Phi.shape[1], "dtype": dtype,
                                     "with_weights": weights is not None})
    store.write(torch.arange(Phi.shape[0]), Phi, weights)
    finalize(store)
    return store


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Two stores (float32 and float16 features) and 64 target-gradient columns per store."""
    g = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("pass")
    stores = [_store(root / "a", torch.randn(N, D, generator=g)),
              _store(root / "b", torch.randn(N, D, generator=g), dtype="float16")]
    Phis = [s.read(dtype=F64) for s in stores]  # the stored values (float16 rounded), exact in float64
    Gs = [torch.randn(COLUMNS, D, generator=g) for _ in stores]
    lams = [relative_lambda(load_spectrum(s), 0.3) for s in stores]
    return stores, Phis, Gs, lams


def _reads(monkeypatch):
    calls = []
    original = FeatureStore.read

    def counted(self, start=0, stop=None, dtype=torch.float32, out=None):
        tensor = original(self, start, stop, dtype, out)
        calls.append((str(self.path), start, start + tensor.shape[0]))
        return tensor

    monkeypatch.setattr(FeatureStore, "read", counted)
    return calls


def _assert_each_row_read_once(calls, stores):
    for store in stores:
        ranges = sorted((a, b) for path, a, b in calls if path == str(store.path))
        covered = torch.zeros(store.N, dtype=torch.long)
        for a, b in ranges:
            covered[a:b] += 1
        assert torch.equal(covered, torch.ones(store.N, dtype=torch.long)), store.path


def _product_bound(Phis, solved64, M):
    """Float32 rounding bound of ``1/M sum_m Phi_m fl32(V_m)`` against float64: the V cast (u), the d-term
    products (d u), the M-term accumulation and the division (M + 1 u), with eps32 = 2u for margin."""
    terms = sum(P.abs() @ V.abs() for P, V in zip(Phis, solved64)) / M
    return EPS32 * (D + M + 3) * terms


def test_64_columns_read_each_store_once_and_equal_the_float64_reference(problem, monkeypatch, tmp_path):
    stores, Phis, Gs, lams = problem
    loads = []
    original_load = scoring.load_kernel
    monkeypatch.setattr(scoring, "load_kernel", lambda s: loads.append(s.path) or original_load(s))
    calls = _reads(monkeypatch)
    solved64 = [solve_targets(s, G, lam) for s, G, lam in zip(stores, Gs, lams)]
    assert loads == [s.path for s in stores]  # one eigenvector matrix per store, each loaded once
    masks = torch.rand(7, N, generator=torch.Generator().manual_seed(1)) < 0.5
    result = score_pass(stores, [V.float() for V in solved64], block_rows=64, columns=True, scratch_dir=tmp_path,
                        dense=torch.float32, topk=5, masks=masks)
    _assert_each_row_read_once(calls, stores)
    assert result.bytes_read == N * D * (4 + 2) and result.blocks == 2 * 5
    reference = sum(dense_scores_float64(P, G, lam) for P, G, lam in zip(Phis, Gs, lams)) / 2
    bound = _product_bound(Phis, solved64, 2)
    assert bool(((result.dense.double() - reference).abs() <= bound).all())
    assert float(bound.max()) < 1e-4 * float(reference.abs().max())  # the bound is tight enough to mean something
    for j in (0, 17, 63):  # the on-disk columns hold exactly the pass's float32 numbers
        assert torch.equal(result.columns.column(j), result.dense[:, j])
    result.columns.close()
    assert not list(tmp_path.iterdir())  # the scratch file had no name and is gone
    top = torch.topk(result.dense, 5, dim=0)
    assert torch.equal(result.topk.positive_indices, top.indices) and torch.equal(result.topk.positive_values,
                                                                                  top.values)
    assert torch.equal(result.topk.negative_indices, torch.topk(result.dense, 5, dim=0, largest=False).indices)
    expected = masks.double() @ result.dense.double()
    torch.testing.assert_close(result.predictions, expected, rtol=0,
                               atol=EPS64 * N * float((masks.double() @ result.dense.double().abs()).max()))


def test_the_float64_option_equals_the_dense_reference_with_weights(problem, tmp_path):
    stores, Phis, Gs, lams = problem
    weights = [torch.linspace(-1, 2, N), None]
    solved = [solve_targets(s, G, lam) for s, G, lam in zip(stores, Gs, lams)]
    got = score_pass(stores, solved, weights, precision="float64", dense=F64, block_rows=50).dense
    expected = (dense_scores_float64(Phis[0], Gs[0], lams[0], weights[0]) + dense_scores_float64(Phis[1], Gs[1],
                                                                                                    lams[1])) / 2
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    weighted = _store(tmp_path / "w", Phis[0].float(), weights=torch.linspace(0.5, 1.5, N))
    own = score_pass([weighted], [solve_targets(weighted, Gs[0], lams[0])], precision="float64", dense=F64).dense
    torch.testing.assert_close(own, dense_scores_float64(Phis[0], Gs[0], lams[0], torch.linspace(0.5, 1.5, N).float()),
                               rtol=1e-9, atol=1e-12)


def test_per_column_ridges_and_the_sweep_are_separate_solves_in_one_pass(problem, monkeypatch):
    stores, Phis, Gs, _ = problem
    kernel = load_kernel(stores[0])
    lams = torch.tensor([0.5, 2.0, 8.0]).repeat_interleave(4)
    per_column = kernel.solve(Gs[0][:12], lams)
    for c in range(12):
        torch.testing.assert_close(per_column[:, c], kernel.solve(Gs[0][c:c + 1], float(lams[c]))[:, 0], rtol=1e-12,
                                   atol=1e-14)
    relative = [0.01, 1.0, 100.0]
    solved = sweep_solves(stores, [G[:6] for G in Gs], relative, relative=True)
    assert solved[0].shape == (D, 3 * 6)
    calls = _reads(monkeypatch)
    sweep = lambda_sweep(stores, [G[:6] for G in Gs], relative, relative=True, dtype=F64)
    _assert_each_row_read_once(calls, stores)  # every ridge from ONE pass
    for i, rel in enumerate(relative):
        absolute = [relative_lambda(load_spectrum(s), rel) for s in stores]
        expected = sum(dense_scores_float64(P, G[:6], lam) for P, G, lam in zip(Phis, Gs, absolute)) / 2
        torch.testing.assert_close(sweep[i], expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="one per column"):
        kernel.solve(Gs[0][:2], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="`lam`"):
        kernel.solve(Gs[0][:2], torch.tensor([-1.0, 1.0]))


def test_score_columns_hold_blocks_written_in_any_order(tmp_path):
    full = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    with ScoreColumns(50, 6, tmp_path) as columns:
        for start in (40, 0, 20):
            columns.write_block(start, full[start:start + 20] if start < 40 else full[40:])
        assert torch.equal(columns.columns([5, 0]), full[:, [5, 0]])
        assert len(os.listdir(tmp_path)) == 0  # unlinked from the start
        with pytest.raises(IndexError, match="column"):
            columns.column(6)


def test_non_finite_scores_are_refused_naming_the_examples(problem):
    stores, _, Gs, lams = problem
    solved = [solve_targets(s, G, lam).float() for s, G, lam in zip(stores, Gs, lams)]
    solved[1][:, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="examples"):
        score_pass(stores, solved, topk=2)
    with pytest.raises(ValueError, match="precision"):
        score_pass(stores, solved, precision="bfloat16")
