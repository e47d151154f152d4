"""AttributionModule + ScoreWriter: scores equal the core API, DDP equals one process, patch masks act
only through their region, scoring resumes, pictures and index are written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from attribution import StepOutput, dense_scores_float64, featurize_batch, load_kernel, x0_hat
from attribution.featurize import projector_from_meta
from attribution.store import open_feature_stores
from attribution.trajectory import load_targets
from helpers import fitted_with_targets
from lightning_modules import AttributionModule
from lightning_modules.loading import load_diffusion_module
from tolerances import EPS32, score_rounding_bound

SCORE = dict(estimator="trak", num_draws=4, relative_lam=0.5, topk=3, pair_batch_size=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model fitted with the featurize callback (2 checkpoints) and 2 recorded targets."""
    return fitted_with_targets(tmp_path_factory.mktemp("attr"), proj_dim=24, num_draws=2, num_inference_steps=20,
                               record_steps=[950, 500, 0])


def predict(run, out, **kw):
    root, dm = run
    module = AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"),
                               out_dir=str(root / out), **{**SCORE, **kw})
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                      **kw.pop("trainer", {}) if "trainer" in kw else {})
    trainer.predict(module.attach_data(dm), return_predictions=False)
    return module


def rounding_bound(modules, target, step_index, steps=(950, 500, 0)):
    """Sum of the float32 rounding bounds of ``modules`` for one pair (see ``tolerances.score_rounding_bound``)."""
    return sum(score_rounding_bound(m, target, steps[step_index]) for m in modules)


def assert_rounding_close(a, b, modules, target):
    """Scores ``(N, S)`` of one target computed in other batches: equal within the derived float32 bound."""
    for s in range(a.shape[1]):
        torch.testing.assert_close(a[:, s].double(), b[:, s].double(), rtol=2 * EPS32,
                                   atol=rounding_bound(modules, target, s))


def scores_of(root, out, target):
    return torch.load(root / out / f"target_{target:04d}.pt", weights_only=False)


def reference_scores(root, target, step_index, mask=None):
    """The core API by hand: x0_hat from x_t per checkpoint, Eq. 3 gradient, dense float64 TRAK, mean."""
    traj = load_targets(root / "targets", [target])[0]
    stores = open_feature_stores(str(root / "fit" / "features"))
    per_store = []
    for store in stores:
        module = load_diffusion_module(store.meta["checkpoint"]["file"])
        task, net = module.attribution_task(), module.unet
        x_t, t = traj.x_t[step_index:step_index + 1], traj.timesteps[step_index:step_index + 1]
        with torch.no_grad():
            estimate = x0_hat(x_t, task.predict_noise(net, x_t, t), t, task.alphas_cumprod)
        paired = "square" if store.meta["train_output"]["kind"] == "square" else "loss"  # score's default output
        out = StepOutput(SCORE["num_draws"], 0, mask=mask, kind=paired)
        g = featurize_batch(task, net, out, projector_from_meta(store.meta["projector"]), estimate,
                            torch.tensor([target]), steps=t)
        lam = SCORE["relative_lam"] * float(load_kernel(store).eigenvalues.mean())
        per_store.append(dense_scores_float64(store.read(dtype=torch.float64), g.double(), lam)[:, 0])
    return torch.stack(per_store).mean(0)


