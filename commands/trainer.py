"""``AttributionTrainer``: the Lightning Trainer plus the project's CLI subcommands.

LightningCLI looks a subcommand up with ``getattr`` on the trainer class and turns the method's
signature into the subcommand's arguments; ``model`` and ``datamodule`` are passed in by the CLI.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from attribution.errors import CheckpointMismatchError, SettingsError
from attribution.featurize import CheckpointFeaturizer, FeaturizeSettings
from attribution.identity import check_checkpoint, check_identity, data_identity, read_identity
from attribution.images import save_grid
from attribution.integrity import read_checkpoint, require_finite
from attribution.masks import write_random_masks
from attribution.pretrained import is_pretrained_folder
from attribution.protocol import check_protocol, first_inputs
from attribution.sampling import scheduler_from_task
from attribution.store import FeatureStore
from attribution.trajectory import Trajectory, real_image_target, sample_targets, save_targets
from callbacks.exact_resume import ExactResume
from callbacks.run_checks import RunChecks
from callbacks.trak_featurize import TrakFeaturizeCallback
from commands.featurize_runner import FeaturizeRunner, checkpoint_info
from commands.lds import LDS_SUBCOMMANDS, LDSCommands

PROJECT_SUBCOMMANDS: dict[str, set[str]] = {
    "masks": {"model", "datamodule"},
    "featurize": {"model", "datamodule"},
    "sample": {"model", "datamodule"},
    "score": {"model", "datamodule"},
    **LDS_SUBCOMMANDS,
}


class AttributionTrainer(LDSCommands, Trainer):
    """A ``Trainer`` whose extra methods are the subcommands of ``cli.py``.

    ``fit`` adds :class:`callbacks.run_checks.RunChecks` (a non-finite loss fails the run; checkpoints are
    stamped with their weights' checksum), :class:`callbacks.exact_resume.ExactResume` (a resumed fit continues
    exactly), and refuses a ``ckpt_path`` trained on other data.
    """

    def fit(self, model: LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: Optional[LightningDataModule] = None, ckpt_path: Optional[Union[str, Path]] = None,
            weights_only: Optional[bool] = None) -> None:
        """``Trainer.fit``: a ``ckpt_path`` is checked against the data before anything runs."""
        check_resume(ckpt_path, datamodule if datamodule is not None else train_dataloaders)
        for needed in (RunChecks, ExactResume):
            if not any(isinstance(callback, needed) for callback in self.callbacks):
                self.callbacks.append(needed())
        return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)

    def masks(self, model: LightningModule, datamodule: LightningDataModule, out_dir: str = "masks",
              num_masks: int = 32, seed: int = 0, fraction: float = 0.5) -> list[Path]:
        """Write seeded random subset masks for the configured data (each example in with probability `fraction`).

        Args:
            out_dir: folder for mask_000.npy ... and masks.json.
            num_masks: how many masks (J).
            seed: seed of the masks; mask j depends only on (seed, j).
            fraction: probability that an example is in a mask.
        """
        paths = write_random_masks(out_dir, datamodule.num_examples, num_masks, seed=seed, p=fraction)
        rank_zero_info(f"wrote {len(paths)} masks over N={datamodule.num_examples} examples to {out_dir}")
        return paths

    def featurize(self, model: LightningModule, datamodule: LightningDataModule, checkpoints: str,
                  out_dir: Optional[str] = None, settings: Optional[FeaturizeSettings] = None) -> list[Path]:
        """Featurize saved checkpoints (one file or a folder of *.ckpt) over the whole training set, and finalize.

        Args:
            checkpoints: a checkpoint file, a folder whose *.ckpt files are each featurized, or a diffusers
                pipeline folder (``save_pretrained``; with ``--model=lightning_modules.PretrainedDiffusion
                --model.path=<folder>``; the datamodule names its data), or a folder of such folders.
            out_dir: where stores go (default: features/ beside each checkpoints folder, or beside a pipeline
                folder); one store per checkpoint.
            settings: featurize settings; default: those of the TrakFeaturizeCallback in the config, if any.
        """
        check_protocol(model, datamodule)
        checkpoints = find_checkpoints(checkpoints)
        settings = settings or self._callback_settings() or FeaturizeSettings()
        jobs = [(path, Path(out_dir) / path.stem if out_dir else default_store_dir(path)) for path in checkpoints]
        featurizer = CheckpointFeaturizer(settings)
        states = [check_featurize_job(model, datamodule, featurizer, path, store) for path, store in jobs]
        rank_zero_info(f"featurize: {len(jobs)} checkpoints checked; stores: "
                       + ", ".join(f"{store.name} {state}" for (_, store), state in zip(jobs, states)))
        runner = FeaturizeRunner(model, datamodule, jobs, featurizer)
        self.predict(runner, return_predictions=False)
        for result in runner.results:
            rank_zero_info(f"featurized {result['rows']} rows into {result['store']} in {result['seconds']:.1f} s")
        return [store for _, store in jobs]

    def sample(self, model: LightningModule, datamodule: LightningDataModule, checkpoint: str, out_dir: str,
               num_targets: int = 4, seed: int = 0, num_inference_steps: Optional[int] = None,
               num_record_steps: int = 10, record_steps: Optional[list[int]] = None,
               real_indices: Optional[list[int]] = None, prompts: Optional[list[str]] = None) -> Path:
        """Generate targets from a checkpoint and record their trajectories (and real images as targets).

        Any module of the protocol (``attribution/protocol.py``) works: ours sample with their own scheduler and
        guidance (``record_targets``/``real_target``); another one with :func:`attribution.trajectory.sample_targets`,
        a DDPM sampler on exactly its task's schedule and prediction type (unconditional models).

        Args:
            checkpoint: the checkpoint to sample from (checked against the model and data first); a diffusers
                pipeline folder too (with ``--model=lightning_modules.PretrainedDiffusion --model.path=<folder>``).
            out_dir: folder for target_XXXX.pt, targets.json and targets.png.
            num_targets: how many images to generate; target i uses seed `seed + i`.
            seed: seed of the first target.
            num_inference_steps: sampling steps (default: all training timesteps).
            num_record_steps: record this many evenly spaced steps (when `record_steps` is not given).
            record_steps: the timesteps to record (each must be on the sampling schedule).
            real_indices: training images (global indices) to add as targets, noised to the recorded steps.
            prompts: captions for a text-conditional model (cycled over the targets); real images use their own.
        """
        check_sample_request(datamodule, num_targets, num_inference_steps, num_record_steps, record_steps,
                             real_indices)
        check_protocol(model, datamodule)
        loaded = check_checkpoint(Path(checkpoint), model, datamodule)
        model.load_state_dict(loaded["state_dict"])
        model.to(self.strategy.root_device).eval()
        own = callable(getattr(model, "record_targets", None)) and callable(getattr(model, "real_target", None))
        scheduler = getattr(model, "noise_scheduler", None) if own else scheduler_from_task(model.attribution_task())
        steps = record_steps or evenly_spaced_steps(scheduler, num_inference_steps, num_record_steps)
        if prompts:  # cycled over the targets
            prompts = [prompts[i % len(prompts)] for i in range(num_targets)]
        info = {"checkpoint": str(Path(checkpoint).absolute()), "num_inference_steps": num_inference_steps,
                "data": read_identity(loaded) or data_identity(datamodule)}  # a pipeline folder: the data given
        seeds = list(range(seed, seed + num_targets))
        if own:
            targets = model.record_targets(seeds, num_inference_steps, steps, prompts=prompts, info=info) \
                if num_targets else []
            targets += [model.real_target(datamodule, index, steps, seed=seed + num_targets + j,
                                          target_id=num_targets + j, info=info)
                        for j, index in enumerate(real_indices or [])]
        else:
            targets = protocol_targets(model, datamodule, scheduler, seed, num_targets, num_inference_steps, steps,
                                       prompts, real_indices, info, self.strategy.root_device)
        for target in targets:  # before anything is written
            for name in ("x_t", "x0_hat", "final"):
                require_finite(getattr(target, name), f"recorded `{name}`",
                               f"of target {target.target_id} sampled from checkpoint {checkpoint}")
        folder = save_targets(targets, out_dir)
        save_grid(torch.stack([t.pictures()[1] for t in targets]), folder / "targets.png", upscale=4)
        rank_zero_info(f"recorded {len(targets)} targets at steps {list(steps)} in {folder}")
        return folder

    def score(self, model: LightningModule, datamodule: Optional[LightningDataModule] = None) -> None:
        """Score recorded targets (the same as `predict` with an AttributionModule)."""
        self.predict(model, datamodule=datamodule, return_predictions=False)

    def predict(self, model: Optional[LightningModule] = None, dataloaders=None,
                datamodule: Optional[LightningDataModule] = None, *args, **kwargs):
        """``Trainer.predict``; a module that scores (``attach_data``) gets the datamodule as its report data,
        and its own (target, step) pairs stay the loop's data."""
        if datamodule is not None and callable(getattr(model, "attach_data", None)):
            model, datamodule = model.attach_data(datamodule), None
        return super().predict(model, dataloaders, datamodule, *args, **kwargs)

    def _callback_settings(self) -> Optional[FeaturizeSettings]:
        for callback in self.callbacks:
            if isinstance(callback, TrakFeaturizeCallback):
                return callback.settings
        return None


