"""EK-FAC / K-FAC influence (attribution.ekfac) against slow references: explicit patches and output gradients
for the factors, loop/vmap per-example gradients, dense float64 Kronecker / eigenbasis inverses, the exact
damped inverse where the Fisher is a Kronecker product, TRAK's dense formula (sign and scale), and kronfluence."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

from attribution import StepOutput, TrainLoss, add_noise, dense_scores_float64, loop_gradients, per_example_gradients
from attribution.ekfac import (EKFACFactors, ekfac_damping_sweep, ekfac_gradients, ekfac_scores, fit_ekfac,
                               precondition, pseudo_targets)
from attribution.errors import CheckpointMismatchError, CorruptFileError, SettingsError
from attribution.gradients import parameter_order
from attribution.task import math_attention
from attribution.testing import random_inputs, tiny_cond_unet, tiny_unet

F64 = torch.float64
T_STEPS = torch.tensor([40, 350, 800])


def _small_unet() -> UNet2DModel:
    """No attention, channels (4, 8): ~7k parameters, largest layer 8 x 145 (dense Kronecker blocks stay small)."""
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        add_attention=False, norm_num_groups=2)
    return torch.nn.Module.to(model.eval(), dtype=F64)


def _batches(x0, keys, size):
    return [(x0[s:s + size], keys[s:s + size]) for s in range(0, len(keys), size)]


def _layer_matrices(model, factors, grads):
    """``(B, p)`` gradients in parameter order -> ``{module: (B, out, in')}`` (bias as the last column)."""
    params, start, cols = dict(model.named_parameters()), 0, {}
    for name in parameter_order(model):
        cols[name], start = slice(start, start + params[name].numel()), start + params[name].numel()
    out = {}
    for lf in factors.layers:
        s = lf.spec
        w = grads[:, cols[s.weight]].reshape(len(grads), s.out_dim, -1)
        out[s.module] = w if s.bias is None else torch.cat([w, grads[:, cols[s.bias]].unsqueeze(2)], 2)
    return out


def _unfold_reference(conv, x):
    """Receptive fields by explicit slicing (no F.unfold): ``(R, positions, C kh kw)``."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = [xp[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw].reshape(len(x), -1)
            for i in range(ho) for j in range(wo)]
    return torch.stack(cols, 1)


def _reference_factors(task, model, out, factors, x0, keys, pseudo_seed=None):
    """A and S from plain per-example backward passes (retain_grad on the layer outputs), explicit patches."""
    modules = dict(model.named_modules())
    specs = {lf.spec.module: lf.spec for lf in factors.layers}
    sums = {n: [0.0, 0.0, 0] for n in specs}
    draws = out.draws(keys, x0.shape[1:], num_train_timesteps=1000, dtype=F64)
    for i in range(len(keys)):
        seen = []

        def keep(name):
            def hook(module, args, y):
                y.retain_grad()
                seen.append((name, args[0], y))
            return hook
        hooks = [modules[n].register_forward_hook(keep(n)) for n in specs]
        t, noise = draws.select(i)
        K = len(t)
        y = task.model_output(model, add_noise(x0[i].expand_as(noise), noise, t, task.alphas_cumprod), t)
        if pseudo_seed is None:
            target = noise
        else:
            target = y.detach() + pseudo_targets(keys[i:i + 1], K, x0.shape[1:], pseudo_seed)[0].to(F64) / math.sqrt(2)
        model.zero_grad()
        (((target - y) ** 2).sum() / K).backward()
        for h in hooks:
            h.remove()
        for n, x, y_out in seen:
            s = specs[n]
            a = x.reshape(len(x), -1, x.shape[-1]) if s.kind == "linear" else _unfold_reference(modules[n], x)
            a = torch.cat([a, torch.ones_like(a[..., :1])], 2) if s.bias is not None else a
            d = y_out.grad.reshape(len(x), -1, s.out_dim) if s.kind == "linear" else \
                y_out.grad.flatten(2).transpose(1, 2)
            a, d = a.reshape(-1, s.in_dim).detach(), d.reshape(-1, s.out_dim)
            sums[n][0] += a.T @ a
            sums[n][1] += d.T @ d
            sums[n][2] += len(a)
    model.zero_grad(set_to_none=True)
    return {n: (A / c, S / c) for n, (A, S, c) in sums.items()}


def _gradients(task, model, out, x0, keys, steps=None):
    draws = out.draws(keys, x0.shape[1:], steps, num_train_timesteps=1000, dtype=x0.dtype)
    return loop_gradients(task, model, out, x0, draws, out_dtype=x0.dtype)


# ================================================================================= (b) explicit references
@pytest.fixture(scope="module")
def small(task):
    """A fitted EK-FAC (empirical Fisher, K = 2) of the small UNet with its float64 references."""
    model = _small_unet()
    x0, _ = random_inputs(6, seed=1)
    keys = torch.tensor([3, 0, 8, 5, 1, 9])
    train, target = TrainLoss(num_draws=2, seed=4), StepOutput(num_draws=2, seed=6)
    xq, qkeys = random_inputs(3, seed=2)[0], torch.tensor([0, 1, 2])
    factors = fit_ekfac(task, model, train, _batches(x0, keys, 4))
    return dict(model=model, x0=x0, keys=keys, train=train, target=target, xq=xq, qkeys=qkeys, factors=factors,
                train_grads=_layer_matrices(model, factors, _gradients(task, model, train, x0, keys)),
                target_grads=_layer_matrices(model, factors, _gradients(task, model, target, xq, qkeys, T_STEPS)))


def test_factors_equal_explicit_patches_and_output_gradients(task, small):
    f = small["factors"]
    ref = _reference_factors(task, small["model"], small["train"], f, small["x0"], small["keys"])
    assert {lf.spec.kind for lf in f.layers} == {"conv2d", "linear"} and len(f.layers) == len(ref)
    for lf in f.layers:
        A, S = ref[lf.spec.module]
        torch.testing.assert_close(lf.activation_covariance, A, rtol=1e-12, atol=1e-14 * float(A.abs().max()))
        torch.testing.assert_close(lf.gradient_covariance, S, rtol=1e-12, atol=1e-14 * float(S.abs().max()))
        recon = lf.activation_eigenvectors @ torch.diag(lf.activation_eigenvalues) @ lf.activation_eigenvectors.T
        torch.testing.assert_close(recon, A, rtol=0, atol=1e-12 * float(A.abs().max()))
    modules = dict(small["model"].named_modules())  # only the GroupNorm affine parameters are excluded
    assert f.meta["excluded"] and all(isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.GroupNorm)
                                      for n in f.meta["excluded"])


def test_per_example_layer_gradients_equal_loop_gradients(task, small):
    grads = ekfac_gradients(task, small["model"], small["target"], small["factors"], small["xq"], small["qkeys"],
                            steps=T_STEPS)
    for name, ref in small["target_grads"].items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


def _dense_scores(small, curvature, damping_scale, damping):
    """``sum_l G_l (C_l + d_l I)^-1 G_t,l^T`` with dense float64 solves; ``d_l`` from traces (= mean eigenvalue)."""
    f, total = small["factors"], 0.0
    traces = {lf.spec.module: float(curvature(lf).trace()) for lf in f.layers}
    mean_all = sum(traces.values()) / f.p
    for lf in f.layers:
        C = curvature(lf)
        shift = {"absolute": 1.0, "layer": traces[lf.spec.module] / len(C), "global": mean_all}[damping_scale]
        g, gt = small["train_grads"][lf.spec.module].flatten(1), small["target_grads"][lf.spec.module].flatten(1)
        total = total + g @ torch.linalg.solve(C + damping * shift * torch.eye(len(C), dtype=F64), gt.T)
    return total


def _kfac_matrix(lf):
    return torch.kron(lf.gradient_covariance, lf.activation_covariance)  # row-major vec of (out, in') matrices


def _ekfac_matrix(small):
    """``(Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T`` with Lambda measured from the loop gradients."""
    def build(lf):
        Q = torch.kron(lf.gradient_eigenvectors, lf.activation_eigenvectors)
        lam = ((small["train_grads"][lf.spec.module].flatten(1) @ Q) ** 2).mean(0)
        return Q @ torch.diag(lam) @ Q.T
    return build


@pytest.mark.parametrize("damping_scale,damping", [("absolute", 1e-4), ("layer", 0.1), ("global", 0.03)])
def test_kfac_equals_the_explicit_kronecker_inverse(task, small, damping_scale, damping):
    f = small["factors"]
    scores = ekfac_scores(f, task, small["model"], small["train"], _batches(small["x0"], small["keys"], 5),
                          small["target_grads"], damping, damping_scale=damping_scale, strategy="kfac", dtype=F64)
    ref = _dense_scores(small, _kfac_matrix, damping_scale, damping)
    assert scores.shape == (6, 3) and float(ref.abs().max()) > 0
    torch.testing.assert_close(scores, ref, rtol=1e-9, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.parametrize("damping_scale,damping", [("absolute", 1e-2), ("layer", 0.1), ("global", 0.03)])
def test_ekfac_equals_the_explicit_eigenbasis_inverse(task, small, damping_scale, damping):
    f = small["factors"]
    for lf in f.layers:  # the eigenvalue correction is diag((Q_S (x) Q_A)^T F (Q_S (x) Q_A)), F = mean g g^T
        g = small["train_grads"][lf.spec.module].flatten(1)
        Q = torch.kron(lf.gradient_eigenvectors, lf.activation_eigenvectors)
        lam = torch.diag(Q.T @ (g.T @ g / len(g)) @ Q).reshape(lf.spec.out_dim, lf.spec.in_dim)
        torch.testing.assert_close(lf.corrected_eigenvalues, lam, rtol=1e-9, atol=1e-12 * float(lam.max()))
    scores = ekfac_scores(f, task, small["model"], small["train"], _batches(small["x0"], small["keys"], 6),
                          small["target_grads"], damping, damping_scale=damping_scale, dtype=F64)
    ref = _dense_scores(small, _ekfac_matrix(small), damping_scale, damping)
    torch.testing.assert_close(scores, ref, rtol=1e-9, atol=1e-10 * float(ref.abs().max()))


def test_kfac_takes_round_off_negative_factor_eigenvalues_as_zero(task, small):
    """A factor eigenvalue below 0 (round-off of a singular covariance; the digits UNet's time-embedding layers
    measured -5e-9 x the largest) is 0 for K-FAC: a damping far below it still gives a definite curvature, and
    the scores equal the dense solve with the positive semidefinite factors; damping 0 on a zero eigenvalue is
    still refused."""
    from attribution.ekfac import denominators
    f = copy.deepcopy(small["factors"])
    lf = f.layers[0]
    mean = float(lf.eigenvalues("kfac").mean())
    lf.gradient_eigenvalues[0] = -1e-3 * mean / float(lf.activation_eigenvalues.max())  # 100x the shift below
    lf.gradient_covariance = (lf.gradient_eigenvectors @ torch.diag(lf.gradient_eigenvalues)
                              @ lf.gradient_eigenvectors.T)
    assert float(lf.eigenvalues("kfac").min()) == 0.0
    damping = 1e-5
    assert all(bool((d > 0).all()) for d in denominators(f, damping, "layer", "kfac"))

    def psd(lf):
        def part(q, lam):
            return q @ torch.diag(lam.clamp(min=0)) @ q.T
        return torch.kron(part(lf.gradient_eigenvectors, lf.gradient_eigenvalues),
                          part(lf.activation_eigenvectors, lf.activation_eigenvalues))

    scores = ekfac_scores(f, task, small["model"], small["train"], _batches(small["x0"], small["keys"], 5),
                          small["target_grads"], damping, damping_scale="layer", strategy="kfac", dtype=F64)
    ref = _dense_scores({**small, "factors": f}, psd, "layer", damping)
    # condition number up to max / (1e-5 mean) ~ 1e8: float64 solves agree to ~1e8 x 2e-16
    torch.testing.assert_close(scores, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    with pytest.raises(SettingsError, match="positive definite"):
        denominators(f, 0.0, "layer", "kfac")


def test_damping_sweep_and_preconditioner_match_single_scores(task, small):
    f, b = small["factors"], _batches(small["x0"], small["keys"], 6)
    sweep = ekfac_damping_sweep(f, task, small["model"], small["train"], b, small["target_grads"], [0.01, 1.0],
                                dtype=F64)
    for i, d in enumerate([0.01, 1.0]):
        one = ekfac_scores(f, task, small["model"], small["train"], b, small["target_grads"], d, dtype=F64)
        torch.testing.assert_close(sweep[i], one, rtol=1e-12, atol=1e-12 * float(one.abs().max()))
        pre = precondition(f, small["target_grads"], d)
        dots = sum(small["train_grads"][n].flatten(1) @ v.flatten(1).T for n, v in pre.items())
        torch.testing.assert_close(one, dots, rtol=1e-9, atol=1e-10 * float(one.abs().max()))


class _LinearDenoiser(torch.nn.Module):
    """``eps_theta(x_t, t) = W vec(x_t) + b``: one Linear layer, one position per row."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.net = torch.nn.Linear(n, n, dtype=F64)

    def forward(self, x, t):
        return self.net(x.flatten(1)).view_as(x)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_exact_damped_inverse_when_the_fisher_is_a_kronecker_product(task, strategy):
    """One example, one draw, one position: the empirical Fisher g g^T is exactly S (x) A, so K-FAC and EK-FAC
    equal the exact damped inverse Fisher-vector product, formed and solved as a dense p x p matrix."""
    torch.manual_seed(0)
    model = _LinearDenoiser().eval()
    x0, keys = torch.randn(1, 1, 2, 2, dtype=F64), torch.tensor([7])
    train, target = TrainLoss(num_draws=1, seed=2), StepOutput(num_draws=3, seed=1)
    xq, qkeys = torch.randn(2, 1, 2, 2, dtype=F64), torch.tensor([0, 1])
    f = fit_ekfac(task, model, train, [(x0, keys)], strategy=strategy)
    g, gt = _gradients(task, model, train, x0, keys), _gradients(task, model, target, xq, qkeys, T_STEPS[:2])
    fisher = g.T @ g  # p x p, rank one
    for damping in (0.01 * float(fisher.trace()), 3.0 * float(fisher.trace())):  # condition numbers 101 and 1.3
        exact = g @ torch.linalg.solve(fisher + damping * torch.eye(len(fisher), dtype=F64), gt.T)
        scores = ekfac_scores(f, task, model, train, [(x0, keys)], ekfac_gradients(task, model, target, f, xq, qkeys,
                              steps=T_STEPS[:2]), damping, damping_scale="absolute", strategy=strategy, dtype=F64)
        torch.testing.assert_close(scores, exact, rtol=1e-10, atol=1e-12 * float(exact.abs().max()))
    lf, G = f.layers[0], _layer_matrices(model, f, g)["net"].flatten(1)  # (out, in') layout
    torch.testing.assert_close(torch.kron(lf.gradient_covariance, lf.activation_covariance), G.T @ G,
                               rtol=1e-12, atol=1e-14 * float(fisher.abs().max()))


def test_large_damping_limit_is_trak_with_the_same_sign_and_scale(task, small):
    """``d (C + d)^-1 -> I`` and ``lam (Phi^T Phi + lam)^-1 -> I``: both become ``<g_i, g_t>`` (relative error
    below ``||C|| / d``), so EK-FAC has TRAK's sign (positive = including the example lowers f_t). On a parameter
    subset (``param_names``: the first and last convolutions, one time-embedding Linear) so that TRAK's dense
    p x p reference stays small."""
    names = ["conv_in.weight", "conv_in.bias", "time_embedding.linear_1.weight", "conv_out.weight"]
    model, train, target = small["model"], small["train"], small["target"]
    f = fit_ekfac(task, model, train, _batches(small["x0"], small["keys"], 6), param_names=names)
    assert [lf.spec.module for lf in f.layers] == ["conv_in", "time_embedding.linear_1", "conv_out"]
    assert f.layers[-1].spec.bias is None and f.meta["excluded"] == []
    draws = train.draws(small["keys"], (1, 8, 8), num_train_timesteps=1000, dtype=F64)
    phi = loop_gradients(task, model, train, small["x0"], draws, param_names=names, out_dtype=F64)
    tdraws = target.draws(small["qkeys"], (1, 8, 8), T_STEPS, num_train_timesteps=1000, dtype=F64)
    g = loop_gradients(task, model, target, small["xq"], tdraws, param_names=names, out_dtype=F64)
    scale = max(float((phi ** 2).sum()), max(float(lf.eigenvalues("ekfac").max()) for lf in f.layers))
    lam = 1e8 * scale
    trak = lam * dense_scores_float64(phi, g, lam)
    grads = ekfac_gradients(task, model, target, f, small["xq"], small["qkeys"], steps=T_STEPS)
    ours = lam * ekfac_scores(f, task, model, train, _batches(small["x0"], small["keys"], 6), grads, lam,
                              damping_scale="absolute", dtype=F64)
    bound = 1e-7 * float(phi.norm(dim=1).max() * g.norm(dim=1).max())
    torch.testing.assert_close(ours, trak, rtol=0, atol=bound)
    assert float((phi @ g.T).abs().max()) > 1e3 * bound


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=(2, 3), stride=(2, 1), padding=(0, 2),
                                                                      dilation=(1, 2)), dict(kernel_size=1)])
