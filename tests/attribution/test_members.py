"""Members of a checkpoint: what it records (identity stamp, datamodule state, the mask file Lightning saved
with the datamodule's hyperparameters), "auto" / "all" / a mask file, and the refusals naming the file."""
from __future__ import annotations

import numpy as np
import pytest

from attribution.errors import MembersError, SettingsError
from attribution.masks import mask_hash
from attribution.members import check_members_setting, recorded_membership, resolve_members

N = 10
MASK = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=bool)


def checkpoint(path=None, mask=MASK, stamp=True):
    """A checkpoint dict as our fits write it: the identity stamp (or only the datamodule's state) and the
    datamodule's hyperparameters with the ``subset_mask`` it was given."""
    identity = {"num_examples": N, "subset_size": int(mask.sum()), "mask_hash": mask_hash(mask, N),
                "dataset_fingerprint": "f"}
    saved = {"datamodule_hyper_parameters": {"subset_mask": None if path is None else str(path), "batch_size": 8}}
    if stamp:
        saved["attribution"] = identity
    else:
        saved["ArrayDataModule"] = {"num_examples": N, "fingerprint": "f", "mask_hash": identity["mask_hash"]}
    return saved


def test_auto_reads_the_recorded_mask_file_and_checks_its_hash(tmp_path):
    np.save(tmp_path / "mask.npy", MASK)
    for stamp in (True, False):  # the identity stamp, or a project datamodule's saved state
        recorded = recorded_membership(checkpoint(tmp_path / "mask.npy", stamp=stamp))
        assert recorded["subset_mask"] == str(tmp_path / "mask.npy")
        members = resolve_members("auto", recorded, N, "checkpoint c")
        assert members.indices.tolist() == np.flatnonzero(MASK).tolist() and not members.all_rows
        assert members.hash == mask_hash(MASK, N) and members.mask().numpy().tolist() == MASK.tolist()


def test_all_rows_when_the_checkpoint_records_no_subset_or_members_is_all(tmp_path):
    everyone = np.ones(N, dtype=bool)
    for recorded in (recorded_membership({}), recorded_membership(checkpoint(None, mask=everyone))):
        members = resolve_members("auto", recorded, N, "checkpoint c")
        assert members.all_rows and members.hash == mask_hash(None, N)
    np.save(tmp_path / "mask.npy", MASK)
    for setting in ("all", None):  # every row, whatever the checkpoint was trained on
        members = resolve_members(setting, recorded_membership(checkpoint(tmp_path / "mask.npy")), N, "checkpoint c")
        assert members.all_rows and members.indices.tolist() == list(range(N))


def test_a_mask_file_is_checked_against_the_recorded_hash(tmp_path):
    np.save(tmp_path / "mine.npy", np.flatnonzero(MASK))  # the same subset as indices: the same hash
    recorded = recorded_membership(checkpoint(tmp_path / "gone.npy"))
    assert resolve_members(str(tmp_path / "mine.npy"), recorded, N, "checkpoint c").hash == mask_hash(MASK, N)
    other = MASK.copy()
    other[1] = True
    np.save(tmp_path / "other.npy", other)
    with pytest.raises(MembersError, match=rf"other\.npy.*checkpoint c.*{mask_hash(MASK, N)}.*{mask_hash(other, N)}"
                                           r".*--model\.members=<mask file>"):
        resolve_members(str(tmp_path / "other.npy"), recorded, N, "checkpoint c")
    # a checkpoint that records nothing takes the file as given
    assert resolve_members(str(tmp_path / "other.npy"), {}, N, "c").indices.tolist() == np.flatnonzero(other).tolist()
    with pytest.raises(MembersError, match=r"short\.npy.*10 training examples"):
        np.save(tmp_path / "short.npy", MASK[:5])
        resolve_members(str(tmp_path / "short.npy"), recorded, N, "checkpoint c")


def test_auto_refuses_a_missing_changed_or_unnamed_mask(tmp_path):
    expected = mask_hash(MASK, N)
    with pytest.raises(MembersError, match=rf"gone\.npy.*{expected}.*missing.*--model\.members"):
        resolve_members("auto", recorded_membership(checkpoint(tmp_path / "gone.npy")), N, "checkpoint c")
    changed = ~MASK
    np.save(tmp_path / "mask.npy", changed)  # the recorded file now holds another mask
    with pytest.raises(MembersError, match=rf"mask\.npy.*{expected}.*{mask_hash(changed, N)}.*--model\.members"):
        resolve_members("auto", recorded_membership(checkpoint(tmp_path / "mask.npy")), N, "checkpoint c")
    with pytest.raises(MembersError, match="records none"):
        resolve_members("auto", recorded_membership(checkpoint(None)), N, "checkpoint c")
    with pytest.raises(MembersError, match="no mask hash"):  # a subset recorded without its hash
        resolve_members("auto", {"mask_hash": None, "subset_size": 4, "subset_mask": None}, N, "checkpoint c")


def test_bad_members_settings_are_refused():
    for bad in ("some", "mask.txt", 3):
        with pytest.raises(SettingsError, match="`members`"):
            check_members_setting(bad)
    for good in ("auto", "all", None, "masks/mask_000.npy", "m.pt"):
        check_members_setting(good)