def check_resume(ckpt_path: Optional[Union[str, Path]], datamodule: Any) -> None:
    """Refuse to resume ``fit`` from a checkpoint file trained on other data than ``datamodule``'s.

    Special values of ``ckpt_path`` ("last", "best", ...) are Lightning's and pass through.
    """
    if ckpt_path is None or not Path(str(ckpt_path)).is_file():
        return
    checkpoint = read_checkpoint(ckpt_path, "ckpt_path")
    source = f"`ckpt_path` {ckpt_path}"
    if callable(getattr(datamodule, "check_resume", None)):
        datamodule.check_resume(checkpoint, source)
    elif read_identity(checkpoint) and data_identity(datamodule):  # a datamodule of the protocol: N, fingerprint
        check_identity(checkpoint, datamodule, source)
    elif read_identity(checkpoint):
        raise CheckpointMismatchError(f"Cannot check {source} against the data: it records the data it was trained "
                                      f"on, but the datamodule given now ({type(datamodule).__name__}) carries no "
                                      "data identity (`num_examples`, `fingerprint`)")


def check_featurize_job(model: LightningModule, datamodule: Any, featurizer: CheckpointFeaturizer,
                        path: Path, store_dir: Path) -> str:
    """Every check of one (checkpoint, store) before any row is featurized; returns the store's state.

    The checkpoint: readable, finite weights matching its stamped checksum, trained on this data, fitting
    the model. Its store, when it exists: made with the same metadata (weights, projector, settings), arrays
    of the recorded sizes, and files matching their checksums once finalized.
    """
    checkpoint = check_checkpoint(path, model, datamodule)
    model.load_state_dict(checkpoint["state_dict"])
    meta, _ = featurizer.prepare(model, data_identity(datamodule), checkpoint_info(path, checkpoint))
    return FeatureStore.check_folder(store_dir, meta)


