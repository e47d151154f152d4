"""FeatureStore: metadata checks, crash-and-resume, atomic meta, concurrent writers."""
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from attribution import FeatureStore, StoreMismatchError
from attribution.store import atomic_write_json


def _meta(**over):
    meta = {"N": 20, "d": 4, "dtype": "float32", "projector": {"kind": "sparse", "seed": 1, "d": 4},
            "dataset_fingerprint": "abc", "checkpoint": "epoch=3"}
    meta.update(over)
    return meta


def test_create_write_read_roundtrip(tmp_path):
    store = FeatureStore.open(tmp_path / "s", _meta())
    assert store.missing_rows().tolist() == list(range(20)) and not store.is_complete
    feats = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    store.write(torch.tensor([2, 7, 19]), feats)
    assert store.missing_rows().numel() == 17 and 7 not in store.missing_rows().tolist()
    torch.testing.assert_close(torch.from_numpy(np.asarray(store.features[[2, 7, 19]])), feats)
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["checkpoint"] == "epoch=3"
    assert np.load(tmp_path / "s" / "features.npy", mmap_mode="r").shape == (20, 4)


def test_float16_store(tmp_path):
    store = FeatureStore.open(tmp_path, _meta(dtype="float16"))
    store.write(torch.tensor([0]), torch.tensor([[1.0, 2.0, 3.0, 1e-3]]))
    assert store.features.dtype == np.float16
    torch.testing.assert_close(store.read(0, 1), torch.tensor([[1.0, 2.0, 3.0, 1e-3]]), rtol=1e-3, atol=1e-6)


def test_metadata_mismatch_names_the_differing_keys(tmp_path):
    FeatureStore.open(tmp_path, _meta())
    with pytest.raises(StoreMismatchError) as err:
        FeatureStore.open(tmp_path, _meta(projector={"kind": "sparse", "seed": 2, "d": 4}, dataset_fingerprint="xyz"))
    msg = str(err.value)
    assert "projector.seed: stored 1 vs given 2" in msg and "dataset_fingerprint: stored 'abc' vs given 'xyz'" in msg
    assert "checkpoint" not in msg
    FeatureStore.open(tmp_path, _meta())  # identical metadata re-opens fine


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"meta\['dtype'\]"):
        FeatureStore.open(tmp_path / "a", _meta(dtype="int8"))
    with pytest.raises(FileNotFoundError):
        FeatureStore.open(tmp_path / "b", _meta(), create=False)
    store = FeatureStore.open(tmp_path / "c", _meta())
    with pytest.raises(ValueError, match="features"):
        store.write(torch.tensor([0, 1]), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="rows"):
        store.write(torch.tensor([20]), torch.zeros(1, 4))


def _featurize(store, rows, crash_after=None):
    for i, r in enumerate(rows.tolist()):
        if crash_after is not None and i == crash_after:
            raise KeyboardInterrupt("simulated kill")
        store.write(torch.tensor([r]), torch.full((1, 4), float(r)))


def test_resume_fills_only_missing_rows(tmp_path):
    store = FeatureStore.open(tmp_path, _meta())
    with pytest.raises(KeyboardInterrupt):
        _featurize(store, store.missing_rows(), crash_after=7)
    reopened = FeatureStore.open(tmp_path, _meta())
    missing = reopened.missing_rows()
    assert missing.tolist() == list(range(7, 20))
    written = []
    orig = reopened.write
    reopened.write = lambda rows, feats, weights=None: (written.extend(rows.tolist()), orig(rows, feats, weights))
    _featurize(reopened, missing)
    assert written == list(range(7, 20)) and reopened.is_complete
    torch.testing.assert_close(reopened.read(), torch.arange(20.0).unsqueeze(1).expand(20, 4))


def test_done_flags_only_after_features(tmp_path, monkeypatch):
    """A failure while writing features leaves the rows not done."""
    store = FeatureStore.open(tmp_path, _meta())

    class Boom(Exception):
        pass

    def failing_flush():
        raise Boom()

    monkeypatch.setattr(store._features, "flush", failing_flush)
    with pytest.raises(Boom):
        store.write(torch.tensor([3]), torch.ones(1, 4))
    assert 3 in store.missing_rows().tolist()


