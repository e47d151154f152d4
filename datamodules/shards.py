"""Converter to captioned-image webdataset shards (format: ``datamodules.shard_format``).

:func:`write_shards` writes each shard atomically (``attribution.atomic``), then
updates ``manifest.json`` (``"complete": false`` until the last shard). A killed conversion
therefore leaves only whole shards; a rerun skips every shard whose source digest matches its
manifest entry and raises ``FileExistsError`` when the folder holds a different conversion
(never overwrites it silently). Front-ends: COCO captions JSON or ``file,caption`` CSV beside an
image folder, in-memory uint8 arrays, and sklearn's digits with captions (demo data).

Command line: ``python -m datamodules.shards {digits,coco,csv} OUT_DIR ...`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from attribution.atomic import atomic_write, atomic_write_text
from attribution.images import square_resize_hwc
from datamodules.shard_format import (
    FORMAT, MANIFEST, RawSample, ShardError, check_shard_files, check_shards, iter_shard, read_manifest,
)

__all__ = [
    "FORMAT", "MANIFEST", "ShardError", "RawSample", "ShardSummary", "write_shards",
    "array_items", "coco_items", "csv_items", "write_array_shards", "write_coco_shards",
    "write_csv_shards", "write_digits_shards", "digits_caption", "read_manifest",
    "check_shard_files", "iter_shard", "check_shards",
]

log = logging.getLogger(__name__)

_DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PathLike = Union[str, Path]


@dataclass
class ShardSummary:
    """What :func:`write_shards` did."""

    manifest_path: Path
    num_examples: int
    fingerprint: str
    written: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


# ================================================================================ items
def digits_caption(label: int) -> str:
    """``7 -> "a handwritten digit seven"``."""
    return f"a handwritten digit {_DIGIT_WORDS[int(label)]}"


def array_items(
    images: np.ndarray, captions: Sequence[Union[str, Sequence[str]]],
    labels: Optional[Sequence[int]] = None,
) -> list[dict]:
    """Items for :func:`write_shards` from uint8 ``(N, H, W[, C])`` images, in array order."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"Expected `images` to be uint8 (N, H, W) or (N, H, W, C), but got {images.dtype} "
            f"of shape {images.shape}"
        )
    if len(captions) != len(images) or (labels is not None and len(labels) != len(images)):
        raise ValueError(
            f"Expected {len(images)} captions and labels (one per image), but got {len(captions)} "
            f"captions and {None if labels is None else len(labels)} labels"
        )
    return [
        {"image": images[i], "captions": captions[i], "label": None if labels is None else int(labels[i])}
        for i in range(len(images))
    ]


def coco_items(image_dir: PathLike, captions_json: PathLike) -> list[dict]:
    """Items from a COCO captions file (``images[{id, file_name}]``, ``annotations[{image_id,
    caption}]``): every listed image, sorted by ``file_name`` (the global index), with all its
    captions in annotation order. An image without a caption or a missing file is an error."""
    with open(captions_json, encoding="utf-8") as handle:
        coco = json.load(handle)
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise ValueError(f"captions_json '{captions_json}': expected a COCO captions file with "
                         "'images' and 'annotations'")
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    captions: dict[str, list[str]] = {name: [] for name in names.values()}
    for note in coco["annotations"]:
        if note["image_id"] not in names:
            raise ValueError(f"captions_json '{captions_json}': annotation for unknown image_id "
                             f"{note['image_id']}")
        captions[names[note["image_id"]]].append(str(note["caption"]).strip())
    return _folder_items(Path(image_dir), captions, f"captions_json '{captions_json}'")


def csv_items(image_dir: PathLike, captions_csv: PathLike) -> list[dict]:
    """Items from a CSV of ``file,caption`` rows (optional ``file,caption`` header; several rows
    per file allowed, kept in row order); files are relative to ``image_dir``, global index =
    sorted file name."""
    captions: dict[str, list[str]] = {}
    with open(captions_csv, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle)):
            if number == 0 and [cell.strip().lower() for cell in row] == ["file", "caption"]:
                continue
            if len(row) != 2:
                raise ValueError(f"captions_csv '{captions_csv}' row {number + 1}: expected "
                                 f"2 columns (file, caption), but got {len(row)}")
            captions.setdefault(row[0].strip(), []).append(row[1].strip())
    return _folder_items(Path(image_dir), captions, f"captions_csv '{captions_csv}'")


