"""``TrakFeaturizeCallback``: TRAK features for every checkpoint, while training.

Plug it into any Lightning diffusion project whose LightningModule and datamodule implement
``attribution.protocol`` (checked in :meth:`TrakFeaturizeCallback.setup`, before any training step, with one error
naming every missing member; the data's samples are checked to fit the denoiser too). Each time a checkpoint is
saved, the callback snapshots the weights it will featurize (``use_ema``: the EMA copy when kept; with Lightning's ``WeightAveraging``, the averaged copy the
checkpoint holds) as they are saved; right after (before the next optimizer step, or at the end of training)
it featurizes the *whole* training set with exactly those weights (whatever hook updates the EMA after the
save) into ``<out_dir>/<checkpoint name>/`` and finalizes the store, so scoring can start. The store records the
checkpoint's absolute path, and the checkpoint itself is stamped with the data identity (N, fingerprint) when its
module does not stamp one, so ``cli.py featurize``/``sample`` can check it later. Override
:meth:`should_featurize` for another schedule (e.g. every second checkpoint).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from attribution.ema import ResolvedDenoiser, resolve_denoiser
from attribution.featurize import CheckpointFeaturizer, FeaturizeSettings
from attribution.protocol import check_inputs_fit, check_protocol
from attribution.identity import data_identity, read_identity, write_identity


class TrakFeaturizeCallback(Callback):
    """Featurize every saved checkpoint (see ``FeaturizeSettings`` for the arguments).

    Args:
        out_dir: where stores go (default: ``features/`` beside the checkpoints folder).
        proj_dim, projector, proj_seed, num_draws, draw_seed, output, share_noise, param_names,
        batch_size, chunk_size, dtype, use_ema, timesteps, normalize_draws, timestep_range: see
        :class:`attribution.featurize.FeaturizeSettings`.
    """

    def __init__(self, out_dir: Optional[str] = None, proj_dim: int = 2048, projector: str = "sparse",
                 proj_seed: int = 0, num_draws: int = 32, draw_seed: int = 0, output: str = "loss",
                 share_noise: bool = False, param_names: Optional[list[str]] = None, batch_size: int = 32,
                 chunk_size: Optional[int] = None, dtype: str = "float32", use_ema: Optional[bool] = None,
                 timesteps: str = "even", normalize_draws: bool = False,
                 timestep_range: Optional[list[int]] = None) -> None:
        self.out_dir = out_dir
        self.settings = FeaturizeSettings(proj_dim, projector, proj_seed, num_draws, draw_seed, output, share_noise,
                                          param_names, batch_size, chunk_size, dtype, use_ema, timesteps,
                                          normalize_draws, timestep_range)
        self.featurizer = CheckpointFeaturizer(self.settings)
        self._pending: list[dict] = []
        self._resumed: Optional[dict] = None
        self.stores: list[Path] = []

    # ----------------------------------------------------------------- the user's hook
    def should_featurize(self, trainer: Trainer, pl_module: LightningModule, checkpoint_path: Optional[str]) -> bool:
        """Whether to featurize the checkpoint just saved (default: every one)."""
        return True

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # every refusal before the first training step
            check_protocol(pl_module, trainer.datamodule)
            resolve_denoiser(pl_module, self.settings.use_ema)  # use_ema=True without an EMA
            check_inputs_fit(pl_module, trainer.datamodule)  # data (channels, size) against the UNet

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning saves in ModelCheckpoint's on_train_batch_end, before the module's own hook (where EMA weights
        # are commonly updated): the weights are snapshotted now, as they are saved, and featurized later.
        self._pending = [{"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                          "weights": _snapshot(trainer, pl_module, self.settings.use_ema)}]
        if not read_identity(checkpoint):  # a foreign module's checkpoint: the data it was trained on
            write_identity(checkpoint, data_identity(trainer.datamodule))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._flush(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._resumed = {"global_step": int(checkpoint.get("global_step", -1)), "epoch": int(checkpoint.get("epoch", -1))}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_resumed(trainer, pl_module)

    # ----------------------------------------------------------------- helpers
    def _flush(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Featurize the checkpoint saved since the last call, with the weights snapshotted when it was saved."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        path = _last_checkpoint_path(trainer)
        info = {**pending[-1], "file": None if path is None else str(Path(path).absolute())}
        weights = info.pop("weights")
        if not self.should_featurize(trainer, pl_module, path):
            return
        self._featurize(trainer, pl_module, info, path, _restore(weights, self.settings.use_ema))

    def _finish_resumed(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A fit resumed from a checkpoint file first finishes that checkpoint's store (a kill while featurizing
        leaves it partial; the restored weights are the checkpoint's). A finished store costs nothing."""
        resumed, self._resumed, path = self._resumed, None, trainer.ckpt_path
        if resumed is None or not path or not Path(path).is_file() or Path(path).stem.startswith("last"):
            return
        if not self.should_featurize(trainer, pl_module, str(path)):
            return
        info = {**resumed, "file": _recorded_file(self._out_dir(trainer, str(path)) / Path(path).stem, path)}
        self._featurize(trainer, pl_module, info, info["file"])

    def _featurize(self, trainer: Trainer, pl_module: LightningModule, info: dict, path: Optional[str],
                   denoiser: Optional[ResolvedDenoiser] = None) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "featurize_dataloader"):
            raise TypeError("TrakFeaturizeCallback needs a datamodule with `featurize_dataloader(indices)` and the "
                            "data identity (`num_examples`, `fingerprint`); see datamodules.ImageDataModule")
        name = Path(path).stem if path and not Path(path).stem.startswith("last") else f"step{info['global_step']:06d}"
        store_dir = self._out_dir(trainer, path) / name
        loader = self.featurizer.rows_loader(datamodule)
        store, stats = self.featurizer.run(pl_module, loader, data_identity(datamodule), store_dir, info,
                                           rank=trainer.global_rank, world_size=trainer.world_size,
                                           barrier=trainer.strategy.barrier, device=pl_module.device,
                                           progress=trainer.is_global_zero, denoiser=denoiser)
        self.stores.append(store.path)
        self._log(trainer, stats, store)

    def _out_dir(self, trainer: Trainer, path: Optional[str]) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        if path is not None:
            return Path(path).parent.parent / "features"
        return Path(trainer.log_dir or trainer.default_root_dir) / "features"

    def _log(self, trainer: Trainer, stats: dict, store) -> None:
        rate = stats["rows"] / max(stats["seconds"], 1e-9)
        rank_zero_info(f"featurized {stats['rows']} rows into {store.path} in {stats['seconds']:.1f} s "
                       f"({rate:.1f} rows/s on rank 0)")
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"featurize/seconds": stats["seconds"], "featurize/rows": stats["rows"],
                                        "featurize/rows_per_second": rate}, step=trainer.global_step)


