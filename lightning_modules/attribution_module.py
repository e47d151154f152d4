"""``AttributionModule``: step-specific TRAK scores for recorded trajectories, as a predict loop.

``predict_step`` takes a batch of (target, step) pairs. For every checkpoint m of the ensemble (the
finalized feature stores in ``features``): x0_hat_t = (x_t - sqrt(1 - abar_t) eps_m(x_t, t)) /
sqrt(abar_t) from the recorded x_t, held fixed; g_m = P_m^T grad f_t(x0_hat_t, theta_m) (Eq. 3, or
D-TRAK's "square"); then tau = 1/M sum_m Phi_m (Phi_m^T Phi_m + lambda_m I)^-1 g_m, an (N,) vector per
pair. ``ScoreWriter`` (added automatically) saves each pair, then per target the (N x steps) scores,
the top-k influencers and the pictures. Pairs already written are skipped: scoring resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, Dataset

from attribution import (FeatureStore, StepOutput, featurize_batch, iter_score_blocks, load_kernel, relative_lambda,
                         x0_hat)
from attribution.trajectory import Trajectory, load_targets
from attribution.featurize import projector_from_meta
from attribution.identity import weights_hash
from attribution.patches import load_patch
from attribution.store import open_feature_stores
from callbacks.score_writer import ScoreWriter, pair_file
from lightning_modules.loading import load_diffusion_module


class PairDataset(Dataset):
    """(target, step) pairs of recorded trajectories; items hold the recorded x_t and its step."""

    def __init__(self, trajectories: list[Trajectory], pairs: list[tuple[int, int]]) -> None:
        self.trajectories = {t.target_id: t for t in trajectories}
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        target_id, s = self.pairs[i]
        traj = self.trajectories[target_id]
        item = {"target": target_id, "step_index": s, "t": int(traj.timesteps[s]), "x_t": traj.x_t[s]}
        if traj.cond is not None:
            item["cond"] = traj.cond
        return item


class AttributionModule(LightningModule):
    """Score recorded targets against finalized feature stores.

    Args:
        features: a finalized feature store folder, or a folder of them (one per checkpoint: the ensemble).
        targets: folder of recorded targets (``cli.py sample``).
        out_dir: where scores and pictures go (default: ``scores/`` beside ``targets``).
        output: target-side function: "loss" (the paper's Eq. 3) or "square" (D-TRAK).
        num_draws: K', noise draws of the step output (20 in the paper).
        draw_seed: seed of those draws (per target and step).
        share_noise: share noise draws with the training side (D-TRAK); match the featurize setting.
        relative_lam: ridge lambda relative to the mean eigenvalue of each checkpoint's kernel Phi^T Phi
            (the absolute ridge of checkpoint m is ``relative_lam * trace(Phi_m^T Phi_m) / d``).
        topk: influencers kept per step and sign.
        steps: only these recorded timesteps (None: every recorded step).
        target_ids: only these targets (None: all).
        patch: restrict f_t to a region: "y0:y1,x0:x1" or a .npy/.pt mask (H,W), or (targets, H, W).
        pair_batch_size: (target, step) pairs per predict batch.
        use_ema: use the EMA weights (must match how the stores were featurized).
    """

    def __init__(self, features: str, targets: str, out_dir: Optional[str] = None, output: str = "loss",
                 num_draws: int = 20, draw_seed: int = 0, share_noise: bool = False, relative_lam: float = 0.1,
                 topk: int = 8, steps: Optional[list[int]] = None, target_ids: Optional[list[int]] = None,
                 patch: Optional[str] = None, pair_batch_size: int = 4, use_ema: bool = True) -> None:
        super().__init__()
        if output not in ("loss", "square"):
            raise ValueError(f"Expected `output` to be 'loss' or 'square', but got {output!r}")
        if relative_lam <= 0:
            raise ValueError(f"Expected `relative_lam` > 0 (a ridge relative to the mean eigenvalue), but got {relative_lam}")
        self.save_hyperparameters()
        self.out_dir = Path(out_dir) if out_dir else Path(targets).parent / "scores"
        self.stores = open_feature_stores(features)
        self.trajectories = load_targets(targets, target_ids)
        self.denoisers = torch.nn.ModuleList()
        self.data: Any = None
        self._loaded = False

    def attach_data(self, datamodule: Any) -> "AttributionModule":
        """The training data the stores were made from: checked now (N, fingerprint), then used for the
        report's pictures. It is not the predict loop's data source: the pairs come from this module, so
        call ``trainer.predict(module.attach_data(dm))`` (``cli.py score`` and ``cli.py predict`` do)."""
        self.check_data(datamodule)
        self.data = datamodule
        return self

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if self._loaded:
            return
        modules = [self._load_checkpoint(store) for store in self.stores]
        self.tasks = [m.attribution_task() for m in modules]
        self.denoisers.extend(m.attribution_denoiser(self.hparams.use_ema) for m in modules)
        self.projectors = [projector_from_meta(s.meta["projector"], d) for s, d in zip(self.stores, self.denoisers)]
        self.kernels = [load_kernel(s) for s in self.stores]
        self.lams = [relative_lambda(k, self.hparams.relative_lam) for k in self.kernels]
        self.masks = load_patch(self.hparams.patch, self.trajectories)
        self._loaded = True

    def _load_checkpoint(self, store: FeatureStore) -> LightningModule:
        meta = store.meta["checkpoint"]
        module = load_diffusion_module(meta["file"])
        found = weights_hash(module.attribution_denoiser(self.hparams.use_ema), store.meta.get("param_names"))
        if found != meta["weights_hash"]:
            raise ValueError(f"Feature store {store.path} was made from other weights than checkpoint "
                             f"{meta['file']} now holds: expected weights hash {meta['weights_hash']}, found {found}")
        return module

    def check_data(self, datamodule: Any) -> None:
        """Refuse a datamodule whose N or fingerprint differ from the stores'."""
        meta = self.stores[0].meta
        if datamodule.num_examples != meta["N"] or datamodule.fingerprint != meta["dataset_fingerprint"]:
            raise ValueError(f"Expected the data the features were made from (N = {meta['N']}, fingerprint "
                             f"{meta['dataset_fingerprint']}), but got N = {datamodule.num_examples}, fingerprint "
                             f"{datamodule.fingerprint}")

    # ----------------------------------------------------------------- data
    def selected_steps(self, traj: Trajectory) -> list[tuple[int, int]]:
        """(step index, timestep) of the target's recorded steps that are scored (``steps``, or all)."""
        wanted = None if self.hparams.steps is None else {int(t) for t in self.hparams.steps}
        return [(s, t) for s, t in enumerate(traj.timesteps.tolist()) if wanted is None or t in wanted]

    def pending_pairs(self) -> list[tuple[int, int]]:
        """(target, step index) pairs not scored yet (scored pairs are files under out_dir/pairs)."""
        return [(traj.target_id, s) for traj in self.trajectories for s, t in self.selected_steps(traj)
                if not pair_file(self.out_dir, traj.target_id, t).exists()]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(PairDataset(self.trajectories, self.pending_pairs()), batch_size=self.hparams.pair_batch_size)

    def configure_callbacks(self):
        return [ScoreWriter()]

    # ----------------------------------------------------------------- scoring
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        with torch.inference_mode(False), torch.enable_grad():
            x_t, t = batch["x_t"].clone(), batch["t"].clone()
            cond = batch["cond"].clone() if "cond" in batch else None
            grads = [self.target_gradients(m, x_t, t, batch["target"].clone(), cond) for m in range(len(self.stores))]
            blocks = iter_score_blocks(self.stores, grads, self.lams)
            scores = torch.cat([b for _, _, b in blocks]).float()
        return {"target": batch["target"].cpu(), "t": t.cpu(), "scores": scores}

    def target_gradients(self, m: int, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                         cond: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, d)`` projected gradients of the step output at checkpoint ``m``."""
        task, model = self.tasks[m], self.denoisers[m].eval()
        with torch.no_grad():
            eps = task.predict_noise(model, x_t, t, cond)
            estimate = x0_hat(x_t, eps, t, task.alphas_cumprod.to(x_t.device))
        out = torch.empty(len(t), self.projectors[m].d, device=x_t.device)
        for rows, mask in self._mask_groups(target):
            output = StepOutput(self.hparams.num_draws, self.hparams.draw_seed, kind=self.hparams.output,
                                mask=None if mask is None else mask.to(x_t.device), share_noise=self.hparams.share_noise)
            out[rows] = featurize_batch(task, model, output, self.projectors[m], estimate[rows], target[rows],
                                             cond=None if cond is None else cond[rows], steps=t[rows],
                                             param_names=self.stores[m].meta.get("param_names"))
        return out

    def _mask_groups(self, target: torch.Tensor):
        """Rows sharing a patch mask: all rows when there is one mask (or none), else per target."""
        if not isinstance(self.masks, dict):
            yield torch.arange(len(target)), self.masks
            return
        for tid in target.unique().tolist():
            yield (target == tid).nonzero().reshape(-1), self.masks[tid]