def _folder_items(image_dir: Path, captions: dict, source: str) -> list[dict]:
    empty = [name for name, found in captions.items() if not found]
    missing = [name for name in captions if not (image_dir / name).is_file()]
    if empty or missing or not captions:
        raise ValueError(
            f"{source}: expected every listed image to exist under '{image_dir}' and to have a "
            f"caption, but got {len(captions)} images, missing files {missing[:5]}, "
            f"images without caption {empty[:5]}"
        )
    return [{"image": image_dir / name, "captions": captions[name], "label": None}
            for name in sorted(captions)]


# ============================================================================ encoding
def _check_item(item: Mapping, index: int) -> tuple[Any, list, int]:
    captions = item.get("captions", [])
    captions = [captions] if isinstance(captions, str) else list(captions)
    if not all(isinstance(text, str) for text in captions):
        raise ValueError(f"item {index}: expected `captions` to be a str or a list of str, "
                         f"but got {item.get('captions')!r}")
    if "image" not in item:
        raise ValueError(f"item {index}: expected an 'image' (uint8 array or file path), but got "
                         f"keys {sorted(item)}")
    label = item.get("label")
    label = -1 if label is None else int(label)
    return item["image"], captions, label


def _image_digest(image: Any) -> bytes:
    if isinstance(image, (str, Path)):
        return hashlib.sha256(Path(image).read_bytes()).digest()
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{array.shape}:{array.dtype}:".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.digest()


def _shard_digest(chunk: Sequence[Mapping], first: int, settings: str) -> str:
    """sha256 of the *source* of one shard (cheap: no decoding or PNG encoding)."""
    digest = hashlib.sha256(f"{FORMAT}:{settings}:".encode())
    for offset, item in enumerate(chunk):
        image, captions, label = _check_item(item, first + offset)
        digest.update(f"{first + offset}:{label}:{json.dumps(captions)}:".encode())
        digest.update(_image_digest(image))
    return digest.hexdigest()


