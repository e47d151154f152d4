"""LDS workflow (lds_train, lds_outputs, lds_report, counterfactual) on a tiny setup: tables with finite
values, the held-out lambda never sees the report targets, the training sweep resumes after a kill
without retraining finished models, actual outputs are cached and reused."""
from __future__ import annotations

import json
import logging
from pathlib import Path
import math
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from helpers import Killed, small_data
from evaluation import counterfactual as cf
from evaluation.outputs import collect_outputs, evaluated_steps
from evaluation.plan import LDSPlan
from evaluation.sweep import DONE
from commands.lds import LDS_SUBCOMMANDS
from commands.trainer import PROJECT_SUBCOMMANDS
from attribution.trajectory import load_targets
from cli import main


def run(args):
    assert set(LDS_SUBCOMMANDS) <= set(PROJECT_SUBCOMMANDS)  # the LDS subcommands are cli.py's own
    return main(args)


def fit_config(tmp_path, n=60):
    data = small_data(tmp_path, n=n)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"every_n_train_steps": 2, "save_top_k": -1,
                                                 "filename": "step{step:06d}", "auto_insert_metric_name": False}}]},
        "model": {"class_path": "lightning_modules.DDPMModule", "init_args": {
            "unet": {"class_path": "diffusers.UNet2DModel", "init_args": {
                "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
                "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "UpBlock2D"], "add_attention": False, "norm_num_groups": 4}},
            "warmup_steps": 1, "num_samples": 2, "sample_inference_steps": 2}},
        "data": {"class_path": "datamodules.ArrayDataModule", "init_args": {"path": data.hparams.path,
                                                                             "batch_size": 16}},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Full model, features (2 checkpoints), 4 targets at 2 steps; LDS plan over 4 masks (1 replicated x 2 seeds)."""
    tmp = tmp_path_factory.mktemp("lds")
    config = fit_config(tmp)
    full = tmp / "full"
    cwd = os.getcwd()
    os.chdir(tmp)  # Lightning writes config.yaml into the working directory
    try:
        run(["fit", "--config", config, "--trainer.max_steps=4", f"--trainer.default_root_dir={full}"])
        run(["featurize", "--config", config, "--checkpoints", str(full / "checkpoints"), "--out_dir",
             str(tmp / "features"), "--settings.proj_dim=16", "--settings.num_draws=2", "--settings.batch_size=64"])
        run(["sample", "--config", config, "--checkpoint", str(full / "checkpoints" / "step000004.ckpt"),
             "--out_dir", str(tmp / "targets"), "--num_targets=4", "--num_inference_steps=10",
             "--record_steps=[900, 500]"])
    finally:
        os.chdir(cwd)
    plan = {"out_dir": str(tmp / "lds"), "fit_config": [config], "num_masks": 4, "replicate_masks": 3,
            "features": str(tmp / "features"), "targets": str(tmp / "targets"), "num_draws": 2,
            "relative_lambdas": [0.01, 1.0, 100.0], "runner": "inprocess", "workers": 1, "classifier_epochs": 1,
            "cf_targets": 1, "cf_step": 500, "forget_step": 500, "cf_ks": [5], "cf_methods": ["trak", "random"],
            "num_completions": 4, "consistency_seeds": 1, "extend_grid": 0}
    plan_file = tmp / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    return {"tmp": tmp, "config": config, "plan": str(plan_file), "root": tmp / "lds"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _args(chain, command, *extra):
    return [command, "--config", chain["config"], "--plan", chain["plan"], *extra]


def _markers(root):
    return {p.parent.name: p.read_bytes() for p in sorted((root / "models").glob(f"*/{DONE}"))}


def test_training_sweep_resumes_without_retraining_finished_models(chain):
    root = chain["root"]
    trained = run(_args(chain, "lds_train", "--max_models=2")).trainer  # a stop after 2 models
    first = _markers(root)
    assert len(first) == 2
    killed = root / "models" / "mask_003_seed_0"  # a killed run: a folder without done.json
    killed.mkdir(parents=True)
    (killed / "partial.ckpt").write_bytes(b"half")
    checkpoints = {name: sorted(p.name for p in (root / "models" / name).rglob("*.ckpt")) for name in first}
    mtimes = {name: (root / "models" / name / DONE).stat().st_mtime_ns for name in first}
    lines_before = (root / "train_times.jsonl").read_text().splitlines()
    run(_args(chain, "lds_train"))
    lines = (root / "train_times.jsonl").read_text().splitlines()[len(lines_before):]
    trained_now = sorted(json.loads(line)["name"] for line in lines)
    # 4 masks x 1 seed + 3 replicated masks x 1 extra seed = 7 models; 2 were finished
    assert len(trained_now) == 5 and not set(trained_now) & set(first)
    assert "mask_003_seed_0" in trained_now and not (killed / "partial.ckpt").exists()
    after = _markers(root)
    assert len(after) == 7
    for name in first:  # finished models untouched
        assert after[name] == first[name]
        assert (root / "models" / name / DONE).stat().st_mtime_ns == mtimes[name]
        assert sorted(p.name for p in (root / "models" / name).rglob("*.ckpt")) == checkpoints[name]
    record = json.loads(after["mask_001_seed_0"])
    assert record["global_step"] == 2 and record["mask_file"].endswith("mask_001.npy")
    assert trained is not None


def test_actual_outputs_are_cached_and_reused(chain):
    run(_args(chain, "lds_outputs"))
    saved = torch.load(chain["root"] / "outputs" / "actual.pt", weights_only=False)
    reps = saved["replicates"]
    assert reps.shape == (2, 4, 4, 2) and torch.isfinite(reps[0]).all() and torch.isfinite(reps[1, :3]).all()
    plan = LDSPlan(**yaml.safe_load(open(chain["plan"])))
    targets = load_targets(plan.targets)
    again = collect_outputs(plan, targets, evaluated_steps(targets, plan.steps))
    assert again["computed"] == 0 and again["cached"] == 7
    assert torch.equal(again["replicates"].nan_to_num(-1), reps.nan_to_num(-1))
    cache = next((chain["root"] / "models" / "mask_000_seed_0").glob("outputs_*.pt"))
    cache.write_bytes(b"")  # a damaged cache would be read: prove the cached file, not a recomputation, is used
    with pytest.raises(Exception):
        collect_outputs(plan, targets, evaluated_steps(targets, plan.steps))
    cache.unlink()
    assert collect_outputs(plan, targets, evaluated_steps(targets, plan.steps))["computed"] == 1


def test_report_tables_have_finite_values_and_expected_rows(chain):
    run(_args(chain, "lds_report"))
    out = chain["root"] / "report"
    rows = json.loads((out / "lds.json").read_text())
    methods = ["trak", "trak_1ckpt", "trak_square", "pixel", "embedding", "random"]
    assert [(r["method"], r["step"]) for r in rows] == [(m, t) for m in methods for t in (900, 500)]
    for r in rows:
        assert math.isfinite(r["lds_mean"]) and r["num_models"] == 4 and r["targets"] == "report"
        assert math.isfinite(r["ceiling"]) and math.isfinite(r["specific_ceiling"])
        assert r["lds_se_total"] >= r["lds_se"] and math.isfinite(r["lds_se_masks"])
        assert (r["lambda"] is not None) == r["method"].startswith("trak")
    sweep = json.loads((out / "lambda_sweep.json").read_text())
    assert len(sweep) == 3 * 3 * 2 and all(math.isfinite(r["heldout_lds_mean"]) for r in sweep)
    paired = json.loads((out / "paired.json").read_text())
    assert {r["method"] for r in paired} == set(methods) - {"pixel"}
    for name in ("lds.csv", "lambda_sweep.csv", "paired.csv", "ceiling.csv", "lds_vs_step.png",
                 "lambda_sweep_trak.png"):
        assert (out / name).stat().st_size > 0
    chosen = torch.load(out / "chosen_scores.pt", weights_only=False)
    assert chosen["scores"]["trak"].shape == (60, 4, 2)


def test_heldout_lambda_choice_never_sees_report_targets(chain):
    out = chain["root"] / "report"
    before = json.loads((out / "lds.json").read_text())
    report = torch.load(out / "chosen_scores.pt", weights_only=False)["report"]
    caches = sorted((chain["root"] / "models").glob("*/outputs_*.pt"))
    originals = {path: path.read_bytes() for path in caches}
    gen = torch.Generator().manual_seed(0)
    for path in caches:  # scramble the report targets' actual outputs in every cached model file
        saved = torch.load(path, weights_only=False)
        saved["outputs"][report] = torch.randn(len(report), 2, generator=gen, dtype=torch.float64) * 1e3
        torch.save(saved, path)
    try:
        run(_args(chain, "lds_report"))
        after = json.loads((out / "lds.json").read_text())
    finally:
        for path, data in originals.items():
            path.write_bytes(data)
    trak = [(r["method"], r["step"], r["lambda"]) for r in before if r["method"].startswith("trak")]
    assert trak == [(r["method"], r["step"], r["lambda"]) for r in after if r["method"].startswith("trak")]
    # the report figures did change: the perturbation reached the reported targets
    assert [r["lds_mean"] for r in before] != [r["lds_mean"] for r in after]


def test_counterfactual_tables_and_plots(chain):
    with pytest.raises(ValueError, match=r"plan.cf_methods.*\['dual'\].*run lds_report"):  # not scored: refused
        run(_args(chain, "counterfactual", '--plan.cf_methods=["trak", "dual"]'))
    assert not (chain["root"] / "counterfactual" / "models").exists()
    run(_args(chain, "counterfactual"))
    out = chain["root"] / "counterfactual"
    summary = json.loads((out / "counterfactual.json").read_text())
    assert {(r["metric"], r["method"]) for r in summary} == {(m, method) for m in ("fid", "completion_l2", "forgetting_l2")
                                                             for method in ("trak", "random")}
    assert all(r["value"] is not None and r["value"] >= 0 for r in summary)
    per_target = {(r["method"], r["target_id"]): r for r in json.loads((out / "per_target.json").read_text())}
    paired = json.loads((out / "paired.json").read_text())   # trak minus random, paired over the targets
    assert {(r["metric"], r["method"], r["versus"]) for r in paired} == {
        (m, "trak", "random") for m in ("fid", "completion_l2", "forgetting_l2")}
    for r in paired:
        diffs = [per_target[("trak", b)][r["metric"]] - per_target[("random", b)][r["metric"]]
                 for (m, b) in per_target if m == "trak"]
        assert r["diff_mean"] == pytest.approx(float(np.mean(diffs)), abs=1e-12) and r["n_targets"] == len(diffs)
    consistency = json.loads((out / "seed_consistency.json").read_text())
    assert len(consistency) == 1 and consistency[0]["l2_same_seed_mean"] > 0
    formation = json.loads((out / "feature_formation.json").read_text())
    assert all(0 <= r["fraction_in_final_class"] <= 1 for r in formation)
    for name in ("fid.png", "forgetting_l2.png", "feature_formation.png"):
        assert (out / name).exists()
    # one result file per measured item: 2 removal models, 1 other-seed model, 2 report targets x 2 steps
    assert {kind: len(list((out / "results" / kind).glob("*.json"))) for kind in ("removal", "consistency",
                                                                                   "formation")} == \
        {"removal": 2, "consistency": 1, "formation": len(formation)}


CF_TABLES = ("per_target", "counterfactual", "seed_consistency", "feature_formation")


def test_counterfactual_killed_after_the_first_result_resumes_without_recomputing(chain, monkeypatch, capsys,
                                                                                   caplog):
    """After the uninterrupted run above: its results are deleted (the retrained models kept), a run killed while
    measuring the second removal model keeps the first one's result; the rerun measures only what is missing and
    ends with the uninterrupted tables; a third run measures nothing."""
    out = chain["root"] / "counterfactual"
    uninterrupted = {name: json.loads((out / f"{name}.json").read_text()) for name in CF_TABLES}
    shutil.rmtree(out / "results")
    measured, sampled, kill_at = [], [], [3]  # completions: reference, 1st model's, 2nd model's (killed)
    real_measure, real_completions = cf._measure_removal, cf.completions

    def measure(plan, job, *args):
        measured.append(job.name)
        return real_measure(plan, job, *args)

    def completions(*args, **kwargs):
        sampled.append(args[3])
        if len(sampled) == kill_at[0]:
            raise Killed("killed while measuring")
        return real_completions(*args, **kwargs)

    monkeypatch.setattr(cf, "_measure_removal", measure)
    monkeypatch.setattr(cf, "completions", completions)
    with pytest.raises(Killed):
        run(_args(chain, "counterfactual"))
    first, second = measured
    assert len(list((out / "results" / "removal").glob("*.json"))) == 1
    assert len(list((out / "results" / "reference").glob("*.pt"))) == 1

    measured.clear(), sampled.clear(), kill_at.clear(), kill_at.append(0)
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    run(_args(chain, "counterfactual"))
    n_formation = len(uninterrupted["feature_formation"])
    assert measured == [second]                                     # the first model's result was read back
    assert len(sampled) == 1 + n_formation                          # its completions and the reference: not again
    for name in CF_TABLES:
        assert json.loads((out / f"{name}.json").read_text()) == uninterrupted[name], name
    err, log = capsys.readouterr().err, caplog.text
    for bar in ("retrained models", "removal models", "seed consistency", "feature formation"):
        assert f"counterfactual: {bar}" in err, (bar, err)         # one progress bar per phase
    assert "removal: 1 measured, 1 reused" in log and "consistency: 1 measured, 0 reused" in log
    assert f"1 of {3 + n_formation} results reused" in log

    measured.clear(), sampled.clear()
    run(_args(chain, "counterfactual"))
    assert measured == [] and sampled == []
    assert f"{3 + n_formation} of {3 + n_formation} results reused" in caplog.text


def test_feature_formation_is_sized_by_the_plan(chain, monkeypatch):
    """plan.formation_targets / formation_steps / num_completions set the pass; unrecorded steps are refused first."""
    sampled = []
    real = cf.completions

    def completions(predict, scheduler, x_t, t, n, *args, **kwargs):
        sampled.append((t, n))
        return real(predict, scheduler, x_t, t, n, *args, **kwargs)

    monkeypatch.setattr(cf, "completions", completions)
    run(_args(chain, "counterfactual", "--plan.formation_targets=1", "--plan.formation_steps=[900]",
              "--plan.num_completions=3"))
    out = chain["root"] / "counterfactual"
    formation = json.loads((out / "feature_formation.json").read_text())
    saved = torch.load(chain["root"] / "report" / "chosen_scores.pt", weights_only=False)
    first_report_target = saved["target_ids"][int(saved["report"][0])]
    assert [(r["target_id"], r["step"]) for r in formation] == [(first_report_target, 900)]
    # num_completions also keys the removal results: they are measured again with 3 completions (+ 1 reference)
    assert sorted(sampled) == sorted([(900, 3)] + [(500, 3)] * 3)
    sampled.clear()
    run(_args(chain, "counterfactual", "--plan.formation_targets=0"))  # no pass; the 4-completion results reused
    assert sampled == [] and not (out / "feature_formation.json").exists() and (out / "counterfactual.json").exists()
    with pytest.raises(ValueError, match="plan.formation_steps"):
        run(_args(chain, "counterfactual", "--plan.formation_steps=[700]"))
    with pytest.raises(ValueError, match="plan.formation_targets"):
        LDSPlan(formation_targets=-1)


def test_plan_is_validated_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="plan.methods"):
        LDSPlan(methods=["trak", "clip"])
    with pytest.raises(ValueError, match="replicate_masks"):
        LDSPlan(num_masks=4, replicate_masks=5)


def test_subprocess_workers_run_the_same_fit_command_side_by_side(chain, tmp_path):
    plan = yaml.safe_load(open(chain["plan"]))
    plan.update(out_dir=str(tmp_path / "sub"), num_masks=2, replicate_masks=0, runner="subprocess", workers=2)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    run(["lds_train", "--config", chain["config"], "--plan", str(tmp_path / "plan.yaml")])
    records = [json.loads((tmp_path / "sub" / "models" / f"mask_00{j}_seed_0" / DONE).read_text()) for j in (0, 1)]
    assert [r["global_step"] for r in records] == [2, 2] and records[0]["seed"] != records[1]["seed"]
    ckpt = torch.load(records[1]["checkpoint"], weights_only=False)
    mask = np.load(tmp_path / "sub" / "masks" / "mask_001.npy")
    assert ckpt["attribution"]["subset_size"] == int(mask.sum())


def test_extra_feature_folders_are_compared_like_trak(chain):
    """``trak@<name>``: the same stores give exactly trak's rows; a layerwise-projected ensemble is scored too."""
    tmp = chain["tmp"]
    run(["featurize", "--config", chain["config"], "--checkpoints", str(tmp / "full" / "checkpoints"), "--out_dir",
         str(tmp / "features_layerwise"), "--settings.proj_dim=16", "--settings.num_draws=2",
         "--settings.projector=layerwise", "--settings.batch_size=64"])
    extra = json.dumps({"same": str(tmp / "features"), "layerwise": str(tmp / "features_layerwise")})
    run(_args(chain, "lds_report", f"--plan.extra_features={extra}",
              '--plan.methods=["trak", "trak@same", "trak@layerwise", "pixel"]'))
    rows = json.loads((chain["root"] / "report" / "lds.json").read_text())
    by = {(r["method"], r["step"]): r for r in rows}
    for t in (900, 500):
        assert by[("trak@same", t)]["lds_mean"] == by[("trak", t)]["lds_mean"]
        assert math.isfinite(by[("trak@layerwise", t)]["lds_mean"])
    with pytest.raises(ValueError, match="extra_features"):
        LDSPlan(methods=["trak@dense"])


def test_step_matched_stores_score_each_step_with_its_own_folder(chain, tmp_path):
    """A ``{step}`` folder: step t is scored with the stores featurized in its timestep window, exactly as
    ``trak`` on those stores at that step alone; a window past T is refused before any store is written."""
    from attribution.store import open_feature_stores
    from evaluation.methods import method_scores

    tmp = chain["tmp"]
    for t, window in ((900, "[500, 1000]"), (500, "[0, 500]")):
        run(["featurize", "--config", chain["config"], "--checkpoints", str(tmp / "full" / "checkpoints"),
             "--out_dir", str(tmp / f"features_band{t}"), "--settings.proj_dim=16", "--settings.num_draws=2",
             "--settings.batch_size=64", f"--settings.timestep_range={window}"])
    plan, targets, steps, stores, data, images, masks = _method_inputs(chain)
    assert sorted(steps) == [500, 900]
    plan = LDSPlan(**{**yaml.safe_load(open(chain["plan"])),
                      "extra_features": {"band": str(tmp / "features_band{step}")}})
    got = method_scores("trak@band", plan, stores, targets, steps, images, None, tmp_path, masks)
    chosen = torch.tensor([2, 0][: len(steps)])
    for s, t in enumerate(steps):
        band = open_feature_stores(str(tmp / f"features_band{t}"), "band")
        assert band[0].meta["train_output"]["timestep_range"] == ([500, 1000] if t == 900 else [0, 500])
        alone = method_scores("trak", plan, band, targets, [t], images, None, tmp_path, masks)
        torch.testing.assert_close(got.predictions[..., s], alone.predictions[..., 0], rtol=0, atol=0)
        torch.testing.assert_close(got.at(chosen)[..., s], alone.at(chosen[s:s + 1])[..., 0], rtol=0, atol=0)
        alone.close()
    assert got.cost["featurize_s_per_1000"] > 0 and got.predictions.shape[-1] == len(steps)
    got.close()
    with pytest.raises(ValueError, match=r"timestep_range.*T = 1000"):
        run(["featurize", "--config", chain["config"], "--checkpoints", str(tmp / "full" / "checkpoints"),
             "--out_dir", str(tmp_path / "past"), "--settings.proj_dim=16", "--settings.num_draws=2",
             "--settings.timestep_range=[900, 1100]"])
    assert not any((tmp_path / "past").rglob("features.npy"))


def _method_inputs(chain):
    from attribution.store import open_feature_stores
    from evaluation.methods import dataset_images

    plan = LDSPlan(**yaml.safe_load(open(chain["plan"])))
    targets = load_targets(plan.targets)
    steps = evaluated_steps(targets, plan.steps)
    stores = open_feature_stores(plan.features, "plan.features")
    data = small_data(chain["tmp"], n=60)
    masks = torch.rand(4, 60, generator=torch.Generator().manual_seed(0)) > 0.5
    return plan, targets, steps, stores, data, dataset_images(data), masks


def test_dual_estimator_equals_trak_at_the_same_absolute_ridge(chain, tmp_path):
    """``dual`` (N x N Gram solve, ridge r * trace / N) equals ``trak`` (d x d solve, ridge r' * trace / d) when
    r' = r d / N: two computations of one estimator, the primal one in float32."""
    from evaluation.methods import method_scores

    plan, targets, steps, stores, data, images, masks = _method_inputs(chain)
    N, d = stores[0].N, stores[0].d
    r = 0.5
    dual = method_scores("dual", plan, stores, targets, steps, images, None, tmp_path, masks, lambdas=[r])
    trak = method_scores("trak", plan, stores, targets, steps, images, None, tmp_path, masks, lambdas=[r * d / N])
    first = torch.zeros(len(steps), dtype=torch.long)
    a, b = dual.at(first).double(), trak.at(first).double()
    trak.close()
    # float32 solve: error <= eps * cond(K + lambda I) * d relative to the largest score
    eigen = [torch.linalg.eigvalsh(s.read(0, N, torch.float64).T @ s.read(0, N, torch.float64)) for s in stores]
    cond = max(float((e.max() + r * e.sum() / N) / (e.clamp(min=0).min() + r * e.sum() / N)) for e in eigen)
    tol = torch.finfo(torch.float32).eps * cond * d * float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert dual.predictions.shape == (1, 4, 4, len(steps))


def test_ekfac_method_equals_the_ekfac_api_on_the_same_checkpoint(chain, tmp_path):
    """The report's ``ekfac_1ckpt`` / ``kfac_1ckpt`` scores are attribution.ekfac's scores of the last checkpoint
    (training rows in index order, the store's training-side draws, the step output at x0_hat_t)."""
    from attribution import StepOutput
    from attribution.ekfac import ekfac_gradients, ekfac_scores, fit_ekfac
    from evaluation.methods import method_scores, store_denoiser, store_train_output, target_inputs
    from lightning_modules.loading import load_diffusion_module

    plan, targets, steps, stores, data, images, masks = _method_inputs(chain)
    store = stores[-1]
    module = load_diffusion_module(store.meta["checkpoint"]["file"])
    task, model = module.attribution_task(), store_denoiser(module, store).eval()
    batch = next(iter(data.featurize_dataloader(list(range(60)), batch_size=60)))
    x0, keys, cond = module.attribution_inputs(batch)
    rows = [(x0, keys)]                                       # one batch: other chunking than the report's
    estimate, tkeys, tcond, t = target_inputs(task, model, targets, steps)
    for strategy in ("ekfac", "kfac"):
        got = method_scores(f"{strategy}_1ckpt", plan, stores, targets, steps, images, None, tmp_path, masks,
                            datamodule=data, lambdas=[0.1])
        factors = fit_ekfac(task, model, store_train_output(store), rows, strategy=strategy)
        output = StepOutput(plan.num_draws, plan.draw_seed)
        with torch.enable_grad():
            grads = ekfac_gradients(task, model, output, factors, estimate, tkeys, steps=t)
            want = ekfac_scores(factors, task, model, store_train_output(store), rows, grads, 0.1,
                                strategy=strategy, dtype=torch.float64)
        want = want.reshape(60, len(targets), len(steps))
        scale = float(want.abs().max())
        torch.testing.assert_close(got.at(torch.zeros(len(steps), dtype=torch.long)).double(), want, rtol=0,
                                   atol=1e-4 * scale)   # float32 gradients summed over p = 1e4 parameters
        assert got.cost["featurize_s_per_1000"] > 0


def test_kfac_scores_are_cached_per_checkpoint_and_damping(chain, tmp_path, monkeypatch):
    """The K-FAC pass runs once per checkpoint and damping: ``kfac`` reuses ``kfac_1ckpt``'s last checkpoint,
    an extended grid scores only its new damping, the cached scores equal the fresh ones, and another target
    side (the draws) is scored anew."""
    import dataclasses

    import evaluation.methods as methods

    plan, targets, steps, stores, data, images, masks = _method_inputs(chain)
    calls = []
    sweep = methods.ekfac_damping_sweep

    def counted(*args, **kwargs):
        calls.append(list(args[6]))
        return sweep(*args, **kwargs)

    monkeypatch.setattr(methods, "ekfac_damping_sweep", counted)
    first = torch.zeros(len(steps), dtype=torch.long)
    one = methods.method_scores("kfac_1ckpt", plan, stores, targets, steps, images, None, tmp_path, masks,
                                datamodule=data, lambdas=[0.1, 1.0])
    assert calls == [[0.1, 1.0]]
    every = methods.method_scores("kfac", plan, stores, targets, steps, images, None, tmp_path, masks,
                                  datamodule=data, lambdas=[0.1, 1.0])
    assert calls == [[0.1, 1.0]] + [[0.1, 1.0]] * (len(stores) - 1)   # the last checkpoint came from the cache
    again = methods.method_scores("kfac_1ckpt", plan, stores, targets, steps, images, None, tmp_path, masks,
                                  datamodule=data, lambdas=[0.01, 0.1, 1.0])
    assert calls[-1] == [0.01]
    fresh = methods.method_scores("kfac_1ckpt", plan, stores, targets, steps, images, None, tmp_path / "fresh",
                                  masks, datamodule=data, lambdas=[0.01, 0.1, 1.0])
    torch.testing.assert_close(again.lambda_scores[1:], one.lambda_scores, rtol=0, atol=0)   # read, not recomputed
    # a pass over another grid: other float32 matmul shapes (the tolerance of the ekfac API test above)
    scale = float(fresh.lambda_scores.abs().max())
    torch.testing.assert_close(again.lambda_scores, fresh.lambda_scores, rtol=0, atol=1e-4 * scale)
    assert again.cost["featurize_s_per_1000"] > 0 and every.predictions.shape == one.predictions.shape
    count = len(calls)
    other = dataclasses.replace(plan, num_draws=plan.num_draws + 1)
    methods.method_scores("kfac_1ckpt", other, stores, targets, steps, images, None, tmp_path, masks,
                          datamodule=data, lambdas=[0.1])
    assert len(calls) == count + 1


def test_comparison_table_and_grid_edges(chain):
    """comparison.csv: one row per method with the mean over steps, paired differences against trak and pixel,
    the ratio to trak and the featurize cost; a ridge chosen at a grid edge is flagged, and extend_grid adds a
    value a factor 10 past that edge before the report is written."""
    run(_args(chain, "lds_report", '--plan.methods=["trak", "dual", "kfac_1ckpt", "pixel"]',
              "--plan.relative_lambdas=[0.1, 1.0]"))
    out = chain["root"] / "report"
    def number(v):  # the JSON tables write NaN as null
        return math.nan if v is None else v

    rows = {r["method"]: {k: number(v) for k, v in r.items()} for r in json.loads((out / "comparison.json").read_text())}
    assert list(rows) == ["trak", "dual", "kfac_1ckpt", "pixel"]
    lds = json.loads((out / "lds.json").read_text())
    for method, row in rows.items():
        per_step = [r["lds_mean"] for r in lds if r["method"] == method]
        assert row["lds_mean_over_steps"] == pytest.approx(float(np.mean(per_step)), abs=1e-12)
        assert math.isfinite(row["lds_mean_se"]) and math.isfinite(row["featurize_s_per_1000"]) or method == "pixel"
    assert rows["trak"]["ratio_to_trak"] == pytest.approx(1.0) and math.isnan(rows["trak"]["minus_trak"])
    assert rows["dual"]["minus_trak"] == pytest.approx(rows["dual"]["lds_mean_over_steps"]
                                                       - rows["trak"]["lds_mean_over_steps"], abs=1e-12)
    assert all(r["lambda_at_grid_edge"] for r in lds if r.get("lambda") is not None)        # 2 values: every choice is an edge
    assert all(math.isfinite(number(r["ceiling_se"])) for r in lds)
    first = {r["method"]: r["lambda"] for r in lds if r.get("lambda") is not None}
    assert set(first) == {"trak", "dual", "kfac_1ckpt"}
    run(_args(chain, "lds_report", '--plan.methods=["trak", "dual", "kfac_1ckpt", "pixel"]',
              "--plan.relative_lambdas=[0.1, 1.0]", "--plan.extend_grid=1"))
    sweep = json.loads((out / "lambda_sweep.json").read_text())
    for method, lam in first.items():
        grid = sorted({r["lambda"] for r in sweep if r["method"] == method})
        assert grid == ([0.01, 0.1, 1.0] if lam == 0.1 else [0.1, 1.0, 10.0])


def test_a_stepwise_method_reports_the_target_side_chosen_on_heldout_targets(chain):
    """``trak_stepwise`` scores both target sides (``trak``, ``trak_square``) and at each step takes the one whose
    best ridge is ahead on the HELD-OUT targets (lambda_sweep's held-out column of the two, read back here); its
    report LDS at that step is the chosen side's at its own chosen ridge (lambda_sweep's report column)."""
    run(_args(chain, "lds_report", '--plan.methods=["trak_stepwise", "trak", "trak_square"]',
              "--plan.relative_lambdas=[0.1, 1.0]"))
    out = chain["root"] / "report"
    lds = {(r["method"], r["step"]): r for r in json.loads((out / "lds.json").read_text())}
    sweep = json.loads((out / "lambda_sweep.json").read_text())
    steps = sorted({t for _, t in lds})
    chosen = []
    for t in steps:
        best = {kind: max(r["heldout_lds_mean"] for r in sweep if r["method"] == name and r["step"] == t)
                for kind, name in (("loss", "trak"), ("square", "trak_square"))}
        kind = max(best, key=best.get)
        row = lds[("trak_stepwise", t)]
        assert row["target_output"] == kind
        name = "trak" if kind == "loss" else "trak_square"
        want = [r["report_lds_mean_for_reference"] for r in sweep
                if r["method"] == name and r["step"] == t and r["lambda"] == row["lambda"]]
        assert row["lds_mean"] == pytest.approx(want[0], abs=1e-12)
        chosen.append(kind)
    comparison = {r["method"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert comparison["trak_stepwise"]["target_output_per_step"] == "/".join(
        chosen[steps.index(t)] for t in [r["step"] for r in json.loads((out / "lds.json").read_text())
                                         if r["method"] == "trak_stepwise"])
    saved = torch.load(out / "chosen_scores.pt", weights_only=False)
    assert saved["scores"]["trak_stepwise"].shape == saved["scores"]["trak"].shape


def test_a_grid_the_estimator_refuses_to_extend_keeps_its_scores_and_the_flag(chain, monkeypatch):
    """EK-FAC refuses a damping too small for a positive definite curvature: the report keeps that method's
    scores on the grid it had, flags the edge, and still extends the others."""
    import commands.lds as lds_commands

    real = lds_commands.method_scores

    def refusing(method, *args, lambdas=None, **kwargs):
        if method == "kfac_1ckpt" and lambdas is not None:
            raise ValueError("Expected `damping` large enough for a positive definite curvature")
        return real(method, *args, lambdas=lambdas, **kwargs)

    monkeypatch.setattr(lds_commands, "method_scores", refusing)
    run(_args(chain, "lds_report", '--plan.methods=["trak", "kfac_1ckpt", "pixel"]',
              "--plan.relative_lambdas=[0.1, 1.0]", "--plan.extend_grid=2"))
    out = chain["root"] / "report"
    sweep = json.loads((out / "lambda_sweep.json").read_text())
    assert sorted({r["lambda"] for r in sweep if r["method"] == "kfac_1ckpt"}) == [0.1, 1.0]
    assert len({r["lambda"] for r in sweep if r["method"] == "trak"}) > 2
    lds = json.loads((out / "lds.json").read_text())
    assert all(r["lambda_at_grid_edge"] for r in lds if r["method"] == "kfac_1ckpt")


def test_lds_featurize_stores_each_subset_models_final_checkpoint_once(chain):
    """lds_featurize: `cli.py featurize` of every finished subset model's final checkpoint (the plan's flags),
    claimed through the launcher's machinery; a second run finds every store done."""
    from attribution.store import open_feature_stores
    from evaluation.sweep import done_record

    args = _args(chain, "lds_featurize", "--mask_stop=1",
                 '--plan.featurize_args=["--settings.proj_dim=8", "--settings.num_draws=1"]')
    run(args)
    for r in (0, 1):
        folder = chain["root"] / "models" / f"mask_000_seed_{r}"
        (store,) = open_feature_stores(str(folder / "features"))
        assert store.d == 8 and store.meta["train_output"]["num_draws"] == 1
        assert store.meta["checkpoint"]["file"] == str(Path(done_record(folder)["checkpoint"]).absolute())
        assert not (folder / "features.claim").exists()
    logs = {r: (chain["root"] / "models" / f"mask_000_seed_{r}" / "featurize.log").stat().st_mtime_ns for r in (0, 1)}
    run(args)  # every store done: no featurize runs again
    assert logs == {r: (chain["root"] / "models" / f"mask_000_seed_{r}" / "featurize.log").stat().st_mtime_ns
                    for r in (0, 1)}
