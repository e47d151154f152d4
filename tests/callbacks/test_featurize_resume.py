"""Kill-and-resume of featurizing (the command and a fit with the callback), every store checked before any row,
and non-finite features refused naming the examples and the checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import seed_everything

from attribution import FeatureStore
from attribution.errors import NonFiniteError, StoreMismatchError
from attribution.featurize import CheckpointFeaturizer, FeaturizeSettings
from attribution.identity import data_identity
from callbacks import TrakFeaturizeCallback
from commands.trainer import AttributionTrainer
from helpers import FailAfter, Killed, fit_trainer, small_data, tiny_module

SETTINGS = dict(proj_dim=16, num_draws=1, batch_size=16)


def _store(path):
    return FeatureStore.open(path, json.loads((path / "meta.json").read_text()), create=False, writable=False)


def _trainer(root):
    return AttributionTrainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two checkpoints (steps 2 and 4) of a tiny model on 120 digits, without features."""
    root = tmp_path_factory.mktemp("fitted")
    dm = small_data(root)
    seed_everything(0)
    fit_trainer(root / "run", []).fit(tiny_module(), datamodule=dm)
    return root, dm, root / "run" / "checkpoints"


def test_a_fit_killed_while_featurizing_finishes_that_store_when_resumed(tmp_path):
    dm = small_data(tmp_path)
    killed = TrakFeaturizeCallback(**SETTINGS)
    killed.featurizer.rows_loader = lambda datamodule: FailAfter(datamodule, 2)
    seed_everything(0)
    with pytest.raises(Killed):
        fit_trainer(tmp_path / "run", [killed]).fit(tiny_module(), datamodule=dm)
    store_dir = tmp_path / "run" / "features" / "step000002"
    assert int(_store(store_dir).done_mask().sum()) == 32 and not (store_dir / "kernel.json").exists()
    ckpt = tmp_path / "run" / "checkpoints" / "step000002.ckpt"
    resumed = TrakFeaturizeCallback(**SETTINGS)
    fit_trainer(tmp_path / "run", [resumed]).fit(tiny_module(), datamodule=dm, ckpt_path=str(ckpt))
    assert [p.name for p in resumed.stores] == ["step000002", "step000004"]
    finished = _store(store_dir)
    assert finished.is_complete and finished.is_finalized
    finished.verify()
    # equal to featurizing the checkpoint's weights in one go
    module = tiny_module()
    module.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    loader = lambda rows: dm.featurize_dataloader(rows.tolist(), batch_size=16)
    fresh, _ = CheckpointFeaturizer(FeaturizeSettings(**SETTINGS)).run(
        module, loader, data_identity(dm), tmp_path / "fresh", {"global_step": 2}, progress=False)
    assert torch.equal(finished.read(), fresh.read())


def test_the_featurize_command_resumes_a_kill_with_only_the_missing_rows(fitted, tmp_path, monkeypatch):
    root, dm, checkpoints = fitted
    settings = FeaturizeSettings(**SETTINGS)
    calls = []
    original = CheckpointFeaturizer.rows_loader

    def dies_in_the_second_store(self, datamodule):
        calls.append(1)
        return FailAfter(datamodule, 3) if len(calls) == 2 else original(self, datamodule)

    monkeypatch.setattr(CheckpointFeaturizer, "rows_loader", dies_in_the_second_store)
    with pytest.raises(Killed):
        _trainer(tmp_path).featurize(tiny_module(), dm, str(checkpoints), str(tmp_path / "out"), settings)
    monkeypatch.setattr(CheckpointFeaturizer, "rows_loader", original)
    first = (tmp_path / "out" / "step000002" / "features.npy").read_bytes()
    assert int(_store(tmp_path / "out" / "step000004").done_mask().sum()) == 48
    rows = []
    write = FeatureStore.write
    monkeypatch.setattr(FeatureStore, "write", lambda self, r, f, w=None: (rows.extend(r.tolist()), write(self, r, f, w)))
    _trainer(tmp_path).featurize(tiny_module(), dm, str(checkpoints), str(tmp_path / "out"), settings)
    assert sorted(rows) == list(range(48, 120))  # nothing redone
    assert (tmp_path / "out" / "step000002" / "features.npy").read_bytes() == first
    monkeypatch.setattr(FeatureStore, "write", write)
    _trainer(tmp_path).featurize(tiny_module(), dm, str(checkpoints), str(tmp_path / "whole"), settings)
    for name in ("step000002", "step000004"):
        assert torch.equal(_store(tmp_path / "out" / name).read(), _store(tmp_path / "whole" / name).read())
        _store(tmp_path / "out" / name).verify()


def test_every_store_of_a_folder_is_checked_before_any_row(fitted, tmp_path):
    root, dm, checkpoints = fitted
    settings = FeaturizeSettings(**SETTINGS)
    other = FeaturizeSettings(**{**SETTINGS, "proj_seed": 7})
    _trainer(tmp_path).featurize(tiny_module(), dm, str(checkpoints / "step000004.ckpt"), str(tmp_path / "out"), other)
    with pytest.raises(StoreMismatchError, match="step000004 was made with different metadata: projector.seed"):
        _trainer(tmp_path).featurize(tiny_module(), dm, str(checkpoints), str(tmp_path / "out"), settings)
    assert not (tmp_path / "out" / "step000002").exists()  # the first checkpoint was not featurized first


def test_non_finite_features_are_refused_naming_examples_and_checkpoint(fitted, tmp_path):
    root, dm, checkpoints = fitted
    module = tiny_module()
    module.load_state_dict(torch.load(checkpoints / "step000002.ckpt", weights_only=False)["state_dict"])
    with torch.no_grad():
        module.unet.conv_out.weight.mul_(1e38)  # finite weights whose outputs overflow
    loader = lambda rows: dm.featurize_dataloader(rows.tolist(), batch_size=16)
    with pytest.raises(NonFiniteError, match=r"features at checkpoint my.ckpt .* examples \[0, 1, 2"):
        CheckpointFeaturizer(FeaturizeSettings(**SETTINGS)).run(
            module, loader, data_identity(dm), tmp_path / "s", {"file": "my.ckpt", "global_step": 2}, progress=False)
    assert int(_store(tmp_path / "s").done_mask().sum()) == 0