def _to_pixels(image: Any, index: int, image_size: Optional[int], grayscale: bool) -> np.ndarray:
    """Path or uint8 array -> uint8 ``(H, W)`` or ``(H, W, 3)`` (optionally square-resized)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                picture = opened.convert("L" if grayscale else "RGB")
        except OSError as err:
            raise ValueError(f"item {index}: cannot read image '{image}': {err}") from err
    else:
        array = np.asarray(image)
        array = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
            raise ValueError(f"item {index}: expected a uint8 (H, W) or (H, W, C) image with C in "
                             f"(1, 3), but got {np.asarray(image).dtype} of shape {np.shape(image)}")
        picture = Image.fromarray(array)
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels if image_size is None else square_resize_hwc(pixels, image_size)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_one_shard(path: Path, chunk: Sequence[Mapping], first: int, settings: dict) -> dict:
    """Write ``chunk`` to ``path`` atomically; returns its manifest entry (less the digest)."""
    import webdataset as wds

    shapes, captions_counts = set(), []

    def write_tar(stream) -> None:
        with wds.TarWriter(stream, encoder=False, mtime=0.0) as writer:
            for offset, item in enumerate(chunk):
                index = first + offset
                image, captions, label = _check_item(item, index)
                pixels = _to_pixels(image, index, settings["image_size"], settings["grayscale"])
                shapes.add((*pixels.shape[:2], 1 if pixels.ndim == 2 else pixels.shape[2]))
                captions_counts.append(len(captions))
                sample = {"__key__": f"{index:08d}", "png": _png(pixels), "index.cls": str(index).encode(),
                          "captions.json": json.dumps(captions, ensure_ascii=False).encode()}
                if label >= 0:
                    sample["label.cls"] = str(label).encode()
                writer.write(sample)

    atomic_write(path, write_tar)
    channels = {shape[2] for shape in shapes}
    if len(channels) != 1:
        raise ValueError(f"shard '{path}': expected one channel count for all images, "
                         f"but got {sorted(channels)}")
    return {"file": path.name, "first": first, "count": len(chunk), "bytes": path.stat().st_size,
            "shape": list(shapes.pop()) if len(shapes) == 1 else None, "channels": channels.pop(),
            "min_captions": min(captions_counts)}


# ============================================================================ manifest
def _write_json_atomic(path: Path, content: dict) -> None:
    atomic_write_text(path, json.dumps(content, indent=1) + "\n")


def _previous_entries(out: Path) -> dict[str, dict]:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise FileExistsError(f"write_shards: '{path}' is not a {FORMAT} manifest; use another out_dir")
    return {entry["file"]: entry for entry in manifest["shards"]}


def _reusable(old: Optional[dict], out: Path, first: int, count: int, digest: str) -> bool:
    """True: skip (identical and intact); False: (re)write; raises if it holds other data."""
    if old is None:
        return False
    if (old["first"], old["count"], old["digest"]) != (first, count, digest):
        raise FileExistsError(
            f"write_shards: '{out / old['file']}' was written from different data or settings "
            f"(first/count {old['first']}/{old['count']}, expected {first}/{count}, or another "
            "source digest); use another out_dir or delete this one"
        )
    path = out / old["file"]
    return path.is_file() and path.stat().st_size == old["bytes"]


def _manifest(header: dict, entries: list[dict], complete: bool) -> dict:
    digest = hashlib.sha256(f"{FORMAT}:{header['num_examples']}:".encode())
    for entry in entries:
        digest.update(entry["digest"].encode())
    shapes = {tuple(entry["shape"]) if entry["shape"] else None for entry in entries}
    shape = list(shapes.pop()) if len(shapes) == 1 and None not in shapes else None
    channels = sorted({entry["channels"] for entry in entries})
    if len(channels) > 1:
        raise ValueError(f"write_shards: expected one channel count for all images, but got {channels}")
    return {**header, "complete": complete, "fingerprint": digest.hexdigest()[:16] if complete else None,
            "image_shape": shape, "channels": channels[0] if channels else None,
            "min_captions": min((entry["min_captions"] for entry in entries), default=0),
            "shards": entries}


def write_shards(
    out_dir: PathLike,
    items: Sequence[Mapping],
    samples_per_shard: int = 1000,
    image_size: Optional[int] = None,
    grayscale: bool = False,
    label_names: Optional[list[str]] = None,
) -> ShardSummary:
    """Write ``items`` (global index = position) as webdataset shards plus ``manifest.json``.

    Args:
        out_dir: output folder (created).
        items: sequence of ``{"image": uint8 (H, W[, C]) array or image file path, "captions":
            str or list of str, "label": int or None}``; see :func:`array_items`,
            :func:`coco_items`, :func:`csv_items`.
        samples_per_shard: samples per shard (the last shard may hold fewer).
        image_size: center-crop to a square and resize (bicubic) to this size while converting;
            ``None`` keeps the source size (the datamodule then needs ``image_size`` if sizes differ).
        grayscale: file images are converted to ``L`` (else ``RGB``); arrays keep their channels.
        label_names: names of the integer labels, stored in the manifest.

    Returns:
        A :class:`ShardSummary` (fingerprint, shards written and skipped).
    """
    if samples_per_shard < 1 or len(items) < 1:
        raise ValueError(f"Expected `samples_per_shard` >= 1 and at least one item, but got "
                         f"{samples_per_shard} and {len(items)} items")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp-*"):  # left by a killed conversion: never a complete shard
        stale.unlink()
    settings = {"image_size": image_size, "grayscale": bool(grayscale)}
    header = {"format": FORMAT, "num_examples": len(items), "samples_per_shard": samples_per_shard,
              "settings": settings, "label_names": label_names}
    previous, entries = _previous_entries(out), []
    summary = ShardSummary(out / MANIFEST, len(items), "")
    for number, first in enumerate(range(0, len(items), samples_per_shard)):
        chunk, name = items[first:first + samples_per_shard], f"shard-{number:06d}.tar"
        digest = _shard_digest(chunk, first, json.dumps(settings, sort_keys=True))
        old = previous.pop(name, None)
        if _reusable(old, out, first, len(chunk), digest):
            entries.append(old)
            summary.skipped.append(name)
            continue
        entries.append({**_write_one_shard(out / name, chunk, first, settings), "digest": digest})
        summary.written.append(name)
        _write_json_atomic(out / MANIFEST, _manifest(header, entries, complete=False))
    if previous:
        raise FileExistsError(f"write_shards: '{out}' holds more shards than this conversion "
                              f"({sorted(previous)[:3]}...); use another out_dir or delete it")
    manifest = _manifest(header, entries, complete=True)
    _write_json_atomic(out / MANIFEST, manifest)
    summary.fingerprint = manifest["fingerprint"]
    log.info("write_shards: %s: %d written, %d skipped", out, len(summary.written), len(summary.skipped))
    return summary


# ========================================================================= front-ends
def write_array_shards(
    out_dir: PathLike, images: np.ndarray, captions: Sequence[Union[str, Sequence[str]]],
    labels: Optional[Sequence[int]] = None, label_names: Optional[list[str]] = None,
    samples_per_shard: int = 1000,
) -> ShardSummary:
    """Shards from in-memory uint8 images ``(N, H, W[, C])`` with captions (array order)."""
    return write_shards(out_dir, array_items(images, captions, labels), samples_per_shard,
                        label_names=label_names)


def write_coco_shards(
    out_dir: PathLike, image_dir: PathLike, captions_json: PathLike, samples_per_shard: int = 1000,
    image_size: Optional[int] = None, grayscale: bool = False,
) -> ShardSummary:
    """Shards from a COCO image folder and ``captions_*.json`` (see :func:`coco_items`)."""
    return write_shards(out_dir, coco_items(image_dir, captions_json), samples_per_shard,
                        image_size, grayscale)


def write_csv_shards(
    out_dir: PathLike, image_dir: PathLike, captions_csv: PathLike, samples_per_shard: int = 1000,
    image_size: Optional[int] = None, grayscale: bool = False,
) -> ShardSummary:
    """Shards from an image folder and a ``file,caption`` CSV (see :func:`csv_items`)."""
    return write_shards(out_dir, csv_items(image_dir, captions_csv), samples_per_shard,
                        image_size, grayscale)


def write_digits_shards(
    out_dir: PathLike, samples_per_shard: int = 1000, limit: Optional[int] = None
) -> ShardSummary:
    """sklearn's 1797 digits (the first ``limit``), uint8 as in ``DigitsDataModule``, with the
    captions ``[digits_caption(label), "the number 7, written by hand"]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:limit]
    labels = digits.target.astype(np.int64)[:limit]
    captions = [[digits_caption(label), f"the number {label}, written by hand"] for label in labels]
    return write_array_shards(out_dir, images, captions, labels, [str(d) for d in range(10)],
                              samples_per_shard)


