"""Tests for webdataset shards: converter round trips, subset streaming, exactly-once over
workers and DDP ranks (simulated and real Lightning DDP), corrupt shards, resumed conversions."""

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.webdataset as wdm
from attribution.masks import SubsetMaskError
from datamodules import WebDatasetDataModule
from datamodules.shards import (
    MANIFEST, ShardError, digits_caption, read_manifest, write_array_shards, write_coco_shards,
    write_csv_shards, write_digits_shards, write_shards,
)
from datamodules.webdataset import even_batch_sizes, plan_epoch

NUM = 300  # digits in the shared shards (64 per shard: 5 shards, the last with 44)


def digits_arrays(n: int = NUM) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images[:n] * (255.0 / 16.0)).astype(np.uint8), digits.target[:n]


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_digits_shards(out, samples_per_shard=64, limit=NUM)
    return out


def save_mask(path: Path, mask: np.ndarray) -> str:
    np.save(path, mask)
    return str(path)


def random_subset(tmp_path: Path, n: int = NUM, seed: int = 1) -> tuple[str, np.ndarray]:
    mask = np.random.default_rng(seed).random(n) < 0.5
    return save_mask(tmp_path / "mask.npy", mask), np.flatnonzero(mask)


def epoch_indices(loader) -> list[list[int]]:
    return [batch["index"].tolist() for batch in loader]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images + 1) * 127.5).round().to(torch.uint8).numpy()


# ==================================================================== converter round trips
def test_digits_round_trip_pixels_indices_captions(digit_shards):
    images, labels = digits_arrays()
    manifest = read_manifest(digit_shards)
    assert manifest["num_examples"] == NUM
    assert [s["count"] for s in manifest["shards"]] == [64, 64, 64, 64, 44]
    assert [s["first"] for s in manifest["shards"]] == [0, 64, 128, 192, 256]
    dm = WebDatasetDataModule(str(digit_shards), batch_size=50)
    batches = list(dm.featurize_dataloader())
    index = torch.cat([b["index"] for b in batches]).numpy()
    np.testing.assert_array_equal(index, np.arange(NUM))
    pixels = to_uint8(torch.cat([b["image"] for b in batches]))
    np.testing.assert_array_equal(pixels[:, 0], images)
    np.testing.assert_array_equal(torch.cat([b["label"] for b in batches]).numpy(), labels)
    assert sum((b["caption"] for b in batches), []) == [digits_caption(k) for k in labels]
    assert dm.all_captions([7])[0] == [digits_caption(labels[7]), f"the number {labels[7]}, written by hand"]
    np.testing.assert_array_equal(to_uint8(dm.images([299, 3]))[:, 0], images[[299, 3]])
    full = dm.full_dataset()
    assert len(full) == NUM and full[130]["index"] == 130 and full[130]["label"] == labels[130]
    np.testing.assert_array_equal(to_uint8(full[130]["image"])[0], images[130])
    assert dm.image_shape == (1, 8, 8) and dm.label_names == [str(d) for d in range(10)]


def test_shards_are_plain_webdataset(digit_shards):
    import webdataset as wds

    url = str(digit_shards / "shard-000001.tar")
    first = next(iter(wds.WebDataset([url], shardshuffle=False).decode("l")))
    assert first["__key__"] == "00000064" and first["index.cls"] == 64
    assert first["png"].shape == (8, 8) and len(first["captions.json"]) == 2


def test_command_line(tmp_path):
    from datamodules.shards import main

    summary = main(["digits", str(tmp_path), "--limit", "40", "--samples-per-shard", "16", "--check"])
    assert summary.num_examples == 40 and len(summary.written) == 3
    assert read_manifest(tmp_path)["fingerprint"] == summary.fingerprint


def write_pictures(folder: Path, names: list[str], size=(6, 5)) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng, pixels = np.random.default_rng(0), {}
    for name in names:
        pixels[name] = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels[name]).save(folder / name)
    return pixels


