"""Model-output functions: what is differentiated per example (training side and target side).

Two functions (SPEC, "The two functions whose gradients are taken"):

* :class:`TrainLoss` featurizes a training example ``z`` (Algorithm 1, line 3)::

      f_train(z) = 1/K sum_k || eps_k - eps_theta(sqrt(abar_{t_k}) z + sqrt(1 - abar_{t_k}) eps_k, t_k) ||^2

  with ``t_k`` uniform in ``[0, T)`` and ``eps_k ~ N(0, I)``.
* :class:`StepOutput` is Eq. 3 of the paper at a given sampling step ``t``::

      f_t(x0_hat_t) = sum_k || eps_k - eps_theta(sqrt(abar_t) x0_hat_t + sqrt(1 - abar_t) eps_k, t) ||^2

  with ``x0_hat_t`` held fixed (the caller passes it detached; no gradient flows through it).

Both are the model's *own* training loss, in its own parameterization (``task.prediction_type``): the
formulas above are the epsilon case; a v-prediction model's loss is ``|| v_k - v_theta(x_t, t) ||^2`` with
``v_k = sqrt(abar_t) eps_k - sqrt(1 - abar_t) x_0``, a sample-prediction model's ``|| x_0 - x0_theta ||^2``
(never one rewritten as another: that would change the per-timestep weighting, SPEC "Prediction types").

Reduction: the squared error is summed over all sample elements (channels and pixels), then
averaged over the K draws for ``TrainLoss`` and summed over the K' draws for ``StepOutput``
(as written in the paper; a constant factor does not change rankings, but it does change the
meaning of the ridge ``lambda``). ``kind="square"`` replaces the squared error by D-TRAK's
squared norm of the network output ``||out_theta(x_t, t)||^2`` (the predicted noise for
epsilon-prediction). An optional binary ``mask``
(broadcastable to one sample, e.g. ``(1, H, W)``) multiplies the squared error pixel-wise
before summing (patch attribution; for a latent model the caller resizes it to the latent grid).

Draws (timesteps and noise) are a deterministic function of ``(seed, key[, step])``, generated
on the CPU with ``torch.Generator`` and then moved to the device: they do not depend on the
batch composition, the order, the chunk size, the rank or the device. Keys are global
training-example indices on the training side and target ids on the target side. With
``share_noise=True`` (D-TRAK) the noise of draw ``k`` depends on ``(seed, k)`` only, so the
training and target sides (built with the same seed) share the same noise draws.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _checks
from .diffusion import add_noise
from .seeding import cpu_generator

__all__ = ["Draws", "ModelOutput", "TrainLoss", "StepOutput", "make_output", "OUTPUTS"]

_TIMESTEP_STREAM = 1
_NOISE_STREAM = 2
_SHARED_NOISE_STREAM = 3
_KINDS = ("loss", "square", "l2", "avg")
_ADDITIVE = ("loss", "square")   # kinds whose per-draw value is the sum of the elementwise result
TIMESTEP_SAMPLING = ("uniform", "stratified", "even")


class Draws(NamedTuple):
    """Random draws for a batch (a NamedTuple, hence a pytree that vmap can split).

    Attributes:
        timesteps: ``(B, K)`` int64.
        noise: ``(B, K, *sample_shape)``.
    """

    timesteps: Tensor
    noise: Tensor

    def to(self, device=None, dtype=None) -> "Draws":
        """Move to ``device``; cast the noise to ``dtype`` (timesteps stay int64)."""
        return Draws(self.timesteps.to(device), self.noise.to(device=device, dtype=dtype))

    def select(self, rows: Tensor | slice) -> "Draws":
        """Rows of the batch."""
        return Draws(self.timesteps[rows], self.noise[rows])


class ModelOutput(ABC):
    """A per-example scalar function of the model, plus its deterministic random draws.

    Subclasses implement :meth:`_timesteps` and :meth:`per_example`.

    Args:
        num_draws: K, the number of (timestep, noise) draws per example.
        seed: global seed of the draws.
        kind: ``"loss"`` (squared denoising error), or D-TRAK's functions of the network output ``out``:
            ``"square"`` ``||out||^2``, ``"l2"`` ``||out||_2``, ``"avg"`` the mean of ``out``.
        mask: optional binary mask broadcastable to one sample ``(*sample_shape)``.
        share_noise: noise of draw k depends on ``(seed, k)`` only (D-TRAK).
    """

    reduction = "sum"

    def __init__(self, num_draws: int, seed: int, kind: str = "loss", mask: Optional[Tensor] = None,
                 share_noise: bool = False) -> None:
        self.num_draws = _checks.positive_int("num_draws", num_draws)
        self.seed = _checks.int_seed("seed", seed)
        self.kind = _checks.one_of("kind", kind, _KINDS)
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"Expected `mask` to be None or a tensor, but got {type(mask).__name__}")
        self.mask = mask
        self.share_noise = bool(share_noise)

    # ----------------------------------------------------------------------------- draws
    def draws(self, keys: Tensor, sample_shape: Sequence[int], steps: Optional[Tensor] = None, *,
              num_train_timesteps: Optional[int] = None, device=None, dtype=torch.float32) -> Draws:
        """Deterministic draws for a batch of keys.

        Args:
            keys: ``(B,)`` integer keys (global training indices or target ids).
            sample_shape: shape of one sample, e.g. ``(C, H, W)``.
            steps: ``(B,)`` integer sampling steps (target side) or None (training side).
            num_train_timesteps: T (needed to draw uniform timesteps; checks ``steps``).
            device, dtype: where the draws go (generated on the CPU, then moved).

        Returns:
            :class:`Draws` with ``timesteps (B, K)`` and ``noise (B, K, *sample_shape)``.
        """
        keys = _checks.long_vector("keys", keys).cpu()
        shape = tuple(int(s) for s in sample_shape)
        timesteps = self._timesteps(keys, steps, num_train_timesteps)
        noise = self._noise(keys, shape, steps)
        return Draws(timesteps, noise).to(device, dtype)

    def _noise(self, keys: Tensor, shape: tuple, steps: Optional[Tensor]) -> Tensor:
        K = self.num_draws
        if self.share_noise:
            shared = torch.stack([torch.randn(shape, generator=cpu_generator(self.seed, _SHARED_NOISE_STREAM, k))
                                  for k in range(K)])
            return shared.unsqueeze(0).expand(len(keys), *shared.shape).clone()
        out = torch.empty((len(keys), K) + shape)
        for i, key in enumerate(keys.tolist()):
            extra = () if steps is None else (int(steps[i]),)
            out[i] = torch.randn((K,) + shape, generator=cpu_generator(self.seed, _NOISE_STREAM, key, *extra))
        return out

    @abstractmethod
    def _timesteps(self, keys: Tensor, steps: Optional[Tensor], num_train_timesteps: Optional[int]) -> Tensor:
        """``(B, K)`` int64 timesteps."""

    # ----------------------------------------------------------------------------- the function
    def per_example(self, task, model_call: Callable, x0: Tensor, draws_i: Draws, cond_i: Optional[Tensor]) -> Tensor:
        """The scalar output for one example (the function vmap differentiates).

        Args:
            task: a :class:`~attribution.task.DiffusionTask`.
            model_call: callable with the denoiser's signature.
            x0: ``(*sample_shape)`` one clean sample (training image or fixed ``x0_hat_t``).
            draws_i: ``Draws(timesteps (K,), noise (K, *sample_shape))``.
            cond_i: ``None`` or ``(L, D)`` conditioning for this example.

        Returns:
            0-d tensor.
        """
        t, noise = draws_i
        K = noise.shape[0]
        cond = None if cond_i is None else cond_i.unsqueeze(0).expand(K, *cond_i.shape)
        err = self.elementwise(task, model_call, x0.unsqueeze(0).expand_as(noise), noise, t, cond)
        per_draw = self.per_draw(err)
        return per_draw.mean() if self.reduction == "mean" else per_draw.sum()

    def per_draw(self, err: Tensor) -> Tensor:
        """``(R,)`` the value of each row (draw) from :meth:`elementwise`'s ``(R, *sample_shape)``: the sum
        for "loss" and "square", the square root of the sum for "l2", the mean for "avg"."""
        flat = err.reshape(err.shape[0], -1)
        if self.kind == "l2":
            return flat.sum(dim=1).sqrt()
        return flat.mean(dim=1) if self.kind == "avg" else flat.sum(dim=1)

    def rows_total(self, err: Tensor, num_draws: int) -> Tensor:
        """``sum_i f(example i)`` from the elementwise result of all ``B * num_draws`` rows (the batched
        paths: layerwise, EK-FAC), with the reduction over draws."""
        total = err.sum() if self.kind in _ADDITIVE else self.per_draw(err).sum()
        return total * (1.0 / num_draws if self.reduction == "mean" else 1.0)

    def elementwise(self, task, model_call: Callable, x0: Tensor, noise: Tensor, t: Tensor,
                    cond: Optional[Tensor]) -> Tensor:
        """The (masked) per-element error of ``R`` rows, before any reduction (shared with the layerwise path).

        ``kind="loss"``: ``(target - out)^2``, the model's own training loss in its own parameterization
        (``task.target``: the noise, ``v`` or ``x0``); ``kind="square"`` and ``"l2"``: ``out^2`` (D-TRAK's
        squared norm and norm of the network output, after :meth:`per_draw`); ``kind="avg"``: ``out``.

        Args:
            x0, noise: ``(R, *sample_shape)``; t: ``(R,)``; cond: ``None`` or ``(R, L, D)``.

        Returns:
            ``(R, *sample_shape)``.
        """
        x_t = add_noise(x0, noise, t, task.alphas_cumprod)
        out = task.model_output(model_call, x_t, t, cond)
        if self.kind == "loss":
            err = (task.target(x0, noise, t) - out) ** 2
        else:
            err = out if self.kind == "avg" else out ** 2
        if self.mask is not None:
            err = err * self.mask.to(device=err.device, dtype=err.dtype)
        return err

    def describe(self) -> dict:
        """Settings to record in store metadata."""
        return {"output": type(self).__name__, "num_draws": self.num_draws, "seed": self.seed,
                "kind": self.kind, "share_noise": self.share_noise, "reduction": self.reduction,
                "mask": None if self.mask is None else list(self.mask.shape)}


class TrainLoss(ModelOutput):
    """Training-side function: mean over K draws of the (masked) squared denoising error.

    Timesteps (``steps`` must be None) per key, with ``timesteps``:

    * ``"uniform"`` (the paper): K independent draws from ``[0, T)``;
    * ``"stratified"``: one uniform draw in each of K equal strata of ``[0, T)`` (every example sees the
      whole range: less variance than uniform);
    * ``"even"`` (D-TRAK): the fixed grid ``floor((k + 1/2) T / K)``, the same for every example.

    ``timestep_range = (low, high)`` draws from ``[low, high)`` instead of ``[0, T)`` (the same three
    schemes over that window): step-matched features, for targets scored at steps inside the window.
    """

    reduction = "mean"

    def __init__(self, num_draws: int = 20, seed: int = 0, kind: str = "loss", mask: Optional[Tensor] = None,
                 share_noise: bool = False, timesteps: str = "uniform",
                 timestep_range: Optional[Sequence[int]] = None) -> None:
        super().__init__(num_draws, seed, kind, mask, share_noise)
        self.timestep_sampling = _checks.one_of("timesteps", timesteps, TIMESTEP_SAMPLING)
        self.timestep_range = check_timestep_range(timestep_range)

    def _timesteps(self, keys, steps, num_train_timesteps):
        if steps is not None:
            raise ValueError("Expected `steps` to be None for TrainLoss (timesteps are drawn), but got a tensor")
        T = _checks.positive_int("num_train_timesteps", num_train_timesteps)
        low, high = check_timestep_range(self.timestep_range, T) or (0, T)
        width, K = high - low, self.num_draws
        if self.timestep_sampling == "even":
            grid = low + ((torch.arange(K, dtype=torch.float64) + 0.5) * width / K).floor().long().clamp(max=width - 1)
            return grid.unsqueeze(0).expand(len(keys), K).clone()
        rows = []
        for k in keys.tolist():
            g = cpu_generator(self.seed, _TIMESTEP_STREAM, k)
            if self.timestep_sampling == "uniform":
                rows.append(torch.randint(low, high, (K,), generator=g))
            else:
                u = torch.rand(K, generator=g, dtype=torch.float64)
                rows.append(low + ((torch.arange(K, dtype=torch.float64) + u) * width / K).floor().long()
                            .clamp(max=width - 1))
        return torch.stack(rows) if rows else torch.empty(0, K, dtype=torch.long)

    def describe(self) -> dict:
        described = {**super().describe(), "timesteps": self.timestep_sampling}
        if self.timestep_range is not None:   # absent from stores of the whole range (older stores match)
            described["timestep_range"] = list(self.timestep_range)
        return described


def check_timestep_range(value: Optional[Sequence[int]], num_train_timesteps: Optional[int] = None
                         ) -> Optional[tuple[int, int]]:
    """``(low, high)`` with ``0 <= low < high`` (``<= T`` when ``num_train_timesteps`` is given), or None."""
    if value is None:
        return None
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and 0 <= value[0] < value[1])
    if ok and num_train_timesteps is not None:
        ok = value[1] <= num_train_timesteps
    if not ok:
        bound = "" if num_train_timesteps is None else f" <= T = {num_train_timesteps}"
        raise ValueError(f"Expected `timestep_range` [low, high) of ints with 0 <= low < high{bound}, but got {value!r}")
    return int(value[0]), int(value[1])


class StepOutput(ModelOutput):
    """Target-side function at a sampling step: Eq. 3 (sum over K' draws), default K' = 20.

    ``steps (B,)`` gives each row's step ``t``; the noise is seeded by ``(seed, key, step)``
    (fresh noise per step) unless ``share_noise``.
    """

    reduction = "sum"

    def __init__(self, num_draws: int = 20, seed: int = 0, kind: str = "loss", mask: Optional[Tensor] = None,
                 share_noise: bool = False) -> None:
        super().__init__(num_draws, seed, kind, mask, share_noise)

    def _timesteps(self, keys, steps, num_train_timesteps):
        steps = _checks.long_vector("steps", steps, len(keys)).cpu()
        low_ok = bool((steps >= 0).all())
        high_ok = num_train_timesteps is None or bool((steps < num_train_timesteps).all())
        if not (low_ok and high_ok):
            raise ValueError(f"Expected `steps` in [0, {num_train_timesteps}), but got {steps.tolist()}")
        return steps.unsqueeze(1).expand(len(keys), self.num_draws).clone()


OUTPUTS = {
    "loss": (StepOutput, "loss"),
    "square": (StepOutput, "square"),
    "l2": (StepOutput, "l2"),
    "avg": (StepOutput, "avg"),
    "train_loss": (TrainLoss, "loss"),
    "train_square": (TrainLoss, "square"),
    "train_l2": (TrainLoss, "l2"),
    "train_avg": (TrainLoss, "avg"),
}


def make_output(name: str, **kw) -> ModelOutput:
    """Select an output function by name.

    ``"loss"`` / ``"square"`` / ``"l2"`` / ``"avg"``: target-side :class:`StepOutput` (Eq. 3 / D-TRAK's);
    ``"train_<kind>"``: the training-side :class:`TrainLoss` of the same kind (``timesteps`` sets its draws).
    Keyword arguments go to the constructor (``num_draws``, ``seed``, ``mask``, ``share_noise``).
    """
    cls, kind = OUTPUTS[_checks.one_of("name", name, OUTPUTS)]
    return cls(kind=kind, **kw)