def check_sample_request(datamodule: Any, num_targets: int, num_inference_steps: Optional[int],
                         num_record_steps: int, record_steps: Optional[list[int]],
                         real_indices: Optional[list[int]]) -> None:
    """Refuse a ``sample`` request that cannot produce targets, before the checkpoint is even loaded."""
    if num_targets < 0 or (num_targets == 0 and not real_indices):
        raise SettingsError(f"Expected `num_targets` >= 1 (or `real_indices` given), but got num_targets = "
                            f"{num_targets} and real_indices = {real_indices}: that records no target")
    if num_inference_steps is not None and num_inference_steps < 1:
        raise SettingsError(f"Expected `num_inference_steps` >= 1 or None, but got {num_inference_steps}")
    if record_steps is None and num_record_steps < 1:
        raise SettingsError(f"Expected `num_record_steps` >= 1, but got {num_record_steps}")
    if record_steps is not None and not record_steps:
        raise SettingsError("Expected `record_steps` to list at least one timestep (or None), but got []")
    n = datamodule.num_examples
    bad = [i for i in real_indices or [] if not 0 <= int(i) < n]
    if bad:
        raise SettingsError(f"Expected `real_indices` to be training indices in [0, {n}), but got {bad}")


def evenly_spaced_steps(scheduler, num_inference_steps: Optional[int], count: int) -> list[int]:
    """``count`` timesteps spread evenly over the sampling schedule (first and last included)."""
    import copy

    import numpy as np
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps or scheduler.config.num_train_timesteps)
    timesteps = scheduler.timesteps.tolist()
    positions = np.unique(np.linspace(0, len(timesteps) - 1, min(count, len(timesteps))).round().astype(int))
    return [int(timesteps[p]) for p in positions]


