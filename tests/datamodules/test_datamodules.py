"""Tests for datamodules: shapes, ranges, global indices, subset loaders, determinism, errors."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.masks import SubsetMaskError, mask_hash
from datamodules import (
    ArrayDataModule,
    CIFAR10DataModule,
    DigitsDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    MNIST5kDataModule,
)


# ------------------------------------------------------------------------------ fake data
def write_fake_cifar(root: Path, per_batch: int = 4, seed: int = 0) -> np.ndarray:
    """Five train batches + test batch + meta in the real pickle format; returns train rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": [(k + i) % 10 for i in range(per_batch)],
                 b"data": data, b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(root / name, "wb") as handle:
            pickle.dump(batch, handle)
        rows.append(data)
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, handle)
    return np.concatenate(rows[:5])


def write_image_folder(root: Path) -> None:
    """7 solid-colour PNGs of mixed non-square sizes in two class folders."""
    specs = {"dog/b.png": (40, 30), "dog/a.png": (16, 16), "cat/z.png": (20, 10),
             "cat/y.png": (12, 24), "cat/sub/x.png": (9, 9), "dog/c.png": (33, 17), "dog/d.png": (8, 8)}
    for k, (name, size) in enumerate(sorted(specs.items())):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color=(30 * k, 255 - 30 * k, 17)).save(path)
    (root / "notes.txt").write_text("not an image")


