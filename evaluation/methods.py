"""Scores of every compared method for the LDS targets and steps, as :class:`MethodScores`: the datamodel
predictions the LDS needs (``(J, B, S)``; estimators ``(L, J, B, S)``, one slice per ridge) and the
``(N, B, S)`` scores at the chosen ridge (:meth:`MethodScores.at`, what ``chosen_scores.pt`` keeps).

Estimators are settings, not forks (:func:`evaluation.plan.parse_method`:
``<trak|dual|ekfac|kfac>[_1ckpt][_square|_stepwise][@<features>]``), all scored on the same targets and masks:

* ``trak``: projected gradients of the step output at each checkpoint of the full model (x0_hat_t
  recomputed from the recorded x_t with that checkpoint, as ``AttributionModule`` does), then ONE pass over
  the stores for every candidate ridge: the solves of all the ridges side by side
  (``attribution.scoring.sweep_solves``, each store's relative lambda), the scores streamed once
  (``score_pass``, float32 on the accelerator when there is one) into the predictions ``masks @ scores``
  and into an on-disk column scratch from which the chosen ridge's scores are read. Nothing of size
  lambdas x N x targets x steps is held in memory.
* ``dual``: the same estimator through the N x N Gram matrix (``attribution.dual``), exact on unprojected
  stores (``--settings.projector=identity``); every ridge from one pass over each store.
* ``ekfac`` / ``kfac``: influence with EK-FAC / K-FAC curvature (``attribution.ekfac``) fitted on the
  training examples at each checkpoint; every damping from one pass over the examples, the scores cached
  per checkpoint and damping (a report rerun or an extended grid scores only what is new).
* ``_1ckpt``: the last checkpoint only; ``_square``: D-TRAK's square output on the target side; ``_stepwise``:
  both target sides scored, and per step the one ahead on the held-out targets (:class:`KindChoiceScores`);
  ``@<name>``: the stores of ``plan.extra_features[name]`` (another training-side output, timestep draws,
  projector, no projection). The ``dual`` and ``ekfac`` scores are held in memory (``L x N x B x S``
  float32): they are meant for data sets of the benchmark's size.
* ``pixel``: cosine similarity between x0_hat_t and each training image.
* ``embedding``: the same in the penultimate features of a classifier trained on the dataset.
* ``random``: seeded Gaussian scores.

Training images are streamed from the datamodule (:class:`DatasetImages`, one block at a time) and the
labels read without decoding images (:func:`dataset_labels`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from attribution import (FeatureStore, StepOutput, embedding_cosine_scores, featurize_batch, pixel_cosine_scores,
                         predicted_outputs, random_scores, train_classifier)
from attribution.dual import GramKernel, finalize_gram, gram_scores_sweep, load_gram
from attribution.ekfac import ekfac_damping_sweep, ekfac_gradients
from attribution.masks import mask_hash
from attribution.featurize import read_cost
from attribution.scoring import PRIMAL_MAX_DIM, default_device, score_pass, sweep_solves
from attribution.ema import resolve_denoiser
from attribution.identity import weights_hash
from attribution.integrity import require_finite
from attribution.atomic import atomic_torch_save
from attribution.trajectory import Trajectory, recorded_at
from attribution.featurize import projector_from_meta
from attribution.store import open_feature_stores
from evaluation.plan import BASELINES, LDSPlan, parse_method, settings_hash
from lightning_modules.influence import TrainingRows, factors_file, member_factors, store_train_output
from lightning_modules.loading import load_diffusion_module

log = logging.getLogger(__name__)


def target_inputs(task, model: torch.nn.Module, targets: Sequence[Trajectory], steps: Sequence[int]) -> tuple:
    """``(x0_hat_t (B * S, ...), keys (B * S,), cond or None, t (B * S,))`` of every (target, step) pair with
    ``model``'s own estimate of x0 from the recorded x_t (rows target-major), as ``AttributionModule`` does."""
    x_t = recorded_at(targets, steps, "x_t")
    B, S = x_t.shape[:2]
    x_t = x_t.reshape(B * S, *x_t.shape[2:])
    t = torch.tensor(list(steps)).repeat(B)
    keys = torch.tensor([tr.target_id for tr in targets]).repeat_interleave(S)
    cond = None if targets[0].cond is None else torch.stack([tr.cond for tr in targets]).repeat_interleave(S, 0)
    with torch.no_grad():
        estimate = task.x0_hat(model, x_t, t, cond)
    return estimate, keys, cond, t


