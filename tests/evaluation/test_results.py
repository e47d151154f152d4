"""ResultCache: a finished result is read instead of computed, a changed key is computed anew (never the stale
file), an unreadable or mismatched file is refused naming it, nothing is stored without a folder."""
from __future__ import annotations

import json

import pytest
import torch

from attribution.errors import CorruptFileError
from evaluation.results import ResultCache


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value
    return compute, calls


def test_a_finished_row_is_read_back_and_a_changed_key_is_computed(tmp_path):
    compute, calls = _counting({"fid": 1.5, "k": (5,), "nan": float("nan")})
    first = ResultCache(tmp_path).row("removal", "m", {"k": 5, "seeds": (1, 2)}, compute)
    again = ResultCache(tmp_path)
    second = again.row("removal", "m", {"seeds": [1, 2], "k": 5}, compute)   # the same key, as JSON reads it
    assert len(calls) == 1 and again.counts == {"removal": [1, 0]} and again.reused == again.total == 1
    assert first["k"] == second["k"] == [5] and first["fid"] == second["fid"] == 1.5
    other = again.row("removal", "m", {"k": 5, "seeds": [1, 3]}, compute)  # another seed: another result
    assert len(calls) == 2 and other["fid"] == 1.5 and again.counts == {"removal": [1, 1]}
    assert len(list((tmp_path / "removal").glob("m_*.json"))) == 2


def test_tensors_are_kept_in_memory_and_on_disk(tmp_path):
    compute, calls = _counting(torch.arange(4.0))
    cache = ResultCache(tmp_path)
    assert torch.equal(cache.tensor("reference", "r", {"t": 1}, compute), torch.arange(4.0))
    cache.tensor("reference", "r", {"t": 1}, compute)
    assert torch.equal(ResultCache(tmp_path).tensor("reference", "r", {"t": 1}, compute), torch.arange(4.0))
    assert len(calls) == 1
    memory = ResultCache(None)
    memory.tensor("reference", "r", {"t": 1}, compute), memory.tensor("reference", "r", {"t": 1}, compute)
    assert len(calls) == 2 and not list(tmp_path.glob("*/*.tmp"))


def test_nothing_is_stored_without_a_folder(tmp_path):
    compute, calls = _counting({"x": 1})
    cache = ResultCache(None)
    cache.row("a", "b", {}, compute), cache.row("a", "b", {}, compute)
    assert len(calls) == 2 and cache.path("a", "b", {}) is None and cache.counts == {"a": [0, 2]}


def test_an_unreadable_or_mismatched_file_is_refused_naming_it(tmp_path):
    compute, _ = _counting({"x": 1})
    cache = ResultCache(tmp_path)
    cache.row("a", "b", {"k": 1}, compute)
    path = cache.path("a", "b", {"k": 1})
    path.write_text("{not json")
    with pytest.raises(CorruptFileError, match=str(path)):
        ResultCache(tmp_path).row("a", "b", {"k": 1}, compute)
    path.write_text(json.dumps({"key": {"k": 2}, "row": {"x": 9}}))
    with pytest.raises(CorruptFileError, match="holds"):
        ResultCache(tmp_path).row("a", "b", {"k": 1}, compute)