# ========================================================================= command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datamodules.shards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="source", required=True)
    digits = commands.add_parser("digits", help="sklearn digits with captions (demo data)")
    digits.add_argument("--limit", type=int, default=None, help="only the first LIMIT digits")
    for name in ("coco", "csv"):
        command = commands.add_parser(name, help=f"image folder + {name} captions")
        command.add_argument("--images", required=True, help="image folder")
        command.add_argument("--captions", required=True, help="captions JSON (coco) or CSV")
        command.add_argument("--image-size", type=int, default=None, help="square size while converting")
        command.add_argument("--grayscale", action="store_true")
    for command in commands.choices.values():
        command.add_argument("out_dir")
        command.add_argument("--samples-per-shard", type=int, default=1000)
        command.add_argument("--check", action="store_true", help="read every shard back afterwards")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> ShardSummary:
    args = _parser().parse_args(argv)
    if args.source == "digits":
        summary = write_digits_shards(args.out_dir, args.samples_per_shard, args.limit)
    else:
        writer = write_coco_shards if args.source == "coco" else write_csv_shards
        summary = writer(args.out_dir, args.images, args.captions, args.samples_per_shard,
                         args.image_size, args.grayscale)
    if args.check:
        check_shards(args.out_dir)
    print(f"{summary.manifest_path}: N={summary.num_examples} fingerprint={summary.fingerprint} "
          f"written={len(summary.written)} skipped={len(summary.skipped)}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