def test_patches_are_the_unfolded_receptive_fields(kw):
    from attribution.ekfac import _covered_layers, _patches

    conv = torch.nn.Conv2d(3, 2, dtype=F64, **kw)
    x = torch.randn(4, 3, 7, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    spec = _covered_layers(torch.nn.Sequential(conv), None)[0][0]
    ref = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)
    assert spec.in_dim == ref.shape[2] + 1
    torch.testing.assert_close(_patches(conv, spec, x), ref, rtol=0, atol=0)
    torch.testing.assert_close(_patches(conv, spec, x), _unfold_reference(conv, x), rtol=0, atol=0)


# ================================================================================= (a) kronfluence
def _kronfluence_task(task, train, target, pseudo_seed):
    from kronfluence.task import Task

    def step(model, x, noise, t, y=None):
        out = task.model_output(model, add_noise(x, noise, t, task.alphas_cumprod), t)
        return (((noise if y is None else y(out)) - out) ** 2).sum()

    class Diffusion(Task):
        """Our losses for kronfluence, one model call per draw (``has_shared_parameters``: K calls per batch)."""

        def compute_train_loss(self, batch, model, sample=False):
            x, k = batch
            d, K = train.draws(k, x.shape[1:], num_train_timesteps=1000, dtype=x.dtype), train.num_draws
            z = pseudo_targets(k, K, x.shape[1:], pseudo_seed).to(x.dtype)
            return sum(step(model, x, d.noise[:, j], d.timesteps[:, j],
                            (lambda out, j=j: out.detach() + z[:, j] / math.sqrt(2)) if sample else None)
                       for j in range(K)) / K

        def compute_measurement(self, batch, model):
            x, k, s = batch
            d = target.draws(k, x.shape[1:], s, num_train_timesteps=1000, dtype=x.dtype)
            return sum(step(model, x, d.noise[:, j], d.timesteps[:, j]) for j in range(target.num_draws))
    return Diffusion()


