"""K-FAC / EK-FAC influence for :class:`~lightning_modules.AttributionModule` (``estimator="kfac"`` or ``"ekfac"``)
and for the LDS plan's ``kfac`` / ``ekfac`` methods: the glue between a checkpoint, its training data and the
Lightning-free math of :mod:`attribution.ekfac`.

For each feature store (one checkpoint of the ensemble), the factors of the curvature are fitted on the
checkpoint's *members* (the rows it was trained on; all N for a model trained on every row) with the store's
training-side function (its draws, timesteps and noise sharing: :func:`store_train_output`), once, and cached
under a name made of everything that changes them (:func:`factors_file`). A score pass then preconditions the
pass's target gradients and walks the N training examples once, giving every row's
``g_i^T (C + damping)^-1 g_t`` (a non-member's: the predicted effect of adding it), averaged over the stores.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from attribution import make_output
from attribution.ekfac import EKFACFactors, fit_ekfac
from attribution.store import FeatureStore

__all__ = ["ESTIMATORS", "TrainingRows", "store_train_output", "factors_file", "member_factors"]

ESTIMATORS = ("trak", "kfac", "ekfac")


class TrainingRows:
    """Re-iterable ``(x0, keys, cond)`` batches of training ``rows`` (default all N) in index order, as the module
    featurizes them (``datamodule.featurize_dataloader`` and ``module.attribution_inputs``), on ``device``; with
    ``progress`` (a description) each pass shows a progress bar over the rows."""

    def __init__(self, datamodule, module, batch_size: int, rows: Optional[Sequence[int]] = None,
                 device=None, progress: Optional[str] = None) -> None:
        self.datamodule, self.module, self.batch_size, self.device = datamodule, module, batch_size, device
        self.rows = list(range(int(datamodule.num_examples))) if rows is None else [int(r) for r in rows]
        self.progress = progress

    def __iter__(self):
        with tqdm(total=len(self.rows), unit="row", desc=self.progress, disable=self.progress is None,
                  leave=False) as bar:
            for batch in self.datamodule.featurize_dataloader(self.rows, batch_size=self.batch_size):
                if self.device is not None:
                    batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                inputs = self.module.attribution_inputs(batch)
                yield inputs
                bar.update(len(inputs[1]))


def store_train_output(store: FeatureStore):
    """The training-side output a store was featurized with (its draws, timesteps, noise sharing)."""
    recorded = store.meta["train_output"]
    return make_output(f"train_{recorded['kind']}", num_draws=recorded["num_draws"], seed=recorded["seed"],
                       share_noise=recorded["share_noise"], timesteps=recorded.get("timesteps", "uniform"),
                       timestep_range=recorded.get("timestep_range"))


def _hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def factors_file(folder: Path, store: FeatureStore, strategy: str, fisher: str, seed: int, members_hash: str,
                 use_ema) -> Path:
    """``<folder>/<strategy>_factors_<key>.pt``: the key hashes the checkpoint's weights, the training-side
    function, the data, the members and the Fisher, so factors of other inputs are never reused."""
    key = _hash({"strategy": strategy, "fisher": fisher, "seed": seed,
                         "weights": store.meta["checkpoint"]["weights_hash"],
                         "train": store_train_output(store).describe(), "data": store.meta.get("dataset_fingerprint"),
                         "members": members_hash, "use_ema": use_ema,
                         "param_names": json.dumps(store.meta.get("param_names"))})
    return Path(folder) / f"{strategy}_factors_{key}.pt"


def member_factors(path: Path, task, model, module, store: FeatureStore, datamodule, members: Sequence[int], *,
                   strategy: str, fisher: str, seed: int, batch_size: int, device=None,
                   progress: bool = False) -> EKFACFactors:
    """The factors at ``path`` if they are there, else fitted on the ``members`` rows and saved (atomically)."""
    if path.exists():
        return EKFACFactors.load(path)
    rows = TrainingRows(datamodule, module, batch_size, rows=members, device=device,
                        progress=f"{strategy} factors {store.path.name}" if progress else None)
    factors = fit_ekfac(task, model, store_train_output(store), rows, fisher=fisher, strategy=strategy, seed=seed,
                        param_names=store.meta.get("param_names"))
    path.parent.mkdir(parents=True, exist_ok=True)
    factors.save(path)
    return factors
