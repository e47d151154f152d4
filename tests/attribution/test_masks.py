"""Tests for attribution.masks: mask file validation, hashes, random masks, fingerprints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.masks import (
    SubsetMaskError,
    dataset_fingerprint,
    indices_to_mask,
    load_subset_mask,
    mask_hash,
    random_mask,
    write_random_masks,
)

N = 1797


def _save(path: Path, content) -> Path:
    if path.suffix == ".npy":
        np.save(path, np.asarray(content))
    else:
        torch.save(content, path)
    return path


# ------------------------------------------------------------------------------- error cases
ERROR_CASES = {
    # name: (file name, content, substrings the message must contain)
    "bool_wrong_length": ("m.npy", np.ones(10, bool), ["a boolean vector of length 10"]),
    "float_half": ("m.npy", np.r_[np.zeros(N - 1), 0.5], ["non-integer", "0.5"]),
    "float_two": ("m.npy", np.r_[np.zeros(N - 1), 2.0], ["values other than 0 and 1", "2.0"]),
    "pt_list_non_integer": ("m.pt", [3, 5.5, 7], ["non-integer", "5.5"]),
    "string_values": ("m.npy", np.array(["1", "2"]), ["non-integer"]),
    "out_of_range": ("m.npy", np.array([0, 5, 1797, 2000, -1]), ["out-of-range", "1797, 2000, -1"]),
    "duplicates": ("m.npy", np.array([9, 3, 3, 7, 9]), ["2 duplicated indices", "3, 9"]),
    "empty_list": ("m.npy", np.array([], np.int64), ["empty"]),
    "empty_mask": ("m.npy", np.zeros(N, bool), ["selects no example"]),
    "two_dimensional": ("m.npy", np.ones((2, 3), bool), ["2-dimensional", "(2, 3)"]),
    "scalar": ("m.npy", np.int64(4), ["a scalar"]),
    "int01_wrong_length": ("m.npy", np.array([1, 0, 1, 1, 0]), ["wrong length", "expected 1797, got 5"]),
    "pt_dict": ("m.pt", {"mask": torch.ones(3)}, ["dict"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_mask_errors_name_argument_expected_and_found(tmp_path, case):
    name, content, found = ERROR_CASES[case]
    path = _save(tmp_path / name, content)
    with pytest.raises(SubsetMaskError) as info:
        load_subset_mask(path, N)
    message = str(info.value)
    assert message.startswith(f"subset_mask '{path}': expected a boolean vector of length {N}")
    assert f"[0, {N})" in message
    for part in found:
        assert part in message, (part, message)


def test_bool_wrong_length_message_is_exact(tmp_path):
    np.save(tmp_path / "m.npy", np.ones(10, bool))
    with pytest.raises(SubsetMaskError) as info:
        load_subset_mask(tmp_path / "m.npy", N)
    assert str(info.value) == (
        f"subset_mask '{tmp_path / 'm.npy'}': expected a boolean vector of length 1797 (one entry per "
        "training example) or a list of integer indices in [0, 1797), but got a boolean vector of length 10"
    )


@pytest.mark.parametrize(
    "name, writer, found",
    [
        ("missing.npy", None, "no such file"),
        ("m.txt", lambda p: p.write_text("1 2 3"), "extension '.txt'"),
        ("m.npy", lambda p: p.write_bytes(b"not numpy at all"), "unreadable"),
        ("m.pt", lambda p: p.write_bytes(b"not torch either"), "unreadable"),
    ],
)
def test_file_errors(tmp_path, name, writer, found):
    path = tmp_path / name
    if writer is not None:
        writer(path)
    with pytest.raises(SubsetMaskError, match="subset_mask") as info:
        load_subset_mask(str(path), N)
    assert found in str(info.value) and str(N) in str(info.value)


def test_subset_mask_error_is_value_error():
    assert issubclass(SubsetMaskError, ValueError)


# ---------------------------------------------------------------------------- valid forms
def test_bool_int_float_mask_and_index_list_agree(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.random(N) < 0.3
    expected = np.flatnonzero(mask)
    shuffled = rng.permutation(expected)
    forms = {
        "bool.npy": mask,
        "int01.npy": mask.astype(np.int64),
        "float01.npy": mask.astype(np.float32),
        "indices.npy": shuffled,
        "indices_u16.npy": shuffled.astype(np.uint16),
        "bool.pt": torch.from_numpy(mask),
        "indices.pt": torch.from_numpy(shuffled),
        "list.pt": shuffled.tolist(),
    }
    hashes = set()
    for name, content in forms.items():
        indices = load_subset_mask(_save(tmp_path / name, content), N)
        assert indices.dtype == np.int64, name
        np.testing.assert_array_equal(indices, expected, err_msg=name)
        hashes.add(mask_hash(indices, N))
    assert hashes == {mask_hash(mask, N)}


def test_short_index_list_of_zero_and_one_is_an_index_list(tmp_path):
    indices = load_subset_mask(_save(tmp_path / "m.npy", np.array([1, 0])), N)
    np.testing.assert_array_equal(indices, [0, 1])


def test_mask_hash_properties():
    all_hash = mask_hash(None, N)
    assert all_hash == mask_hash(np.arange(N), N) == mask_hash(np.ones(N, bool), N)
    assert len(all_hash) == 16 and int(all_hash, 16) >= 0
    assert mask_hash([1, 2], N) == mask_hash([2, 1], N) != mask_hash([1, 3], N)
    assert mask_hash([1, 2], N) != mask_hash([1, 2], N + 1)
    with pytest.raises(ValueError):
        indices_to_mask([N], N)


# --------------------------------------------------------------------------- random masks
def test_write_random_masks_deterministic_and_independent_of_count(tmp_path):
    paths_a = write_random_masks(tmp_path / "a", num_examples=500, num_masks=3, seed=7)
    paths_b = write_random_masks(tmp_path / "b", num_examples=500, num_masks=5, seed=7)
    paths_c = write_random_masks(tmp_path / "c", num_examples=500, num_masks=3, seed=8)
    assert [p.name for p in paths_a] == ["mask_000.npy", "mask_001.npy", "mask_002.npy"]
    for pa, pb, pc in zip(paths_a, paths_b, paths_c):
        mask = np.load(pa)
        assert mask.dtype == bool and mask.shape == (500,)
        np.testing.assert_array_equal(mask, np.load(pb))
        assert not np.array_equal(mask, np.load(pc))
    assert not np.array_equal(np.load(paths_a[0]), np.load(paths_a[1]))
    manifest = json.loads((tmp_path / "a" / "masks.json").read_text())
    assert manifest["num_examples"] == 500 and manifest["num_masks"] == 3 and manifest["seed"] == 7
    assert manifest["p"] == 0.5
    assert manifest["hashes"] == [mask_hash(load_subset_mask(p, 500), 500) for p in paths_a]


def test_write_random_masks_idempotent_and_never_overwrites(tmp_path):
    paths = write_random_masks(tmp_path, num_examples=100, num_masks=2, seed=1)
    stamps = [p.stat().st_mtime_ns for p in paths + [tmp_path / "masks.json"]]
    write_random_masks(tmp_path, num_examples=100, num_masks=2, seed=1)
    assert stamps == [p.stat().st_mtime_ns for p in paths + [tmp_path / "masks.json"]]
    with pytest.raises(FileExistsError, match="mask_000.npy"):
        write_random_masks(tmp_path, num_examples=100, num_masks=2, seed=2)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_random_mask_fraction_close_to_p(p):
    fractions = [random_mask(20000, seed=3, index=j, p=p).mean() for j in range(3)]
    assert np.allclose(fractions, p, atol=0.015)


def test_write_random_masks_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`p`"):
        write_random_masks(tmp_path, 10, 2, seed=0, p=0.0)
    with pytest.raises(ValueError, match="num_masks"):
        write_random_masks(tmp_path, 10, 0, seed=0)


# ---------------------------------------------------------------------------- fingerprint
def test_dataset_fingerprint_stable_and_sensitive():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=20)
    base = dataset_fingerprint(images, labels)
    assert base == dataset_fingerprint(images.copy(), labels.copy()) and len(base) == 16
    changed = images.copy()
    changed[3, 2, 1, 0] ^= 1
    variants = {
        dataset_fingerprint(changed, labels),
        dataset_fingerprint(images, None),
        dataset_fingerprint(images, np.roll(labels, 1)),
        dataset_fingerprint(images, labels, extra="image_size=16"),
        dataset_fingerprint(images.reshape(20, 8, 1, 8), labels),
        dataset_fingerprint(images.view(np.int8), labels),
    }
    assert base not in variants and len(variants) == 6