def target_gradients(store: FeatureStore, targets: Sequence[Trajectory], steps: Sequence[int], plan: LDSPlan,
                     kind: str) -> torch.Tensor:
    """``(B * S, d)`` projected gradients of the step output at the store's checkpoint (rows target-major)."""
    module = load_diffusion_module(store.meta["checkpoint"]["file"])
    task, model = module.attribution_task(), store_denoiser(module, store, plan.use_ema).eval()
    estimate, keys, cond, t = target_inputs(task, model, targets, steps)
    output = StepOutput(plan.num_draws, plan.draw_seed, kind=kind, share_noise=plan.share_noise)
    with torch.enable_grad():
        return featurize_batch(task, model, output, projector_from_meta(store.meta["projector"], model),
                                    estimate, keys, cond=cond, steps=t, param_names=store.meta.get("param_names"))


def store_denoiser(module, store: FeatureStore, use_ema=None) -> torch.nn.Module:
    """The network of ``module`` that the store was featurized with (``use_ema`` None: the store's recorded
    choice), refused when its weights are not the store's (weights hash)."""
    use = store.meta.get("use_ema") if use_ema is None else use_ema
    model = resolve_denoiser(module, use).model
    found = weights_hash(model, store.meta.get("param_names"))
    expected = store.meta["checkpoint"]["weights_hash"]
    if found != expected:
        raise ValueError(f"Feature store {store.path} was made from other weights than checkpoint "
                         f"{store.meta['checkpoint'].get('file')} gives with use_ema={use}: expected weights hash "
                         f"{expected}, found {found}")
    return model


SOLVE_BUDGET_BYTES = 2 << 30  # float32 solves kept during one pass (M x d x L x targets x steps x 4 bytes)


