"""Bad inputs through the command line: each gets exit code 2, one line ``error: ...`` naming the argument or
file, and nothing is written (the whole test folder is unchanged).

``cli.run`` runs in-process and maps errors exactly as ``python cli.py`` does. One small world (120 real
digits, a 3-step fit with the featurize callback, 2 recorded targets) feeds every case; each case makes its
own bad copy of one input before the snapshot is taken.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from attribution.integrity import stamp_checkpoint
from conftest import CONFIGS
from helpers import digits_subset_array

SMOKE = str(CONFIGS / "smoke.yaml")
SCORE = str(CONFIGS / "score_digits.yaml")
N = 120


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    npz = digits_subset_array(root / "digits.npz", N)
    data = ["--data=datamodules.ArrayDataModule", f"--data.path={npz}"]
    assert cli.run(["fit", "--config", SMOKE, *data, f"--trainer.default_root_dir={root / 'run'}",
                    "--trainer.callbacks+=callbacks.TrakFeaturizeCallback", "--trainer.callbacks.proj_dim=8",
                    "--trainer.callbacks.num_draws=1", "--trainer.callbacks.batch_size=256"]) == 0
    ckpt = root / "run" / "checkpoints" / "step000003.ckpt"
    assert cli.run(["sample", "--config", SMOKE, *data, f"--checkpoint={ckpt}", f"--out_dir={root / 'targets'}",
                    "--num_targets=2", "--num_inference_steps=4", "--num_record_steps=2",
                    f"--trainer.default_root_dir={root / 'sample'}"]) == 0
    (root / "cases").mkdir()
    return {"root": root, "npz": npz, "data": data, "ckpt": ckpt, "store": root / "run" / "features" / ckpt.stem,
            "targets": root / "targets"}


# ----------------------------------------------------------------------------------------- command builders
def fit(w, *args):
    return ["fit", "--config", SMOKE, *w["data"], f"--trainer.default_root_dir={w['root'] / 'never'}", *args]


def featurize(w, *args, checkpoints=None):
    return ["featurize", "--config", SMOKE, *w["data"], f"--checkpoints={checkpoints or w['ckpt']}",
            f"--out_dir={w['root'] / 'never'}", f"--trainer.default_root_dir={w['root'] / 'never'}",
            "--settings.proj_dim=8", "--settings.num_draws=1", *args]


def sample(w, *args, checkpoint=None):
    return ["sample", "--config", SMOKE, *w["data"], f"--checkpoint={checkpoint or w['ckpt']}",
            f"--out_dir={w['root'] / 'never'}", "--num_inference_steps=4", "--num_record_steps=2",
            f"--trainer.default_root_dir={w['root'] / 'never'}", *args]


def score(w, *args, features=None, targets=None):
    return ["score", "--config", SMOKE, "--config", SCORE, *w["data"], f"--model.features={features or w['store']}",
            f"--model.targets={targets or w['targets']}", f"--model.out_dir={w['root'] / 'never'}",
            "--model.num_draws=1", "--trainer.logger=false", f"--trainer.default_root_dir={w['root'] / 'never'}",
            *args]


# ----------------------------------------------------------------------------------------- bad files
def save(path, array):
    np.save(path, array)
    return path


def copy_store(w, d):
    return Path(shutil.copytree(w["store"], d / "store"))


def copy_targets(w, d):
    return Path(shutil.copytree(w["targets"], d / "targets"))


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def npy_data_offset(path):
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
        return f.tell()


def flip_checkpoint_tensors(src, dst):
    """A copy of checkpoint ``src`` with the lowest bit of one byte flipped in every stored tensor (same size)."""
    shutil.copy(src, dst)
    data = bytearray(dst.read_bytes())
    with zipfile.ZipFile(dst) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size:
                name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
                    int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
                data[info.header_offset + 30 + name_len + extra_len] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def nan_checkpoint(src, dst):
    checkpoint = torch.load(src, weights_only=False)
    next(v for k, v in checkpoint["state_dict"].items() if v.is_floating_point())[0] = float("nan")
    stamp_checkpoint(checkpoint)  # a checkpoint saved with NaN weights (its checksum holds)
    torch.save(checkpoint, dst)
    return dst


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def shards(d, edit=None):
    from datamodules.shards import write_digits_shards
    write_digits_shards(d / "shards", samples_per_shard=16, limit=32)
    manifest = d / "shards" / "manifest.json"
    if edit is not None:
        edit(d / "shards", manifest)
    return d / "shards"


def edit_manifest(**changes):
    def edit(folder, manifest):
        value = json.loads(manifest.read_text())
        value.update(changes)
        manifest.write_text(json.dumps(value))
    return edit


def shard_data(w, folder):
    return ["fit", "--config", SMOKE, "--data=datamodules.WebDatasetDataModule", f"--data.path={folder}",
            f"--trainer.default_root_dir={w['root'] / 'never'}"]


def array_data(w, path):
    return ["fit", "--config", SMOKE, "--data=datamodules.ArrayDataModule", f"--data.path={path}",
            f"--trainer.default_root_dir={w['root'] / 'never'}"]


def npz(d, **arrays):
    np.savez(d / "data.npz", **arrays)
    return d / "data.npz"


def other_architecture_checkpoint(w, d):
    checkpoint = torch.load(w["ckpt"], weights_only=False)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "up_blocks" not in k}
    stamp_checkpoint(checkpoint)
    torch.save(checkpoint, d / "other.ckpt")
    return d / "other.ckpt"


def other_data_targets(w, d):
    folder = copy_targets(w, d)
    for file in folder.glob("target_*.pt"):
        target = torch.load(file, weights_only=False)
        target["info"]["data"] = {**target["info"]["data"], "dataset_fingerprint": "0123456789abcdef"}
        torch.save(target, file)
    return folder


def targets_with(w, d, name, content):
    folder = copy_targets(w, d)
    (folder / name).write_bytes(content)
    return folder


def unfinished(store):
    """A store as a kill leaves it: 3 rows not done, not finalized."""
    np.save(store / "done.npy", np.r_[np.ones(N - 3), np.zeros(3)].astype(np.uint8))
    (store / "kernel.json").unlink()


def store_with(w, d, edit):
    store = copy_store(w, d)
    edit(store)
    return store


def store_of_flipped_checkpoint(w, d):
    """A copy of the store whose recorded checkpoint file is a bit-flipped copy of the real one."""
    store = copy_store(w, d)
    meta = json.loads((store / "meta.json").read_text())
    meta["checkpoint"]["file"] = str(flip_checkpoint_tensors(w["ckpt"], d / "f.ckpt"))
    (store / "meta.json").write_text(json.dumps(meta))
    return store


def mismatched_partial_store(w, d):
    """A store folder for the checkpoint made with other settings (proj_dim 4) than the command's (8)."""
    from attribution.store import FeatureStore
    meta = json.loads((w["store"] / "meta.json").read_text())
    FeatureStore.open(d / "out" / w["ckpt"].stem, {**meta, "d": 4})
    return d / "out"