def test_coco_json_front_end(tmp_path):
    pixels = write_pictures(tmp_path / "img", ["c.png", "a.png", "b.png"])
    coco = {"images": [{"id": 5, "file_name": "c.png"}, {"id": 9, "file_name": "a.png"},
                       {"id": 2, "file_name": "b.png"}],
            "annotations": [{"image_id": 9, "caption": "a one"}, {"image_id": 5, "caption": "c one"},
                            {"image_id": 9, "caption": "a two "}, {"image_id": 2, "caption": "b one"},
                            {"image_id": 9, "caption": "a three"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    summary = write_coco_shards(tmp_path / "out", tmp_path / "img", tmp_path / "captions.json", 2)
    assert summary.written == ["shard-000000.tar", "shard-000001.tar"]
    dm = WebDatasetDataModule(str(tmp_path / "out"), batch_size=2)
    assert dm.all_captions([0, 1, 2]) == [["a one", "a two", "a three"], ["b one"], ["c one"]]
    assert dm.captions([2, 0]) == ["c one", "a one"] and dm.image_shape == (3, 5, 6)
    got = to_uint8(dm.images([0, 1, 2])).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, np.stack([pixels[n] for n in ("a.png", "b.png", "c.png")]))


def test_csv_front_end_resizes_mixed_sizes(tmp_path):
    write_pictures(tmp_path / "img", ["y.png"], size=(10, 7))
    write_pictures(tmp_path / "img", ["x.png"], size=(5, 9))
    (tmp_path / "caps.csv").write_text('file,caption\ny.png,"why, one"\nx.png,ex one\ny.png,why two\n')
    write_csv_shards(tmp_path / "same", tmp_path / "img", tmp_path / "caps.csv")
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        WebDatasetDataModule(str(tmp_path / "same"))
    assert WebDatasetDataModule(str(tmp_path / "same"), image_size=4).images([0, 1]).shape == (2, 3, 4, 4)
    write_csv_shards(tmp_path / "sq", tmp_path / "img", tmp_path / "caps.csv", image_size=4, grayscale=True)
    dm = WebDatasetDataModule(str(tmp_path / "sq"))
    assert dm.all_captions([0, 1]) == [["ex one"], ["why, one", "why two"]] and dm.image_shape == (1, 4, 4)
    (tmp_path / "bad.csv").write_text("missing.png,nothing\n")
    with pytest.raises(ValueError, match="missing.png"):
        write_csv_shards(tmp_path / "bad", tmp_path / "img", tmp_path / "bad.csv")


# ======================================================================== streaming a subset
def test_train_epoch_is_exactly_the_subset_and_seeded(digit_shards, tmp_path):
    mask_path, subset = random_subset(tmp_path)
    dm = WebDatasetDataModule(str(digit_shards), subset_mask=mask_path, batch_size=32, shuffle_buffer=40)
    loader = dm.train_dataloader()
    first, second = flat(epoch_indices(loader)), flat(epoch_indices(loader))
    assert sorted(first) == subset.tolist() and sorted(second) == subset.tolist()
    assert first != second  # the next epoch reshuffles
    again = WebDatasetDataModule(str(digit_shards), subset_mask=mask_path, batch_size=32, shuffle_buffer=40)
    assert flat(epoch_indices(again.train_dataloader())) == first  # same seed, same order
    assert len(loader) == len(epoch_indices(loader)) == int(np.ceil(len(subset) / 32))


def test_training_caption_and_flip_are_seeded_per_example(digit_shards):
    def by_index(batch):
        order = batch["index"].argsort()
        return batch["index"][order], [batch["caption"][i] for i in order], batch["image"][order]

    dm = WebDatasetDataModule(str(digit_shards), batch_size=NUM, augment=True)
    loader = dm.train_dataloader()
    (index, first, image0), (_, second, image1) = by_index(next(iter(loader))), by_index(next(iter(loader)))
    assert all(c in o for c, o in zip(first, dm.all_captions(index)))
    assert len(set(first)) > 10 and first != second  # both caption kinds; redrawn each epoch
    plain = dm.images(index)
    flipped = [not torch.equal(a, p) for a, p in zip(image0, plain)]
    assert all(torch.equal(a, p.flip(-1)) for a, p, f in zip(image0, plain, flipped) if f)
    assert 0 < sum(flipped) < NUM and not torch.equal(image0, image1)
    again = WebDatasetDataModule(str(digit_shards), batch_size=NUM, augment=True)
    assert by_index(next(iter(again.train_dataloader())))[1] == first  # seeded


@pytest.mark.parametrize("samples_per_shard", [150, 30])  # 1 shard, 5 shards
def test_two_workers_see_each_example_once(tmp_path, samples_per_shard):
    images, labels = digits_arrays(150)
    write_array_shards(tmp_path / "s", images, [digits_caption(k) for k in labels], labels,
                       samples_per_shard=samples_per_shard)
    mask_path, subset = random_subset(tmp_path, 150)
    dm = WebDatasetDataModule(str(tmp_path / "s"), subset_mask=mask_path, batch_size=8, num_workers=2)
    seen = flat(epoch_indices(dm.train_dataloader()))
    assert len(seen) == len(set(seen)) and sorted(seen) == subset.tolist()
    wanted = subset[::3][::-1]  # any order in; increasing order out
    batches = epoch_indices(dm.featurize_dataloader(wanted, batch_size=5))
    assert batches == [sorted(wanted)[j:j + 5] for j in range(0, len(wanted), 5)]
    assert flat(epoch_indices(dm.featurize_dataloader())) == list(range(150))


# ================================================================================ DDP split
def test_plan_is_exactly_once_with_equal_batches():
    """Brute force over shard layouts, subsets, ranks, workers and batch sizes."""
    rng = np.random.default_rng(0)
    for counts, world, workers, batch in itertools.product(
        ([7], [3, 3, 1], [4] * 6), (1, 2, 3), (1, 2, 4), (1, 2, 5)
    ):
        counts = np.array(counts)
        firsts = np.r_[0, np.cumsum(counts)[:-1]]
        subset = np.flatnonzero(rng.random(counts.sum()) < 0.7)
        if len(subset) // world < -(-(-(-len(subset) // world)) // batch):
            continue  # the datamodule refuses these (a rank would get fewer samples than batches)
        seen, per_rank = [], []
        for rank in range(world):
            sizes_of_rank = []
            for worker in range(workers):
                reads, sizes = plan_epoch(firsts, counts, subset, 0, 3, rank, world, worker, workers, batch)
                kept = [i for _, part in reads for i in part.tolist()]
                assert sum(sizes) == len(kept) and all(0 < s <= batch for s in sizes)
                assert all(firsts[s] <= p.min() and p.max() < firsts[s] + counts[s] for s, p in reads)
                seen += kept
                sizes_of_rank += sizes
            per_rank.append(len(sizes_of_rank))
        assert sorted(seen) == subset.tolist(), (counts, world, workers, batch)
        assert len(set(per_rank)) == 1  # DDP: every rank runs the same number of steps


def test_even_batch_sizes():
    assert even_batch_sizes(33, 3, 16) == [16, 16, 1]
    assert even_batch_sizes(32, 3, 16) == [16, 15, 1]
    with pytest.raises(ValueError, match="non-empty"):
        even_batch_sizes(2, 3, 16)


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (3, 2)])
def test_simulated_ranks_disjoint_and_cover(digit_shards, tmp_path, monkeypatch, world_size, num_workers):
    mask_path, subset = random_subset(tmp_path)
    per_rank = []
    for rank in range(world_size):
        monkeypatch.setattr(wdm, "_rank_and_world_size", lambda rank=rank: (rank, world_size))
        dm = WebDatasetDataModule(str(digit_shards), subset_mask=mask_path, batch_size=16,
                                  num_workers=num_workers, shuffle_buffer=10)
        per_rank.append(epoch_indices(dm.train_dataloader()))
    everything = flat(sum(per_rank, []))
    assert len(everything) == len(set(everything)) and sorted(everything) == subset.tolist()
    assert len({len(batches) for batches in per_rank}) == 1


