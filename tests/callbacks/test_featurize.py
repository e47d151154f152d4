"""TrakFeaturizeCallback and cli.py featurize: complete stores per checkpoint, equal to the core API,
resumable after a kill, training unaffected, foreign modules, and refusals of mismatched inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from lightning.pytorch import LightningModule, seed_everything

from attribution import DiffusionTask, FeatureStore, StoreMismatchError, featurize_batch, load_kernel
from attribution.featurize import CheckpointFeaturizer, FeaturizeSettings
from callbacks import TrakFeaturizeCallback
from attribution.featurize import projector_from_meta
from cli import main
from conftest import CONFIGS
from helpers import FailAfter, fit_trainer, small_data, tiny_module, tiny_unet
from attribution.identity import CheckpointMismatchError, data_identity

SETTINGS = dict(proj_dim=32, num_draws=2, batch_size=64)


def test_callback_writes_one_finalized_store_per_checkpoint_equal_to_the_core(tmp_path):
    dm = small_data(tmp_path)
    callback = TrakFeaturizeCallback(**SETTINGS)
    fit_trainer(tmp_path / "run", [callback]).fit(tiny_module(), datamodule=dm)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert [p.stem for p in ckpts] == ["step000002", "step000004"]
    assert [p.name for p in callback.stores] == ["step000002", "step000004"]
    for ckpt, store_path in zip(ckpts, callback.stores):
        meta = FeatureStore.open(store_path, _meta(store_path), create=False)
        assert meta.is_complete and load_kernel(meta).eigenvalues.shape == (32,)
        assert meta.meta["checkpoint"]["file"] == str(ckpt)
        # reference: the core API on the checkpoint's weights, rows in another order
        module = tiny_module()
        module.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
        module.eval()
        rows = torch.tensor([119, 3, 57, 0])
        x0 = torch.stack([dm.full_dataset()[int(i)]["image"] for i in rows])
        ref = featurize_batch(module.attribution_task(), module.unet, FeaturizeSettings(**SETTINGS).train_output(),
                              projector_from_meta(meta.meta["projector"]), x0, rows)
        assert torch.allclose(meta.read()[rows], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))  # float32, other batch


def _meta(path):
    import json
    return json.loads((path / "meta.json").read_text())


def test_training_is_unaffected_by_the_callback(tmp_path):
    dm = small_data(tmp_path)
    weights = []
    for name, callbacks in (("with", [TrakFeaturizeCallback(**SETTINGS)]), ("without", [])):
        seed_everything(0)
        module = tiny_module()
        fit_trainer(tmp_path / name, callbacks, max_steps=5).fit(module, datamodule=dm)
        weights.append(torch.cat([p.detach().flatten() for p in module.unet.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_a_killed_run_resumes_with_only_the_missing_rows(tmp_path):
    dm, module = small_data(tmp_path), tiny_module().eval()
    featurizer = CheckpointFeaturizer(FeaturizeSettings(**SETTINGS))
    ident, info = data_identity(dm), {"global_step": 0}
    with pytest.raises(KeyboardInterrupt):
        featurizer.run(module, FailAfter(dm, 3, KeyboardInterrupt), ident, tmp_path / "killed", info, progress=False)
    store = FeatureStore.open(tmp_path / "killed", _meta(tmp_path / "killed"), create=False)
    assert int(store.done_mask().sum()) == 48 and not (tmp_path / "killed" / "kernel.json").exists()
    loader = lambda rows: dm.featurize_dataloader(rows.tolist(), batch_size=16)
    _, stats = featurizer.run(module, loader, ident, tmp_path / "killed", info, progress=False)
    assert stats["rows"] == 120 - 48
    _, full = featurizer.run(module, loader, ident, tmp_path / "whole", info, progress=False)
    assert full["rows"] == 120
    resumed = FeatureStore.open(tmp_path / "killed", _meta(tmp_path / "killed"), create=False)
    whole = FeatureStore.open(tmp_path / "whole", _meta(tmp_path / "whole"), create=False)
    assert torch.equal(resumed.read(), whole.read())
    assert (tmp_path / "killed" / "kernel.json").exists()
    _, again = featurizer.run(module, loader, ident, tmp_path / "whole", info, progress=False)
    assert again["rows"] == 0  # a complete store is skipped


def test_store_with_another_projection_seed_or_dataset_is_refused(tmp_path):
    dm, module = small_data(tmp_path), tiny_module().eval()
    loader = lambda rows: dm.featurize_dataloader(rows.tolist(), batch_size=64)
    CheckpointFeaturizer(FeaturizeSettings(**SETTINGS)).run(module, loader, data_identity(dm), tmp_path / "s",
                                                            {"global_step": 0}, progress=False)
    other_seed = CheckpointFeaturizer(FeaturizeSettings(**SETTINGS, proj_seed=1))
    with pytest.raises(StoreMismatchError, match="projector.seed"):
        other_seed.run(module, loader, data_identity(dm), tmp_path / "s", {"global_step": 0}, progress=False)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "noise.npy", rng.integers(0, 255, (120, 8, 8), dtype=np.uint8))
    from datamodules import ArrayDataModule
    other = ArrayDataModule(path=str(tmp_path / "noise.npy"))
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        CheckpointFeaturizer(FeaturizeSettings(**SETTINGS)).run(
            module, loader, data_identity(other), tmp_path / "s", {"global_step": 0}, progress=False)


class ForeignDiffusion(LightningModule):
    """Somebody else's minimal Lightning diffusion module: its own names, batches as tuples."""

    def __init__(self):
        super().__init__()
        self.net = tiny_unet()
        self.sched = DDPMScheduler(num_train_timesteps=1000)

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        noise, t = torch.randn_like(x), torch.randint(0, 1000, (x.shape[0],))
        return torch.nn.functional.mse_loss(self.net(self.sched.add_noise(x, noise, t), t).sample, noise)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=1e-3)


