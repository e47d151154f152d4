"""Finished results, one small file each, so that a long measurement resumes where it was stopped.

A result is named by its ``kind`` (a sub-folder), a readable ``name`` and the hash of its ``key``: a JSON dict
of everything the result depends on (the model's folder and training record, the target, the step, the settings,
the seeds). A result whose file exists is read instead of computed; a changed key (another setting, a
retrained model) names another file, so a stale result is never read. Files are written through
:mod:`attribution.atomic`, so a kill loses at most the result in progress.

    <folder>/<kind>/<name>_<hash of key>.json    {"key": key, "row": row}   (``row``: a JSON dict)
    <folder>/<kind>/<name>_<hash of key>.pt      {"key": key, "tensor": t}   (``tensor``: intermediates)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from attribution.atomic import atomic_torch_save, atomic_write_json
from attribution.errors import CorruptFileError
from evaluation.plan import settings_hash


def _normalized(obj):
    """``obj`` as JSON reads it back (tuples become lists, keys strings): what a reused file gives."""
    return json.loads(json.dumps(obj, sort_keys=True))


class ResultCache:
    """Reads finished results from ``folder`` and writes each new one as it finishes (``folder`` None: nothing
    is stored, every result is computed; intermediates are still kept in memory for this run).

    ``counts[kind]`` is ``[reused, computed]`` of the rows asked for so far.
    """

    def __init__(self, folder: Optional[Path]):
        self.folder = None if folder is None else Path(folder)
        self.counts: dict[str, list[int]] = {}
        self._memory: dict[str, torch.Tensor] = {}

    @property
    def reused(self) -> int:
        return sum(r for r, _ in self.counts.values())

    @property
    def total(self) -> int:
        return sum(r + c for r, c in self.counts.values())

    def path(self, kind: str, name: str, key: dict, suffix: str = ".json") -> Optional[Path]:
        if self.folder is None:
            return None
        return self.folder / kind / f"{name}_{settings_hash(_normalized(key))}{suffix}"

    def row(self, kind: str, name: str, key: dict, compute: Callable[[], dict]) -> dict:
        """The finished row of ``(kind, name, key)``: read from its file, else ``compute()``, written, returned
        (the same JSON either way)."""
        key, path = _normalized(key), self.path(kind, name, key)
        counts = self.counts.setdefault(kind, [0, 0])
        if path is not None and path.exists():
            counts[0] += 1
            return self._read(path, key, lambda: json.loads(path.read_text()))["row"]
        row = _normalized(compute())
        if path is not None:
            atomic_write_json(path, {"key": key, "row": row})
        counts[1] += 1
        return row

    def tensor(self, kind: str, name: str, key: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """An intermediate tensor (e.g. reference completions) shared by several rows: memory, file, or computed."""
        key, path = _normalized(key), self.path(kind, name, key, ".pt")
        memo = settings_hash({"kind": kind, "name": name, "key": key})
        if memo not in self._memory:
            if path is not None and path.exists():
                self._memory[memo] = self._read(path, key, lambda: torch.load(path, weights_only=False))["tensor"]
            else:
                value = compute().detach().cpu()
                if path is not None:
                    atomic_torch_save({"key": key, "tensor": value}, path)
                self._memory[memo] = value
        return self._memory[memo]

    @staticmethod
    def _read(path: Path, key: dict, load: Callable[[], dict]) -> dict:
        try:
            saved = load()
        except Exception as err:  # noqa: BLE001 - any unreadable file is refused the same way
            raise CorruptFileError(f"Expected the finished result {path} to be readable, but reading it failed "
                                   f"({type(err).__name__}: {err}); delete it to recompute it") from err
        if not isinstance(saved, dict) or saved.get("key") != key:
            raise CorruptFileError(f"Expected the finished result {path} to hold the result of its key {key}, but it "
                                   f"holds {saved.get('key') if isinstance(saved, dict) else type(saved).__name__}; "
                                   f"delete it to recompute it")
        return saved