def test_meta_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    atomic_write_json(path, {"a": 1})

    def crash(*args, **kwargs):
        raise OSError("disk died")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_json(path, {"a": 2, "big": list(range(1000))})
    assert json.loads(path.read_text()) == {"a": 1}  # old file intact, never half-written


def test_weights_column(tmp_path):
    store = FeatureStore.open(tmp_path, _meta(with_weights=True))
    store.write(torch.tensor([1]), torch.ones(1, 4), weights=torch.tensor([-0.5]))
    assert store.weights()[1] == -0.5
    with pytest.raises(ValueError, match="weights"):
        store.write(torch.tensor([2]), torch.ones(1, 4))


def _writer(path, meta, rows):
    store = FeatureStore.open(path, meta)
    for r in rows:
        store.write(torch.tensor([r]), torch.full((1, 4), float(r)))


def test_two_processes_write_disjoint_rows(tmp_path):
    meta = _meta(N=200)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, meta, list(range(k, 200, 2)))) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = FeatureStore.open(tmp_path, meta)
    assert store.is_complete
    torch.testing.assert_close(store.read(), torch.arange(200.0).unsqueeze(1).expand(200, 4))


def _file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def _part_writer(path, meta, rank, world):
    """One rank of a multi-rank featurize: its contiguous share into its own part, nothing else."""
    store = FeatureStore.open(path, meta, create=False)
    rows = store.rank_share(rank, world)
    part = store.part(rows)
    part.write(rows, rows.float().unsqueeze(1).expand(len(rows), 4) + 0.5, rows.float() / 10)


def test_ranks_write_contiguous_shares_into_their_own_parts_and_rank_zero_merges(tmp_path):
    meta = _meta(N=101, with_weights=True)
    store = FeatureStore.open(tmp_path, meta)
    store.write(torch.tensor([3, 50]), torch.zeros(2, 4), torch.zeros(2))  # rows of an earlier run
    before = _file_bytes(tmp_path)
    shares = [store.rank_share(r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shares), store.missing_rows())  # disjoint, in order, all the missing rows
    assert all(bool((s[1:] > s[:-1]).all()) for s in shares) and max(map(len, shares)) - min(map(len, shares)) <= 1
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_part_writer, args=(tmp_path, meta, r, 3)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    parts = sorted((tmp_path / "parts").iterdir())
    assert len(parts) == 3 and len({p.name for p in parts}) == 3  # one folder (files) per rank
    assert _file_bytes(tmp_path) == before  # no rank touched the store's own files
    assert store.merge_parts() == 99 and not (tmp_path / "parts").exists()
    assert store.is_complete
    expected = torch.arange(101.0).unsqueeze(1).expand(101, 4) + 0.5
    expected[[3, 50]] = 0
    torch.testing.assert_close(store.read(), expected)
    torch.testing.assert_close(store.weights()[[0, 100]], torch.tensor([0.0, 10.0]))
    assert store.merge_parts() == 0


def test_a_killed_multi_rank_run_keeps_the_rows_its_parts_finished(tmp_path):
    meta = _meta(N=30)
    store = FeatureStore.open(tmp_path, meta)
    part = store.part(torch.arange(10, 20))
    part.write(torch.tensor([10, 11]), torch.ones(2, 4))  # killed after two rows
    with pytest.raises(ValueError, match=r"rows. in \[10, 20\)"):
        part.write(torch.tensor([25]), torch.ones(1, 4))
    (tmp_path / "parts" / "rows_0000000020_0000000030").mkdir()  # killed while being created: no meta.json
    again = FeatureStore.open(tmp_path, meta)
    assert again.merge_parts() == 2
    assert again.missing_rows().tolist() == [r for r in range(30) if r not in (10, 11)]
    other = FeatureStore.open(tmp_path / "other", _meta(N=30))
    bad = other.part(torch.arange(0, 5))
    bad.write(torch.tensor([0]), torch.ones(1, 4))
    json_path = bad.path / "meta.json"
    json_path.write_text(json_path.read_text().replace('"abc"', '"xyz"'))  # a part of other data
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        other.merge_parts()