def find_checkpoints(checkpoints: str) -> list[Path]:
    """A checkpoint file; a diffusers pipeline folder; the sorted *.ckpt files of a folder (recursively), else the
    pipeline folders in it (e.g. one per training step); error when there are none."""
    path = Path(checkpoints)
    if path.is_file() or is_pretrained_folder(path):
        return [path]
    found = sorted(p for p in path.rglob("*.ckpt") if not p.stem.startswith("last")) if path.is_dir() else []
    found = found or (sorted(p for p in path.iterdir() if is_pretrained_folder(p)) if path.is_dir() else [])
    if not found:
        raise FileNotFoundError(f"Expected `checkpoints` to be a checkpoint file, a folder holding *.ckpt files or a "
                                f"diffusers pipeline folder (save_pretrained: unet/, scheduler/), but {str(path)!r} "
                                f"{'holds none' if path.is_dir() else 'does not exist'}")
    return found


def default_store_dir(path: Path) -> Path:
    """``<run>/features/<name>`` for ``<run>/checkpoints/<name>.ckpt``; ``<parent>/features/<name>`` for a
    pipeline folder ``<parent>/<name>``."""
    return (path.parent if path.is_dir() else path.parent.parent) / "features" / path.stem


def protocol_targets(model: Any, datamodule: Any, scheduler: Any, seed: int, num_targets: int,
                     num_inference_steps: Optional[int], steps: list[int], prompts: Optional[list[str]],
                     real_indices: Optional[list[int]], info: dict, device: torch.device) -> list[Trajectory]:
    """Targets of a module known only through the protocol (unconditional models): ``num_targets`` samples (seeds
    ``seed``, ``seed + 1``, ...) from its denoiser (the EMA one when kept) with ``scheduler``, then the training
    examples ``real_indices`` as the denoiser sees them (``attribution_inputs``), noised to ``steps``."""
    from attribution.ema import resolve_denoiser

    task, (net, ema) = model.attribution_task(), resolve_denoiser(model, None)
    net = net.to(device).eval()
    x0, _, cond = first_inputs(model, datamodule)
    if cond is not None or prompts:
        raise SettingsError(f"Expected an unconditional model for `cli.py sample` with {type(model).__name__} (it has "
                            "no record_targets), but its attribution_inputs give conditioning; record targets in your "
                            "own loop with attribution.trajectory.sample_targets(predict, scheduler, ..., cond=...)")
    predict = lambda x, t: task.model_output(net, x, t)  # noqa: E731
    info = {**info, "sampler": type(scheduler).__name__, "use_ema": ema}
    seeds = list(range(seed, seed + num_targets))
    targets = sample_targets(predict, scheduler, tuple(x0.shape[1:]), seeds, steps, num_inference_steps, info=info,
                             device=device) if seeds else []
    for j, index in enumerate(real_indices or []):
        image = first_inputs(model, datamodule, int(index))[0][0].to(device)
        targets.append(real_image_target(predict, task, image, steps, seed=seed + num_targets + j,
                                         target_id=num_targets + j, index=int(index), info=info))
    return targets