def _saved_module(trainer: Trainer, pl_module: LightningModule) -> LightningModule:
    """The module whose weights a checkpoint saves: Lightning's ``WeightAveraging`` saves its averaged copy of the
    whole module as the checkpoint's ``state_dict``; otherwise the module itself."""
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # pragma: no cover - Lightning < 2.5
        return pl_module
    for callback in trainer.callbacks:
        if isinstance(callback, WeightAveraging) and callback._average_model is not None:
            return callback._average_model.module
    return pl_module


def _snapshot(trainer: Trainer, pl_module: LightningModule, use_ema: Optional[bool]) -> dict:
    """The network featurizing will use (``use_ema``), and a CPU copy of its state as saved now."""
    source = _saved_module(trainer, pl_module)
    model, ema = resolve_denoiser(source, use_ema)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {"source": source, "ema": ema, "state": state}


def _restore(weights: dict, use_ema: Optional[bool]) -> ResolvedDenoiser:
    """The network with exactly the snapshotted weights: the live one when it still holds them (nothing changed
    since the save), else a copy of it loaded with the snapshot (e.g. the EMA was updated after the save)."""
    model = resolve_denoiser(weights["source"], use_ema).model
    state = model.state_dict()
    if state.keys() != weights["state"].keys() or not all(torch.equal(state[k].cpu(), v)
                                                           for k, v in weights["state"].items()):
        model = copy.deepcopy(model)
        for p in model.parameters():
            p.grad = None
        model.load_state_dict(weights["state"])
    return ResolvedDenoiser(model, weights["ema"])


def _recorded_file(store_dir: Path, path: str | Path) -> str:
    """How the store of checkpoint ``path`` names it (the same file may be given by another path), else ``path``."""
    meta = store_dir / "meta.json"
    stored = json.loads(meta.read_text()).get("checkpoint", {}).get("file") if meta.is_file() else None
    if stored and Path(stored).is_file() and os.path.samefile(stored, path):
        return stored
    return str(Path(path).absolute())


def _last_checkpoint_path(trainer: Trainer) -> Optional[str]:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "_last_checkpoint_saved", None) or getattr(callback, "last_model_path", None)
    return path or None
