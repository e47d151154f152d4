"""Layerwise (Kronecker) projector against explicitly projected per-example gradients; hashed sparse JL;
gradient-path choice."""
import copy
import math

import pytest
import torch

from attribution import StepOutput, TrainLoss, featurize_batch, loop_gradients, per_example_gradients
from attribution.fastpath import CPU_VMAP_MAX_PARAMS, choose_gradient_path
from attribution.layerwise import LayerwiseProjector, _rows_loss, featurize_batch_layerwise, layer_groups
from attribution.sparse_fast import HashedSparseProjector
from attribution.task import math_attention
from attribution.testing import random_inputs, tiny_cond_unet, tiny_unet

from tolerances import assert_float32_close

F64 = torch.float64


def _reference(task, model, out, proj, x0, keys, cond=None, steps=None):
    draws = out.draws(keys, x0.shape[1:], steps, num_train_timesteps=1000, dtype=x0.dtype)
    grads = loop_gradients(task, model, out, x0, draws, cond, param_names=proj.param_names, out_dtype=x0.dtype)
    return proj.project(grads)


@pytest.mark.parametrize("inner_d", [None, 2000])
def test_layerwise_equals_projected_loop_gradients_unet2d(task, inner_d):
    model = tiny_unet(dtype=F64)
    x0, _ = random_inputs(3)
    out, keys = TrainLoss(num_draws=3, seed=1), torch.tensor([4, 7, 9])
    proj = LayerwiseProjector(model, d=500, seed=3, inner_d=inner_d)
    ref = _reference(task, model, out, proj, x0, keys)
    with math_attention(model):  # same attention kernel as the reference: equal to float64 rounding
        fast = featurize_batch_layerwise(task, model, out, proj, x0, keys, out_dtype=F64)
    assert fast.shape == (3, proj.d) and float(ref.abs().max()) > 1.0
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    # default (fused SDPA) attention differs from the math kernel by ~1e-8 relative in float64
    fused = featurize_batch_layerwise(task, model, out, proj, x0, keys, out_dtype=F64)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_layerwise_equals_vmap_gradients_cond_unet_cross_attention(task):
    model = tiny_cond_unet(dtype=F64)
    x0, cond = random_inputs(3, cond_dim=6)
    out, keys, steps = StepOutput(num_draws=2, seed=2), torch.tensor([0, 5, 6]), torch.tensor([10, 500, 990])
    proj = LayerwiseProjector(model, rank=(3, 4), seed=1)
    draws = out.draws(keys, x0.shape[1:], steps, num_train_timesteps=1000, dtype=F64)
    grads = per_example_gradients(task, model, out, x0, draws, cond, param_names=proj.param_names, out_dtype=F64)
    fast = featurize_batch_layerwise(task, model, out, proj, x0, keys, cond, steps, out_dtype=F64)
    torch.testing.assert_close(fast, proj.project(grads), rtol=1e-10, atol=1e-10)
    # the cross-attention key projection sees the conditioning: its features move with it
    g = next(g for g in proj.groups if g.module.endswith("attn2.to_k"))
    other = featurize_batch_layerwise(task, model, out, proj, x0, keys, cond + 1, steps, out_dtype=F64)
    cols = slice(g.offset, g.offset + g.dims())
    assert not torch.allclose(other[:, cols], fast[:, cols])
    assert any(gr.kind == "layernorm" for gr in proj.groups) and proj.coverage() == 1.0


def test_weight_block_is_the_kronecker_projection():
    model = tiny_unet(dtype=F64)
    proj = LayerwiseProjector(model, rank=(3, 5), seed=7)
    grads = torch.randn(2, proj.p, dtype=F64, generator=torch.Generator().manual_seed(0))
    feats = proj.project(grads)
    start = 0
    for name in proj.param_names:
        n = math.prod(proj.shapes[name])
        group = next((g for g in proj.groups if g.weight == name and g.kind == "conv2d"), None)
        if group is not None:
            p_out, p_in = proj.factors(group, dtype=F64)
            kron = torch.kron(p_out, p_in)  # row (a, b) = weight[a, b...], column (o, i)
            block = feats[:, group.offset:group.offset + group.k_out * group.k_in]
            torch.testing.assert_close(block, grads[:, start:start + n] @ kron, rtol=1e-12, atol=1e-12)
        start += n


