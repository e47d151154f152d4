"""A fit killed mid-epoch and resumed from its last checkpoint ends with exactly the weights of the
uninterrupted run: the epoch's data order (datamodules.base.EpochSampler) and the global random state of the
training noise (callbacks.exact_resume.ExactResume) are restored, not only Lightning's own state."""
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.exact_resume import ExactResume
from commands.trainer import AttributionTrainer
from helpers import Killed, small_data, tiny_module

STEPS = 9   # 120 examples in batches of 32: 4 batches an epoch, so the kill at step 6 is mid-epoch 1


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _trainer(root, *callbacks):
    checkpoint = ModelCheckpoint(every_n_train_steps=1, save_top_k=-1, filename="step{step:06d}",
                                 auto_insert_metric_name=False)
    return AttributionTrainer(accelerator="cpu", max_steps=STEPS, default_root_dir=root, logger=False,
                              enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint, *callbacks])


def _weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _fit(root, seed=0, *callbacks, ckpt_path=None):
    root.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    module, dm = tiny_module(), small_data(root, batch_size=32)
    _trainer(root / "run", *callbacks).fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def test_a_resumed_fit_equals_the_uninterrupted_run(tmp_path):
    whole = _weights(_fit(tmp_path / "whole"))
    with pytest.raises(Killed):
        _fit(tmp_path / "killed", 0, KillAt(6))
    last = sorted((tmp_path / "killed" / "run").rglob("step*.ckpt"))[-1]
    assert last.name == "step000006.ckpt"
    resumed = _fit(tmp_path / "resumed", 123, ckpt_path=str(last))   # another seed: the checkpoint decides
    assert torch.equal(_weights(resumed), whole)
    assert "rng_states" in torch.load(last, weights_only=False)


def test_without_the_random_state_the_resumed_run_differs(tmp_path, monkeypatch):
    """The check above can fail: restoring only Lightning's state (no random state) changes the weights."""
    monkeypatch.setattr(ExactResume, "on_train_batch_start", lambda *args: None)
    whole = _weights(_fit(tmp_path / "whole"))
    with pytest.raises(Killed):
        _fit(tmp_path / "killed", 0, KillAt(6))
    last = sorted((tmp_path / "killed" / "run").rglob("step*.ckpt"))[-1]
    assert not torch.equal(_weights(_fit(tmp_path / "resumed", 123, ckpt_path=str(last))), whole)
