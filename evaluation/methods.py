"""Scores of every compared method for the LDS targets and steps: ``(N, B, S)`` (TRAK: ``(L, N, B, S)``).

* TRAK (``trak``, ``trak_1ckpt``, ``trak_square``): projected gradients of the step output at each
  checkpoint of the full model (x0_hat_t recomputed from the recorded x_t with that checkpoint, as
  ``AttributionModule`` does), then one score matrix per candidate ridge from the stores' stored
  eigendecomposition (``iter_score_blocks`` with each store's relative lambda). ``trak_1ckpt`` uses
  only the last store; ``trak_square`` uses D-TRAK's square output on the target side.
* ``trak@<name>``: ``trak`` on the stores of ``plan.extra_features[name]`` (e.g. another projector).
* ``pixel``: cosine similarity between x0_hat_t and each training image.
* ``embedding``: the same in the penultimate features of a classifier trained on the dataset.
* ``random``: seeded Gaussian scores.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from attribution import (FeatureStore, StepOutput, embedding_cosine_scores, featurize_batch, lambda_sweep,
                         pixel_cosine_scores, random_scores, train_classifier)
from attribution.ema import resolve_denoiser
from attribution.identity import weights_hash
from attribution.atomic import atomic_torch_save
from attribution.trajectory import Trajectory, recorded_at
from attribution.featurize import projector_from_meta
from attribution.store import open_feature_stores
from evaluation.plan import TRAK_METHODS, LDSPlan, settings_hash
from lightning_modules.loading import load_diffusion_module

log = logging.getLogger(__name__)


def target_gradients(store: FeatureStore, targets: Sequence[Trajectory], steps: Sequence[int], plan: LDSPlan,
                     kind: str) -> torch.Tensor:
    """``(B * S, d)`` projected gradients of the step output at the store's checkpoint (rows target-major)."""
    module = load_diffusion_module(store.meta["checkpoint"]["file"])
    task, model = module.attribution_task(), store_denoiser(module, store, plan.use_ema).eval()
    x_t = recorded_at(targets, steps, "x_t")
    B, S = x_t.shape[:2]
    x_t = x_t.reshape(B * S, *x_t.shape[2:])
    t = torch.tensor(list(steps)).repeat(B)
    keys = torch.tensor([tr.target_id for tr in targets]).repeat_interleave(S)
    cond = None if targets[0].cond is None else torch.stack([tr.cond for tr in targets]).repeat_interleave(S, 0)
    with torch.no_grad():
        estimate = task.x0_hat(model, x_t, t, cond)
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


def trak_scores(stores: Sequence[FeatureStore], grads: Sequence[torch.Tensor], relative_lambdas: Sequence[float],
                B: int, S: int) -> torch.Tensor:
    """``(L, N, B, S)`` checkpoint-averaged scores, one slice per relative ridge."""
    sweep = lambda_sweep(stores, grads, relative_lambdas, relative=True, dtype=torch.float32)
    return sweep.reshape(len(relative_lambdas), -1, B, S)


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


def dataset_arrays(datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """All N training images ``(N, C, H, W)`` in [-1, 1] and labels ``(N,)``."""
    images = datamodule.images(range(datamodule.num_examples))
    dataset = datamodule.full_dataset()
    labels = torch.tensor([int(dataset[i]["label"]) for i in range(len(dataset))])
    return images, labels


def method_scores(method: str, plan: LDSPlan, stores, targets: Sequence[Trajectory], steps: Sequence[int],
                  images: torch.Tensor, classifier, cache_dir: Path) -> torch.Tensor:
    """``(L, N, B, S)`` for a TRAK method (L = len(plan.relative_lambdas)), ``(N, B, S)`` for a baseline."""
    B, S = len(targets), len(steps)
    if method.startswith("trak@"):
        name = method.split("@", 1)[1]
        extra = open_feature_stores(plan.extra_features[name], f"plan.extra_features.{name}")
        return trak_scores(extra, cached_gradients(plan, extra, targets, steps, "loss", cache_dir), plan.relative_lambdas, B, S)
    if method in TRAK_METHODS:
        kind, last = TRAK_METHODS[method]
        use = list(stores[-last:]) if last else list(stores)
        grads = cached_gradients(plan, stores, targets, steps, kind, cache_dir)
        grads = grads[-last:] if last else grads
        return trak_scores(use, grads, plan.relative_lambdas, B, S)
    x0 = recorded_at(targets, steps, "x0_hat")
    flat = x0.reshape(B * S, *x0.shape[2:])
    if method == "pixel":
        scores = pixel_cosine_scores(images, flat)
    elif method == "embedding":
        scores = embedding_cosine_scores(classifier.embed, images, flat)
    elif method == "random":
        scores = random_scores(images.shape[0], B * S, seed=plan.split_seed + 12345)
    else:
        raise ValueError(f"Expected a method among {list(TRAK_METHODS) + ['pixel', 'embedding', 'random']}, "
                         f"but got {method!r}")
    return scores.reshape(-1, B, S)


def dataset_classifier(datamodule, plan: LDSPlan, cache_dir: Path):
    """The offline classifier (embedding baseline, FID features, feature formation), cached."""
    path = cache_dir / f"classifier_e{plan.classifier_epochs}.pt"
    images, labels = dataset_arrays(datamodule)
    if path.exists():
        return torch.load(path, weights_only=False)
    classifier = train_classifier(images, labels, epochs=plan.classifier_epochs, seed=plan.seed)
    with torch.no_grad():
        accuracy = float((classifier(images).argmax(1) == labels).float().mean())
    log.info("classifier trained: train accuracy %.3f", accuracy)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(classifier, path)
    return classifier
