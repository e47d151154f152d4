"""Members only: a model fit on a subset mask is scored with the kernel of its own training rows (the mask its
checkpoint records, read with ``members="auto"``), every row keeps its score, the top-k are chosen among the
members by default (or among the non-members / all rows on request) and the report gives the member fraction
of every top-k; ``members="all"`` gives the old all-rows scores bit for bit; a mask that is not the model's is
refused naming the file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

import lightning_modules.attribution_module as attribution_module
from attribution.errors import MembersError, SettingsError
from attribution.masks import mask_hash
from attribution.scoring import load_spectrum, member_kernel_files, relative_lambda, score_pass, solve_targets
from attribution.store import open_feature_stores
from callbacks.score_writer import load_target_scores
from lightning_modules import AttributionModule
from helpers import subset_scorer
from tolerances import EPS32

EPS64 = torch.finfo(torch.float64).eps
SCORE = dict(estimator="trak", num_draws=2, relative_lam=0.5, topk=5, pair_batch_size=4)
N = 120


@pytest.fixture(scope="module")
def run(subset_fit):
    return subset_fit  # the shared tiny model fit on a 50% subset mask


def module(run, out, **kw):
    return subset_scorer(run, out, **{**SCORE, **kw})


def score(run, out, monkeypatch=None, **kw):
    """Score every pair; with ``monkeypatch``, also return each checkpoint's solve ``(store, grads, lam, kernel)``."""
    solves = []
    if monkeypatch is not None:
        solve = attribution_module.solve_targets

        def recorded(store, grads, lam, kernel=None):
            solves.append((store, grads.detach().clone(), lam, kernel))
            return solve(store, grads, lam, kernel)

        monkeypatch.setattr(attribution_module, "solve_targets", recorded)
    scorer = module(run, out, **kw)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False).predict(
        scorer.attach_data(run[1]), return_predictions=False)
    if monkeypatch is not None:
        monkeypatch.undo()
    return scorer, solves


def pair_scores(run, out, scorer):
    """(N, pairs) scores of the assembled target files, in pass order (targets, then steps)."""
    return torch.cat([load_target_scores(run[0] / out / f"target_{t.target_id:04d}.pt")["scores"]
                      for t in scorer.trajectories], dim=1)


def test_auto_reads_the_fit_mask_and_scores_equal_the_members_float64_reference(run, monkeypatch):
    root, _, mask = run
    scorer, solves = score(run, "auto", monkeypatch, precision="float64")
    recorded = torch.load(scorer.stores[0].meta["checkpoint"]["file"], weights_only=False)["attribution"]["mask_hash"]
    for mem, store in zip(scorer.members, scorer.stores):
        assert torch.equal(mem.mask(), mask) and mem.hash == recorded == mask_hash(mask.numpy(), N)
        assert (store.path / member_kernel_files(mem.hash)[2]).is_file()  # saved beside the store
    stores = {str(s.path): s for s in open_feature_stores(str(root / "fit" / "features"))}
    ref, bound = 0, 0
    for store, grads, lam, kernel in solves:
        assert kernel is not None
        Phi = stores[str(store.path)].read(dtype=torch.float64)
        K_M, d = Phi[mask].T @ Phi[mask], Phi.shape[1]  # the kernel of the member rows only, by hand
        # the relative lambda from the members' kernel: its eigenvalues sum to the trace within d^2 eps64
        assert lam == pytest.approx(SCORE["relative_lam"] * float(K_M.trace()) / d, rel=d ** 2 * EPS64)
        V = torch.linalg.solve(K_M + lam * torch.eye(d, dtype=torch.float64), grads.double().T)
        s = torch.linalg.eigvalsh(K_M)
        kappa = float((s.max() + lam) / (s.min() + lam))
        ref = ref + Phi @ V  # phi_i^T (K_M + lam I)^-1 g for EVERY row i, members and non-members
        bound = bound + (EPS64 * (d + len(solves) + 3) + EPS64 * kappa * d ** 2) * (Phi.abs() @ V.abs())
    ref, bound = ref / len(solves), bound / len(solves)
    got = pair_scores(run, "auto", scorer).double()
    assert got.shape == (N, 4)
    # a float64 pass against the LU reference, then the float32 storage of the pair files (half an ulp)
    assert bool(((got - ref).abs() <= bound + EPS32 / 2 * got.abs() * (1 + EPS32)).all())
    all_rows = 0
    for store, grads, _, _ in solves:  # the all-rows kernel gives other scores: the test can tell them apart
        Phi = stores[str(store.path)].read(dtype=torch.float64)
        lam_all = SCORE["relative_lam"] * float((Phi.T @ Phi).trace()) / Phi.shape[1]
        all_rows = all_rows + Phi @ torch.linalg.solve(Phi.T @ Phi + lam_all * torch.eye(Phi.shape[1],
                                                                                       dtype=torch.float64),
                                                      grads.double().T)
    assert not torch.allclose(got, all_rows / len(solves), rtol=0.05)