def test_full_rank_is_exact_and_random_ranks_preserve_inner_products_in_expectation(task):
    model = tiny_unet(dtype=F64)
    x0, _ = random_inputs(3)
    out = TrainLoss(num_draws=2, seed=0)
    groups, _ = layer_groups(model)
    full = {g.module: (g.out_dim, max(g.in_dim, 0)) for g in groups}
    exact = LayerwiseProjector(model, ranks=full, seed=0)
    draws = out.draws(torch.arange(3), x0.shape[1:], num_train_timesteps=1000, dtype=F64)
    grads = loop_gradients(task, model, out, x0, draws, param_names=exact.param_names, out_dtype=F64)
    gram = grads @ grads.T
    f = exact.project(grads)
    torch.testing.assert_close(f @ f.T, gram, rtol=1e-12, atol=1e-9)
    # JL: E[<phi_i, phi_j>] = <g_i, g_j>; the mean over 150 seeds is within a few standard errors
    grams = torch.stack([(lambda z: z @ z.T)(LayerwiseProjector(model, rank=(2, 3), seed=s, inner_d=None)
                                              .project(grads)) for s in range(150)])
    scale = gram.diag().sqrt()
    err = (grams.mean(0) - gram) / (scale[:, None] * scale[None, :])
    sem = grams.std(0) / math.sqrt(len(grams)) / (scale[:, None] * scale[None, :])
    assert float(err.abs().max()) < 0.1
    assert bool((err.abs() < 4 * sem + 1e-12).all())


def test_batch_composition_chunking_and_flags(task):
    model = tiny_unet()
    x0, _ = random_inputs(4)
    out = TrainLoss(num_draws=2, seed=5)
    proj = LayerwiseProjector(model, d=300, seed=1)
    flags = [p.requires_grad for p in model.parameters()]
    # batch composition and chunking change nothing but rounding: exact to float64 rounding in float64
    model64 = copy.deepcopy(model).double()
    whole64 = featurize_batch_layerwise(task, model64, out, proj, x0, torch.arange(4), out_dtype=F64)
    chunked64 = featurize_batch_layerwise(task, model64, out, proj, x0, torch.arange(4), chunk_size=3, out_dtype=F64)
    alone64 = featurize_batch_layerwise(task, model64, out, proj, x0[2:3], torch.tensor([2]), out_dtype=F64)
    torch.testing.assert_close(chunked64, whole64, rtol=1e-10, atol=1e-10 * float(whole64.abs().max()))
    torch.testing.assert_close(alone64[0], whole64[2], rtol=1e-10, atol=1e-10 * float(whole64.abs().max()))
    # float32, every composition: within float32 rounding of the float64 reference
    x0 = x0.float()
    whole = featurize_batch_layerwise(task, model, out, proj, x0, torch.arange(4))
    chunked = featurize_batch_layerwise(task, model, out, proj, x0, torch.arange(4), chunk_size=3)
    alone = featurize_batch_layerwise(task, model, out, proj, x0[2:3], torch.tensor([2]))
    for result, ref in ((whole, whole64), (chunked, whole64), (alone[0], whole64[2])):
        assert_float32_close(result, ref, proj.p)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # weight gradients were never computed
    assert whole.dtype == torch.float32 and proj.d == 300


def test_rows_loss_matches_per_example_with_mask_and_square(task):
    model = tiny_unet(dtype=F64)
    x0, _ = random_inputs(3)
    mask = torch.zeros(1, 8, 8, dtype=F64)
    mask[:, 2:6, 1:5] = 1
    for out in (TrainLoss(num_draws=3, seed=1, mask=mask), StepOutput(num_draws=2, seed=1, kind="square")):
        steps = None if isinstance(out, TrainLoss) else torch.tensor([1, 2, 3])
        draws = out.draws(torch.arange(3), x0.shape[1:], steps, num_train_timesteps=1000, dtype=F64)
        with torch.no_grad():
            rows = _rows_loss(task, model, out, x0, draws, None)
            each = sum(out.per_example(task, model, x0[i], draws.select(i), None) for i in range(3))
        torch.testing.assert_close(rows, each, rtol=1e-12, atol=1e-12)


