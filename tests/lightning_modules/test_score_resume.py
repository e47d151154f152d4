"""Scoring resumes only what it can trust: pairs carry the identity of what made them, stale or corrupt pieces
are recomputed and counted, assembly completes whatever is missing (also after a kill during assembly), targets
of other data are refused before any pair, stores are only read, and non-finite gradients are never written."""
from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

import callbacks.score_writer as score_writer
from attribution.errors import CheckpointMismatchError, NonFiniteError
from callbacks.score_writer import load_target_scores
from commands.trainer import AttributionTrainer
from helpers import fit_trainer, fitted_with_targets, tiny_module
from lightning_modules import AttributionModule
from tolerances import EPS32, score_rounding_bound

SCORE = dict(estimator="trak", num_draws=2, relative_lam=0.5, topk=3, pair_batch_size=3)


class Killed(Exception):
    """Stands for a kill (Lightning turns a KeyboardInterrupt into an exit)."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model fitted with the featurize callback (2 checkpoints) and 2 recorded targets (3 steps each)."""
    return fitted_with_targets(tmp_path_factory.mktemp("resume"), proj_dim=16, num_draws=1, num_inference_steps=10,
                               record_steps=[900, 500, 0])


def flip_a_stored_byte(path):
    """Flip the lowest bit of the first byte of the (first) tensor stored in a torch.save zip file."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[start] ^= 0x01
    path.write_bytes(bytes(data))


def score(run, out, features=None, **kw):
    root, dm = run
    module = AttributionModule(features=str(features or root / "fit" / "features"), targets=str(root / "targets"),
                               out_dir=str(root / out), **{**SCORE, **kw})
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False).predict(
        module.attach_data(dm), return_predictions=False)
    return module


def scores(root, out, target):
    return load_target_scores(root / out / f"target_{target:04d}.pt")["scores"]


def test_a_rerun_with_other_inputs_recomputes_every_pair(run):
    root, _ = run
    first = score(run, "shared")
    assert first.resume_counts == {"ok": 0, "missing": 6, "stale": 0, "corrupt": 0}
    again = score(run, "shared")  # same inputs: everything reused
    assert again.resume_counts == {"ok": 6, "missing": 0, "stale": 0, "corrupt": 0}
    one_store = root / "fit" / "features" / "step000002"
    for name, kw in (("lam", {"relative_lam": 2.0}), ("draws", {"num_draws": 3}), ("patch", {"patch": "0:4,0:8"}),
                     ("features", {"features": one_store})):
        other = score(run, "shared", **kw)
        assert other.resume_counts == {"ok": 0, "missing": 0, "stale": 6, "corrupt": 0}, name
        score(run, f"fresh_{name}", **kw)
        for target in (0, 1):  # what the shared folder now holds is what a fresh run computes
            assert torch.equal(scores(root, "shared", target), scores(root, f"fresh_{name}", target)), name
            result = load_target_scores(root / "shared" / f"target_{target:04d}.pt")
            assert result["settings"]["relative_lam"] == kw.get("relative_lam", SCORE["relative_lam"])


def test_partial_reuse_corrupt_pairs_and_a_deleted_target_file(run):
    root, _ = run
    score(run, "partial")
    full = {t: scores(root, "partial", t).clone() for t in (0, 1)}
    only = score(run, "partial", steps=[500])  # a subset of the steps: reused, target files reassembled
    assert only.resume_counts == {"ok": 2, "missing": 0, "stale": 0, "corrupt": 0}
    assert torch.equal(scores(root, "partial", 0), full[0][:, 1:2])
    flip_a_stored_byte(root / "partial" / "pairs" / "target_0001_t0000.pt")
    (root / "partial" / "target_0000.pt").unlink()
    (root / "partial" / "target_0000.png").unlink()
    again = score(run, "partial")
    assert again.resume_counts == {"ok": 5, "missing": 0, "stale": 0, "corrupt": 1}
    assert torch.equal(scores(root, "partial", 0), full[0])
    assert torch.equal(scores(root, "partial", 1)[:, :2], full[1][:, :2])  # reused, bit for bit
    # the corrupt pair was recomputed alone (another vmap batch): equal up to float32 rounding
    torch.testing.assert_close(scores(root, "partial", 1)[:, 2], full[1][:, 2], rtol=2 * EPS32,
                               atol=score_rounding_bound(again, 1, 0))
    assert (root / "partial" / "target_0000.png").stat().st_size > 1000


def test_a_deleted_target_file_is_rebuilt_without_computing(run):
    root, _ = run
    score(run, "deleted")
    before = scores(root, "deleted", 1).clone()
    (root / "deleted" / "target_0001.pt").unlink()
    again = score(run, "deleted")
    assert again.resume_counts["ok"] == 6
    assert torch.equal(scores(root, "deleted", 1), before)


def test_a_kill_during_assembly_is_completed_by_the_next_run(run, monkeypatch):
    root, _ = run
    score(run, "whole")
    drawn = []
    original = score_writer.influencer_figure

    def dies_on_the_second_picture(*args, **kwargs):
        if drawn:
            raise Killed("killed while assembling")
        drawn.append(original(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(score_writer, "influencer_figure", dies_on_the_second_picture)
    with pytest.raises(Killed):
        score(run, "killed")
    monkeypatch.setattr(score_writer, "influencer_figure", original)
    assert not (root / "killed" / "target_0001.png").exists() and not (root / "killed" / "index.html").exists()
    again = score(run, "killed")  # no pair to compute: the loop is skipped, assembly still runs
    assert again.resume_counts["ok"] == 6
    for name in ("target_0000.pt", "target_0001.pt", "target_0000.png", "target_0001.png", "index.html", "index.md"):
        assert (root / "killed" / name).exists(), name
    for t in (0, 1):
        assert torch.equal(scores(root, "killed", t), scores(root, "whole", t))
    assert "target_0001.png" in (root / "killed" / "index.html").read_text()


def test_targets_of_other_data_are_refused_before_any_pair(run, tmp_path):
    root, _ = run
    rng = np.random.default_rng(0)
    np.save(tmp_path / "noise.npy", rng.integers(0, 255, (120, 8, 8), dtype=np.uint8))
    from datamodules import ArrayDataModule
    noise = ArrayDataModule(path=str(tmp_path / "noise.npy"))
    seed_everything(0)
    fit_trainer(tmp_path / "noise_fit", [], max_steps=2).fit(tiny_module(), datamodule=noise)
    trainer = AttributionTrainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.sample(tiny_module(), noise, checkpoint=str(tmp_path / "noise_fit" / "checkpoints" / "step000002.ckpt"),
                   out_dir=str(tmp_path / "targets"), num_targets=1, num_inference_steps=4, num_record_steps=2)
    with pytest.raises(CheckpointMismatchError, match="fingerprint"):
        AttributionModule(features=str(root / "fit" / "features"), targets=str(tmp_path / "targets"),
                          out_dir=str(tmp_path / "scores"), **SCORE)
    assert not (tmp_path / "scores").exists()


def test_scoring_only_reads_the_stores(run):
    root, _ = run
    features = root / "fit" / "features"
    copy = root / "readonly_features"
    shutil.copytree(features, copy)
    for lock in copy.rglob(".lock"):
        lock.unlink()
    before = {str(p): p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()}
    copy.chmod(0o555)
    for folder in copy.iterdir():
        folder.chmod(0o555)
    try:
        score(run, "from_readonly", features=copy)
    finally:
        for folder in [copy, *copy.iterdir()]:
            folder.chmod(0o755)
    assert {str(p): p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()} == before  # no .lock, no change


def test_non_finite_target_gradients_are_refused_before_writing(run, monkeypatch):
    root, _ = run
    original = AttributionModule.target_gradients

    def nan_for_target_1(self, m, x_t, t, target, cond):
        grads = original(self, m, x_t, t, target, cond)
        grads[target == 1] = float("nan")
        return grads

    monkeypatch.setattr(AttributionModule, "target_gradients", nan_for_target_1)
    with pytest.raises(NonFiniteError, match=r"target gradients at checkpoint .*step00000[24].ckpt for targets"):
        score(run, "nan", pair_batch_size=6)
    assert not list((root / "nan").rglob("*.pt"))
