"""Integrity of stored arrays: sizes checked against the metadata (a truncated file is refused, never
extended), read-only opening that changes nothing, checksums that catch a flipped byte, finiteness checked
before a kernel is written, and checkpoints read with clear errors."""
import json

import numpy as np
import pytest
import torch

from attribution import FeatureStore, finalize, load_kernel
from attribution.errors import AttributionInputError, CorruptFileError, NonFiniteError, SettingsError
from attribution.integrity import read_checkpoint, require_finite, stamp_checkpoint
from attribution.store import open_feature_stores

N, D = 30, 4


def _meta(**over):
    return {"N": N, "d": D, "dtype": "float32", "dataset_fingerprint": "abc",
            "checkpoint": {"file": "c.ckpt", "weights_hash": "00"}, **over}


def _finished(path, **over):
    store = FeatureStore.open(path, _meta(**over))
    store.write(torch.arange(N), torch.randn(N, D, generator=torch.Generator().manual_seed(0)),
                **({"weights": torch.ones(N)} if over.get("with_weights") else {}))
    finalize(store)
    return store


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _flip(path, offset_from_end=3):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("writable", [True, False])
def test_a_truncated_features_file_is_refused_and_left_as_it_is(tmp_path, writable):
    store = FeatureStore.open(tmp_path, _meta())
    store.write(torch.arange(10), torch.ones(10, D))
    del store
    size = (tmp_path / "features.npy").stat().st_size
    (tmp_path / "features.npy").write_bytes((tmp_path / "features.npy").read_bytes()[: size // 2])
    with pytest.raises(CorruptFileError) as err:
        FeatureStore.open(tmp_path, _meta(), create=False, writable=writable)
    message = str(err.value)
    assert "features.npy" in message and f"{size} bytes" in message and f"{size // 2} bytes (truncated)" in message
    assert (tmp_path / "features.npy").stat().st_size == size // 2  # numpy's "r+" would have zero-extended it


def test_wrong_shape_or_dtype_against_the_metadata_is_refused(tmp_path):
    FeatureStore.open(tmp_path, _meta())
    np.save(tmp_path / "done.npy", np.zeros(N + 1, np.uint8))
    with pytest.raises(CorruptFileError, match=r"done.npy.*shape \(30,\).*\(31,\)"):
        FeatureStore.open(tmp_path, _meta(), create=False)
    np.save(tmp_path / "done.npy", np.zeros(N, np.uint8))
    np.save(tmp_path / "features.npy", np.zeros((N, D), np.float16))
    with pytest.raises(CorruptFileError, match="float32.*float16"):
        FeatureStore.open(tmp_path, _meta(), create=False)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="meta.json"):
        FeatureStore.open(tmp_path, _meta(), create=False, writable=False)


def test_reading_changes_nothing_and_creates_no_lock_file(tmp_path):
    _finished(tmp_path / "s")
    before = _files(tmp_path / "s")
    assert ".lock" in before  # made by the writer
    (tmp_path / "s" / ".lock").unlink()
    before = _files(tmp_path / "s")
    stores = open_feature_stores(str(tmp_path / "s"))
    store = stores[0]
    assert not store.writable and not (tmp_path / "s" / ".lock").exists()
    assert store.read().shape == (N, D) and store.is_complete and load_kernel(store).eigenvalues.shape == (D,)
    with pytest.raises(SettingsError, match="writable"):
        store.write(torch.tensor([0]), torch.zeros(1, D))
    with pytest.raises(SettingsError, match="create"):
        FeatureStore.open(tmp_path / "s", _meta(), create=True, writable=False)
    assert _files(tmp_path / "s") == before


@pytest.mark.parametrize("name", ["features.npy", "done.npy", "weights.npy", "kernel_eigenvalues.npy",
                                  "kernel_eigenvectors.npy"])
def test_a_flipped_byte_in_any_file_of_a_finished_store_is_caught(tmp_path, name):
    store = _finished(tmp_path, with_weights=True)
    store.verify()
    assert set(json.loads((tmp_path / "kernel.json").read_text())["checksums"]) == {
        "features.npy", "done.npy", "weights.npy", "kernel_eigenvalues.npy", "kernel_eigenvectors.npy"}
    _flip(tmp_path / name, 1 if name == "done.npy" else 3)
    with pytest.raises(CorruptFileError, match=f"{name}.*sha256"):
        open_feature_stores(str(tmp_path))
    if name.startswith("kernel"):
        with pytest.raises(CorruptFileError, match=name):
            load_kernel(FeatureStore.open(tmp_path, _meta(with_weights=True), create=False, writable=False))


def test_open_feature_stores_checks_every_store_before_returning(tmp_path):
    _finished(tmp_path / "a")
    _finished(tmp_path / "b")
    partial = FeatureStore.open(tmp_path / "c", _meta())
    partial.write(torch.arange(5), torch.ones(5, D))
    with pytest.raises(CorruptFileError, match="c misses 25 of 30 rows"):
        open_feature_stores(str(tmp_path))
    (tmp_path / "b" / "kernel.json").write_text(json.dumps({"N": N, "d": D, "trace": 1.0}))  # an older version's
    with pytest.raises(CorruptFileError, match="without checksums"):
        open_feature_stores(str(tmp_path / "b"))
    assert FeatureStore.check_folder(tmp_path / "a", _meta()) == "finalized"
    assert FeatureStore.check_folder(tmp_path / "b", _meta()) == "complete"  # featurize re-finalizes it
    assert FeatureStore.check_folder(tmp_path / "c", _meta()) == "partial"
    assert FeatureStore.check_folder(tmp_path / "none", _meta()) == "absent" and not (tmp_path / "none").exists()


def test_non_finite_features_are_refused_before_the_kernel_is_written(tmp_path):
    store = FeatureStore.open(tmp_path, _meta())
    feats = torch.ones(N, D)
    feats[[4, 17]] = float("nan")
    store.write(torch.arange(N), feats)
    with pytest.raises(NonFiniteError, match=r"features in store .* rows \[4, 17\]"):
        finalize(store)
    assert not any((tmp_path / name).exists() for name in ("kernel.json", "kernel_eigenvalues.npy",
                                                           "kernel_eigenvectors.npy"))


def test_require_finite_names_the_rows():
    require_finite(torch.ones(3, 2), "x")
    with pytest.raises(NonFiniteError, match=r"examples \[12\] \(1 of 2\)"):
        require_finite(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]).flip(0), "features", rows=torch.tensor([11, 12]),
                       row_name="examples")