def _run_kronfluence(tmp_path, model, ktask, train_set, query_set, strategy, empirical, damping):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    model = prepare_model(copy.deepcopy(model), ktask)
    analyzer = Analyzer("ekfac_test", model, ktask, cpu=True, disable_tqdm=True, output_dir=str(tmp_path),
                        log_level=logging.WARNING)
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical, has_shared_parameters=True,
                                  activation_covariance_dtype=F64, gradient_covariance_dtype=F64,
                                  eigendecomposition_dtype=F64, per_sample_gradient_dtype=F64, lambda_dtype=F64)
    with math_attention(model):
        analyzer.fit_all_factors("f", train_set, per_device_batch_size=4, factor_args=factor_args)
        factors = {**analyzer.load_all_factors("f"), **analyzer.load_covariance_matrices("f")}
        if query_set is None:
            return factors, None
        score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=F64, precondition_dtype=F64,
                                    score_dtype=F64)
        analyzer.compute_pairwise_scores("s", "f", query_set, train_set, per_device_query_batch_size=3,
                                         per_device_train_batch_size=4, score_args=score_args)
    return factors, analyzer.load_pairwise_scores("s")["all_modules"].T


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_factors_match_kronfluence(task, tmp_path, fisher):
    """K = 2 draws per example: A, S average over all rows and positions, Lambda over examples (kronfluence with
    ``has_shared_parameters``, one model call per draw), on a UNet with self-attention (Linear over tokens)."""
    pytest.importorskip("kronfluence")
    model = tiny_unet(dtype=F64)
    x0, _ = random_inputs(6, seed=3)
    keys, train = torch.arange(6) * 2 + 1, TrainLoss(num_draws=2, seed=1)
    theirs, _ = _run_kronfluence(tmp_path, model, _kronfluence_task(task, train, None, 5), TensorDataset(x0, keys),
                                 None, "ekfac", fisher == "empirical", None)
    ours = fit_ekfac(task, model, train, _batches(x0, keys, 4), fisher=fisher, seed=5)
    assert {lf.spec.module for lf in ours.layers} == set(theirs["lambda_matrix"])
    for lf in ours.layers:
        n = lf.spec.module
        pairs = [(lf.activation_covariance, theirs["activation_covariance"][n] /
                  theirs["num_activation_covariance_processed"][n]),
                 (lf.gradient_covariance,
                  theirs["gradient_covariance"][n] / theirs["num_gradient_covariance_processed"][n]),
                 (lf.activation_eigenvalues, theirs["activation_eigenvalues"][n]),
                 (lf.gradient_eigenvalues, theirs["gradient_eigenvalues"][n]),
                 (lf.corrected_eigenvalues, theirs["lambda_matrix"][n] / theirs["num_lambda_processed"][n])]
        for mine, kron in pairs:
            torch.testing.assert_close(mine, kron.to(F64), rtol=1e-9, atol=1e-11 * float(kron.abs().max()))