def test_describe_roundtrip_seeding_and_errors(task):
    model = tiny_unet()
    proj = LayerwiseProjector(model, d=400, seed=9)
    again = LayerwiseProjector.from_description(model, proj.describe())
    grads = torch.randn(2, proj.p, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.project(grads), proj.project(grads))
    other = LayerwiseProjector(model, d=400, seed=10)
    assert not torch.allclose(other.project(grads), proj.project(grads))
    assert proj.describe()["kind"] == "layerwise" and proj.describe()["coverage"] == 1.0
    with pytest.raises(ValueError, match="d"):
        LayerwiseProjector(model, d=10, seed=0, inner_d=None)
    with pytest.raises(ValueError, match="exactly one"):
        LayerwiseProjector(model, d=100, rank=(2, 2))
    x0, _ = random_inputs(2)
    with pytest.raises(ValueError, match="eval mode"):
        featurize_batch_layerwise(task, model.train(), TrainLoss(1), proj, x0.float(), torch.arange(2))
    model.eval()
    with pytest.raises(TypeError, match="LayerwiseProjector"):
        featurize_batch_layerwise(task, model, TrainLoss(1), HashedSparseProjector(10, 4, 0), x0.float(),
                                  torch.arange(2))


def test_uncovered_parameters_are_excluded_and_reported():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3),
                                torch.nn.Conv2d(2, 2, 3, groups=2))
    proj = LayerwiseProjector(model, rank=(2, 2), seed=0)
    assert proj.excluded == ["0.weight", "2.weight", "2.bias"]
    assert proj.param_names == ["1.weight", "1.bias"] and proj.p == 15
    assert math.isclose(proj.coverage(), 15 / (20 + 15 + 2 * 9 + 2))


def test_hashed_sparse_projector_matrix_blocks_and_slices():
    proj = HashedSparseProjector(1000, 64, seed=3, s=2, block_cols=96)
    grads = torch.randn(3, 1000, dtype=F64, generator=torch.Generator().manual_seed(0))
    dense = proj.matrix()
    torch.testing.assert_close(proj.project(grads), grads @ dense, rtol=1e-12, atol=1e-12)
    assert bool(((dense != 0).sum(1) == 2).all()) and math.isclose(float(dense.abs().max()), 1 / math.sqrt(2))
    big = HashedSparseProjector(1000, 64, seed=3, s=2, block_cols=1 << 15)
    torch.testing.assert_close(big.project(grads), proj.project(grads), rtol=1e-12, atol=1e-12)
    out = grads.new_zeros(3, 64)
    proj.project_slice(grads[:, :300], 0, out)
    proj.project_slice(grads[:, 300:], 300, out)
    torch.testing.assert_close(out, proj.project(grads), rtol=1e-12, atol=1e-12)
    # E[S S^T] = I: averaged over seeds the Gram matrix of the columns approaches the identity
    mean = sum((lambda m: m @ m.T)(HashedSparseProjector(50, 16, seed=s).matrix()) for s in range(400)) / 400
    assert float((mean - torch.eye(50, dtype=F64)).abs().max()) < 0.2
    assert abs(float(mean.diag().mean()) - 1.0) < 1e-12


def test_gradient_path_choice_and_auto_featurize(task):
    model = tiny_unet()
    assert choose_gradient_path(model, (1, 8, 8)) == "vmap"
    big = torch.nn.Linear(3000, 3000)  # 9M parameters on CPU
    assert 9_003_000 > CPU_VMAP_MAX_PARAMS and choose_gradient_path(big, (3000,)) == "loop"
    calls = []
    assert choose_gradient_path(model, (1, 8, 8), probe=lambda path: calls.append(path)) in ("vmap", "loop")
    assert calls.count("vmap") == calls.count("loop") == 2
    x0 = random_inputs(3)[0]
    out = TrainLoss(num_draws=2, seed=0)
    proj = HashedSparseProjector(sum(p.numel() for p in model.parameters()), 32, seed=0)
    draws = out.draws(torch.arange(3), x0.shape[1:], num_train_timesteps=1000, dtype=F64)
    ref64 = proj.project(loop_gradients(task, copy.deepcopy(model).double(), out, x0, draws, out_dtype=F64))
    x0 = x0.float()
    for path in ("vmap", "loop", "auto"):  # every path within float32 rounding of the float64 loop
        assert_float32_close(featurize_batch(task, model, out, proj, x0, torch.arange(3), gradient_path=path),
                             ref64, proj.p)
    lw = LayerwiseProjector(model, d=200, seed=0)  # featurize_batch dispatches to the layerwise path itself
    assert torch.equal(featurize_batch(task, model, out, lw, x0, torch.arange(3)),
                       featurize_batch_layerwise(task, model, out, lw, x0, torch.arange(3)))
