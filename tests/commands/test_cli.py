"""cli.py: every config instantiates; fit on a mask through the CLI; bad masks refused before training."""
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from cli import AttributionCLI, main
from conftest import CONFIGS, ROOT


def fake_cifar(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root


OVERLAYS = {"featurize_digits.yaml": "ddpm_digits.yaml"}  # a config added on top of another one


def scored_run(tmp_path):
    """Feature stores and recorded targets from a smoke run, for the scoring config."""
    smoke = str(CONFIGS / "smoke.yaml")
    main(["fit", "--config", smoke, f"--trainer.default_root_dir={tmp_path / 'run'}",
          "--trainer.callbacks+=callbacks.TrakFeaturizeCallback", "--trainer.callbacks.proj_dim=8",
          "--trainer.callbacks.num_draws=1", "--trainer.callbacks.batch_size=512"])
    main(["sample", "--config", smoke, f"--checkpoint={tmp_path / 'run' / 'checkpoints' / 'step000003.ckpt'}",
          f"--out_dir={tmp_path / 'targets'}", "--num_targets=1", "--num_inference_steps=4", "--num_record_steps=2",
          "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    return [f"--model.features={tmp_path / 'run' / 'features'}", f"--model.targets={tmp_path / 'targets'}"]


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--config", str(CONFIGS / OVERLAYS[config])] if config in OVERLAYS else []
    args = base + ["--config", str(CONFIGS / config), "--trainer.logger=false"]
    if "cifar" in config:
        args.append(f"--data.root={fake_cifar(tmp_path / 'cifar')}")
    if "coco" in config:  # COCO shards stand-in: captioned digits in the same shard format
        from datamodules.shards import write_digits_shards
        write_digits_shards(tmp_path / "shards", samples_per_shard=16, limit=32)
        args += [f"--data.path={tmp_path / 'shards'}", "--data.num_workers=0"]
    if config.startswith("score"):
        args += scored_run(tmp_path)
    cli = _instantiate(args)
    assert cli.model is not None and cli.datamodule.num_examples > 0
    if "cifar" in config:  # the paper's architecture, built from its configuration
        assert sum(p.numel() for p in cli.model.unet.parameters()) == 35_746_307


def _instantiate(args) -> AttributionCLI:
    return main(args, run=False)


def test_masks_then_fit_through_the_cli(tmp_path):
    smoke = str(CONFIGS / "smoke.yaml")
    main(["masks", "--config", smoke, "--out_dir", str(tmp_path / "masks"), "--num_masks", "2", "--seed", "3"])
    mask = np.load(tmp_path / "masks" / "mask_001.npy")
    assert mask.shape == (1797,) and 0.4 < mask.mean() < 0.6
    main(["fit", "--config", smoke, f"--data.subset_mask={tmp_path / 'masks' / 'mask_001.npy'}",
          f"--trainer.default_root_dir={tmp_path / 'run'}"])
    ckpt = torch.load(next((tmp_path / "run").rglob("*.ckpt")), weights_only=False)
    assert ckpt["attribution"]["subset_size"] == int(mask.sum())
    assert (tmp_path / "run" / "samples" / "final.png").exists()


def test_wrong_length_mask_exits_before_training(tmp_path):
    np.save(tmp_path / "bad.npy", np.ones(10, dtype=bool))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(CONFIGS / "smoke.yaml"),
         f"--data.subset_mask={tmp_path / 'bad.npy'}", f"--trainer.default_root_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "subset_mask" in proc.stderr and "1797" in proc.stderr and "length 10" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was trained or written


@pytest.mark.parametrize("plan", sorted(p.name for p in (CONFIGS / "lds").glob("*.yaml")))
def test_every_shipped_lds_plan_is_valid(plan):
    """Each evaluation plan of configs/lds builds an LDSPlan (its checks: methods, cf_methods, grids), the fit
    configs it names exist, and every cf method is one lds_report scores (counterfactual refuses others)."""
    import yaml

    from evaluation.plan import LDSPlan
    built = LDSPlan(**yaml.safe_load((CONFIGS / "lds" / plan).read_text()))
    assert built.methods and set(built.cf_methods) <= set(built.methods)
    assert all((ROOT / config).is_file() for config in built.fit_config), built.fit_config
