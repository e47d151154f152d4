r"""EK-FAC / K-FAC influence of training examples on a target (a denoising step), Lightning-free.

What is computed, exactly (SPEC, "Estimators beyond the paper's TRAK"; kronfluence's conventions):

Covered layers: every ``Linear`` and ``Conv2d`` (``groups=1``, zero padding, integer padding) whose weight
is differentiated (kronfluence's coverage). Norm affine parameters, embeddings and anything else are
*excluded* and listed in ``factors.meta["excluded"]`` (on the project's UNets they are < 1% of ``p``).
A layer ``y = W a (+ b)`` is applied at positions ``s`` (pixels, tokens) of a *row*; ``a_s`` is its input
at ``s`` (a convolution's unfolded receptive field, in ``F.unfold`` = ``weight.reshape(out, -1)`` order)
with a homogeneous coordinate 1 appended when the layer has a bias (``in' = in + 1``), and ``delta_s`` the
gradient of the objective w.r.t. the layer output at ``s``. A row is one ``(example, draw)`` of the
training-side function ``train_output`` (:class:`~attribution.outputs.TrainLoss`, the same deterministic
draws as TRAK's features); the objective is ``sum_i f_train(z_i)``.

1. Kronecker factors, averaged over all rows and positions of the examples of the fit::

       A = mean_{rows, s} a_s a_s^T           (in' x in')
       S = mean_{rows, s} delta_s delta_s^T   (out x out)

   ``fisher="empirical"``: ``delta`` back-propagated from the training loss itself (the empirical Fisher;
   kronfluence ``use_empirical_fisher=True``). ``fisher="sampled"``: from the same squared error with the
   regression target replaced by the pseudo-target ``y = out.detach() + z / sqrt(2)``, ``z ~ N(0, I)``
   seeded by ``(seed, example key)`` (:func:`pseudo_targets`). ``||y - out||^2`` is the negative
   log-likelihood of a Gaussian of variance 1/2, so this is the true Fisher, an unbiased estimate of the
   GGN ``J^T (2 I) J`` of the loss (also of D-TRAK's ``||out||^2``, whose Hessian in ``out`` is ``2 I`` too).
2. ``A = Q_A diag(L_A) Q_A^T``, ``S = Q_S diag(L_S) Q_S^T`` (float64 ``eigh`` of the symmetrized factors;
   K-FAC uses ``max(L, 0)``: both are covariances, a negative eigenvalue is round-off, so any damping > 0
   gives a definite curvature).
3. The per-example gradient of a layer is ``G_i = sum_{rows of i, s} delta_s a_s^T`` (``out x in'``: the
   weight gradient, the bias gradient as its last column). Curvature eigenvalues in the basis
   ``Q_S (x) Q_A``: ``strategy="kfac"`` ``Lambda = L_S L_A^T`` (the outer product; per position, as
   kronfluence); ``strategy="ekfac"`` the eigenvalue correction ``Lambda = mean_i (Q_S^T G_i Q_A)^2``
   (elementwise square; ``G_i`` with the Fisher's ``delta``; mean over the examples of the fit).
4. Influence of training example ``i`` on a target with gradient ``G_t`` (:func:`ekfac_gradients` of e.g.
   :class:`~attribution.outputs.StepOutput` at step ``t``)::

       tau_{i,t} = sum_layers < G_i , Q_S [ (Q_S^T G_t Q_A) / (Lambda + damping_l) ] Q_A^T >

   with ``G_i`` the gradient of the *real* training loss (TRAK's training features): ``g_i^T (C + D)^-1 g_t``
   for the block-diagonal (per layer) curvature ``C = (Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T``. Same
   formula and sign as TRAK's ``Phi (Phi^T Phi + lambda I)^-1 g`` (:mod:`attribution.scoring`):
   a positive score means including example ``i`` lowers ``f_t``.

Damping plays lambda's role (choose it on held-out targets): ``damping_scale="layer"`` (default) adds
``damping * mean(Lambda_l)`` to layer ``l`` (kronfluence's default heuristic is ``damping = 0.1``);
``"global"`` adds ``damping`` times the mean eigenvalue over all covered parameters (trace / p, like
:func:`~attribution.scoring.relative_lambda`); ``"absolute"`` adds ``damping`` itself. (K-FAC's
``Lambda`` is per position, EK-FAC's per example: compare their absolute dampings only through a scale.)

Streaming: per-example layer gradients come from ONE batched forward/backward per chunk, with hooks and
the parameters frozen (as :mod:`attribution.layerwise`; rows of different examples must not interact,
true for these UNets), never ``N x p``; :func:`ekfac_scores` preconditions the target gradients once
(``T x p``) and then makes one pass over the training examples for all ``(n, T)`` scores.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from .atomic import atomic_torch_save
from .diffusion import add_noise
from .errors import CheckpointMismatchError, CorruptFileError, SettingsError, SettingsTypeError
from .gradients import parameter_order
from .identity import tensors_hash, weights_hash
from .integrity import require_finite
from .layerwise import _input_requires_grad, _rows_loss, layer_groups
from .outputs import Draws, ModelOutput
from .seeding import cpu_generator
from .task import math_attention

__all__ = ["FISHERS", "STRATEGIES", "DAMPING_SCALES", "LayerSpec", "LayerFactors", "EKFACFactors", "fit_ekfac",
           "ekfac_gradients", "check_damping", "denominators", "precondition", "ekfac_scores", "ekfac_damping_sweep", "pseudo_targets"]

log = logging.getLogger(__name__)

FISHERS = ("empirical", "sampled")
STRATEGIES = ("ekfac", "kfac")
DAMPING_SCALES = ("layer", "global", "absolute")
FORMAT, VERSION = "ekfac-factors", 1
_PSEUDO_STREAM = 41
_TENSORS = ("activation_covariance", "gradient_covariance", "activation_eigenvalues", "activation_eigenvectors",
            "gradient_eigenvalues", "gradient_eigenvectors", "corrected_eigenvalues")


# ================================================================================= containers
@dataclass(frozen=True)
class LayerSpec:
    """A covered layer: ``kind`` linear / conv2d; ``G`` is ``out_dim x in_dim`` (``in_dim`` counts the bias
    coordinate when ``bias`` is set)."""

    module: str
    kind: str
    weight: str
    bias: Optional[str]
    out_dim: int
    in_dim: int


@dataclass
class LayerFactors:
    """Factors of one layer (float64, CPU). ``corrected_eigenvalues (out, in')`` is None for a K-FAC fit."""

    spec: LayerSpec
    num_positions: int
    activation_covariance: Tensor
    gradient_covariance: Tensor
    activation_eigenvalues: Tensor
    activation_eigenvectors: Tensor
    gradient_eigenvalues: Tensor
    gradient_eigenvectors: Tensor
    corrected_eigenvalues: Optional[Tensor] = None

    def eigenvalues(self, strategy: str) -> Tensor:
        """``Lambda (out, in')`` of ``strategy`` ("kfac": ``L_S L_A^T``; "ekfac": the corrected ones)."""
        if _checks.one_of("strategy", strategy, STRATEGIES) == "kfac":
            # A and S are covariances (positive semidefinite): an eigenvalue below 0 is the round-off of a
            # singular direction (float32 per-batch products; measured down to -5e-9 x the largest), so it is 0
            return torch.outer(self.gradient_eigenvalues.clamp(min=0), self.activation_eigenvalues.clamp(min=0))
        if self.corrected_eigenvalues is None:
            raise SettingsError("Expected factors fitted with strategy='ekfac' for `strategy` = 'ekfac', but these "
                                "were fitted with strategy='kfac' (no eigenvalue correction); refit or use 'kfac'")
        return self.corrected_eigenvalues

    def _check(self, where: str) -> None:
        o, i = self.spec.out_dim, self.spec.in_dim
        shapes = {"activation_covariance": (i, i), "gradient_covariance": (o, o), "activation_eigenvalues": (i,),
                  "activation_eigenvectors": (i, i), "gradient_eigenvalues": (o,), "gradient_eigenvectors": (o, o),
                  "corrected_eigenvalues": (o, i)}
        for name, shape in shapes.items():
            t = getattr(self, name)
            if t is None and name == "corrected_eigenvalues":
                continue
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise CorruptFileError(f"Expected {name} of layer {self.spec.module!r} {where} to have shape {shape}, "
                                       f"but got {got}")
            require_finite(t, f"{name} of layer {self.spec.module!r}", where)


class EKFACFactors:
    """Per-layer factors and what they were fitted on (``meta``); :meth:`save` / :meth:`load` them."""

    def __init__(self, layers: Sequence[LayerFactors], meta: dict, source: str = "the fitted factors") -> None:
        self.layers, self.meta, self.source = list(layers), dict(meta), source

    @property
    def p(self) -> int:
        """Covered parameters (weights and biases of the covered layers)."""
        return sum(lf.spec.out_dim * lf.spec.in_dim for lf in self.layers)

    def save(self, path: str | Path) -> Path:
        """Write atomically (:func:`~attribution.atomic.atomic_torch_save`)."""
        layers = [{"spec": asdict(lf.spec), "num_positions": lf.num_positions,
                   **{name: getattr(lf, name) for name in _TENSORS}} for lf in self.layers]
        return atomic_torch_save({"format": FORMAT, "version": VERSION, "meta": self.meta, "layers": layers}, path)

    @classmethod
    def load(cls, path: str | Path) -> "EKFACFactors":
        """Read factors written by :meth:`save`; shapes and finiteness are checked."""
        path = Path(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise CorruptFileError(f"Expected {path} to be EK-FAC factors written by EKFACFactors.save, but it is "
                                   f"unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("version") != VERSION:
            found = (obj.get("format"), obj.get("version")) if isinstance(obj, dict) else type(obj).__name__
            raise CorruptFileError(f"Expected {path} to hold {FORMAT!r} version {VERSION}, but got {found}")
        layers = []
        for entry in obj["layers"]:
            lf = LayerFactors(LayerSpec(**entry["spec"]), int(entry["num_positions"]),
                              **{name: entry[name] for name in _TENSORS})
            lf._check(f"in {path}")
            layers.append(lf)
        return cls(layers, obj["meta"], source=str(path))

    def check(self, model: torch.nn.Module, task=None, train_output: Optional[ModelOutput] = None) -> None:
        """Refuse a model (other layers or other weights), task or training-side function than the fit's."""
        modules = dict(model.named_modules())
        bad = [lf.spec.module for lf in self.layers if lf.spec.module not in modules
               or getattr(modules[lf.spec.module], "weight", None) is None
               or modules[lf.spec.module].weight[0].numel() + (lf.spec.bias is not None) != lf.spec.in_dim
               or modules[lf.spec.module].weight.shape[0] != lf.spec.out_dim]
        if bad:
            raise SettingsError(f"Expected `model` with the layers of {self.source}, but got missing or reshaped "
                                f"layers {bad[:3]}")
        found = weights_hash(model, self.meta["param_names"])
        if found != self.meta["weights_hash"]:
            raise CheckpointMismatchError(f"Expected `model` with the weights {self.source} were fitted on "
                                          f"(weights_hash {self.meta['weights_hash']}), but got {found}; refit "
                                          "the factors for this checkpoint")
        for name, given, key in (("task", task, "task"), ("train_output", train_output, "train_output")):
            if given is not None and given.describe() != self.meta[key]:
                raise SettingsError(f"Expected `{name}` as in {self.source} ({self.meta[key]}), but got "
                                    f"{given.describe()}")


# ================================================================================= layers and hooks
def _covered_layers(model: torch.nn.Module, param_names) -> tuple[list[LayerSpec], list[str]]:
    groups, excluded = layer_groups(model, param_names)
    modules = dict(model.named_modules())
    specs = []
    for g in groups:
        ok = g.kind in ("linear", "conv2d") and g.weight is not None
        if ok and not isinstance(getattr(modules[g.module], "padding", 0), str):
            specs.append(LayerSpec(g.module, g.kind, g.weight, g.bias, g.out_dim, g.in_dim + (g.bias is not None)))
        else:
            excluded += [n for n in (g.weight, g.bias) if n is not None]
    if not specs:
        raise SettingsError("Expected `model` to contain Linear / Conv2d layers with differentiated weights, "
                            "but found none")
    dropped = set(excluded)
    return specs, [n for n in parameter_order(model, param_names) if n in dropped]


def _patches(module: torch.nn.Module, spec: LayerSpec, x: Tensor) -> Tensor:
    """``(R, S, in)``: the layer input at every position of every row, without the bias coordinate.

    Convolutions: the receptive fields in ``F.unfold`` order (channel, kernel row, kernel column), from strided
    views of the padded input and one copy (``F.unfold``'s im2col was ~70% of the time on CPU).
    """
    if spec.kind == "linear":
        return x.reshape(x.shape[0], -1, x.shape[-1])
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    v = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # (R, C, Ho, Wo, span_h, span_w)
    if dh > 1 or dw > 1:
        v = v[..., ::dh, ::dw]
    return v.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], v.shape[2] * v.shape[3], -1)


def _out_grads(spec: LayerSpec, dy: Tensor) -> Tensor:
    """``(R, S, out)``: the output gradient at every position of every row."""
    if spec.kind == "linear":
        return dy.reshape(dy.shape[0], -1, dy.shape[-1])
    return dy.flatten(2).transpose(1, 2)


class _Hooks:
    """Forward hooks on the covered layers; ``on_grad(spec, module, x, dy)`` runs (without grad) when a layer's
    output gradient ``dy`` arrives, with ``x`` its input; both have the ``rows`` first."""

    def __init__(self, model: torch.nn.Module, specs: Sequence[LayerSpec], rows: int, on_grad: Callable) -> None:
        modules = dict(model.named_modules())
        self.targets = [(modules[s.module], s) for s in specs]
        self.rows, self.on_grad, self.handles = rows, on_grad, []

    def __enter__(self) -> "_Hooks":
        for module, spec in self.targets:
            self.handles.append(module.register_forward_pre_hook(_input_requires_grad))
            self.handles.append(module.register_forward_hook(self._forward_hook(spec)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _forward_hook(self, spec: LayerSpec):
        def hook(module, args, output):
            x = args[0]
            if x.shape[0] != self.rows:
                raise RuntimeError(f"Expected layer {spec.module!r} to see the {self.rows} rows first, but its input "
                                   f"has shape {tuple(x.shape)}")
            if output.requires_grad:
                saved = x.detach()
                output.register_hook(lambda dy: self._grad(spec, module, saved, dy))
        return hook

    def _grad(self, spec, module, x, dy) -> None:
        with torch.no_grad():
            self.on_grad(spec, module, x, dy.detach())


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters ``requires_grad=False`` (autograd skips weight gradients; the hooks form them) and the math
    attention kernel (the function TRAK's vmap path differentiates); both restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with math_attention(model):
            yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


# ================================================================================= objectives and passes
def pseudo_targets(keys: Tensor, num_draws: int, sample_shape: Sequence[int], seed: int) -> Tensor:
    """``z (B, K, *sample_shape)`` standard normal, seeded by ``(seed, key)``: the sampled Fisher's noise."""
    keys = _checks.long_vector("keys", keys).cpu()
    shape = (_checks.positive_int("num_draws", num_draws),) + tuple(int(s) for s in sample_shape)
    out = torch.empty((len(keys),) + shape)
    for i, key in enumerate(keys.tolist()):
        out[i] = torch.randn(shape, generator=cpu_generator(_checks.int_seed("seed", seed), _PSEUDO_STREAM, key))
    return out


def _objective(task, model, output_fn: ModelOutput, x0: Tensor, draws: Draws, cond: Optional[Tensor],
               pseudo: Optional[Tensor]) -> Tensor:
    """``sum_i f(example i)`` over the ``B*K`` rows in one model call; with ``pseudo (B, K, ...)`` the
    sampled-Fisher loss ``sum w * mask * (out.detach() + z / sqrt 2 - out)^2`` instead."""
    if pseudo is None:
        return _rows_loss(task, model, output_fn, x0, draws, cond)
    t, noise = draws
    B, K = t.shape

    def rows(v: Tensor) -> Tensor:
        return v.unsqueeze(1).expand(B, K, *v.shape[1:]).reshape(B * K, *v.shape[1:])
    x_t = add_noise(rows(x0), noise.reshape(B * K, *noise.shape[2:]), t.reshape(-1), task.alphas_cumprod)
    out = task.model_output(model, x_t, t.reshape(-1), None if cond is None else rows(cond))
    err = (out.detach() + pseudo.reshape(out.shape) / math.sqrt(2.0) - out) ** 2
    if output_fn.mask is not None:
        err = err * output_fn.mask.to(device=err.device, dtype=err.dtype)
    return err.sum() * (1.0 / K if output_fn.reduction == "mean" else 1.0)


def _backward(task, model, output_fn, specs, chunk, on_grad) -> None:
    x0, draws, cond, pseudo = chunk
    with torch.enable_grad(), _Hooks(model, specs, draws.timesteps.numel(), on_grad):
        loss = _objective(task, model, output_fn, x0, draws, cond, pseudo)
        if loss.requires_grad:
            loss.backward()


def _chunks(task, output_fn, x0, keys, cond, steps, chunk_size, pseudo_seed) -> Iterator[tuple]:
    """``(x0, draws, cond, pseudo)`` per chunk of ``chunk_size`` examples (draws made for the whole batch)."""
    B = x0.shape[0]
    chunk = B if chunk_size is None else _checks.positive_int("chunk_size", chunk_size)
    draws = output_fn.draws(keys, x0.shape[1:], steps, num_train_timesteps=task.num_train_timesteps,
                            device=x0.device, dtype=x0.dtype)
    pseudo = None if pseudo_seed is None else \
        pseudo_targets(keys, output_fn.num_draws, x0.shape[1:], pseudo_seed).to(x0.device, x0.dtype)
    for s in range(0, B, chunk):
        rows = slice(s, s + chunk)
        yield (x0[rows].detach(), draws.select(rows), None if cond is None else cond[rows].detach(),
               None if pseudo is None else pseudo[rows])


def _gradient_chunk(task, model, output_fn, specs, chunk) -> dict[str, Tensor]:
    """Per-example layer gradients ``{module: (B, out, in')}`` of one chunk (rows of an example summed)."""
    x0 = chunk[0]
    B = x0.shape[0]
    grads = {s.module: x0.new_zeros(B, s.out_dim, s.in_dim) for s in specs}

    def on_grad(spec, module, x, dy):
        a = _patches(module, spec, x)
        a = a.reshape(B, -1, a.shape[-1])
        d = _out_grads(spec, dy).reshape(B, -1, spec.out_dim)
        g = grads[spec.module]
        g[:, :, :a.shape[-1]] += torch.bmm(d.transpose(1, 2), a)
        if spec.bias is not None:  # the homogeneous coordinate, without concatenating ones to the patches
            g[:, :, -1] += d.sum(1)
    _backward(task, model, output_fn, specs, chunk, on_grad)
    return grads


def _check_inputs(model, x0, keys, cond) -> Tensor:
    if model.training:
        raise SettingsError("Expected `model` in eval mode (call model.eval() first), but got training mode")
    _checks.tensor_ndim("x0", x0, x0.ndim, "")
    keys = _checks.long_vector("keys", keys, x0.shape[0])
    if cond is not None and cond.shape[0] != x0.shape[0]:
        raise SettingsError(f"Expected `cond` with leading dimension {x0.shape[0]}, but got {tuple(cond.shape)}")
    return keys


def _iter_batches(batches: Iterable, name: str) -> Iterator[tuple[Tensor, Tensor, Optional[Tensor]]]:
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise SettingsTypeError(f"Expected every item of `{name}` to be (x0, keys) or (x0, keys, cond), but got "
                                    f"a {type(batch).__name__}{size}")
        yield batch[0], batch[1], (batch[2] if len(batch) == 3 else None)


def _layer_gradients(task, model, output_fn, specs, x0, keys, cond=None, steps=None, chunk_size=None,
                     pseudo_seed=None) -> dict[str, Tensor]:
    keys = _check_inputs(model, x0, keys, cond)
    parts = {s.module: [] for s in specs}
    with _frozen(model):
        for chunk in _chunks(task, output_fn, x0, keys, cond, steps, chunk_size, pseudo_seed):
            for name, g in _gradient_chunk(task, model, output_fn, specs, chunk).items():
                parts[name].append(g)
    return {name: torch.cat(p) if p else x0.new_zeros(0, s.out_dim, s.in_dim)
            for (name, p), s in zip(parts.items(), specs)}


# ================================================================================= fit
class _Moments:
    """Running sums of ``a a^T`` and ``delta delta^T`` (float64) over rows and positions, per layer."""

    def __init__(self, specs: Sequence[LayerSpec], device) -> None:
        f64 = torch.float64
        self.a = {s.module: torch.zeros(s.in_dim, s.in_dim, dtype=f64, device=device) for s in specs}
        self.s = {s.module: torch.zeros(s.out_dim, s.out_dim, dtype=f64, device=device) for s in specs}
        self.count = {s.module: 0 for s in specs}

    def add(self, spec, module, x, dy) -> None:
        a = _patches(module, spec, x)
        a = a.reshape(-1, a.shape[-1])
        d = _out_grads(spec, dy).reshape(-1, spec.out_dim)
        A, n = self.a[spec.module], a.shape[1]
        A[:n, :n] += (a.T @ a).double()
        if spec.bias is not None:  # the homogeneous coordinate: column sums and the count
            total = a.sum(0).double()
            A[:n, n] += total
            A[n, :n] += total
            A[n, n] += a.shape[0]
        self.s[spec.module] += (d.T @ d).double()
        self.count[spec.module] += a.shape[0]

    def factors(self, specs: Sequence[LayerSpec]) -> list[LayerFactors]:
        unseen = [s.module for s in specs if self.count[s.module] == 0]
        if unseen:
            raise SettingsError(f"Expected every covered layer to receive an output gradient from the training "
                                f"loss, but {unseen[:3]} never did; restrict `param_names` to the layers it uses")
        out = []
        for s in specs:
            A, S = (m[s.module].cpu() / self.count[s.module] for m in (self.a, self.s))
            require_finite(A, f"activation covariance of layer {s.module!r}", "(check the training inputs)")
            require_finite(S, f"gradient covariance of layer {s.module!r}", "(check the training loss)")
            la, qa = torch.linalg.eigh((A + A.T) / 2)
            ls, qs = torch.linalg.eigh((S + S.T) / 2)
            out.append(LayerFactors(s, self.count[s.module], A, S, la, qa, ls, qs))
        return out


def fit_ekfac(task, model: torch.nn.Module, train_output: ModelOutput, batches: Iterable, *,
              fisher: str = "empirical", strategy: str = "ekfac", seed: int = 0,
              param_names: Optional[Sequence[str]] = None, chunk_size: Optional[int] = None) -> EKFACFactors:
    """Fit the per-layer factors on the training examples in ``batches`` (see the module docstring).

    Args:
        task: a :class:`~attribution.task.DiffusionTask`.
        model: the denoiser (eval mode).
        train_output: the training-side function (a :class:`~attribution.outputs.TrainLoss`, TRAK's).
        batches: re-iterable (two passes for EK-FAC) of ``(x0 (B, *sample_shape), keys (B,)[, cond (B, L, D)])``,
            keys the global training indices (they seed the draws); each example at most once.
        fisher: "empirical" (the real targets) or "sampled" (seeded pseudo-targets: the true Fisher / GGN).
        strategy: "ekfac" (second pass for the eigenvalue correction) or "kfac" (one pass).
        seed: seed of the pseudo-targets (``fisher="sampled"``).
        param_names: differentiate only these parameters (None: all trainable).
        chunk_size: examples per forward/backward pass (``chunk_size * K`` rows); None: the whole batch.
    """
    if not isinstance(train_output, ModelOutput):
        raise SettingsTypeError(f"Expected `train_output` to be a ModelOutput, but got {type(train_output).__name__}")
    if model.training:
        raise SettingsError("Expected `model` in eval mode (call model.eval() first), but got training mode")
    _checks.one_of("fisher", fisher, FISHERS)
    _checks.one_of("strategy", strategy, STRATEGIES)
    pseudo_seed = _checks.int_seed("seed", seed) if fisher == "sampled" else None
    if iter(batches) is batches:
        raise SettingsTypeError(f"Expected `batches` to be re-iterable (a list or DataLoader), but got a one-shot "
                                f"{type(batches).__name__}")
    specs, excluded = _covered_layers(model, param_names)
    meta = {"format": FORMAT, "strategy": strategy, "fisher": fisher, "seed": seed,
            "train_output": train_output.describe(), "task": task.describe(),
            "param_names": None if param_names is None else list(param_names),
            "weights_hash": weights_hash(model, None if param_names is None else list(param_names)),
            "excluded": excluded}
    moments, keys_seen = None, []
    with _frozen(model):
        for x0, keys, cond in _iter_batches(batches, "batches"):
            keys_seen.append(_check_inputs(model, x0, keys, cond).cpu())
            moments = moments or _Moments(specs, x0.device)
            for chunk in _chunks(task, train_output, x0, keys, cond, None, chunk_size, pseudo_seed):
                _backward(task, model, train_output, specs, chunk, moments.add)
    keys_all = torch.cat(keys_seen) if keys_seen else torch.zeros(0, dtype=torch.long)
    if keys_all.numel() == 0 or keys_all.unique().numel() != keys_all.numel():
        raise SettingsError(f"Expected `batches` to hold at least one example, each once, but got {keys_all.numel()} "
                            f"keys ({keys_all.unique().numel()} distinct)")
    layers = moments.factors(specs)
    if strategy == "ekfac":
        _correct_eigenvalues(task, model, train_output, batches, layers, keys_all, chunk_size, pseudo_seed)
    meta.update(num_examples=int(keys_all.numel()), keys_hash=tensors_hash([("keys", keys_all.sort().values)]),
                covered_params=sum(s.out_dim * s.in_dim for s in specs))
    log.info("fitted %s (%s Fisher) on %d examples: %d layers, %d parameters, %d excluded", strategy, fisher,
             keys_all.numel(), len(specs), meta["covered_params"], len(excluded))
    return EKFACFactors(layers, meta)


def _correct_eigenvalues(task, model, train_output, batches, layers, keys_all, chunk_size, pseudo_seed) -> None:
    """Second pass: ``Lambda = mean_i (Q_S^T G_i Q_A)^2`` with the Fisher's per-example gradients."""
    specs = [lf.spec for lf in layers]
    sums, keys_seen, bases = {}, [], {}
    with _frozen(model):
        for x0, keys, cond in _iter_batches(batches, "batches"):
            keys_seen.append(_check_inputs(model, x0, keys, cond).cpu())
            for chunk in _chunks(task, train_output, x0, keys, cond, None, chunk_size, pseudo_seed):
                for lf in layers:
                    if lf.spec.module not in bases:
                        bases[lf.spec.module] = tuple(q.to(x0.device, x0.dtype) for q in
                                                      (lf.gradient_eigenvectors, lf.activation_eigenvectors))
                grads = _gradient_chunk(task, model, train_output, specs, chunk)
                for name, g in grads.items():
                    qs, qa = bases[name]
                    moment = (qs.T @ g @ qa).double().square().sum(0)
                    sums[name] = moment if name not in sums else sums[name] + moment
    again = torch.cat(keys_seen) if keys_seen else torch.zeros(0, dtype=torch.long)
    if not torch.equal(again, keys_all):
        raise SettingsError(f"Expected `batches` to give the same examples on every pass, but the second pass gave "
                            f"{again.numel()} keys (first: {keys_all.numel()}); pass a list or a deterministic loader")
    for lf in layers:
        lf.corrected_eigenvalues = sums[lf.spec.module].cpu() / keys_all.numel()
        require_finite(lf.corrected_eigenvalues, f"corrected eigenvalues of layer {lf.spec.module!r}")


# ================================================================================= gradients and scores
def ekfac_gradients(task, model: torch.nn.Module, output_fn: ModelOutput, factors: EKFACFactors, x0: Tensor,
                    keys: Tensor, cond: Optional[Tensor] = None, steps: Optional[Tensor] = None,
                    chunk_size: Optional[int] = None) -> dict[str, Tensor]:
    """Per-example gradients of ``output_fn`` for the layers of ``factors`` (``featurize_batch``'s contract with
    ``factors`` in the projector's place).

    Target side: ``x0`` = ``x0_hat_t`` (detached), ``keys`` = target ids, ``steps`` = t, ``output_fn`` =
    :class:`~attribution.outputs.StepOutput`. Training side: ``x0`` = training samples, ``keys`` = global
    indices, ``output_fn`` = the fit's TrainLoss.

    Returns:
        ``{module: (B, out, in')}`` in ``x0``'s dtype: weight gradient (``weight.reshape(out, -1)``) with the
        bias gradient as last column.
    """
    factors.check(model, task)
    return _layer_gradients(task, model, output_fn, [lf.spec for lf in factors.layers], x0, keys, cond, steps,
                            chunk_size)


def check_damping(damping) -> float:
    """``damping`` as a float, refused unless it is a finite number >= 0."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < math.inf:
        raise SettingsError(f"Expected `damping` to be a finite float >= 0, but got {damping!r}")
    return float(damping)


def denominators(factors: EKFACFactors, damping: float, damping_scale: str = "layer",
                 strategy: str = "ekfac") -> list[Tensor]:
    """``Lambda_l + damping_l`` per layer (float64), refused unless every one is positive (a definite curvature)."""
    damping = check_damping(damping)
    _checks.one_of("damping_scale", damping_scale, DAMPING_SCALES)
    eigs = [lf.eigenvalues(strategy) for lf in factors.layers]
    if damping_scale == "absolute":
        shifts = [damping] * len(eigs)
    elif damping_scale == "layer":
        shifts = [damping * float(e.clamp(min=0).mean()) for e in eigs]
    else:
        mean = sum(float(e.clamp(min=0).sum()) for e in eigs) / sum(e.numel() for e in eigs)
        shifts = [damping * mean] * len(eigs)
    dens = [e + s for e, s in zip(eigs, shifts)]
    bad = [(lf.spec.module, float(d.min())) for lf, d in zip(factors.layers, dens) if not bool((d > 0).all())]
    if bad:
        raise SettingsError(f"Expected `damping` large enough for a positive definite curvature, but with damping = "
                            f"{damping} ({damping_scale}) the smallest eigenvalue of layer {bad[0][0]!r} is "
                            f"{bad[0][1]:.3e}; pass a larger damping")
    return dens


def _check_grads(factors: EKFACFactors, grads, name: str) -> int:
    if not isinstance(grads, Mapping):
        raise SettingsTypeError(f"Expected `{name}` to be a dict {{module: (T, out, in')}} from ekfac_gradients, "
                                f"but got {type(grads).__name__}")
    names = [lf.spec.module for lf in factors.layers]
    missing, extra = [n for n in names if n not in grads], sorted(set(grads) - set(names))
    if missing or extra:
        raise SettingsError(f"Expected `{name}` for exactly the layers of {factors.source}, but got missing "
                            f"{missing[:3]} and unexpected {extra[:3]}")
    T = None
    for lf in factors.layers:
        g = grads[lf.spec.module]
        shape = (T if T is not None else "T", lf.spec.out_dim, lf.spec.in_dim)
        if not isinstance(g, Tensor) or g.ndim != 3 or tuple(g.shape[1:]) != shape[1:] or (T is not None and
                                                                                           g.shape[0] != T):
            raise SettingsError(f"Expected `{name}[{lf.spec.module!r}]` of shape {shape}, but got "
                                f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
        T = g.shape[0]
        require_finite(g, f"`{name}` of layer {lf.spec.module!r}")
    return T


def precondition(factors: EKFACFactors, target_grads: Mapping[str, Tensor], damping: float, *,
                 damping_scale: str = "layer", strategy: str = "ekfac") -> dict[str, Tensor]:
    """``{module: Q_S [(Q_S^T G_t Q_A) / (Lambda + damping_l)] Q_A^T}`` ``(T, out, in')`` float64."""
    _check_grads(factors, target_grads, "target_grads")
    out = {}
    for lf, den in zip(factors.layers, denominators(factors, damping, damping_scale, strategy)):
        g = target_grads[lf.spec.module]
        qs, qa, den = (t.to(g.device) for t in (lf.gradient_eigenvectors, lf.activation_eigenvectors, den))
        out[lf.spec.module] = qs @ ((qs.T @ g.double() @ qa) / den) @ qa.T
    return out


def ekfac_damping_sweep(factors: EKFACFactors, task, model: torch.nn.Module, train_output: ModelOutput,
                        train_batches: Iterable, target_grads: Mapping[str, Tensor], dampings: Sequence[float], *,
                        damping_scale: str = "layer", strategy: str = "ekfac", chunk_size: Optional[int] = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """Scores for several dampings from one pass over the training examples: ``(L, n, T)``.

    Rows follow the order of ``train_batches`` (``(x0, keys[, cond])``, as for :func:`fit_ekfac`; one pass);
    memory holds the ``L x T x p`` preconditioned target gradients in the training gradients' dtype.
    """
    factors.check(model, task, train_output)
    dampings = [check_damping(d) for d in dampings]
    if not dampings:
        raise SettingsError("Expected `dampings` to hold at least one value, but got none")
    T = _check_grads(factors, target_grads, "target_grads")
    pre = [precondition(factors, target_grads, d, damping_scale=damping_scale, strategy=strategy) for d in dampings]
    stacked = {lf.spec.module: torch.cat([p[lf.spec.module].flatten(1) for p in pre]) for lf in factors.layers}
    specs, blocks = [lf.spec for lf in factors.layers], []
    for x0, keys, cond in _iter_batches(train_batches, "train_batches"):
        grads = _layer_gradients(task, model, train_output, specs, x0, keys, cond, chunk_size=chunk_size)
        block = torch.zeros(x0.shape[0], len(dampings) * T, dtype=torch.float64, device=x0.device)
        for name, g in grads.items():
            if stacked[name].dtype != g.dtype or stacked[name].device != g.device:  # once, to the gradients' dtype
                stacked[name] = stacked[name].to(g.device, g.dtype)
            block += (g.flatten(1) @ stacked[name].T).double()
        require_finite(block, "EK-FAC scores", "(training batch)", rows=keys.cpu(), row_name="training keys")
        blocks.append(block.cpu())
    scores = torch.cat(blocks) if blocks else torch.zeros(0, len(dampings) * T, dtype=torch.float64)
    return scores.reshape(-1, len(dampings), T).permute(1, 0, 2).to(dtype)


def ekfac_scores(factors: EKFACFactors, task, model: torch.nn.Module, train_output: ModelOutput,
                 train_batches: Iterable, target_grads: Mapping[str, Tensor], damping: float, *,
                 damping_scale: str = "layer", strategy: str = "ekfac", chunk_size: Optional[int] = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """``(n, T)`` influence scores ``tau_{i,t}`` (module docstring) of the training examples of
    ``train_batches`` (in their order) on the targets of ``target_grads`` (:func:`ekfac_gradients`)."""
    return ekfac_damping_sweep(factors, task, model, train_output, train_batches, target_grads, [damping],
                               damping_scale=damping_scale, strategy=strategy, chunk_size=chunk_size, dtype=dtype)[0]
