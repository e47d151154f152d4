"""Independent implementation: MadryLab's traker (``import trak``) on the same per-example gradients.

traker's own gradient computer is bypassed with one that returns our precomputed gradients, and
its NoOpProjector means no projection: the comparison isolates the kernel / scoring math.
"""
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import spearmanr

from attribution import (DiffusionTask, FeatureStore, TrainLoss, StepOutput, finalize, num_parameters,
                         per_example_gradients, score)
from attribution.testing import tiny_unet

trak = pytest.importorskip("trak", reason="traker (import name `trak`) is not installed")
from trak.gradient_computers import AbstractGradientComputer  # noqa: E402
from trak.projectors import NoOpProjector  # noqa: E402


class Precomputed(AbstractGradientComputer):
    """Batches are ``(grads (B, p), out_to_loss (B, 1))``."""

    def __init__(self, model, task, grad_dim=None, dtype=torch.float32, device="cpu", grad_wrt=None):
        super().__init__(model, task, grad_dim, dtype, device)

    def load_model_params(self, model):
        pass

    def compute_per_sample_grad(self, batch):
        return batch[0].clone()

    def compute_loss_grad(self, batch):
        return batch[1]


class Flat(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(p))


def _trak_scores(tmp_path, train_grads, q, target_grads):
    N, p = train_grads.shape
    model = Flat(p)
    traker = trak.TRAKer(model=model, task="image_classification", train_set_size=N, save_dir=str(tmp_path / "trak"),
                         device="cpu", gradient_computer=Precomputed, projector=NoOpProjector(),
                         use_half_precision=False, lambda_reg=0.0, logging_level=40)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for s in range(0, N, 64):
        traker.featurize(batch=(train_grads[s:s + 64], q[s:s + 64]), inds=torch.arange(s, min(s + 64, N)).numpy())
    traker.finalize_features()
    traker.start_scoring_checkpoint("exp", model.state_dict(), model_id=0, num_targets=target_grads.shape[0])
    traker.score(batch=(target_grads, None), num_samples=target_grads.shape[0])
    return torch.as_tensor(traker.finalize_scores(exp_name="exp")).float()


def _ours(tmp_path, train_grads, q, target_grads):
    store = FeatureStore.open(tmp_path / "ours", {"N": train_grads.shape[0], "d": train_grads.shape[1],
                                                   "dtype": "float32", "with_weights": True})
    store.write(torch.arange(train_grads.shape[0]), train_grads, q.reshape(-1))
    finalize(store)
    return score([store], [target_grads], 0.0)


def test_traker_agrees_on_diffusion_gradients(tmp_path):
    task = DiffusionTask.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    model = tiny_unet(seed=3)
    # (not up_blocks.1.resnets.1.conv2.bias: a constant added to a GroupNorm group cancels, which
    # makes the kernel exactly singular and our lam = 0 check refuses it)
    names = ["up_blocks.1.resnets.1.norm2.weight", "up_blocks.1.resnets.1.norm2.bias", "conv_norm_out.weight",
             "conv_norm_out.bias", "conv_out.weight", "conv_out.bias"]
    p = num_parameters(model, names)
    g = torch.Generator().manual_seed(0)
    N = 4 * p
    x0 = torch.randn(N, 1, 8, 8, generator=g)
    train = TrainLoss(num_draws=2, seed=1)
    draws = train.draws(torch.arange(N), (1, 8, 8), num_train_timesteps=1000)
    grads = per_example_gradients(task, model, train, x0, draws, param_names=names)
    target = StepOutput(num_draws=4, seed=2)
    xt = torch.randn(3, 1, 8, 8, generator=g)
    tdraws = target.draws(torch.arange(3), (1, 8, 8), torch.tensor([100, 500, 900]), num_train_timesteps=1000)
    tgrads = per_example_gradients(task, model, target, xt, tdraws, param_names=names)
    ones = torch.ones(N, 1)
    ours, theirs = _ours(tmp_path, grads, ones, tgrads), _trak_scores(tmp_path, grads, ones, tgrads)
    assert ours.shape == theirs.shape == (N, 3)
    for b in range(3):
        assert spearmanr(ours[:, b], theirs[:, b]).statistic > 0.99


def test_traker_agrees_with_out_to_loss_weights(tmp_path):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(1000, 6, generator=g)
    q = torch.randn(1000, 1, generator=g)
    G = torch.randn(4, 6, generator=g)
    ours, theirs = _ours(tmp_path, X, q, G), _trak_scores(tmp_path, X, q, G)
    for b in range(4):
        assert spearmanr(ours[:, b], theirs[:, b]).statistic > 0.999
    # traker rescales X^T X internally; the scores agree up to one positive factor
    c = float((ours * theirs).sum() / (theirs * theirs).sum())
    assert c > 0
    torch.testing.assert_close(ours, c * theirs, rtol=1e-3, atol=1e-4 * float(ours.abs().max()))
