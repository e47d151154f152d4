"""A foreign Lightning project (tests/foreign_project: its own module and datamodule, dict keys "pixels"/"idx",
v-prediction on a cosine schedule, EMA by AveragedModel updated in on_train_batch_end) plugged in through the
protocol only: refused before training with one error naming every missing member, or for data that does not
fit its UNet; fit with TrakFeaturizeCallback; targets from `cli.py sample`; scores from `cli.py score` told the
module class."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from attribution.errors import ProtocolError, SettingsError
from attribution.identity import tensors_hash
from attribution.trajectory import load_targets
from callbacks import TrakFeaturizeCallback
from callbacks.score_writer import load_target_scores
from cli import run
from foreign_project.data import DigitsData, TrainOnlyData
from foreign_project.module import ForeignDiffusion, NoProtocol
from helpers import fit_trainer

SETTINGS = dict(proj_dim=16, num_draws=2, batch_size=48)
MODULE = "foreign_project.module.ForeignDiffusion"


def test_missing_members_of_both_sides_are_named_in_one_error_before_training(tmp_path):
    trainer = fit_trainer(tmp_path / "run", [TrakFeaturizeCallback(**SETTINGS)], max_steps=2)
    with pytest.raises(ProtocolError) as refused:
        trainer.fit(NoProtocol(), datamodule=TrainOnlyData())
    message = str(refused.value)
    for member in ("NoProtocol.attribution_task()", "NoProtocol.attribution_denoiser()",
                   "NoProtocol.attribution_inputs()", "TrainOnlyData.num_examples", "TrainOnlyData.fingerprint",
                   "TrainOnlyData.featurize_dataloader(indices, batch_size=None)"):
        assert member in message
    assert trainer.global_step == 0 and not (tmp_path / "run" / "checkpoints").exists()


def test_data_that_does_not_fit_the_unet_is_refused_before_training(tmp_path):
    trainer = fit_trainer(tmp_path / "run", [TrakFeaturizeCallback(**SETTINGS)], max_steps=2)
    with pytest.raises(SettingsError, match=r"in_channels = 3, sample_size = 8.*\(1, 8, 8\)"):
        trainer.fit(ForeignDiffusion(channels=3), datamodule=DigitsData(channels=1))
    assert trainer.global_step == 0


def test_the_foreign_project_is_featurized_sampled_and_scored(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seed_everything(0)
    module, dm = ForeignDiffusion(), DigitsData()
    callback = TrakFeaturizeCallback(**SETTINGS)
    fit_trainer(Path("run"), [callback], max_steps=2, every=2).fit(module, datamodule=dm)  # a relative run folder
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    (store,) = callback.stores
    meta = json.loads((store / "meta.json").read_text())
    saved = torch.load(ckpt, weights_only=False)
    names = [n for n, _ in module.net.named_parameters()]
    assert meta["checkpoint"]["file"] == str(ckpt)  # absolute: scoring finds it from any working directory
    assert meta["use_ema"] is True and meta["task"]["prediction_type"] == "v_prediction"
    ema_weights = saved["state_dict"]
    assert meta["checkpoint"]["weights_hash"] == tensors_hash((n, ema_weights["ema.module." + n]) for n in names)
    assert saved["attribution"]["dataset_fingerprint"] == dm.fingerprint  # stamped by the callback
    assert saved["attribution"]["mask_hash"] is None  # the datamodule has no subset mask

    foreign = ["--model=" + MODULE, "--data=foreign_project.data.DigitsData", "--trainer.logger=false",
               "--trainer.default_root_dir=."]
    assert run(["sample", *foreign, f"--checkpoint={ckpt}", "--out_dir=targets", "--num_targets=2",
                "--num_inference_steps=10", "--record_steps=[900, 500, 0]", "--real_indices=[7]"]) == 0
    targets = load_targets(tmp_path / "targets")
    assert [t.source for t in targets] == ["sampled", "sampled", "real:7"]
    assert targets[0].info["use_ema"] is True and targets[0].timesteps.tolist() == [900, 500, 0]

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    score = ["score", "--model=lightning_modules.AttributionModule",
             f"--model.features={tmp_path / 'run' / 'features'}",
             f"--model.targets={tmp_path / 'targets'}", "--model.num_draws=2", "--model.estimator=trak",
             "--data=foreign_project.data.DigitsData",
             "--trainer.logger=false", "--trainer.inference_mode=false"]
    assert run(score) == 2  # the checkpoint records no module class: the user tells it
    assert "--model.module_class=" in capsys.readouterr().err
    assert run([*score, f"--model.module_class={MODULE}"]) == 0
    scores = load_target_scores(tmp_path / "scores" / "target_0002.pt")["scores"]
    assert scores.shape == (48, 3) and torch.isfinite(scores).all() and scores.abs().sum() > 0
    # K-FAC influence on the same foreign v-prediction model, its EMA weights (the store's), its own data batches
    assert run([*score, f"--model.module_class={MODULE}", "--model.estimator=kfac",
                f"--model.out_dir={tmp_path / 'scores_kfac'}"]) == 0
    kfac = load_target_scores(tmp_path / "scores_kfac" / "target_0002.pt")["scores"]
    assert kfac.shape == (48, 3) and torch.isfinite(kfac).all() and not torch.equal(kfac, scores)