def fake_images(seed: int = 0, n: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 6, 6, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- factories
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(root / "cifar-10-batches-py")
    write_image_folder(root / "folder")
    np.save(root / "images.npy", fake_images()[..., 0])
    np.savez(root / "images.npz", images=fake_images(), labels=np.arange(12) % 3)
    return root


def make(kind: str, data_dir: Path, **kwargs) -> ImageDataModule:
    if kind == "digits":
        return DigitsDataModule(**kwargs)
    if kind == "mnist5k":
        return MNIST5kDataModule(**kwargs)
    if kind == "cifar":
        return CIFAR10DataModule(str(data_dir / "cifar-10-batches-py"), **kwargs)
    if kind == "folder":
        return ImageFolderDataModule(str(data_dir / "folder"), image_size=8, **kwargs)
    if kind == "npy":
        return ArrayDataModule(str(data_dir / "images.npy"), **kwargs)
    if kind == "npz":
        return ArrayDataModule(str(data_dir / "images.npz"), **kwargs)
    raise ValueError(kind)


EXPECTED = {  # kind: (N, image_shape, labelled)
    "digits": (1797, (1, 8, 8), True),
    "mnist5k": (5000, (1, 28, 28), True),
    "cifar": (20, (3, 32, 32), True),
    "folder": (7, (3, 8, 8), True),
    "npy": (12, (1, 6, 6), False),
    "npz": (12, (3, 6, 6), True),
}
KINDS = sorted(EXPECTED)


def collect(loader) -> dict:
    batches = list(loader)
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


def write_mask(tmp_path: Path, num_examples: int, seed: int = 0) -> np.ndarray:
    mask = np.random.default_rng(seed).random(num_examples) < 0.4
    mask[[0, num_examples - 1]] = [False, True]
    np.save(tmp_path / "mask.npy", mask)
    return np.flatnonzero(mask)


# ---------------------------------------------------------------------- common behaviour
@pytest.mark.parametrize("kind", KINDS)
def test_full_dataset_and_featurize_are_global_order(kind, data_dir):
    num, shape, labelled = EXPECTED[kind]
    dm = make(kind, data_dir, batch_size=1024)
    assert dm.num_examples == num and dm.image_shape == shape
    np.testing.assert_array_equal(dm.subset_indices, np.arange(num))
    assert dm.mask_hash == mask_hash(None, num)
    full = dm.full_dataset()
    assert len(full) == num
    item = full[num - 1]
    assert set(item) == {"image", "index", "label"} and item["index"] == num - 1
    assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == shape
    batch = collect(dm.featurize_dataloader())
    np.testing.assert_array_equal(batch["index"].numpy(), np.arange(num))
    images = batch["image"]
    assert tuple(images.shape) == (num, *shape)
    assert images.min() >= -1 and images.max() <= 1 and images.min() < 0 < images.max()
    assert ((batch["label"] >= 0).all() if labelled else (batch["label"] == -1).all())
    assert (dm.label_names is not None) == labelled
    torch.testing.assert_close(dm.images([num - 1, 0]), images[[num - 1, 0]])
    torch.testing.assert_close(full[num - 1]["image"], images[num - 1])
    some = collect(dm.featurize_dataloader(indices=[num - 1, 2, 1], batch_size=2))
    np.testing.assert_array_equal(some["index"].numpy(), [num - 1, 2, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_train_dataloader_yields_exactly_the_subset_deterministically(kind, data_dir, tmp_path):
    num = EXPECTED[kind][0]
    subset = write_mask(tmp_path, num)
    dm = make(kind, data_dir, subset_mask=str(tmp_path / "mask.npy"), batch_size=64, seed=3)
    np.testing.assert_array_equal(dm.subset_indices, subset)
    assert dm.mask_hash == mask_hash(subset, num) != mask_hash(None, num)
    epoch = collect(dm.train_dataloader())
    order = epoch["index"].numpy()
    np.testing.assert_array_equal(np.sort(order), subset)  # each subset example exactly once
    assert not np.array_equal(order, subset)  # shuffled
    torch.testing.assert_close(epoch["image"], dm.images(order))  # augment=False: exact pixels
    same = make(kind, data_dir, subset_mask=str(tmp_path / "mask.npy"), batch_size=64, seed=3)
    other = make(kind, data_dir, subset_mask=str(tmp_path / "mask.npy"), batch_size=64, seed=4)
    np.testing.assert_array_equal(collect(same.train_dataloader())["index"].numpy(), order)
    assert not np.array_equal(collect(other.train_dataloader())["index"].numpy(), order)
    assert same.fingerprint == dm.fingerprint


@pytest.mark.parametrize("kind", KINDS)
def test_bad_mask_fails_at_construction(kind, data_dir, tmp_path):
    num = EXPECTED[kind][0]
    np.save(tmp_path / "bad.npy", np.ones(num + 1, bool))
    expected = f"expected a boolean vector of length {num} .*got a boolean vector of length {num + 1}"
    with pytest.raises(SubsetMaskError, match=expected):
        make(kind, data_dir, subset_mask=str(tmp_path / "bad.npy"))


def test_augment_flips_only_horizontally(data_dir):
    dm = make("npz", data_dir, augment=True, batch_size=4)
    torch.manual_seed(0)
    flips = 0
    for _ in range(4):
        epoch = collect(dm.train_dataloader())
        original = dm.images(epoch["index"])
        flipped = original.flip(-1)
        for image, a, b in zip(epoch["image"], original, flipped):
            assert torch.equal(image, a) or torch.equal(image, b)
            flips += int(torch.equal(image, b))
    assert 0 < flips < 48
    plain = collect(dm.featurize_dataloader())["image"]
    torch.testing.assert_close(plain, dm.images(range(12)))  # featurize never augments


def test_state_dict_detects_other_data_or_mask(data_dir, tmp_path):
    dm = make("npz", data_dir)
    state = dm.state_dict()
    make("npz", data_dir).load_state_dict(state)
    np.save(tmp_path / "m.npy", np.arange(5))
    with pytest.raises(ValueError, match="mask_hash"):
        make("npz", data_dir, subset_mask=str(tmp_path / "m.npy")).load_state_dict(state)


def test_constructor_arguments_are_validated():
    with pytest.raises(ValueError, match="`batch_size`"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="`pad`"):
        DigitsDataModule(pad=-1)


# ---------------------------------------------------------------------- dataset specifics
def test_digits_pixels_labels_and_resize():
    from sklearn.datasets import load_digits

    digits = load_digits()
    dm = DigitsDataModule()
    expected = torch.from_numpy(np.round(digits.images[:3] * 255 / 16) / 127.5 - 1).float()
    torch.testing.assert_close(dm.images([0, 1, 2])[:, 0], expected)
    assert dm.label_names == [str(i) for i in range(10)]
    assert [dm.full_dataset()[i]["label"] for i in range(3)] == digits.target[:3].tolist()
    big = DigitsDataModule(image_size=16, pad=2)
    assert big.image_shape == (1, 20, 20) and big.fingerprint != dm.fingerprint
    assert big.images([0]).min() >= -1 and big.images([0])[0, 0, 0, 0] == -1  # zero padding
    assert dm.hparams["image_size"] == 8 and big.hparams["pad"] == 2


def test_mnist5k_pad_and_labels():
    dm = MNIST5kDataModule(pad=2, image_size=14)
    assert dm.image_shape == (1, 18, 18) and dm.num_examples == 5000
    labels = dm.full_dataset().labels
    assert torch.bincount(labels).tolist() == [500] * 10


def test_cifar_reads_pickle_layout_in_order(data_dir):
    rows = write_fake_cifar(data_dir / "again", seed=0)
    dm = CIFAR10DataModule(str(data_dir / "cifar-10-batches-py"))
    for index in (0, 5, 19):  # batch 1 row 0, batch 2 row 1, batch 5 row 3
        expected = torch.from_numpy(rows[index].reshape(3, 32, 32).astype(np.float32) / 127.5 - 1)
        torch.testing.assert_close(dm.images([index])[0], expected)
    assert [dm.full_dataset()[i]["label"] for i in (0, 5)] == [0, 2]
    assert dm.label_names == [f"class{i}" for i in range(10)]
    test = CIFAR10DataModule(str(data_dir / "cifar-10-batches-py"), split="test")
    assert test.num_examples == 4 and test.fingerprint != dm.fingerprint


def test_cifar_missing_root_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10DataModule(str(tmp_path / "nowhere"))
    message = str(info.value)
    assert f"root '{tmp_path / 'nowhere'}' does not contain data_batch_1 ... data_batch_5" in message
    assert "cifar-10-python.tar.gz" in message and "<root>/data_batch_1" in message
    assert "never downloads" in message
    write_fake_cifar(tmp_path / "partial")
    (tmp_path / "partial" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="missing: data_batch_4"):
        CIFAR10DataModule(str(tmp_path / "partial"))


def test_image_folder_order_labels_crop_and_grayscale(data_dir, tmp_path):
    dm = make("folder", data_dir)
    names = [p.relative_to(data_dir / "folder").as_posix() for p in dm.files]
    assert names == sorted(names) and names[0] == "cat/sub/x.png" and len(names) == 7
    assert dm.label_names == ["cat", "dog"]
    assert [dm.full_dataset()[i]["label"] for i in range(7)] == [0, 0, 0, 1, 1, 1, 1]
    images = dm.images(range(7))
    assert torch.allclose(images, images[:, :, :1, :1].expand_as(images), atol=1 / 127.5)  # solid
    gray = ImageFolderDataModule(str(data_dir / "folder"), image_size=5, grayscale=True)
    assert gray.image_shape == (1, 5, 5) and gray.fingerprint != dm.fingerprint
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 6)).save(tmp_path / "flat" / "a.png")
    flat = ImageFolderDataModule(str(tmp_path / "flat"), image_size=4)
    assert flat.label_names is None and flat.full_dataset()[0]["label"] == -1
    with pytest.raises(FileNotFoundError, match="found none"):
        ImageFolderDataModule(str(data_dir / "cifar-10-batches-py"), image_size=4)


def test_array_fingerprint_changes_with_data(tmp_path):
    images = fake_images()
    np.save(tmp_path / "a.npy", images)
    first = ArrayDataModule(str(tmp_path / "a.npy")).fingerprint
    assert ArrayDataModule(str(tmp_path / "a.npy")).fingerprint == first
    images[4, 1, 1, 0] ^= 1
    np.save(tmp_path / "a.npy", images)
    assert ArrayDataModule(str(tmp_path / "a.npy")).fingerprint != first
    assert ArrayDataModule(str(tmp_path / "a.npy"), image_size=3).image_shape == (3, 3, 3)


@pytest.mark.parametrize(
    "content, match",
    [
        (np.zeros((3, 4, 4), np.float32), "expected uint8 images .* got dtype float32"),
        (np.zeros((3, 4, 4, 5), np.uint8), r"shape \(3, 4, 4, 5\)"),
        (np.zeros((3, 4), np.uint8), r"shape \(3, 4\)"),
        ({"pixels": np.zeros((3, 4, 4), np.uint8)}, "expected an 'images' array"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(2, np.int64)}, "expected 3 labels"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(3)}, "non-negative integers"),
    ],
)
def test_array_errors(tmp_path, content, match):
    if isinstance(content, dict):
        path = tmp_path / "x.npz"
        np.savez(path, **content)
    else:
        path = tmp_path / "x.npy"
        np.save(path, content)
    with pytest.raises(ValueError, match=match):
        ArrayDataModule(str(path))


def test_array_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ArrayDataModule(str(tmp_path / "none.npy"))