RECORDER = textwrap.dedent('''
    import json
    from pathlib import Path

    import lightning as L
    import torch

    from datamodules import WebDatasetDataModule

    class Recorder(L.LightningModule):
        """Writes the global indices of its training batches to ``out/rank{r}_epoch{e}.json``."""

        def __init__(self, out):
            super().__init__()
            self.out, self.seen, self.layer = Path(out), [], torch.nn.Linear(64, 1)

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            return self.layer(batch["image"].flatten(1)).pow(2).mean()

        def on_train_epoch_end(self):
            name = f"rank{self.global_rank}_epoch{self.current_epoch}.json"
            (self.out / name).write_text(json.dumps(self.seen))
            self.seen = []

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit(shards, mask, out, strategy):
        data = WebDatasetDataModule(shards, subset_mask=mask, batch_size=16, shuffle_buffer=20)
        trainer = L.Trainer(accelerator="cpu", strategy=strategy, devices=2, max_epochs=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(Recorder(out), datamodule=data)
''')
exec(RECORDER)  # defines Recorder and fit here too (ddp_fork children need no import)


def ddp_mask(tmp_path: Path) -> tuple[str, np.ndarray]:
    mask = np.zeros(NUM, dtype=bool)
    mask[np.random.default_rng(3).choice(NUM, 151, replace=False)] = True  # odd: uneven ranks
    return save_mask(tmp_path / "m.npy", mask), np.flatnonzero(mask)


