"""Format of captioned-image webdataset shards, and their checked reading (no writing here).

Format (``FORMAT``): a folder with ``shard-000000.tar``, ``shard-000001.tar``, ... and a
``manifest.json``. Sample ``i`` (the global index) lives in shard ``i // samples_per_shard`` as
the tar members ``%08d.captions.json`` (a JSON list of strings, in source order),
``%08d.index.cls`` (the decimal index), ``%08d.label.cls`` (only when the label is known) and
``%08d.png`` (the image, ``L`` or ``RGB``). Samples are in increasing index order inside a shard,
and shards hold consecutive index ranges, so the manifest's ``first``/``count`` per shard is a
lookup table. Any webdataset reader can read the shards (``wds.WebDataset(urls)``).

``manifest.json`` keys: ``format``, ``num_examples``, ``samples_per_shard``, ``settings``
(conversion ``image_size``/``grayscale``), ``label_names``, ``complete``, ``fingerprint`` (sha256
of the shards' source digests), ``image_shape`` (``[H, W, C]`` or ``null`` when sizes differ),
``channels``, ``min_captions`` and ``shards`` (``file``, ``first``, ``count``, ``bytes``,
``shape``, ``channels``, ``min_captions``, ``digest`` each). Written by ``datamodules.shards``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Optional, Union

__all__ = [
    "FORMAT", "MANIFEST", "ShardError", "RawSample", "read_manifest", "check_shard_files",
    "iter_shard", "check_shards",
]

FORMAT = "captioned-images-webdataset/v1"
MANIFEST = "manifest.json"
PathLike = Union[str, Path]


from attribution.errors import ShardError  # noqa: E402  (re-exported: part of the project's error family)


class RawSample(NamedTuple):
    """One undecoded sample: PNG bytes, its captions (source order) and label (-1 if unknown)."""

    index: int
    png: bytes
    captions: list
    label: int


def read_manifest(path: PathLike) -> dict:
    """Load and check ``path/manifest.json`` (complete, contiguous shard ranges summing to N)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"path '{path}': expected a shard folder with {MANIFEST}, but found "
                                "none; convert first with `python -m datamodules.shards`")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardError(f"'{file}': expected a JSON manifest, but it is unreadable ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"'{file}': expected format {FORMAT!r}, but got {manifest.get('format')!r}")
    if not manifest.get("complete"):
        raise ShardError(f"'{file}' is incomplete (the conversion was interrupted); rerun the "
                         "converter with the same arguments to finish it")
    expected = 0
    for entry in manifest["shards"]:
        if entry["first"] != expected or entry["count"] < 1:
            raise ShardError(f"'{file}': shard '{entry['file']}' starts at {entry['first']} with "
                             f"{entry['count']} samples, expected to start at {expected}")
        expected += entry["count"]
    if expected != manifest["num_examples"]:
        raise ShardError(f"'{file}': shards hold {expected} samples but num_examples is "
                         f"{manifest['num_examples']}")
    return manifest


def check_shard_files(path: PathLike, manifest: Mapping) -> None:
    """Cheap check (no reading): every shard exists and has the size the manifest records."""
    for entry in manifest["shards"]:
        file = Path(path) / entry["file"]
        if not file.is_file():
            raise ShardError(f"shard '{file}' listed in {MANIFEST} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ShardError(f"shard '{file}' is {size} bytes but {MANIFEST} records "
                             f"{entry['bytes']}: truncated or replaced; rerun the converter")


def _parse(file: Path, key: str, fields: dict, expected: int) -> RawSample:
    try:
        index = int(fields["index.cls"])
        captions = json.loads(fields["captions.json"])
        label = int(fields["label.cls"]) if "label.cls" in fields else -1
        png = fields["png"]
    except (KeyError, ValueError) as err:
        raise ShardError(f"shard '{file}': sample '{key}' is malformed "
                         f"({type(err).__name__}: {err})") from err
    if key != f"{expected:08d}" or index != expected:
        raise ShardError(f"shard '{file}': expected sample {expected}, but found key '{key}' "
                         f"index {index}")
    return RawSample(index, png, captions, label)


def _grouped(file: Path) -> Iterator[tuple[str, dict]]:
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    key, fields = None, {}
    with open(file, "rb") as stream:
        for member in tar_file_iterator(stream):  # default handler re-raises
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix != key and key is not None:
                yield key, fields
                fields = {}
            key, fields[suffix] = prefix, member["data"]
    if key is not None:
        yield key, fields


def iter_shard(
    file: PathLike, first: int, count: int, stop_after: Optional[int] = None
) -> Iterator[RawSample]:
    """Samples of one shard in order, checked against the manifest (``first``, ``count``).

    Stops after index ``stop_after`` when given. Any read or parse failure, or a sample count
    that differs from ``count`` (a tar truncated at a member boundary), raises
    :class:`ShardError` naming the file.
    """
    file, expected = Path(file), first
    try:
        for key, fields in _grouped(file):
            sample = _parse(file, key, fields, expected)
            yield sample
            expected += 1
            if stop_after is not None and sample.index >= stop_after:
                return
    except ShardError:
        raise
    except Exception as err:  # noqa: BLE001 - tarfile/IO errors: report with the file name
        raise ShardError(f"shard '{file}' is corrupt or truncated after {expected - first} of "
                         f"{count} samples ({type(err).__name__}: {err}); rerun the converter") from err
    if expected != first + count:
        raise ShardError(f"shard '{file}' holds {expected - first} samples but {MANIFEST} records "
                         f"{count}: truncated or replaced; rerun the converter")


def check_shards(path: PathLike) -> dict:
    """Full check: read every shard and compare with the manifest; returns the manifest."""
    manifest = read_manifest(path)
    check_shard_files(path, manifest)
    for entry in manifest["shards"]:
        for _ in iter_shard(Path(path) / entry["file"], entry["first"], entry["count"]):
            pass
    return manifest