def truncated_partial_store(w, d):
    store = Path(shutil.copytree(w["store"], d / "out" / w["ckpt"].stem))
    for name in ("kernel.json", "kernel_eigenvalues.npy", "kernel_eigenvectors.npy"):
        (store / name).unlink()
    truncate(store / "features.npy", 0.6)
    return d / "out"


# ----------------------------------------------------------------------------------------- the table
CASES = {
    # subset masks (fit --data.subset_mask)
    "mask_wrong_length": (lambda w, d: fit(w, f"--data.subset_mask={save(d / 'm.npy', np.ones(10, bool))}"),
                          ["subset_mask", "length 10"]),
    "mask_value_2": (lambda w, d: fit(w, f"--data.subset_mask={save(d / 'm.npy', np.r_[np.ones(119), 2].astype(int))}"),
                     ["subset_mask", "values other than 0 and 1", "2"]),
    "mask_empty": (lambda w, d: fit(w, f"--data.subset_mask={save(d / 'm.npy', np.zeros(0, bool))}"),
                   ["subset_mask", "empty"]),
    "mask_float_half": (lambda w, d: fit(w, f"--data.subset_mask={save(d / 'm.npy', np.full(N, 0.5))}"),
                        ["subset_mask", "non-integer"]),
    "mask_2d": (lambda w, d: fit(w, f"--data.subset_mask={save(d / 'm.npy', np.ones((2, 60), bool))}"),
                ["subset_mask", "2-dimensional"]),
    "mask_out_of_range": (lambda w, d: fit(w, f"--data.subset_mask={save(d / 'm.npy', np.array([5, 500]))}"),
                          ["subset_mask", "out-of-range"]),
    "mask_duplicates": (lambda w, d: fit(w, f"--data.subset_mask={save(d / 'm.npy', np.array([3, 3, 7]))}"),
                        ["subset_mask", "duplicated"]),
    "mask_missing": (lambda w, d: fit(w, f"--data.subset_mask={d / 'nope.npy'}"), ["subset_mask", "no such file"]),
    "mask_suffix": (lambda w, d: fit(w, f"--data.subset_mask={d / 'm.txt'}"), ["subset_mask", ".txt"]),
    "mask_garbage": (lambda w, d: (d / "m.npy").write_bytes(b"not a numpy file") and
                     fit(w, f"--data.subset_mask={d / 'm.npy'}"), ["subset_mask", "unreadable"]),
    "mask_selects_nothing": (lambda w, d: fit(w, f"--data.subset_mask={save(d / 'm.npy', np.zeros(N, bool))}"),
                             ["subset_mask", "selects no example"]),
    # settings and config values
    "config_bad_type": (lambda w, d: fit(w, "--trainer.max_steps=abc"), ["trainer.max_steps", "abc"]),
    "config_unknown_key": (lambda w, d: fit(w, "--model.init_args.nope=1"), ["nope"]),
    "config_batch_size_0": (lambda w, d: fit(w, "--data.init_args.batch_size=0"), ["`batch_size`", "0"]),
    "config_ema_decay": (lambda w, d: fit(w, "--model.init_args.ema_decay=2"), ["`ema_decay`", "2.0"]),
    "score_relative_lam": (lambda w, d: score(w, "--model.relative_lam=-1"), ["`relative_lam`", "-1"]),
    "score_output": (lambda w, d: score(w, "--model.output=norm"), ["`output`", "norm"]),
    "score_num_draws_0": (lambda w, d: score(w, "--model.num_draws=0"), ["`num_draws`", "0"]),
    "score_topk_0": (lambda w, d: score(w, "--model.topk=0"), ["`topk`", "0"]),
    "score_steps_not_recorded": (lambda w, d: score(w, "--model.steps=[123]"), ["`steps`", "123"]),
    "score_steps_empty": (lambda w, d: score(w, "--model.steps=[]"), ["`steps`", "[]"]),
    "score_target_ids_unknown": (lambda w, d: score(w, "--model.target_ids=[7]"), ["`target_ids`", "7"]),
    "score_target_ids_empty": (lambda w, d: score(w, "--model.target_ids=[]"), ["`target_ids`", "[]"]),
    "score_members_other_mask": (lambda w, d: score(w, f"--model.members={save(d / 'm.npy', np.arange(N) < 60)}"),
                                 ["m.npy", "hash", "--model.members"]),
    "score_members_suffix": (lambda w, d: score(w, "--model.members=m.txt"), ["`members`", "m.txt"]),
    "score_rank_unknown": (lambda w, d: score(w, "--model.rank=best"), ["`rank`", "best"]),
    "score_rank_no_nonmembers": (lambda w, d: score(w, "--model.rank=nonmembers"), ["`rank`", "no non-members"]),
    "sample_num_targets_0": (lambda w, d: sample(w, "--num_targets=0"), ["`num_targets`", "0"]),
    "sample_num_record_steps_0": (lambda w, d: sample(w, "--num_record_steps=0"), ["`num_record_steps`", "0"]),
    "sample_real_indices": (lambda w, d: sample(w, "--real_indices=[500]"), ["`real_indices`", "500"]),
    "featurize_proj_dim_0": (lambda w, d: featurize(w, "--settings.proj_dim=0"), ["`proj_dim`", "0"]),
    # checkpoints
    "ckpt_missing": (lambda w, d: featurize(w, checkpoints=d / "nope.ckpt"), ["checkpoints", "nope.ckpt"]),
    "ckpt_folder_empty": (lambda w, d: featurize(w, checkpoints=d), ["checkpoints", "holds none"]),
    "ckpt_garbage": (lambda w, d: (d / "bad.ckpt").write_bytes(b"\x00garbage") and
                     sample(w, checkpoint=d / "bad.ckpt"), ["bad.ckpt", "readable checkpoint"]),
    "ckpt_truncated": (lambda w, d: sample(w, checkpoint=truncate(Path(shutil.copy(w["ckpt"], d / "t.ckpt")))),
                       ["t.ckpt", "readable checkpoint"]),
    "ckpt_bit_flipped": (lambda w, d: featurize(w, checkpoints=flip_checkpoint_tensors(w["ckpt"], d / "f.ckpt")),
                         ["f.ckpt", "checksum"]),
    "ckpt_nan_weights": (lambda w, d: sample(w, checkpoint=nan_checkpoint(w["ckpt"], d / "nan.ckpt")),
                         ["nan.ckpt", "finite weights"]),
    "ckpt_other_architecture": (lambda w, d: featurize(w, checkpoints=other_architecture_checkpoint(w, d)),
                                ["other.ckpt", "model configuration"]),
    "ckpt_other_data": (lambda w, d: ["featurize", "--config", SMOKE, f"--checkpoints={w['ckpt']}",
                                      f"--out_dir={w['root'] / 'never'}",
                                      f"--trainer.default_root_dir={w['root'] / 'never'}"],
                        ["step000003.ckpt", "num_examples"]),
    "fit_resume_other_datamodule": (lambda w, d: ["fit", "--config", SMOKE, f"--ckpt_path={w['ckpt']}",
                                                  f"--trainer.default_root_dir={w['root'] / 'never'}"],
                                    ["ckpt_path", "step000003.ckpt", "num_examples"]),
    "fit_resume_garbage": (lambda w, d: (d / "g.ckpt").write_bytes(b"garbage") and fit(w, f"--ckpt_path={d / 'g.ckpt'}"),
                           ["ckpt_path", "g.ckpt"]),
    # feature stores
    "store_missing": (lambda w, d: score(w, features=d / "none"), ["features", "none"]),
    "store_truncated": (lambda w, d: score(w, features=store_with(w, d, lambda s: truncate(s / "features.npy", 0.6))),
                        ["features.npy", "bytes", "truncated"]),
    "store_flipped_byte": (lambda w, d: score(w, features=store_with(
        w, d, lambda s: flip_byte(s / "features.npy", npy_data_offset(s / "features.npy") + 5))),
        ["features.npy", "sha256"]),
    "store_corrupt_meta": (lambda w, d: score(w, features=store_with(w, d, lambda s: (s / "meta.json").write_text("{"))),
                           ["meta.json", "unreadable"]),
    "store_incomplete": (lambda w, d: score(w, features=store_with(w, d, unfinished)),
                         ["features", "misses 3 of 120 rows"]),
    "store_not_finalized": (lambda w, d: score(w, features=store_with(w, d, lambda s: (s / "kernel.json").unlink())),
                            ["store", "not finalized"]),
    "store_flipped_kernel": (lambda w, d: score(w, features=store_with(
        w, d, lambda s: flip_byte(s / "kernel_eigenvectors.npy", npy_data_offset(s / "kernel_eigenvectors.npy") + 3))),
        ["kernel_eigenvectors.npy", "sha256"]),
    "store_wrong_sized_done": (lambda w, d: score(w, features=store_with(
        w, d, lambda s: np.save(s / "done.npy", np.ones(N + 1, np.uint8)))), ["done.npy", "(121,)"]),
    "store_checkpoint_flipped": (lambda w, d: score(w, features=store_of_flipped_checkpoint(w, d)),
                                 ["f.ckpt", "checksum"]),
    "featurize_into_other_store": (lambda w, d: featurize(w, f"--out_dir={mismatched_partial_store(w, d)}"),
                                   ["different metadata", "d: stored 4 vs given 8"]),
    "featurize_into_truncated_store": (lambda w, d: featurize(w, f"--out_dir={truncated_partial_store(w, d)}"),
                                       ["features.npy", "truncated"]),
    # recorded targets
    "targets_missing": (lambda w, d: score(w, targets=d / "none"), ["targets", "none"]),
    "targets_corrupt_index": (lambda w, d: score(w, targets=targets_with(w, d, "targets.json", b"[")),
                              ["targets.json", "unreadable"]),
    "targets_corrupt_file": (lambda w, d: score(w, targets=targets_with(w, d, "target_0000.pt", b"x")),
                             ["targets.json", "readable"]),
    "targets_empty": (lambda w, d: score(w, targets=targets_with(w, d, "targets.json", b'{"targets": []}')),
                      ["targets", "lists none"]),
    "targets_other_data": (lambda w, d: score(w, targets=other_data_targets(w, d)), ["targets", "0123456789abcdef"]),
    # patches
    "patch_non_integer": (lambda w, d: score(w, "--model.patch=1.5:3,0:4"), ["`patch`", "'1.5' is not an integer"]),
    "patch_reversed": (lambda w, d: score(w, "--model.patch=5:2,0:8"), ["`patch`", "5:2,0:8"]),
    "patch_outside": (lambda w, d: score(w, "--model.patch=0:9,0:8"), ["`patch`", "inside the 8x8"]),
    "patch_all_zero": (lambda w, d: score(w, f"--model.patch={save(d / 'p.npy', np.zeros((8, 8)))}"),
                       ["`patch`", "all zero"]),
    "patch_wrong_shape": (lambda w, d: score(w, f"--model.patch={save(d / 'p.npy', np.ones((3, 3)))}"),
                          ["`patch`", "(3, 3)"]),
    "patch_not_binary": (lambda w, d: score(w, f"--model.patch={save(d / 'p.npy', np.full((8, 8), 2.0))}"),
                         ["`patch`", "binary"]),
    "patch_missing_file": (lambda w, d: score(w, f"--model.patch={d / 'p.npy'}"), ["`patch`", "does not exist"]),
    "patch_neither": (lambda w, d: score(w, "--model.patch=abc"), ["`patch`", "'abc'"]),
    "patch_per_target_count": (lambda w, d: score(w, f"--model.patch={save(d / 'p.npy', np.ones((5, 8, 8)))}"),
                               ["`patch`", "(5, 8, 8)"]),
    # array data
    "array_corrupt_npz": (lambda w, d: (d / "x.npz").write_bytes(b"PK garbage") and array_data(w, d / "x.npz"),
                          ["`path`", "x.npz"]),
    "array_without_images": (lambda w, d: array_data(w, npz(d, pictures=np.zeros((4, 8, 8), np.uint8))),
                             ["'images'", "data.npz"]),
    "array_float_images": (lambda w, d: array_data(w, save(d / "x.npy", np.zeros((4, 8, 8)))), ["uint8", "x.npy"]),
    "array_suffix": (lambda w, d: array_data(w, d / "x.txt"), ["`path`", "x.txt"]),
    "array_labels_length": (lambda w, d: array_data(w, npz(d, images=np.zeros((4, 8, 8), np.uint8),
                                                           labels=np.arange(3))), ["labels", "3"]),
    "array_1d_images": (lambda w, d: array_data(w, save(d / "x.npy", np.zeros(64, np.uint8))), ["shape", "x.npy"]),
    # webdataset shards
    "shards_missing_manifest": (lambda w, d: shard_data(w, d), ["manifest.json"]),
    "shards_incomplete": (lambda w, d: shard_data(w, shards(d, edit_manifest(complete=False))),
                          ["manifest.json", "incomplete"]),
    "shards_wrong_format": (lambda w, d: shard_data(w, shards(d, edit_manifest(format="v0"))),
                            ["manifest.json", "'v0'"]),
    "shards_corrupt_manifest": (lambda w, d: shard_data(w, shards(d, lambda f, m: m.write_text("{"))),
                                ["manifest.json", "JSON"]),
    "shards_truncated": (lambda w, d: shard_data(w, shards(d, lambda f, m: truncate(f / "shard-000001.tar", 0.5))),
                         ["shard-000001.tar", "bytes"]),
}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_the_table_is_large_and_covers_every_kind_of_input():
    kinds = {name.split("_")[0] for name in CASES}
    assert len(CASES) >= 40
    assert {"mask", "config", "score", "sample", "ckpt", "store", "targets", "patch", "array", "shards"} <= kinds


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, world, capsys, monkeypatch):
    build, expected = CASES[name]
    case_dir = world["root"] / "cases" / name
    case_dir.mkdir()
    argv = build(world, case_dir)
    monkeypatch.chdir(case_dir)
    before = snapshot(world["root"])
    capsys.readouterr()
    rc = cli.run(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for text in expected:
        assert text in err, (text, err)
    assert snapshot(world["root"]) == before  # nothing was written, anywhere
    assert not (world["root"] / "never").exists()


def test_debug_switch_shows_the_traceback(world, monkeypatch):
    argv = score(world, "--model.topk=0")
    monkeypatch.setenv("JOURNEY_DEBUG", "1")
    with pytest.raises(ValueError, match="topk"):
        cli.run(argv)
    monkeypatch.delenv("JOURNEY_DEBUG")
    with pytest.raises(ValueError, match="topk"):
        cli.run(["--debug", *argv])
    assert cli.run(argv) == 2
    assert os.environ.get("JOURNEY_DEBUG") is None
