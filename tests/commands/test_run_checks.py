"""``cli.py fit`` fails (exit code 2) on a non-finite loss instead of stopping quietly, stamps its checkpoints with
their weights' checksum, resumes a checkpoint of the same data and refuses one of other data."""
from __future__ import annotations

import sys

import pytest
import torch

import cli
from attribution.integrity import STAMP_KEY, read_checkpoint
from conftest import CONFIGS, ROOT
from helpers import digits_subset_array

SMOKE = str(CONFIGS / "smoke.yaml")


def _fit(tmp_path, *args):
    npz = tmp_path / "digits.npz"
    if not npz.exists():
        digits_subset_array(npz, 120)
    return ["fit", "--config", SMOKE, "--data=datamodules.ArrayDataModule", f"--data.path={npz}", *args]


def test_a_diverging_fit_fails_with_exit_code_2_and_one_line(tmp_path, capsys):
    rc = cli.run(_fit(tmp_path, "--model.init_args.lr=1e8", "--trainer.max_steps=30",
                      f"--trainer.default_root_dir={tmp_path / 'run'}"))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Expected a finite training loss" in err and "global step" in err
    assert "lr" in err


def test_checkpoints_are_stamped_and_resume_on_the_same_data_only(tmp_path, capsys):
    assert cli.run(_fit(tmp_path, f"--trainer.default_root_dir={tmp_path / 'run'}")) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step000003.ckpt"
    assert STAMP_KEY in torch.load(ckpt, weights_only=False)
    read_checkpoint(ckpt)  # its weights match the stamp
    assert cli.run(_fit(tmp_path, f"--ckpt_path={ckpt}", "--trainer.max_steps=6",
                        f"--trainer.default_root_dir={tmp_path / 'resumed'}")) == 0
    resumed = torch.load(next((tmp_path / "resumed").rglob("*.ckpt")), weights_only=False)
    assert resumed["global_step"] == 6
    capsys.readouterr()
    # another datamodule class (all 1797 digits): refused before any step, nothing written
    rc = cli.run(["fit", "--config", SMOKE, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / 'other'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "`ckpt_path`" in err and "num_examples = 1797" in err and "120" in err, err
    assert not (tmp_path / "other").exists()


def test_python_cli_py_prints_one_line_without_traceback(tmp_path):
    import subprocess
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", SMOKE, "--data.init_args.batch_size=0",
                           f"--trainer.default_root_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "`batch_size`" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_sample_refuses_non_finite_trajectories_before_writing(tmp_path):
    from attribution.errors import NonFiniteError
    from attribution.integrity import stamp_checkpoint
    from commands.trainer import AttributionTrainer
    from helpers import fit_trainer, small_data, tiny_module

    dm = small_data(tmp_path)
    fit_trainer(tmp_path / "run", [], max_steps=2).fit(tiny_module(), datamodule=dm)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "step000002.ckpt", weights_only=False)
    checkpoint["state_dict"]["unet.conv_out.weight"].mul_(1e38)  # finite weights whose outputs overflow
    stamp_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "overflow.ckpt")
    trainer = AttributionTrainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(NonFiniteError, match=r"recorded `(x_t|x0_hat|final)` of target 0 sampled from checkpoint .*overflow.ckpt"):
        trainer.sample(tiny_module(), dm, checkpoint=str(tmp_path / "overflow.ckpt"), out_dir=str(tmp_path / "targets"),
                       num_targets=1, num_inference_steps=4, num_record_steps=2)
    assert not (tmp_path / "targets").exists()