@pytest.mark.parametrize("strategy,damping", [("ekfac", None), ("kfac", 1e-3)])
def test_scores_match_kronfluence(task, tmp_path, strategy, damping):
    """One training draw: kronfluence's pairwise scores with ``has_shared_parameters`` keep only one model call of
    the training loss (its pairwise hook assigns the score of each call instead of adding it, then clears the
    cache), so the training side uses K = 1; the target side sums K' = 2 draws. ``damping=None`` is kronfluence's
    heuristic 0.1 x mean(Lambda) per layer, i.e. ours with damping 0.1 and ``damping_scale="layer"``."""
    pytest.importorskip("kronfluence")
    model = tiny_unet(dtype=F64)
    x0, _ = random_inputs(8, seed=4)
    keys, train, target = torch.arange(8), TrainLoss(num_draws=1, seed=2), StepOutput(num_draws=2, seed=3)
    xq, qkeys = random_inputs(3, seed=6)[0], torch.tensor([4, 5, 6])
    _, theirs = _run_kronfluence(tmp_path, model, _kronfluence_task(task, train, target, 0), TensorDataset(x0, keys),
                                 TensorDataset(xq, qkeys, T_STEPS), strategy, True, damping)
    f = fit_ekfac(task, model, train, _batches(x0, keys, 4), strategy=strategy)
    grads = ekfac_gradients(task, model, target, f, xq, qkeys, steps=T_STEPS)
    ours = ekfac_scores(f, task, model, train, _batches(x0, keys, 3), grads, 0.1 if damping is None else damping,
                        damping_scale="layer" if damping is None else "absolute", strategy=strategy, dtype=F64)
    for j in range(3):
        assert spearmanr(ours[:, j], theirs[:, j])[0] > 0.99
    torch.testing.assert_close(ours, theirs.to(F64), rtol=1e-8, atol=1e-9 * float(theirs.abs().max()))


