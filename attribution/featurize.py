"""Featurize one checkpoint into one feature store: the work shared by the callback and ``cli.py featurize``.

Every example of the *full* training set is featurized (LDS and counterfactuals need every example,
not only the subset the model saw). Under DDP each rank takes a disjoint, contiguous share of the rows
still missing from the store (``FeatureStore.rank_share``) and writes it into its own part of the store,
which rank 0 merges before finalizing (``FeatureStore.part`` / ``merge_parts``: no two ranks write the same
file, see :mod:`attribution.store` for the file-system assumption); every example is featurized exactly
once and a killed run resumes with only the missing rows.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from attribution import (FeatureStore, checkpoint_seed, featurize_batch, finalize, make_output, make_projector,
                         num_parameters)
from attribution.layerwise import LayerwiseProjector
from attribution.sparse_fast import HashedSparseProjector
from attribution.outputs import TIMESTEP_SAMPLING, ModelOutput, check_timestep_range
from attribution.projectors import Projector
from attribution.gradients import parameter_order
from attribution.identity import weights_hash
from attribution.atomic import atomic_write_json
from attribution.errors import CorruptFileError
from attribution.integrity import require_finite
from attribution.protocol import AttributableDiffusion
from attribution.ema import ResolvedDenoiser, check_use_ema, resolve_denoiser

log = logging.getLogger(__name__)


PROJECTORS = ("sparse", "sparse_hash", "layerwise", "gaussian", "rademacher", "identity")


@dataclass
class FeaturizeSettings:
    """How training examples are featurized (recorded in every store's metadata).

    Args:
        proj_dim: d, the projected feature dimension.
        projector: "sparse" (sparse JL), "sparse_hash" (blocked sparse JL with hashed indices),
            "layerwise" (per-layer Kronecker factors from hooks: no per-example gradient is ever formed,
            the fastest on large models), "gaussian" or "rademacher" (dense reference), "identity" (no
            projection: the whole gradient is stored, ``d = p`` whatever ``proj_dim``; for the exact
            estimator of :mod:`attribution.dual` on data sets of the benchmark's size: N x p values per store).
        proj_seed: experiment seed of the projections; checkpoint m uses checkpoint_seed(proj_seed, id_m).
        num_draws: K, (timestep, noise) draws per example averaged in the training loss (default 32, evenly
            spaced: with K-FAC influence in ``score`` the best measured on the digits ground truth, see the
            README; the paper's TRAK used K = 10 uniform draws).
        draw_seed: seed of the draws; draws for example i depend only on (i, draw_seed).
        output: training-side function: "loss" (default: the paper's TRAK, Eq. 3; the best measured on the
            digits ground truth, see the README), or D-TRAK's "square" (with ``cli.py score`` then using
            "square" on the target side too), "l2", "avg" of the network output.
        share_noise: share the noise draws between examples and the target side (D-TRAK).
        param_names: differentiate only these parameters (None: all trainable).
        batch_size: examples per featurize batch.
        chunk_size: examples per vmap call (bounds memory; None: the whole batch).
        dtype: feature storage dtype, "float32" or "float16".
        use_ema: None: the EMA weights when the module keeps them, else the raw weights; True: the EMA
            weights (an error when the module keeps none); False: the raw weights. The store records which
            (``use_ema``: true or false; see :mod:`attribution.ema`).
        timesteps: how the K training timesteps of an example are drawn: "even" (default: D-TRAK's fixed grid),
            "uniform" (the paper) or "stratified" (one per equal stratum of [0, T)).
        normalize_draws: timestep normalization (Diffusion-ReTrac): every (example, draw) gradient scaled to
            unit (projected) norm before the draws are averaged.
        timestep_range: ``[low, high)``: draw the training timesteps from this window only (None: ``[0, T)``);
            step-matched features for targets scored at steps inside it (``cli.py score --steps``).
    """

    proj_dim: int = 2048
    projector: str = "sparse"
    proj_seed: int = 0
    num_draws: int = 32
    draw_seed: int = 0
    output: str = "loss"
    share_noise: bool = False
    param_names: Optional[list[str]] = None
    batch_size: int = 32
    chunk_size: Optional[int] = None
    dtype: str = "float32"
    use_ema: Optional[bool] = None
    timesteps: str = "even"
    normalize_draws: bool = False
    timestep_range: Optional[list[int]] = None

    def __post_init__(self) -> None:
        check_use_ema(self.use_ema)
        check_timestep_range(self.timestep_range)
        for name in ("proj_dim", "num_draws", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {getattr(self, name)}")
        if self.output not in ("loss", "square", "l2", "avg"):
            raise ValueError(f"Expected `output` to be 'loss', 'square', 'l2' or 'avg', but got {self.output!r}")
        if self.timesteps not in TIMESTEP_SAMPLING:
            raise ValueError(f"Expected `timesteps` in {TIMESTEP_SAMPLING}, but got {self.timesteps!r}")
        if self.normalize_draws and self.projector == "layerwise":
            raise ValueError("Expected `normalize_draws` False with the layerwise projector (it forms no per-draw "
                             "gradient), but got True")
        if self.projector not in PROJECTORS:
            raise ValueError(f"Expected `projector` in {PROJECTORS}, but got {self.projector!r}")
        if self.projector == "layerwise" and self.param_names is not None:
            raise ValueError("Expected `param_names` None with the layerwise projector (it covers every Linear, "
                             f"Conv2d and norm layer), but got {self.param_names[:3]}")

    def train_output(self) -> ModelOutput:
        return make_output(f"train_{self.output}", num_draws=self.num_draws, seed=self.draw_seed,
                           share_noise=self.share_noise, timesteps=self.timesteps,
                           timestep_range=self.timestep_range)


def make_settings_projector(kind: str, model: torch.nn.Module, d: int, seed: int,
                            param_names: Optional[list[str]] = None) -> Projector:
    """The projector ``kind`` for ``model``'s (selected) parameters."""
    if kind == "layerwise":
        return LayerwiseProjector(model, d=d, seed=seed)
    p = num_parameters(model, param_names)
    if kind == "sparse_hash":
        return HashedSparseProjector(p, d, seed)
    return make_projector(kind, p, p if kind == "identity" else d, seed)


def projector_from_meta(description: dict, model: Optional[torch.nn.Module] = None) -> Projector:
    """Rebuild the projector recorded in a store's metadata (``Projector.describe()``); the layerwise
    projector also needs the ``model`` whose layers it covers."""
    if description["kind"] == "layerwise":
        if model is None:
            raise ValueError("Expected the `model` to rebuild a layerwise projector, but got None")
        return LayerwiseProjector.from_description(model, description)
    if description["kind"] == "sparse_hash":
        return HashedSparseProjector(description["p"], description["d"], description["seed"], s=description["s"])
    desc = dict(description)
    kind, p, d, seed = desc.pop("kind"), desc.pop("p"), desc.pop("d"), desc.pop("seed")
    extras = {k: v for k, v in desc.items() if k in ("s", "tile_cols", "tile_rows")}
    return make_projector(kind, p, d, seed, **extras)


class CheckpointFeaturizer:
    """Featurize the current weights of a module (one checkpoint) into a :class:`FeatureStore`."""

    def __init__(self, settings: FeaturizeSettings) -> None:
        self.settings = settings

    def rows_loader(self, datamodule: Any) -> Callable[[torch.Tensor], Any]:
        """Global indices (R,) -> the datamodule's deterministic featurize loader over them."""
        return lambda rows: datamodule.featurize_dataloader(rows.tolist(), batch_size=self.settings.batch_size)

    def denoiser(self, module: AttributableDiffusion) -> ResolvedDenoiser:
        """The module's network that the settings' ``use_ema`` selects (its current weights)."""
        return resolve_denoiser(module, self.settings.use_ema)

    def recorded_param_names(self, model: torch.nn.Module) -> Optional[list[str]]:
        """The store's ``param_names``: the setting when given; else None when every parameter of ``model`` is
        differentiated, or the names of those that are (a PEFT/LoRA network: its adapter parameters), so that
        scoring differentiates exactly the same ones whatever ``requires_grad`` the reloaded network has."""
        s = self.settings
        if s.param_names is not None or s.projector == "layerwise":
            return s.param_names
        names = parameter_order(model, None)
        return None if len(names) == len(list(model.parameters())) else names

    def prepare(self, module: AttributableDiffusion, data_identity: dict, checkpoint: dict,
                denoiser: Optional[ResolvedDenoiser] = None) -> tuple[dict, Projector]:
        """Store metadata and projector for ``denoiser`` (default: :meth:`denoiser` of the module)."""
        s = self.settings
        model, used_ema = denoiser or self.denoiser(module)
        check_timestep_range(s.timestep_range, module.attribution_task().num_train_timesteps)  # before any work
        whash = weights_hash(model, s.param_names)
        projector = make_settings_projector(s.projector, model, s.proj_dim,
                                            checkpoint_seed(s.proj_seed, int(whash[:15], 16)), s.param_names)
        meta = {
            "N": int(data_identity["num_examples"]), "d": projector.d, "dtype": s.dtype,
            "dataset_fingerprint": data_identity["dataset_fingerprint"],
            "projector": projector.describe(), "train_output": s.train_output().describe(),
            "task": module.attribution_task().describe(), "param_names": self.recorded_param_names(model),
            "use_ema": used_ema, "normalize_draws": s.normalize_draws,
            "checkpoint": {**checkpoint, "weights_hash": whash},
        }
        return meta, projector

    def run(self, module: AttributableDiffusion, rows_loader: Callable[[torch.Tensor], Any], data_identity: dict,
            store_dir: str | Path, checkpoint: dict, rank: int = 0, world_size: int = 1,
            barrier: Callable[[], None] = lambda: None, device: Optional[torch.device] = None,
            progress: bool = True, denoiser: Optional[ResolvedDenoiser] = None) -> tuple[FeatureStore, dict]:
        """Featurize the rows missing from the store at ``store_dir``; rank 0 finalizes when complete.

        Args:
            denoiser: the network to featurize (e.g. a snapshot of the weights a checkpoint saved); default:
                :meth:`denoiser` of the module, with its current weights.
            rows_loader: global indices (R,) -> an iterable of batches for ``module.attribution_inputs``.
            data_identity: ``num_examples`` and ``dataset_fingerprint`` of the full training set.
            checkpoint: what identifies the checkpoint (file, global_step, ...), stored in the metadata.
        Returns:
            the store and ``{"rows": rows featurized here, "seconds": ...}``.
        """
        denoiser = denoiser or self.denoiser(module)
        meta, projector = self.prepare(module, data_identity, checkpoint, denoiser)
        if rank == 0:  # creates the store, or keeps the rows of a killed multi-rank run (its parts)
            FeatureStore.open(store_dir, meta, create=True).merge_parts()
        barrier()
        store = FeatureStore.open(store_dir, meta, create=False)
        mine = store.rank_share(rank, world_size)  # contiguous, disjoint; all ranks see the same missing rows
        writer = store.part(mine) if world_size > 1 and len(mine) else store  # a rank writes only its own part
        barrier()  # every rank has read the same missing set before anyone writes
        start = time.perf_counter()
        with _eval_mode(module), _eval_mode(denoiser.model), torch.random.fork_rng(devices=[]):
            done = self._featurize_rows(module, denoiser.model, projector, writer, rows_loader(mine), len(mine),
                                        device, progress and rank == 0)
        seconds = time.perf_counter() - start
        if rank == 0 and done:
            record_cost(store, done, seconds)
        barrier()
        merged = store.merge_parts() if rank == 0 else 0
        if rank == 0 and store.is_complete and (done or merged or not store.is_finalized):
            finalize(store)
        barrier()
        return store, {"rows": done, "seconds": seconds}

    def _featurize_rows(self, module, model, projector, store, batches, total, device, progress) -> int:
        s = self.settings
        task, output = module.attribution_task(), s.train_output()
        done = 0
        with tqdm(total=total, unit="row", desc=f"featurize {Path(store.path).name}", disable=not progress) as bar:
            for batch in batches:
                x0, index, cond = module.attribution_inputs(batch)
                x0, index = x0.to(device), index.to(device)
                cond = None if cond is None else cond.to(device)
                with torch.enable_grad():
                    features = featurize_batch(task, model, output, projector, x0, index, cond=cond,
                                               param_names=s.param_names, chunk_size=s.chunk_size,
                                               normalize_draws=s.normalize_draws)
                require_finite(features, "features", f"at checkpoint {_checkpoint_name(store)} (store {store.path})",
                               rows=index.cpu(), row_name="examples")
                store.write(index.cpu(), features)
                done += len(index)
                bar.update(len(index))
        return done


COST_FILE = "cost.json"


def record_cost(store: FeatureStore, rows: int, seconds: float) -> None:
    """Add ``rows`` featurized in ``seconds`` (by one process) to the store's ``cost.json`` (atomic; a resumed
    run adds its own rows), which the LDS report turns into seconds per 1000 examples."""
    previous = read_cost(store) or {"rows": 0, "seconds": 0.0}
    atomic_write_json(Path(store.path) / COST_FILE, {"rows": int(previous["rows"]) + int(rows),
                                                     "seconds": float(previous["seconds"]) + float(seconds),
                                                     "device": str(torch.device("cuda" if torch.cuda.is_available()
                                                                                else "cpu")),
                                                     "threads": torch.get_num_threads()})


def read_cost(store: FeatureStore) -> Optional[dict]:
    """The store's recorded featurize cost ``{"rows", "seconds", ...}``, or None when it recorded none."""
    path = Path(store.path) / COST_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or not {"rows", "seconds"} <= set(record):
        raise CorruptFileError(f"Expected {path} to hold the featurize cost {{rows, seconds}}, but got {record!r}")
    return record


def _checkpoint_name(store: FeatureStore) -> str:
    """The checkpoint a store was made from, for messages: its file, else its global step."""
    info = store.meta.get("checkpoint") or {}
    return str(info.get("file") or f"of global step {info.get('global_step')}")


class _eval_mode:
    """Put a module in eval mode and restore its previous mode afterwards."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)