def test_read_checkpoint_refuses_unreadable_non_finite_and_altered_weights(tmp_path):
    good = {"state_dict": {"w": torch.ones(3), "b": torch.zeros(2)}, "global_step": 1}
    stamp_checkpoint(good)
    torch.save(good, tmp_path / "good.ckpt")
    assert torch.equal(read_checkpoint(tmp_path / "good.ckpt")["state_dict"]["w"], torch.ones(3))
    (tmp_path / "garbage.ckpt").write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(CorruptFileError, match="`checkpoint` .*garbage.ckpt.*readable"):
        read_checkpoint(tmp_path / "garbage.ckpt")
    altered = {**good, "state_dict": {"w": torch.tensor([1.0, 1.0, 1.0000001]), "b": torch.zeros(2)}}
    torch.save(altered, tmp_path / "altered.ckpt")  # the stamp of the original weights
    with pytest.raises(CorruptFileError, match="altered.ckpt.*checksum"):
        read_checkpoint(tmp_path / "altered.ckpt")
    nan = {"state_dict": {"w": torch.tensor([1.0, float("nan")])}}
    stamp_checkpoint(nan)
    torch.save(nan, tmp_path / "nan.ckpt")
    with pytest.raises(NonFiniteError, match=r"nan.ckpt.*\['w'\]"):
        read_checkpoint(tmp_path / "nan.ckpt", "ckpt_path")
    with pytest.raises(FileNotFoundError, match="`ckpt_path`"):
        read_checkpoint(tmp_path / "none.ckpt", "ckpt_path")
    assert issubclass(CorruptFileError, AttributionInputError) and issubclass(AttributionInputError, ValueError)