# ================================================================================= (c) diffusers UNets end to end
@pytest.mark.parametrize("cond_dim", [None, 6])
def test_hooked_gradients_equal_vmap_through_attention(task, cond_dim):
    model = tiny_unet(dtype=F64) if cond_dim is None else tiny_cond_unet(dtype=F64, cross_attention_dim=cond_dim)
    x0, cond = random_inputs(3, cond_dim=cond_dim)
    train, keys = TrainLoss(num_draws=3, seed=1), torch.tensor([2, 0, 7])
    f = fit_ekfac(task, model, train, [(x0, keys) if cond is None else (x0, keys, cond)], strategy="kfac")
    draws = train.draws(keys, x0.shape[1:], num_train_timesteps=1000, dtype=F64)
    ref = _layer_matrices(model, f, per_example_gradients(task, model, train, x0, draws, cond, out_dtype=F64))
    grads = ekfac_gradients(task, model, train, f, x0, keys, cond, chunk_size=2)
    for name, r in ref.items():
        torch.testing.assert_close(grads[name], r, rtol=1e-10, atol=1e-12 * float(r.abs().max()))
    if cond_dim:
        assert any(n.endswith("attn2.to_k") for n in grads) and grads[next(n for n in grads if n.endswith(
            "attn2.to_k"))].shape[2] == cond_dim  # the cross-attention key sees the conditioning tokens