@dataclass
class MethodScores:
    """One method's scores for the B targets x S steps.

    Attributes:
        predictions: ``(J, B, S)`` float64 datamodel predictions ``masks @ scores`` (TRAK: ``(L, J, B, S)``).
        scores: ``(N, B, S)`` float32 held scores (baselines), or None.
        chunks: TRAK: ``(first target, stop target, ScoreColumns)`` per pass, each holding ``(N, L * Bc * S)``
            on disk (column ``l * Bc * S + b * S + s``).
    """

    predictions: torch.Tensor
    scores: Optional[torch.Tensor] = None
    chunks: list = field(default_factory=list)
    num_lambdas: int = 1
    lambda_scores: Optional[torch.Tensor] = None
    lambdas: Optional[list] = None
    cost: dict = field(default_factory=dict)

    def at(self, chosen_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(N, B, S)`` float32 scores; TRAK: at ridge index ``chosen_index[s]`` per step (the held-out choice)."""
        if self.scores is not None:
            return self.scores
        if self.lambda_scores is not None:
            S = self.lambda_scores.shape[-1]
            return torch.stack([self.lambda_scores[int(chosen_index[s]), :, :, s] for s in range(S)], dim=-1)
        S = self.predictions.shape[-1]
        out = None
        for first, stop, columns in self.chunks:
            width = (stop - first) * S
            for b in range(first, stop):
                for s in range(S):
                    column = columns.column(int(chosen_index[s]) * width + (b - first) * S + s)
                    out = torch.empty(column.shape[0], self.predictions.shape[-2], S) if out is None else out
                    out[:, b, s] = column
        return out

    def close(self) -> None:
        for _, _, columns in self.chunks:
            columns.close()
        self.chunks = []


def trak_scores(stores: Sequence[FeatureStore], grads: Sequence[torch.Tensor], relative_lambdas: Sequence[float],
                B: int, S: int, masks: torch.Tensor, scratch_dir: Optional[Path] = None,
                budget_bytes: int = SOLVE_BUDGET_BYTES) -> MethodScores:
    """Checkpoint-averaged scores of every relative ridge from one pass over the stores (per chunk of targets
    whose solves fit ``budget_bytes``): predictions ``(L, J, B, S)`` and the scores on disk."""
    L, J = len(relative_lambdas), masks.shape[0]
    per_target = sum(s.d for s in stores) * L * S * 4
    chunk = max(1, min(B, budget_bytes // max(per_target, 1)))
    predictions, chunks = [], []
    try:
        for first in range(0, B, chunk):
            stop = min(B, first + chunk)
            rows = slice(first * S, stop * S)
            solved = sweep_solves(stores, [G[rows] for G in grads], relative_lambdas, relative=True, dtype=torch.float32)
            result = score_pass(stores, solved, device=default_device(), columns=True, scratch_dir=scratch_dir,
                                masks=masks, what="TRAK scores")
            chunks.append((first, stop, result.columns))
            predictions.append(result.predictions.reshape(J, L, stop - first, S))
    except BaseException:
        for _, _, columns in chunks:
            columns.close()
        raise
    return MethodScores(torch.cat(predictions, dim=2).permute(1, 0, 2, 3).contiguous(), chunks=chunks, num_lambdas=L,
                        lambdas=list(relative_lambdas))


def swept_scores(scores: torch.Tensor, masks: torch.Tensor, lambdas: Sequence[float], B: int, S: int,
                 cost: Optional[dict] = None) -> MethodScores:
    """Held ``(L, N, B * S)`` scores of a ridge/damping sweep (estimators for data sets of the benchmark's
    size: ``dual``, ``ekfac``), with their predictions ``(L, J, B, S)``."""
    held = scores.reshape(len(lambdas), -1, B, S).to(torch.float32)
    predictions = torch.stack([predicted_outputs(held[i], masks) for i in range(len(lambdas))])
    return MethodScores(predictions, lambda_scores=held, num_lambdas=len(lambdas), lambdas=list(lambdas),
                        cost=dict(cost or {}))


def baseline_scores(scores: torch.Tensor, masks: torch.Tensor, B: int, S: int) -> MethodScores:
    """A baseline's ``(N, B * S)`` scores held (the output), with their predictions."""
    held = scores.reshape(-1, B, S)
    return MethodScores(predicted_outputs(held, masks), scores=held)


def cached_gradients(plan: LDSPlan, stores: Sequence[FeatureStore], targets: Sequence[Trajectory],
                     steps: Sequence[int], kind: str, cache_dir: Path) -> list[torch.Tensor]:
    key = settings_hash({**plan.output_settings(), "kind": kind, "steps": list(steps),
                         "target_ids": [t.target_id for t in targets],
                         "stores": [str(s.path.resolve()) for s in stores]})
    path = cache_dir / f"grads_{kind}_{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    grads = [target_gradients(store, targets, steps, plan, kind) for store in stores]
    atomic_torch_save(grads, path)
    return grads


class DatasetImages:
    """The datamodule's N training images as an image source: ``shape (N, C, H, W)``; ``[start:stop]`` or
    ``[index (k,)]`` -> float ``(k, C, H, W)`` in [-1, 1], decoded on demand (``datamodule.images``), so only
    the block being used is ever in memory as float32."""

    def __init__(self, datamodule) -> None:
        self.datamodule = datamodule
        first = datamodule.images([0])
        self.shape = (int(datamodule.num_examples), *first.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            key = range(*key.indices(self.shape[0]))
        return self.datamodule.images(torch.as_tensor(key).reshape(-1).tolist())


def dataset_images(datamodule) -> DatasetImages:
    """The training images, streamed (see :class:`DatasetImages`)."""
    return DatasetImages(datamodule)


def dataset_labels(datamodule) -> torch.Tensor:
    """The ``(N,)`` int64 labels without decoding any image: ``datamodule.labels`` when it has it (shards read
    their label records), else the labels the full dataset keeps beside its images; decoding every item is the
    last resort, for a datamodule that offers neither."""
    N = datamodule.num_examples
    if callable(getattr(datamodule, "labels", None)):
        return torch.as_tensor(datamodule.labels(range(N)), dtype=torch.int64)
    dataset = datamodule.full_dataset()
    held = getattr(dataset, "labels", None)
    if isinstance(held, (torch.Tensor, np.ndarray)) and len(held) == N:
        return torch.as_tensor(held, dtype=torch.int64).clone()
    return torch.tensor([int(dataset[i]["label"]) for i in range(len(dataset))])


def dataset_arrays(datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """All N training images ``(N, C, H, W)`` in [-1, 1] and labels ``(N,)`` (in memory: prefer
    :func:`dataset_images` and :func:`dataset_labels`, which stream)."""
    return datamodule.images(range(datamodule.num_examples)), dataset_labels(datamodule)


def method_scores(method: str, plan: LDSPlan, stores, targets: Sequence[Trajectory], steps: Sequence[int],
                  images, classifier, cache_dir: Path, masks: torch.Tensor, datamodule=None,
                  lambdas: Optional[Sequence[float]] = None) -> MethodScores:
    """The method's :class:`MethodScores` for ``masks (J, N)``: an estimator (:func:`evaluation.plan.parse_method`)
    with one prediction slice per ridge of ``lambdas`` (default ``plan.relative_lambdas``), a baseline with
    one. ``images``: a tensor or an image source (:func:`dataset_images`); ``datamodule``: the training data
    (EK-FAC/K-FAC; default: the datamodule of ``images``). ``cost`` records the featurize seconds per 1000
    examples of the stores used (when they recorded it) and the seconds spent here."""
    B, S = len(targets), len(steps)
    lambdas = list(plan.relative_lambdas if lambdas is None else lambdas)
    spec = parse_method(method)
    start = time.perf_counter()
    if spec is not None:
        if not plan.known_method(method):
            raise ValueError(f"Expected `plan.extra_features.{spec.features}` for method {method!r}, but the plan "
                             f"has only {sorted(plan.extra_features)}")
        datamodule = datamodule if datamodule is not None else getattr(images, "datamodule", None)
        if spec.kind == "stepwise":  # both target sides scored; the report picks one per step on held-out targets
            return KindChoiceScores.of({kind: method_scores(component_method(method, kind), plan, stores, targets,
                                                            steps, images, classifier, cache_dir, masks,
                                                            datamodule, lambdas) for kind in TARGET_KINDS})
        folders = step_folders(plan, spec, steps)
        if folders is None:
            use = list(stores if spec.features is None else
                       open_feature_stores(plan.extra_features[spec.features], f"plan.extra_features.{spec.features}"))
            result = estimator_scores(method, spec, plan, use, targets, steps, datamodule, masks, cache_dir, lambdas)
        else:   # step-matched stores: each step scored with its own folder's stores
            result = StepwiseScores.join([
                estimator_scores(method, spec, plan, open_feature_stores(
                    folder, f"plan.extra_features.{spec.features} at step {t}"), targets, [t], datamodule, masks,
                    cache_dir, lambdas) for t, folder in folders.items()])
        result.cost["score_seconds"] = time.perf_counter() - start
        return result
    x0 = recorded_at(targets, steps, "x0_hat")
    flat = x0.reshape(B * S, *x0.shape[2:])
    if method == "pixel":
        scores = pixel_cosine_scores(images, flat)
    elif method == "embedding":
        scores = embedding_cosine_scores(classifier.embed, images, flat)
    elif method == "random":
        scores = random_scores(images.shape[0], B * S, seed=plan.split_seed + 12345)
    else:
        raise ValueError(f"Expected a method among {list(BASELINES)} or <trak|dual|ekfac|kfac>[_1ckpt][_square|_stepwise]"
                         f"[@<name>], but got {method!r}")
    result = baseline_scores(scores, masks, B, S)
    result.cost["score_seconds"] = time.perf_counter() - start
    return result


STEP_FIELD = "{step}"


def step_folders(plan: LDSPlan, spec, steps: Sequence[int]) -> Optional[dict[int, str]]:
    """Step-matched stores: when the method's ``plan.extra_features`` folder contains ``{step}`` (e.g.
    ``runs/x/features_band{step}``, each featurized with ``--settings.timestep_range`` around that step), the
    folder of each scored step (``{step}`` replaced by it); None for one folder used at every step."""
    folder = plan.extra_features.get(spec.features) if spec.features is not None else None
    if folder is None or STEP_FIELD not in str(folder):
        return None
    return {int(t): str(folder).replace(STEP_FIELD, str(int(t))) for t in steps}


def estimator_scores(method: str, spec, plan: LDSPlan, use: Sequence[FeatureStore], targets: Sequence[Trajectory],
                     steps: Sequence[int], datamodule, masks: torch.Tensor, cache_dir: Path,
                     lambdas: Sequence[float]) -> MethodScores:
    """An estimator's :class:`MethodScores` on the stores ``use`` (all checkpoints; the last with ``_1ckpt``)."""
    B, S = len(targets), len(steps)
    use = list(use)[-1:] if spec.last_only else list(use)
    if spec.estimator in ("ekfac", "kfac"):
        return ekfac_method_scores(spec, plan, use, targets, steps, datamodule, masks, cache_dir, lambdas)
    grads = cached_gradients(plan, use, targets, steps, spec.kind, cache_dir)
    if spec.estimator == "dual":
        kernels = [gram_kernel(store) for store in use]
        result = swept_scores(gram_scores_sweep(use, grads, lambdas, kernels), masks, lambdas, B, S)
    else:
        wide = [str(st.path) for st in use if st.d > PRIMAL_MAX_DIM]
        if wide:
            raise ValueError(f"Method {method!r}: stores {wide} hold unprojected features (d > "
                             f"{PRIMAL_MAX_DIM}); use the exact estimator dual{method[4:]} on them")
        result = trak_scores(use, grads, lambdas, B, S, masks, cache_dir)
    result.cost.update(featurize_cost(use))   # EK-FAC reads only the stores' checkpoints: its cost is its own
    return result


@dataclass
class StepwiseScores(MethodScores):
    """One method scored step by step (step-matched stores): ``parts[s]`` holds step s's ``MethodScores``."""

    parts: list = field(default_factory=list)

    @classmethod
    def join(cls, parts: Sequence[MethodScores]) -> "StepwiseScores":
        if len({p.num_lambdas for p in parts}) != 1:
            raise ValueError(f"Expected every step scored over the same ridges, but got {[p.lambdas for p in parts]}")
        cost = {"featurize_s_per_1000": sum(p.cost.get("featurize_s_per_1000", math.nan) for p in parts)}
        return cls(torch.cat([p.predictions for p in parts], dim=-1), num_lambdas=parts[0].num_lambdas,
                   lambdas=parts[0].lambdas, cost=cost, parts=list(parts))

    def at(self, chosen_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.cat([p.at(None if chosen_index is None else chosen_index[s:s + 1])
                          for s, p in enumerate(self.parts)], dim=-1)

    def close(self) -> None:
        for part in self.parts:
            part.close()


TARGET_KINDS = ("loss", "square")   # the target sides a ``_stepwise`` method chooses between


def component_method(method: str, kind: str) -> str:
    """The method name with the target side ``kind`` instead of ``_stepwise``: ``kfac_1ckpt_stepwise@even32`` ->
    ``kfac_1ckpt@even32`` (loss) / ``kfac_1ckpt_square@even32`` (square)."""
    return method.replace("_stepwise", "" if kind == "loss" else f"_{kind}", 1)


@dataclass
class KindChoiceScores(MethodScores):
    """A ``_stepwise`` method: the same estimator scored with each target side (``parts[kind]``, over one ridge
    grid), and per step the side chosen on the HELD-OUT targets (:meth:`choose_kinds`, which the report calls
    before it chooses the ridge): the side whose best ridge has the higher held-out mean LDS at that step. Its
    predictions ``(L, J, B, S)`` and scores (:meth:`at`) are then the chosen side's at every step; ``chosen``
    names them. What the score default ``square_from`` applies with a threshold (``AttributionModule``)."""

    parts: dict = field(default_factory=dict)
    chosen: Optional[list] = None

    @classmethod
    def of(cls, parts: dict) -> "KindChoiceScores":
        grids = {kind: list(p.lambdas) for kind, p in parts.items()}
        if len({tuple(g) for g in grids.values()}) != 1:
            raise ValueError(f"Expected every target side scored over the same ridges, but got {grids}")
        first = next(iter(parts.values()))
        cost = {"featurize_s_per_1000": sum(p.cost.get("featurize_s_per_1000", math.nan) for p in parts.values()),
                "score_seconds": sum(p.cost.get("score_seconds", 0.0) for p in parts.values())}
        return cls(first.predictions, num_lambdas=first.num_lambdas, lambdas=list(first.lambdas), cost=cost,
                   parts=dict(parts))

    def choose_kinds(self, heldout_mean) -> list:
        """Per step, the target side whose best ridge has the highest held-out mean LDS; ``heldout_mean``
        maps a part's predictions ``(L, J, B, S)`` to its ``(L, S)`` held-out mean LDS (no report target)."""
        kinds = list(self.parts)
        best = torch.stack([torch.nan_to_num(heldout_mean(self.parts[k].predictions), nan=-math.inf).max(0).values
                            for k in kinds])                       # (kinds, S)
        self.chosen = [kinds[int(i)] for i in best.argmax(0)]
        self.predictions = torch.stack([self.parts[k].predictions[..., s] for s, k in enumerate(self.chosen)], dim=-1)
        return self.chosen

    def at(self, chosen_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.chosen is None:
            raise ValueError("Expected the target side chosen per step (choose_kinds) before the scores are read")
        held = {k: self.parts[k].at(chosen_index) for k in set(self.chosen)}
        return torch.stack([held[k][..., s] for s, k in enumerate(self.chosen)], dim=-1)

    def close(self) -> None:
        for part in self.parts.values():
            part.close()


def featurize_cost(stores: Sequence[FeatureStore]) -> dict:
    """``featurize_s_per_1000``: the featurize seconds per 1000 training examples summed over ``stores`` (what
    each store's ``cost.json`` recorded; NaN when one did not record it)."""
    total = 0.0
    for store in stores:
        record = read_cost(store)
        if record is None or not record.get("rows"):
            return {"featurize_s_per_1000": math.nan}
        total += 1000.0 * record["seconds"] / record["rows"]
    return {"featurize_s_per_1000": total}


def gram_kernel(store: FeatureStore) -> GramKernel:
    """The store's N x N Gram kernel over all rows (the full model's members): saved beside it, else made now."""
    try:
        return load_gram(store)
    except FileNotFoundError:
        return finalize_gram(store)


def ekfac_method_scores(spec, plan: LDSPlan, stores: Sequence[FeatureStore], targets: Sequence[Trajectory],
                        steps: Sequence[int], datamodule, masks: torch.Tensor, cache_dir: Path,
                        dampings: Sequence[float]) -> MethodScores:
    """EK-FAC / K-FAC influence (:mod:`attribution.ekfac`) at each store's checkpoint, averaged over the
    checkpoints, for every damping of ``dampings`` (relative to each layer's mean eigenvalue): the factors
    are fitted on all N training examples with the store's training-side output (cached per checkpoint),
    then one pass over the examples scores every (target, step) pair and damping not yet in the checkpoint's
    score cache (:func:`ekfac_store_scores`)."""
    if datamodule is None:
        raise ValueError(f"Method {spec.estimator}: expected the training datamodule (the EK-FAC factors are "
                         "fitted on the training examples), but got None")
    B, S = len(targets), len(steps)
    total, seconds, N = None, 0.0, int(datamodule.num_examples)
    for store in stores:
        swept, spent = ekfac_store_scores(spec, plan, store, targets, steps, datamodule, cache_dir, dampings)
        seconds += spent
        total = swept if total is None else total + swept
    cost = {"featurize_s_per_1000": 1000.0 * seconds / N}   # fit + scoring pass: its whole gradient cost
    return swept_scores(total / len(stores), masks, dampings, B, S, cost)


def ekfac_store_scores(spec, plan: LDSPlan, store: FeatureStore, targets: Sequence[Trajectory],
                       steps: Sequence[int], datamodule, cache_dir: Path,
                       dampings: Sequence[float]) -> tuple[torch.Tensor, float]:
    """``(L, N, B * S)`` EK-FAC / K-FAC scores of one store's checkpoint for ``dampings``, and the seconds
    one pass over them cost (fit + scoring, as measured when they were computed).

    Cached per checkpoint and damping in ``<cache_dir>/<estimator>_scores_<key>.pt``: the key hashes the
    factors' key (weights, training-side function, data, members, Fisher, seed), the target side (targets,
    steps, draws, kind) and the batch size, so methods that share a checkpoint (``kfac_1ckpt``, ``kfac``, an
    ensemble's seed-0 member) score it once, a report rerun (another split, ``lambda_per_step``, more ground
    truth seeds) scores nothing, and an extended grid scores only its new dampings."""
    N = int(datamodule.num_examples)
    # the cache of `score --model.estimator=...` (lightning_modules.influence), over all N rows
    path = factors_file(cache_dir, store, spec.estimator, plan.ekfac_fisher, plan.seed, mask_hash(None, N),
                        plan.use_ema)
    key = settings_hash({**plan.output_settings(), "factors": path.name, "kind": spec.kind, "steps": list(steps),
                         "target_ids": [t.target_id for t in targets], "batch_size": plan.ekfac_batch_size,
                         "N": N})
    cache = cache_dir / f"{spec.estimator}_scores_{key}.pt"
    held = torch.load(cache, weights_only=False) if cache.exists() else {"scores": {}, "seconds": {}}
    missing = [float(d) for d in dampings if float(d) not in held["scores"]]
    if missing:
        module = load_diffusion_module(store.meta["checkpoint"]["file"])
        task, model = module.attribution_task(), store_denoiser(module, store, plan.use_ema).eval()
        train_output = store_train_output(store)
        rows = TrainingRows(datamodule, module, plan.ekfac_batch_size)
        start = time.perf_counter()
        factors = member_factors(path, task, model, module, store, datamodule, list(range(N)),
                                 strategy=spec.estimator, fisher=plan.ekfac_fisher, seed=plan.seed,
                                 batch_size=plan.ekfac_batch_size)
        estimate, keys, cond, t = target_inputs(task, model, targets, steps)
        output = StepOutput(plan.num_draws, plan.draw_seed, kind=spec.kind, share_noise=plan.share_noise)
        with torch.enable_grad():
            grads = ekfac_gradients(task, model, output, factors, estimate, keys, cond=cond, steps=t)
            swept = ekfac_damping_sweep(factors, task, model, train_output, rows, grads, missing,
                                        strategy=spec.estimator)
        spent = time.perf_counter() - start
        if swept.shape[1] != N:
            raise ValueError(f"Expected EK-FAC scores for the N = {N} training examples, but got {swept.shape[1]}")
        for i, damping in enumerate(missing):
            held["scores"][damping] = swept[i].to(torch.float32).clone()
            held["seconds"][damping] = spent   # the whole pass: it scores every damping at once
        atomic_torch_save(held, cache)
    scores = torch.stack([held["scores"][float(d)] for d in dampings])
    require_finite(scores, f"{spec.estimator} scores", f"of {store.path} (cache {cache})")
    # the cost of one pass that scores the whole grid, as measured (not the time a cache hit took)
    return scores, max(held["seconds"][float(d)] for d in dampings)


def dataset_classifier(datamodule, plan: LDSPlan, cache_dir: Path):
    """The offline classifier (embedding baseline, FID features, feature formation), cached; trained from the
    streamed images (one minibatch decoded at a time)."""
    path = cache_dir / f"classifier_e{plan.classifier_epochs}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    images, labels = dataset_images(datamodule), dataset_labels(datamodule)
    classifier = train_classifier(images, labels, epochs=plan.classifier_epochs, seed=plan.seed)
    with torch.no_grad():
        hits = sum(int((classifier(images[start:start + 512]).argmax(1) == labels[start:start + 512]).sum())
                   for start in range(0, len(labels), 512))
    log.info("classifier trained: train accuracy %.3f", hits / len(labels))
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(classifier, path)
    return classifier