def test_members_all_gives_the_old_all_rows_scores_bit_for_bit(run, monkeypatch):
    root, _, _ = run
    scorer, solves = score(run, "all", monkeypatch, members="all", rank="all")
    assert all(mem.all_rows for mem in scorer.members) and all(kernel is None for *_, kernel in solves)
    # the scoring of before members existed: the store's own kernel (all N rows) and its relative lambda
    old = score_pass(scorer.stores, [solve_targets(store, grads, relative_lambda(load_spectrum(store), 0.5)).float()
                                     for store, grads, _, _ in solves], precision="float32", dense=torch.float32).dense
    assert torch.equal(pair_scores(run, "all", scorer), old)
    assert scorer.pair_keys != module(run, "auto").pair_keys  # a members kernel gives other scores: other keys


def test_rank_chooses_the_top_k_among_members_nonmembers_or_all_rows(run):
    root, _, mask = run
    report = root / "rank" / "member_fraction.json"
    for rank in ("members", "nonmembers", "all"):
        scorer, _ = score(run, "rank", rank=rank)  # the pairs are computed once, then reused: rank is assembly
        assert scorer.resume_counts["ok"] == (0 if rank == "members" else 4)
        written = json.loads(report.read_text())
        assert written["rank"] == rank and written["base_rate"] == pytest.approx(float(mask.double().mean()))
        assert len(written["pairs"]) == 4 and len((root / "rank" / "member_fraction.csv").read_text().splitlines()) == 5
        for traj in scorer.trajectories:
            result = load_target_scores(root / "rank" / f"target_{traj.target_id:04d}.pt")
            scores, positive, negative = result["scores"], result["positive_indices"], result["negative_indices"]
            assert scores.shape == (N, 2) and torch.equal(result["members"], mask)  # every row's score is written
            pool = {"members": mask, "nonmembers": ~mask, "all": torch.ones_like(mask)}[rank]
            masked = scores.masked_fill(~pool.unsqueeze(1), float("-inf"))
            assert torch.equal(positive, masked.topk(5, dim=0).indices)
            assert torch.equal(negative, scores.masked_fill(~pool.unsqueeze(1), float("inf")).topk(
                5, dim=0, largest=False).indices)
            fraction = mask[positive].double().mean(0)
            assert torch.equal(result["member_fraction_positive"], fraction)
            if rank == "members":
                assert bool(mask[positive].all() and mask[negative].all()) and fraction.tolist() == [1.0, 1.0]
            if rank == "nonmembers":
                assert not bool(mask[positive].any() or mask[negative].any()) and "ADDING" in result["rank_label"]
            rows = [r for r in written["pairs"] if r["target"] == traj.target_id]
            assert [r["positive"] for r in rows] == fraction.tolist()
        assert written["mean_positive"] == pytest.approx(np.mean([r["positive"] for r in written["pairs"]]))
    assert written["mean_positive"] < 1  # rank="all" on this model: non-members reach the top-k too


def test_a_mask_that_is_not_the_models_is_refused_naming_the_file(run, tmp_path):
    root, _, mask = run
    recorded = mask_hash(mask.numpy(), N)
    other = mask.numpy().copy()
    other[0] = not other[0]
    np.save(tmp_path / "other.npy", other)
    found = mask_hash(other, N)
    with pytest.raises(MembersError, match=rf"other\.npy.*{recorded}.*{found}.*--model\.members"):
        module(run, "other", members=str(tmp_path / "other.npy"))
    original = root / "mask.npy"
    shutil.copy(original, tmp_path / "backup.npy")
    try:
        np.save(original, other)  # the file the checkpoint records now holds another mask
        with pytest.raises(MembersError, match=rf"mask\.npy.*{recorded}.*{found}.*--model\.members"):
            module(run, "changed")
        original.unlink()
        with pytest.raises(MembersError, match=rf"mask\.npy.*{recorded}.*missing.*--model\.members"):
            module(run, "missing")
        assert module(run, "given", members=str(tmp_path / "backup.npy")).members[0].hash == recorded
    finally:
        shutil.copy(tmp_path / "backup.npy", original)
    with pytest.raises(SettingsError, match="non-members"):
        module(run, "none", members="all", rank="nonmembers")
    with pytest.raises(SettingsError, match="`rank`"):
        module(run, "bad", rank="best")
    with pytest.raises(SettingsError, match="`members`"):
        module(run, "bad", members="mask.txt")


def test_read_only_stores_keep_their_members_kernel_under_out_dir(run, monkeypatch):
    root, _, _ = run
    copy = root / "readonly_features"
    shutil.copytree(root / "fit" / "features", copy, ignore=shutil.ignore_patterns("kernel_members_*", ".lock"))
    before = {str(p): p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()}
    monkeypatch.setattr(attribution_module.os, "access", lambda path, mode: False)  # (chmod binds no root user)
    scorer = AttributionModule(features=str(copy), targets=str(root / "targets"), out_dir=str(root / "ro"), **SCORE)
    monkeypatch.undo()
    assert {str(p): p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()} == before  # nothing written
    assert all(folder.parent == root / "ro" / "member_kernels" for folder in scorer.kernel_dirs)
    assert all((folder / member_kernel_files(mem.hash)[2]).is_file()
               for folder, mem in zip(scorer.kernel_dirs, scorer.members))