def test_tiny_unet_end_to_end_deterministic_saved_and_refusing_mismatches(task, tmp_path):
    model = tiny_unet()
    x0 = random_inputs(10, seed=7)[0].float()
    keys, train, target = torch.arange(10) + 100, TrainLoss(num_draws=2, seed=0), StepOutput(num_draws=2, seed=0)
    xq, qkeys, steps = x0[:4] * 0.5, torch.arange(4), torch.tensor([900, 500, 100, 10])

    def run(fisher, seed=0):
        f = fit_ekfac(task, model, train, _batches(x0, keys, 4), fisher=fisher, seed=seed, chunk_size=3)
        grads = ekfac_gradients(task, model, target, f, xq, qkeys, steps=steps)
        return f, grads, ekfac_scores(f, task, model, train, _batches(x0, keys, 6), grads, 0.1)

    flags = [p.requires_grad for p in model.parameters()]
    f, grads, scores = run("sampled")
    assert scores.shape == (10, 4) and scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    f2, _, again = run("sampled")
    assert torch.equal(again, scores)  # same seeds -> identical scores
    other, _, _ = run("sampled", seed=1)
    emp, _, emp_scores = run("empirical")
    for a, b, c in zip(f.layers, other.layers, emp.layers):
        assert torch.equal(a.activation_covariance, b.activation_covariance)  # A does not depend on the targets
        torch.testing.assert_close(a.activation_covariance, c.activation_covariance, rtol=1e-5, atol=1e-6)
    assert not torch.equal(f.layers[-1].gradient_covariance, other.layers[-1].gradient_covariance)
    assert not torch.allclose(emp_scores, scores)
    f.save(tmp_path / "factors.pt")
    loaded = EKFACFactors.load(tmp_path / "factors.pt")
    assert torch.equal(ekfac_scores(loaded, task, model, train, _batches(x0, keys, 6), grads, 0.1), scores)
    assert loaded.meta["num_examples"] == 10 and loaded.meta["fisher"] == "sampled" and 0 < loaded.p < 50_000
    with pytest.raises(SettingsError, match="train_output"):
        ekfac_scores(loaded, task, model, TrainLoss(num_draws=3, seed=0), _batches(x0, keys, 6), grads, 0.1)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.conv_out.bias += 1e-3
    with pytest.raises(CheckpointMismatchError, match="weights"):
        ekfac_gradients(task, changed, target, loaded, xq, qkeys, steps=steps)
    (tmp_path / "broken.pt").write_bytes((tmp_path / "factors.pt").read_bytes()[:500])
    with pytest.raises(CorruptFileError):
        EKFACFactors.load(tmp_path / "broken.pt")