class PluggedIn(ForeignDiffusion):
    """The few lines a user adds to plug the callback in."""

    def attribution_task(self):
        return DiffusionTask.from_scheduler(self.sched)

    def attribution_denoiser(self, ema=True):
        return self.net

    def attribution_inputs(self, batch):
        return batch["image"], batch["index"], None


def test_a_foreign_module_plugs_in_with_three_methods(tmp_path):
    dm = small_data(tmp_path)
    with pytest.raises(TypeError, match="attribution_task"):
        fit_trainer(tmp_path / "a", [TrakFeaturizeCallback(**SETTINGS)]).fit(ForeignDiffusion(), datamodule=dm)
    callback = TrakFeaturizeCallback(**SETTINGS)
    fit_trainer(tmp_path / "b", [callback], max_steps=2).fit(PluggedIn(), datamodule=dm)
    store = FeatureStore.open(callback.stores[0], _meta(callback.stores[0]), create=False)
    assert store.is_complete and torch.isfinite(store.read()).all() and store.read().abs().sum() > 0


def test_cli_featurize_matches_the_callback_and_refuses_mismatched_checkpoints(tmp_path):
    smoke = str(CONFIGS / "smoke.yaml")
    callback_dir = tmp_path / "run"
    main(["fit", "--config", smoke, f"--trainer.default_root_dir={callback_dir}", "--trainer.max_steps=3",
          "--trainer.callbacks+=callbacks.TrakFeaturizeCallback", "--trainer.callbacks.proj_dim=16",
          "--trainer.callbacks.num_draws=1", "--trainer.callbacks.batch_size=256"])
    ckpt = next((callback_dir / "checkpoints").glob("*.ckpt"))
    main(["featurize", "--config", smoke, f"--checkpoints={ckpt.parent}", f"--out_dir={tmp_path / 'cli'}",
          f"--trainer.default_root_dir={tmp_path}",
          "--settings.proj_dim=16", "--settings.num_draws=1", "--settings.batch_size=256"])
    by_callback = np.load(callback_dir / "features" / ckpt.stem / "features.npy")
    by_cli = np.load(tmp_path / "cli" / ckpt.stem / "features.npy")
    assert by_callback.shape == (1797, 16) and np.array_equal(by_callback, by_cli)
    # a checkpoint of another architecture, and one trained on other data, are refused before any work
    with pytest.raises(CheckpointMismatchError, match="model configuration"):
        main(["featurize", "--config", smoke, f"--checkpoints={ckpt}", f"--out_dir={tmp_path / 'x'}",
              f"--trainer.default_root_dir={tmp_path}",
              "--model.init_args.unet.init_args.block_out_channels=[4, 8]"])
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).integers(0, 255, (1797, 8, 8), dtype=np.uint8))
    with pytest.raises(CheckpointMismatchError, match="dataset_fingerprint"):
        main(["featurize", "--config", smoke, f"--checkpoints={ckpt}", f"--out_dir={tmp_path / 'y'}",
              f"--trainer.default_root_dir={tmp_path}",
              "--data=datamodules.ArrayDataModule", f"--data.path={tmp_path / 'noise.npy'}"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_ddp_featurizes_every_example_exactly_once_and_equals_one_process(tmp_path, monkeypatch):
    """Two CPU processes (gloo, forked): disjoint row shares covering all N, features equal to one process."""
    import os
    log_dir = tmp_path / "rows"
    log_dir.mkdir()
    original = FeatureStore.write

    def logging_write(self, rows, features, weights=None):
        with open(log_dir / f"rank{os.getpid()}.txt", "a") as f:
            f.write(" ".join(str(int(r)) for r in rows) + "\n")
        return original(self, rows, features, weights)

    monkeypatch.setattr(FeatureStore, "write", logging_write)
    dm = small_data(tmp_path, n=101)  # odd N: uneven shares
    seed_everything(0)
    fit_trainer(tmp_path / "ddp", [TrakFeaturizeCallback(**SETTINGS)], max_steps=2, strategy="ddp_fork",
                devices=2).fit(tiny_module(), datamodule=dm)
    per_process = [[int(r) for line in p.read_text().split() for r in [line]] for p in log_dir.glob("rank*.txt")]
    assert len(per_process) == 2
    assert not set(per_process[0]) & set(per_process[1])
    assert sorted(per_process[0] + per_process[1]) == list(range(101))
    store_dir = tmp_path / "ddp" / "features" / "step000002"
    ddp = np.load(store_dir / "features.npy")
    module = tiny_module()
    module.load_state_dict(torch.load(tmp_path / "ddp" / "checkpoints" / "step000002.ckpt",
                                      weights_only=False)["state_dict"])
    loader = lambda rows: dm.featurize_dataloader(rows.tolist(), batch_size=64)
    store, _ = CheckpointFeaturizer(FeaturizeSettings(**SETTINGS)).run(
        module, loader, data_identity(dm), tmp_path / "single", {"global_step": 2}, progress=False)
    assert np.allclose(ddp, store.read().numpy(), rtol=1e-4, atol=1e-4 * np.abs(ddp).max())
    assert (store_dir / "kernel.json").exists()


def test_layerwise_projector_through_the_featurizer_and_scoring(tmp_path):
    """projector='layerwise': the store equals the core layerwise path, and scoring rebuilds the same projector."""
    from attribution.layerwise import featurize_batch_layerwise
    from attribution.trajectory import from_samples, save_targets
    from lightning.pytorch import Trainer
    from lightning_modules import AttributionModule

    dm = small_data(tmp_path)
    callback = TrakFeaturizeCallback(**{**SETTINGS, "projector": "layerwise", "proj_dim": 64})
    seed_everything(0)
    module = tiny_module()
    fit_trainer(tmp_path / "run", [callback], max_steps=2).fit(module, datamodule=dm)
    store_path = callback.stores[0]
    store = FeatureStore.open(store_path, _meta(store_path), create=False)
    assert store.meta["projector"]["kind"] == "layerwise" and store.d == 64 and store.is_complete
    module.eval()
    rows = torch.tensor([7, 99])
    x0 = torch.stack([dm.full_dataset()[int(i)]["image"] for i in rows])
    ref = featurize_batch_layerwise(module.attribution_task(), module.unet, FeaturizeSettings(**SETTINGS).train_output(),
                                    projector_from_meta(store.meta["projector"], module.unet), x0, rows)
    assert torch.allclose(store.read()[rows], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    save_targets(from_samples(module.sample([3], 5, record=True, record_steps=[800, 0])), tmp_path / "targets")
    scoring = AttributionModule(features=str(tmp_path / "run" / "features"), targets=str(tmp_path / "targets"),
                                num_draws=2, relative_lam=0.5, estimator="trak")
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False).predict(
        scoring.attach_data(dm), return_predictions=False)
    scores = torch.load(tmp_path / "scores" / "target_0000.pt", weights_only=False)["scores"]
    assert scores.shape == (120, 2) and torch.isfinite(scores).all() and scores.abs().sum() > 0


def test_identity_projection_stores_the_whole_gradient_with_the_gram_kernel_and_the_cost(tmp_path, monkeypatch):
    """projector=identity: d = p whatever proj_dim, rows equal the unprojected per-example gradients (the core
    with an identity projector), the store is finalized with the N x N Gram kernel when d > PRIMAL_MAX_DIM, and
    cost.json records the rows featurized by the runs that finished."""
    import attribution.scoring as scoring
    from attribution.dual import load_gram
    from attribution.featurize import read_cost
    from attribution.gradients import num_parameters
    from attribution.projectors import make_projector

    dm, module = small_data(tmp_path), tiny_module().eval()
    p = num_parameters(module.unet)
    monkeypatch.setattr(scoring, "PRIMAL_MAX_DIM", p - 1)
    settings = FeaturizeSettings(proj_dim=7, num_draws=2, batch_size=64, projector="identity")
    featurizer = CheckpointFeaturizer(settings)
    ident, info = data_identity(dm), {"global_step": 0}
    with pytest.raises(KeyboardInterrupt):
        featurizer.run(module, FailAfter(dm, 1, KeyboardInterrupt), ident, tmp_path / "s", info, progress=False)
    loader = lambda rows: dm.featurize_dataloader(rows.tolist(), batch_size=32)
    store, stats = featurizer.run(module, loader, ident, tmp_path / "s", info, progress=False)
    assert store.d == p and store.meta["projector"]["kind"] == "identity"
    # the killed run recorded no cost (rows and seconds both uncounted, so the rate stays right)
    assert read_cost(store)["rows"] == stats["rows"] == 120 - 16 and read_cost(store)["seconds"] > 0
    rows = torch.tensor([5, 77])
    x0 = torch.stack([dm.full_dataset()[int(i)]["image"] for i in rows])
    ref = featurize_batch(module.attribution_task(), module.unet, settings.train_output(),
                          make_projector("identity", p, p, 0), x0, rows)
    torch.testing.assert_close(store.read()[rows], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    kernel = load_gram(store)
    full = store.read().double()
    torch.testing.assert_close(kernel.gram, full @ full.T, rtol=1e-10, atol=0)
    with pytest.raises(Exception, match="unprojected features"):
        load_kernel(store)
