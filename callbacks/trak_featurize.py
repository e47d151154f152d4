"""``TrakFeaturizeCallback``: TRAK features for every checkpoint, while training.

Plug it into any Lightning diffusion project whose LightningModule implements the three methods of
``attribution.protocol``. Each time a checkpoint is saved, the callback notes it; right after (before
the next optimizer step, or at the end of training) it featurizes the *whole* training set with the
checkpoint's weights into ``<out_dir>/<checkpoint name>/`` and finalizes the store, so scoring can
start. Override :meth:`should_featurize` for another schedule (e.g. every second checkpoint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from attribution.featurize import CheckpointFeaturizer, FeaturizeSettings
from attribution.protocol import check_protocol
from attribution.identity import data_identity


class TrakFeaturizeCallback(Callback):
    """Featurize every saved checkpoint (see ``FeaturizeSettings`` for the arguments).

    Args:
        out_dir: where stores go (default: ``features/`` beside the checkpoints folder).
        proj_dim, projector, proj_seed, num_draws, draw_seed, output, share_noise, param_names,
        batch_size, chunk_size, dtype, use_ema: see :class:`attribution.featurize.FeaturizeSettings`.
    """

    def __init__(self, out_dir: Optional[str] = None, proj_dim: int = 2048, projector: str = "sparse",
                 proj_seed: int = 0, num_draws: int = 10, draw_seed: int = 0, output: str = "loss",
                 share_noise: bool = False, param_names: Optional[list[str]] = None, batch_size: int = 32,
                 chunk_size: Optional[int] = None, dtype: str = "float32", use_ema: bool = True) -> None:
        self.out_dir = out_dir
        self.settings = FeaturizeSettings(proj_dim, projector, proj_seed, num_draws, draw_seed, output, share_noise,
                                          param_names, batch_size, chunk_size, dtype, use_ema)
        self.featurizer = CheckpointFeaturizer(self.settings)
        self._pending: list[dict] = []
        self.stores: list[Path] = []

    # ----------------------------------------------------------------- the user's hook
    def should_featurize(self, trainer: Trainer, pl_module: LightningModule, checkpoint_path: Optional[str]) -> bool:
        """Whether to featurize the checkpoint just saved (default: every one)."""
        return True

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_protocol(pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending.append({"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)})

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._flush(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, pl_module)

    # ----------------------------------------------------------------- helpers
    def _flush(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Featurize the checkpoints saved since the last call (weights unchanged since the save)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        path = _last_checkpoint_path(trainer)
        info = {**pending[-1], "file": None if path is None else str(path)}
        if info["global_step"] != trainer.global_step:
            raise RuntimeError(f"TrakFeaturizeCallback: the weights changed since the checkpoint of step "
                               f"{info['global_step']} was saved (now step {trainer.global_step}); not featurizing "
                               "weights that differ from the checkpoint")
        if not self.should_featurize(trainer, pl_module, path):
            return
        self._featurize(trainer, pl_module, info, path)

    def _featurize(self, trainer: Trainer, pl_module: LightningModule, info: dict, path: Optional[str]) -> None:
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
                                           progress=trainer.is_global_zero)
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


def _last_checkpoint_path(trainer: Trainer) -> Optional[str]:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "_last_checkpoint_saved", None) or getattr(callback, "last_model_path", None)
    return path or None