def test_bad_input_is_refused_before_work(task):
    model = _small_unet()
    x0, _ = random_inputs(2)
    train, b = TrainLoss(num_draws=1), [(x0, torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="fisher"):
        fit_ekfac(task, model, train, b, fisher="true")
    with pytest.raises(TypeError, match="re-iterable"):
        fit_ekfac(task, model, train, iter(b))
    with pytest.raises(SettingsError, match="each once"):
        fit_ekfac(task, model, train, b + b)
    with pytest.raises(TypeError, match="every item of `batches`"):
        fit_ekfac(task, model, train, [x0])
    model.train()
    with pytest.raises(SettingsError, match="eval mode"):
        fit_ekfac(task, model, train, b)
    model.eval()
    f = fit_ekfac(task, model, train, b, strategy="kfac")
    grads = ekfac_gradients(task, model, train, f, x0, torch.tensor([0, 1]))
    with pytest.raises(SettingsError, match="strategy='ekfac'"):
        ekfac_scores(f, task, model, train, b, grads, 0.1)
    with pytest.raises(SettingsError, match="damping"):
        ekfac_scores(f, task, model, train, b, grads, -1.0, strategy="kfac")
    with pytest.raises(SettingsError, match="missing"):
        ekfac_scores(f, task, model, train, b, dict(list(grads.items())[1:]), 0.1, strategy="kfac")
    bad = {**grads, "conv_out": grads["conv_out"] * float("nan")}
    with pytest.raises(ValueError, match="finite"):
        precondition(f, bad, 0.1, strategy="kfac")