def test_module_scores_equal_the_core_api_and_pictures_are_written(run):
    root, _ = run
    module = predict(run, "scores")
    # the default featurize is the paper's Eq. 3, and score pairs it with the loss on the target side
    assert {s.meta["train_output"]["kind"] for s in module.stores} == {"loss"} and module.hparams.output == "loss"
    # a model trained on all N rows: members "auto" are every row, the store's own kernel, the keys of "all"
    assert all(mem.all_rows for mem in module.members) and module.ranked_rows is None
    assert not list((root / "fit" / "features").rglob("kernel_members_*"))
    assert module.pair_keys == AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"),
                                                 members="all", **SCORE).pair_keys
    report = json.loads((root / "scores" / "member_fraction.json").read_text())
    assert report["base_rate"] == 1.0 and report["mean_positive"] == 1.0 and len(report["pairs"]) == 6
    for target in (0, 1):
        result = scores_of(root, "scores", target)
        assert result["scores"].shape == (120, 3) and result["timesteps"].tolist() == [950, 500, 0]
        for s in range(3):
            ref = reference_scores(root, target, s)
            assert torch.allclose(result["scores"][:, s].double(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
        top = result["scores"].topk(3, dim=0).indices
        assert torch.equal(result["positive_indices"], top)
        assert (root / "scores" / f"target_{target:04d}.png").stat().st_size > 5000
    assert "target_0001.png" in (root / "scores" / "index.html").read_text()


def test_scoring_resumes_with_only_the_missing_pairs(run):
    root, _ = run
    first = predict(run, "resume")
    before = scores_of(root, "resume", 1)["scores"]
    (root / "resume" / "pairs" / "target_0001_t0500.pt").unlink()
    again = AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"),
                              out_dir=str(root / "resume"), **SCORE)
    assert again.pending_pairs() == [(1, 1)]
    assert first.pending_pairs() == [(1, 1)]
    second = predict(run, "resume")
    after = scores_of(root, "resume", 1)["scores"]  # the one pair now ran in a batch of its own: float32 rounding
    assert_rounding_close(after[:, 1:2], before[:, 1:2], [second, second], 1)
    assert torch.equal(after[:, [0, 2]], before[:, [0, 2]])  # the other pairs were not recomputed


def test_patch_masks_act_only_through_their_region(run, tmp_path):
    root, _ = run
    m_full = predict(run, "full")
    m_top = predict(run, "top", patch="0:3,0:8")
    m_bottom = predict(run, "bottom", patch="3:8,0:8")
    m_all = predict(run, "everything", patch="0:8,0:8")
    full, top, bottom = (scores_of(root, name, 0)["scores"].double() for name in ("full", "top", "bottom"))
    # f_t is a sum over pixels: the two halves' scores add up to the unmasked scores, and differ from them
    assert_rounding_close(top + bottom, full, [m_full, m_top, m_bottom], 0)
    assert not torch.allclose(top, full, rtol=0.05)
    assert_rounding_close(scores_of(root, "everything", 0)["scores"], full, [m_full, m_all], 0)
    mask = torch.zeros(8, 8)
    mask[:3] = 1
    ref = reference_scores(root, 0, 1, mask=mask.unsqueeze(0))
    assert torch.allclose(top[:, 1], ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
    np.save(tmp_path / "per_target.npy", np.stack([mask.numpy(), 1 - mask.numpy()]))
    m_files = predict(run, "files", patch=str(tmp_path / "per_target.npy"))  # per-target masks: other batches
    assert_rounding_close(scores_of(root, "files", 0)["scores"], top, [m_files, m_top], 0)
    assert_rounding_close(scores_of(root, "files", 1)["scores"], scores_of(root, "bottom", 1)["scores"],
                          [m_files, m_bottom], 1)
    with pytest.raises(ValueError, match="patch"):
        predict(run, "bad", patch="5:2,0:8")


def test_ddp_predict_equals_one_process(run):
    root, dm = run
    single_module = predict(run, "single")
    module = AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"),
                               out_dir=str(root / "ddp"), **SCORE)
    Trainer(accelerator="cpu", strategy="ddp_fork", devices=2, logger=False, enable_progress_bar=False,
            inference_mode=False).predict(module.attach_data(dm), return_predictions=False)
    for target in (0, 1):
        single, ddp = scores_of(root, "single", target), scores_of(root, "ddp", target)
        # each rank scores its own share of the pairs, in other batches: float32 rounding
        assert_rounding_close(single["scores"], ddp["scores"], [single_module, single_module], target)
        assert torch.equal(single["positive_indices"], ddp["positive_indices"])


def test_bad_inputs_are_refused_before_work(run, tmp_path):
    root, _ = run
    with pytest.raises(FileNotFoundError, match="features"):
        AttributionModule(features=str(tmp_path), targets=str(root / "targets"))
    with pytest.raises(FileNotFoundError, match="targets"):
        AttributionModule(features=str(root / "fit" / "features"), targets=str(tmp_path))
    with pytest.raises(ValueError, match="output"):
        AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"), output="norm")