def check_ddp_records(out: Path, subset: np.ndarray) -> None:
    orders = []
    for epoch in range(2):
        ranks = [json.loads((out / f"rank{r}_epoch{epoch}.json").read_text()) for r in range(2)]
        seen = [flat(batches) for batches in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == subset.tolist()
        assert len(ranks[0]) == len(ranks[1]) == 5  # 76 and 75 samples in 5 batches each
        orders.append(seen[0])
    assert orders[0] != orders[1]  # the trainer's epoch reshuffles


def test_lightning_ddp_fork_exactly_once(digit_shards, tmp_path):
    """Lightning's DDPStrategy (gloo, 2 CPU processes) started by forking this process."""
    mask_path, subset = ddp_mask(tmp_path)
    fit(str(digit_shards), mask_path, tmp_path, "ddp_fork")
    check_ddp_records(tmp_path, subset)


def test_lightning_ddp_script_exactly_once(digit_shards, tmp_path, repo_root):
    """``strategy="ddp"`` as users run it. A script in a subprocess: the ddp launcher re-executes
    ``sys.argv`` for rank 1, which inside pytest would rerun the whole test session."""
    mask_path, subset = ddp_mask(tmp_path)
    script = tmp_path / "ddp_fit.py"
    script.write_text(RECORDER + "\nimport sys\nif __name__ == '__main__':\n    fit(*sys.argv[1:4], 'ddp')\n")
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(script), str(digit_shards), mask_path, str(tmp_path)]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    check_ddp_records(tmp_path, subset)


# ========================================================================= failures, reruns
def test_truncated_shard_is_named_at_construction(digit_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digit_shards, copy)
    shard = copy / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match="shard-000002.tar.*truncated"):
        WebDatasetDataModule(str(copy))
    (copy / "shard-000003.tar").unlink()
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["shards"][2]["bytes"] = 5000  # a manifest that agrees with the truncated file
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="shard-000003.tar.*missing"):
        WebDatasetDataModule(str(copy))


def test_corrupt_shard_is_named_while_reading(digit_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digit_shards, copy)
    shard = copy / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)  # zeros: tar sees an early end
    shard.write_bytes(bytes(data))
    dm = WebDatasetDataModule(str(copy), batch_size=64, shuffle_buffer=0)  # same size: passes init
    with pytest.raises(ShardError, match="shard-000001.tar"):
        list(dm.featurize_dataloader())
    with pytest.raises(ShardError, match="shard-000001.tar"):
        list(dm.train_dataloader())
    data[600:700] = b"\xff" * 100  # garbage inside the first member's data/header area
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000001.tar"):
        dm.images([64])


def test_interrupted_conversion_resumes_and_skips_complete_shards(tmp_path):
    images, labels = digits_arrays(100)
    items = [{"image": images[i], "captions": [digits_caption(labels[i])], "label": int(labels[i])}
             for i in range(100)]
    out, broken = tmp_path / "out", tmp_path / "broken.png"
    broken.write_bytes(b"not a png")  # the conversion dies while writing the third shard
    with pytest.raises(ValueError, match="item 70.*broken.png"):
        write_shards(out, items[:70] + [{**items[70], "image": broken}] + items[71:], samples_per_shard=32)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(ShardError, match="incomplete"):
        WebDatasetDataModule(str(out))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    summary = write_shards(out, items, samples_per_shard=32)
    assert summary.skipped == ["shard-000000.tar", "shard-000001.tar"]
    assert summary.written == ["shard-000002.tar", "shard-000003.tar"]
    assert all(out.joinpath(name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert write_shards(out, items, samples_per_shard=32).written == []
    fresh = write_shards(tmp_path / "fresh", items, samples_per_shard=32)
    assert fresh.fingerprint == summary.fingerprint
    got = to_uint8(WebDatasetDataModule(str(out)).images(range(100)))[:, 0]
    np.testing.assert_array_equal(got, images)
    with pytest.raises(FileExistsError, match="different data"):
        write_shards(out, items[::-1], samples_per_shard=32)


# ============================================================================ argument errors
def test_bad_arguments_fail_at_construction(digit_shards, tmp_path):
    with pytest.raises(SubsetMaskError, match="length"):
        WebDatasetDataModule(str(digit_shards),
                             subset_mask=save_mask(tmp_path / "m.npy", np.ones(NUM + 1, bool)))
    with pytest.raises(ValueError, match="caption_index"):
        WebDatasetDataModule(str(digit_shards), caption_index=2)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        WebDatasetDataModule(str(tmp_path))
    dm = WebDatasetDataModule(str(digit_shards), caption_index=1, image_size=4)
    assert dm.captions([0]) == ["the number 0, written by hand"] and dm.image_shape == (1, 4, 4)
    assert dm.fingerprint != WebDatasetDataModule(str(digit_shards)).fingerprint
    with pytest.raises(ValueError, match="duplicates"):
        dm.featurize_dataloader([1, 1])
