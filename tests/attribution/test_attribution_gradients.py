"""vmap per-example gradients equal a loop of backward passes; subsets skip excluded work."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attribution import (SparseProjector, StepOutput, TrainLoss, featurize_batch, loop_gradients,
                         num_parameters, parameter_order, per_example_gradients, split_parameters)
from attribution.testing import random_inputs, tiny_cond_unet, tiny_unet
from tolerances import assert_float32_close


F64 = torch.float64


SUBSET = ["conv_in.weight", "down_blocks.1.attentions.0.to_q.weight", "up_blocks.1.resnets.0.conv2.bias",
          "conv_out.weight", "conv_out.bias"]


@pytest.mark.parametrize("param_names", [None, SUBSET])
def test_vmap_equals_loop_unet2d(task, param_names):
    model = tiny_unet(dtype=F64)
    x0, _ = random_inputs(5)
    out = TrainLoss(num_draws=3, seed=1)
    draws = out.draws(torch.arange(5), x0.shape[1:], num_train_timesteps=1000, dtype=F64)
    fast = per_example_gradients(task, model, out, x0, draws, param_names=param_names, chunk_size=2, out_dtype=F64)
    slow = loop_gradients(task, model, out, x0, draws, param_names=param_names, out_dtype=F64)
    assert fast.shape == (5, num_parameters(model, param_names))
    assert float(slow.abs().max()) > 1e-3
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("param_names", [None, ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "conv_out.bias"]])
def test_vmap_equals_loop_condition_unet_with_cond(task, param_names):
    model = tiny_cond_unet(dtype=F64)
    x0, cond = random_inputs(4, cond_dim=6)
    out = StepOutput(num_draws=2, seed=3)
    draws = out.draws(torch.arange(4), x0.shape[1:], torch.tensor([10, 300, 600, 999]), dtype=F64)
    fast = per_example_gradients(task, model, out, x0, draws, cond, param_names=param_names, out_dtype=F64)
    slow = loop_gradients(task, model, out, x0, draws, cond, param_names=param_names, out_dtype=F64)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-10)
    # the cross-attention key weight depends on cond: changing cond changes the gradient
    other = per_example_gradients(task, model, out, x0, draws, cond + 1, param_names=param_names, out_dtype=F64)
    assert not torch.allclose(other, fast)


def test_chunk_size_does_not_change_gradients(task):
    model = tiny_unet(dtype=F64)
    x0, _ = random_inputs(5)
    out = TrainLoss(num_draws=2, seed=1)
    draws = out.draws(torch.arange(5), x0.shape[1:], num_train_timesteps=1000, dtype=F64)
    a = per_example_gradients(task, model, out, x0, draws, chunk_size=1, out_dtype=F64)
    b = per_example_gradients(task, model, out, x0, draws, chunk_size=5, out_dtype=F64)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_parameter_subset_order_and_frozen_split():
    model = tiny_unet()
    order = parameter_order(model, list(reversed(SUBSET)))
    assert order == SUBSET  # model order, not the caller's order
    diff, frozen = split_parameters(model, SUBSET)
    assert list(diff) == SUBSET and not any(t.requires_grad for t in diff.values())
    assert set(frozen) >= {n for n, _ in model.named_parameters()} - set(SUBSET)
    assert not any(t.requires_grad for t in frozen.values())
    with pytest.raises(ValueError, match="param_names"):
        parameter_order(model, ["not.a.param"])


def test_subset_skips_excluded_gradient_work(task):
    """Only conv_out selected: backward stops at conv_out, so FLOPs ~ forward FLOPs."""
    model = tiny_unet()
    x0, _ = random_inputs(4)
    x0 = x0.float()
    out = TrainLoss(num_draws=2, seed=1)
    draws = out.draws(torch.arange(4), x0.shape[1:], num_train_timesteps=1000)
    flops = {}
    for name, names in [("all", None), ("last", ["conv_out.weight", "conv_out.bias"])]:
        with FlopCounterMode(display=False) as fc:
            per_example_gradients(task, model, out, x0, draws, param_names=names)
        flops[name] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x0.repeat_interleave(2, 0), draws.timesteps.reshape(-1))
    forward = fc.get_total_flops()
    assert flops["all"] > 2.5 * forward
    assert flops["last"] < 1.2 * forward


def test_eval_mode_required(task):
    model = tiny_unet().train()
    x0, _ = random_inputs(2)
    out = TrainLoss(num_draws=1, seed=0)
    draws = out.draws(torch.arange(2), x0.shape[1:], num_train_timesteps=1000)
    with pytest.raises(ValueError, match="eval mode"):
        per_example_gradients(task, model, out, x0.float(), draws)


def test_featurize_batch_is_deterministic_and_batch_independent(task):
    model = tiny_unet()
    x0, _ = random_inputs(6)
    x0 = x0.float()
    out = TrainLoss(num_draws=2, seed=5)
    proj = SparseProjector(num_parameters(model), 64, seed=11)
    keys = torch.tensor([10, 11, 12, 13, 14, 15])
    a = featurize_batch(task, model, out, proj, x0, keys, chunk_size=4)
    b = featurize_batch(task, model, out, SparseProjector(num_parameters(model), 64, seed=11), x0, keys, chunk_size=3)
    assert a.shape == (6, 64) and a.dtype == torch.float32
    assert torch.equal(featurize_batch(task, model, out, proj, x0, keys, chunk_size=4), a)  # deterministic
    # other chunks and batch compositions change only float32 rounding: each within it of the float64 loop
    draws = out.draws(keys, x0.shape[1:], num_train_timesteps=1000, dtype=torch.float64)
    ref = proj.project(loop_gradients(task, copy.deepcopy(model).double(), out, x0.double(), draws,
                                      out_dtype=torch.float64))
    perm = torch.tensor([3, 0, 5])
    c = featurize_batch(task, model, out, proj, x0[perm], keys[perm])
    for result, expected in ((a, ref), (b, ref), (c, ref[perm])):
        assert_float32_close(result, expected, proj.p)
    with pytest.raises(ValueError, match="projector.p"):
        featurize_batch(task, model, out, SparseProjector(10, 8, 0), x0, keys)
