"""``AttributionModule``: step-specific TRAK scores for recorded trajectories, as a predict loop.

For every (target, step) pair and every checkpoint m of the ensemble (the finalized feature stores in
``features``): x0_hat_t from the recorded x_t (``task.x0_hat``, for any prediction type; for epsilon
(x_t - sqrt(1 - abar_t) eps_m(x_t, t)) / sqrt(abar_t)), held fixed; g_m = P_m^T grad f_t(x0_hat_t, theta_m)
(Eq. 3, or D-TRAK's "square"); then tau = 1/M sum_m Phi_m (Phi_m^T Phi_m + lambda_m I)^-1 g_m, an (N,) vector
per pair. ``ScoreWriter`` (added automatically) saves each pair, then per target the (N x steps) scores,
the top-k influencers and the pictures.

One pass per predict batch. A batch is up to ``pairs_per_pass`` pending pairs (under DDP, of this rank's
share: Lightning's predict sampler deals the pairs out without repeats). ``predict_step`` walks the
checkpoints one at a time: it loads checkpoint m (the only denoiser resident; ``tasks``/``denoisers``/
``projectors`` load on demand and drop the previous one), computes the gradients of all the batch's pairs
(vmap batches of ``pair_batch_size``) and their solve ``V_m = (K_m + lambda_m I)^-1 G_m^T`` (d x pairs; the
eigenvectors are loaded for it and dropped: only the eigenvalues stay, for the relative lambda). Then ONE
sequential read of every store serves all the batch's pairs (``attribution.scoring.score_pass``; products in
``precision``, float32 by default, on the module's device: the accelerator when there is one). The scores go
to an unlinked scratch file on disk column by column (never N x pairs in memory), from which the writer saves
one pair file per pair. So a batch's stores are read once, whatever the number of pairs, and resume keeps its
unit: a pair file (with its key and checksum) exists only for a finished pass, and a killed run recomputes
only the pairs without one. Nothing needs a hook at the epoch's end, and DDP ranks never share a pass.

Members (``members``, ``rank``): a model fit on a subset mask was influenced only by its members, so each
checkpoint's kernel is ``K_m = Phi_M^T Phi_M`` over its own training rows (``attribution.members``: by default
the mask its checkpoint records, hash checked; formed once per store before any pair and saved beside it,
``attribution.scoring.member_kernel``; the relative lambda uses its trace). Every row keeps its score
``phi_i^T (K_m + lambda_m I)^-1 g`` (a non-member's: the predicted effect of adding it); the top-k are chosen
among the members by default (``rank``), and the report gives the member fraction of every top-k. A model
trained on all N rows uses the store's own kernel: the same scores as before members existed, bit for bit.

Influence with a Kronecker-factored curvature (``estimator="kfac"`` or ``"ekfac"``, :mod:`attribution.ekfac`)
instead of TRAK's projected kernel: each checkpoint's K-FAC / EK-FAC factors are fitted once on its members, with
its store's training-side function (``lightning_modules.influence``; saved under ``out_dir/influence`` with a
key of everything that changes them), before any pair. A pass then preconditions the batch's (unprojected)
target gradients, ``(C_m + damping)^-1 grad f_t``, and walks the N training examples once through checkpoint
m: ``tau_i = 1/M sum_m g_{m,i}^T (C_m + damping)^-1 grad f_t`` for every row (same sign as TRAK's). The
stores give only the checkpoints and their settings (their projected features are not read); a pass costs one
gradient of every training example per checkpoint and holds ``pairs x p`` floats, so keep ``pairs_per_pass``
large enough to amortize it and small enough for memory.

Everything is checked before the first pair is computed: every store (complete, finalized, sizes and
checksums), the checkpoint each store was made from (readable, finite, its stamped checksum, the store's
weights), the targets (readable, recorded from a model trained on the features' data, the requested
``steps`` and ``target_ids`` recorded), the patch and the settings. Resume checks what it resumes: each
pair has a key (``pair_keys``) made of everything that changes its numbers (the stores' metadata and
checksums, the target's x_t and conditioning, the patch mask, output, num_draws, draw_seed, share_noise,
relative_lam, use_ema); a pair file is reused only when its key matches and its checksum holds, every
other pair is computed, and the run says how many it reused and computed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from attribution import FeatureStore, StepOutput, featurize_batch, relative_lambda
from attribution.ekfac import FISHERS, check_damping, denominators, ekfac_gradients, ekfac_scores
from attribution.ema import resolve_denoiser
from attribution.members import RANKS, Members, check_members_setting, recorded_membership, resolve_members
from attribution.scoring import (KernelEigen, load_member_kernel, load_spectrum, member_kernel, member_kernel_files,
                                 score_pass, solve_targets)
from attribution.errors import CheckpointMismatchError, CorruptFileError, SettingsError, TargetsError
from attribution.integrity import read_checkpoint, require_finite
from attribution.trajectory import Trajectory, load_targets
from attribution.featurize import projector_from_meta
from attribution.identity import KEY as IDENTITY_KEY
from attribution.identity import tensors_hash, weights_hash
from attribution.patches import load_patch
from attribution.store import open_feature_stores
from callbacks.score_writer import ScoreWriter, pair_file, pair_status
from lightning_modules.influence import ESTIMATORS, TrainingRows, factors_file, member_factors, store_train_output
from lightning_modules.loading import load_diffusion_module


INFLUENCE_BUDGET_BYTES = 2 << 30  # preconditioned target gradients held by one K-FAC / EK-FAC training pass


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
        output: target-side function: "loss" (the paper's Eq. 3) or "square" (D-TRAK's squared norm of the
            network output); None (default): the stores' training-side output ("square" for stores featurized
            with ``output: square``, else "loss": the default featurize's Eq. 3).
        square_from: high-noise steps take D-TRAK's square output on the target side: steps
            ``t >= square_from * T`` (T: the model's training timesteps) use "square", the others ``output``.
            A float in (0, 1], None (``output`` at every step) or "auto" (default): 0.6 for the kfac / ekfac
            estimators with a loss target side (on the digits ground truth the loss gradient predicts nothing at
            t = 900 and 700 and the square output does, while the loss is far ahead at t <= 500: the
            ``_stepwise`` held-out choice of the LDS report, README), None for estimator "trak" (the paper's
            TRAK) and when ``output`` is "square" anyway.
        num_draws: K', noise draws of the step output (20 in the paper).
        draw_seed: seed of those draws (per target and step).
        share_noise: share noise draws with the training side (D-TRAK); match the featurize setting.
        relative_lam: ridge lambda relative to the mean eigenvalue of each checkpoint's kernel Phi_M^T Phi_M over
            its members (the absolute ridge of checkpoint m is ``relative_lam * trace(Phi_M^T Phi_M) / d``).
        topk: influencers kept per step and sign.
        steps: only these recorded timesteps (None: every recorded step).
        target_ids: only these targets (None: all).
        patch: restrict f_t to a region: "y0:y1,x0:x1" or a .npy/.pt mask (H,W), or (targets, H, W).
        pair_batch_size: (target, step) pairs per vmap batch of target gradients (bounds the gradient memory).
        use_ema: None: the weights each store was featurized with (its recorded ``use_ema``); True / False: the
            EMA / raw weights (refused when they are not the store's: weights hash).
        pairs_per_pass: pending pairs scored by one pass over the stores (one predict batch); the solves kept
            meanwhile take ``M * d * pairs_per_pass`` floats.
        precision: of the big products, "float32" (on the accelerator when there is one) or "float64" (the
            reference).
        module_class: the LightningModule class of the stores' checkpoints (e.g. ``my_package.MyModule``), for
            checkpoints that record none (ours record ``module_class``; LightningCLI records ``_class_path``).
        members: the training rows of each store's checkpoint, over which its kernel is formed: "auto" (the subset
            mask the checkpoint records, its hash checked; all N rows when it records none), "all" or None (every
            row: the kernel over all N) or a subset mask file (checked against the recorded hash, if any).
        rank: where the top-k are chosen: "members" (among the members only), "all" (every row; a non-member's
            score lacks the damping 1/(1 + phi^T (K_M + lambda I)^-1 phi) of an exact add, so non-members are
            favoured, the more as d nears the number of members) or "nonmembers" (only the rows no checkpoint was
            trained on: the predicted effect of ADDING them). The written score vectors always hold all N rows.
        estimator: "kfac" (default: influence with the K-FAC curvature fitted on each checkpoint's members, see
            above; the best measured on the digits ground truth, README) or "ekfac" (eigenvalue-corrected), both
            needing the training data (``attach_data``), or "trak" (the paper's projected kernel, Eq. 3: the
            feature stores alone).
        damping: kfac/ekfac only: added to each layer's curvature eigenvalues, relative to their mean (the LDS
            plan's held-out choice on digits: 1e-3 with featurize's 32 even draws, 1e-2 with 10 uniform draws).
        fisher: kfac/ekfac only: "empirical" (the training loss's own gradients) or "sampled" (pseudo-targets seeded
            by ``draw_seed``: the GGN), see :func:`attribution.ekfac.fit_ekfac`.
        influence_batch_size: kfac/ekfac only: training examples per forward/backward of the fit and score passes.
    """

    def __init__(self, features: str, targets: str, out_dir: Optional[str] = None, output: Optional[str] = None,
                 num_draws: int = 20, draw_seed: int = 0, share_noise: bool = False, relative_lam: float = 0.1,
                 topk: int = 8, steps: Optional[list[int]] = None, target_ids: Optional[list[int]] = None,
                 patch: Optional[str] = None, pair_batch_size: int = 4, use_ema: Optional[bool] = None,
                 pairs_per_pass: int = 1024, precision: str = "float32", module_class: Optional[str] = None,
                 members: Optional[str] = "auto", rank: str = "members", estimator: str = "kfac",
                 damping: float = 0.001, fisher: str = "empirical", influence_batch_size: int = 64,
                 square_from: Optional[float | str] = "auto") -> None:
        super().__init__()
        check_score_settings(output, num_draws, draw_seed, relative_lam, topk, steps, target_ids, pair_batch_size,
                             pairs_per_pass, precision, members, rank)
        check_influence_settings(estimator, damping, fisher, influence_batch_size)
        check_square_from(square_from)
        self.save_hyperparameters()
        self.out_dir = Path(out_dir) if out_dir else Path(targets).parent / "scores"
        self.stores = open_feature_stores(features)  # every store checked: sizes, complete, checksums
        self.hparams["output"] = output or target_output_for(self.stores)
        self.hparams["square_from"] = resolve_square_from(square_from, estimator, self.hparams["output"])
        if self.hparams.square_from is not None:
            T = (self.stores[0].meta.get("task") or {}).get("num_train_timesteps", "T")
            rank_zero_info(f"score: target side {self.hparams.output!r} at t < {self.hparams.square_from} x {T}, D-TRAK's "
                           f"'square' from there on (square_from={square_from!r}; null: {self.hparams.output!r} everywhere)")
        self.members = [self._store_members(store) for store in self.stores]  # checkpoints read and checked
        self.member_mask, self.ranked_rows = ranking_rows(self.members, rank)
        self.trajectories = read_targets(targets, target_ids)
        check_targets_data(self.trajectories, self.stores)
        check_steps(self.trajectories, steps)
        self.masks = load_patch(self.hparams.patch, self.trajectories)
        self._form_member_kernels()
        self.pair_keys = self._pair_keys()
        self.resume_counts: dict[str, int] = {}
        self.resident = ResidentCheckpoint(self._load_resident)
        self.tasks, self.denoisers, self.projectors = (self.resident.view(i) for i in range(3))
        self.factors: list = []
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
        if self.hparams.estimator != "trak":  # the factors are fitted at on_predict_start, on the pass's device
            if self.data is None:
                raise SettingsError(f"Expected the training data for estimator={self.hparams.estimator!r} (its factors "
                                    "and every score pass walk the training examples), but none is attached: call "
                                    "trainer.predict(module.attach_data(datamodule)) (cli.py score does with "
                                    "--data), or score with estimator='trak' (the stores alone)")
            self._loaded = True
            return
        for m in range(len(self.stores)):  # every checkpoint checked (weights hash) before any pair, one at a time
            self.resident.get(m)
        self.resident.release()  # setup runs before Lightning picks the device: the pass loads them there
        self.kernels = [  # eigenvalues only: the relative lambda (of the members' kernel when it is not all N)
            load_spectrum(s) if mem.all_rows else load_member_kernel(s, mem.hash, folder, eigenvectors=False)
            for s, mem, folder in zip(self.stores, self.members, self.kernel_dirs)]
        self.lams = [relative_lambda(k, self.hparams.relative_lam) for k in self.kernels]
        self._loaded = True

    def on_predict_start(self) -> None:
        if self.hparams.estimator != "trak" and not self.factors:
            self._setup_influence()

    def _setup_influence(self) -> None:
        """Each checkpoint's K-FAC / EK-FAC factors over its members: loaded, or fitted and saved (rank 0 fits, the
        other ranks wait and load), and the damping checked against them, before any pair (on the pass's device)."""
        trainer = getattr(self, "_trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        if rank == 0:  # fits what is missing
            self.factors = self._member_factors(progress=True)
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("influence_factors")
        if rank != 0:  # loads what rank 0 saved
            self.factors = self._member_factors(progress=False)
        self.resident.release()

    def _member_factors(self, progress: bool) -> list:
        """Each store's factors over its members (cached or fitted now), checked against its checkpoint and the
        damping (a damping too small for a definite curvature is refused here, not at a pass)."""
        strategy, out = self.hparams.estimator, []
        for m, (store, mem) in enumerate(zip(self.stores, self.members)):
            path = factors_file(self.out_dir / "influence", store, strategy, self.hparams.fisher, self.hparams.draw_seed,
                                mem.hash, self._use_ema(store))
            task, model, _, module = self.resident.get(m)
            rank_zero_info(f"score: {strategy} factors of checkpoint {store.meta['checkpoint']['file']} over its "
                           f"{len(mem.indices)} members ({'cached' if path.exists() else 'fitting now'})")
            factors = member_factors(path, task, model, module, store, self.data, mem.indices.tolist(),
                                     strategy=strategy, fisher=self.hparams.fisher, seed=self.hparams.draw_seed,
                                     batch_size=self.hparams.influence_batch_size, device=self.device,
                                     progress=progress)
            factors.check(model, task, store_train_output(store))
            denominators(factors, self.hparams.damping, "layer", strategy)
            out.append(factors)
        return out

    def _store_members(self, store: FeatureStore) -> Members:
        """The members of the store's checkpoint (``members``), the checkpoint read and checked on the way."""
        recorded = read_store_checkpoint(store)
        return resolve_members(self.hparams.members, recorded, store.N,
                               f"checkpoint {store.meta['checkpoint']['file']} of `features` store {store.path}")

    def _form_member_kernels(self) -> None:
        """Each store's members' kernel, formed now (before any pair; once: it is saved) unless its members are all
        N rows (the store's own kernel). Saved in the store's folder, or under ``out_dir`` when that is read-only."""
        self.kernel_dirs: list[Optional[Path]] = []
        for store, mem in zip(self.stores, self.members):
            trak = self.hparams.estimator == "trak"  # kfac/ekfac fit their factors over the members instead
            folder = None if mem.all_rows or not trak else member_kernel_dir(store, mem.hash, self.out_dir)
            self.kernel_dirs.append(folder)
            if folder is not None:
                member_kernel(store, mem.indices, mem.hash, folder, eigenvectors=False)
        described = sorted({f"{len(mem.indices)} of {mem.num_examples} rows: {mem.source}" for mem in self.members})
        what = "the kernels' rows" if self.hparams.estimator == "trak" else f"the {self.hparams.estimator} factors' rows"
        rank_zero_info(f"score: members of the {len(self.stores)} stores ({what}): {'; '.join(described)}; "
                       f"top-k ranked among {self.hparams.rank!r}")

    def member_kernel(self, m: int) -> Optional[KernelEigen]:
        """The members' kernel of checkpoint ``m`` (eigenvectors loaded now), or None: the store's own kernel."""
        mem = self.members[m]
        return None if mem.all_rows else load_member_kernel(self.stores[m], mem.hash, self.kernel_dirs[m])

    def _load_resident(self, m: int) -> tuple:
        """(task, denoiser on this module's device, projector, module) of checkpoint ``m``, its weights hash
        checked (the module, whose ``attribution_inputs`` make training batches, on the device too)."""
        store = self.stores[m]
        module = self._load_checkpoint(store)
        if self.hparams.estimator != "trak":
            module = module.to(self.device).eval()
        denoiser = resolve_denoiser(module, self._use_ema(store)).model
        projector = projector_from_meta(store.meta["projector"], denoiser)
        return module.attribution_task(), denoiser.to(self.device).eval(), projector, module

    def _load_checkpoint(self, store: FeatureStore) -> LightningModule:
        meta = store.meta["checkpoint"]
        module = load_diffusion_module(meta["file"], class_path=self.hparams.get("module_class"))
        found = weights_hash(resolve_denoiser(module, self._use_ema(store)).model, store.meta.get("param_names"))
        if found != meta["weights_hash"]:
            raise CheckpointMismatchError(f"Feature store {store.path} was made from other weights than checkpoint "
                             f"{meta['file']} now holds: expected weights hash {meta['weights_hash']}, found {found}")
        return module

    def _use_ema(self, store: FeatureStore) -> Optional[bool]:
        return store.meta.get("use_ema") if self.hparams.use_ema is None else self.hparams.use_ema

    def check_data(self, datamodule: Any) -> None:
        """Refuse a datamodule whose N or fingerprint differ from the stores'."""
        meta = self.stores[0].meta
        if datamodule.num_examples != meta["N"] or datamodule.fingerprint != meta["dataset_fingerprint"]:
            raise CheckpointMismatchError(f"Expected the data the features were made from (N = {meta['N']}, fingerprint "
                             f"{meta['dataset_fingerprint']}), but got N = {datamodule.num_examples}, fingerprint "
                             f"{datamodule.fingerprint}")

    # ----------------------------------------------------------------- data
    def selected_steps(self, traj: Trajectory) -> list[tuple[int, int]]:
        """(step index, timestep) of the target's recorded steps that are scored (``steps``, or all)."""
        wanted = None if self.hparams.steps is None else {int(t) for t in self.hparams.steps}
        return [(s, t) for s, t in enumerate(traj.timesteps.tolist()) if wanted is None or t in wanted]

    def pending_pairs(self) -> list[tuple[int, int]]:
        """(target, step index) pairs to compute: no pair file, or one made with other inputs, or corrupt."""
        return [pair for pair, status in self.pair_states() if status != "ok"]

    def pair_states(self) -> list[tuple[tuple[int, int], str]]:
        """``((target, step index), status)`` of every selected pair; status as :func:`pair_status`."""
        return [((traj.target_id, s), pair_status(pair_file(self.out_dir, traj.target_id, t),
                                                  self.pair_keys[(traj.target_id, t)]))
                for traj in self.trajectories for s, t in self.selected_steps(traj)]

    def predict_dataloader(self) -> DataLoader:
        states = self.pair_states()
        self.resume_counts = {k: sum(status == k for _, status in states) for k in ("ok", "missing", "stale", "corrupt")}
        c = self.resume_counts
        rank_zero_info(f"score: {c['ok']} of {len(states)} pairs reused from {self.out_dir}, {len(states) - c['ok']} "
                       f"to compute ({c['missing']} missing, {c['stale']} made with other inputs, {c['corrupt']} "
                       "corrupt)")
        pending = [pair for pair, status in states if status != "ok"]
        return DataLoader(PairDataset(self.trajectories, pending), batch_size=self.hparams.pairs_per_pass)

    def _pair_keys(self) -> dict[tuple[int, int], str]:
        """{(target id, timestep): key}: a hash of everything that changes the pair's scores."""
        trak = self.hparams.estimator == "trak"  # (TRAK's keys stay those of before: its pair files remain valid)
        all_rows = trak and all(mem.all_rows for mem in self.members)
        members = {} if all_rows else {"members": [m.hash for m in self.members]}
        if not trak:
            members.update({k: self.hparams[k] for k in ("estimator", "damping", "fisher")})
        if self.hparams.square_from is not None:   # (absent otherwise: the pair files of before remain valid)
            members["square_from"] = self.hparams.square_from
        common = json.dumps({"format": 2, "stores": [s.identity() for s in self.stores], **members,
                             "use_ema": [self._use_ema(s) for s in self.stores],
                             **{k: self.hparams[k] for k in ("output", "num_draws", "draw_seed", "share_noise",
                                                             "relative_lam", "precision")}}, sort_keys=True,
                            default=str)
        keys = {}
        for traj in self.trajectories:
            mask = self.masks.get(traj.target_id) if isinstance(self.masks, dict) else self.masks
            for s, t in self.selected_steps(traj):
                tensors = [("x_t", traj.x_t[s])] + ([("cond", traj.cond)] if traj.cond is not None else []) \
                    + ([("mask", mask)] if mask is not None else [])
                inputs = tensors_hash(tensors, prefix=f"{common}|target={traj.target_id}|t={t}|")
                keys[(traj.target_id, t)] = hashlib.sha256(inputs.encode()).hexdigest()[:32]
        return keys

    def configure_callbacks(self):
        return [ScoreWriter()]

    # ----------------------------------------------------------------- scoring
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One pass (see the module docstring): ``{"target", "t", "scores": ScoreColumns (N, pairs) on disk}``."""
        if self.hparams.estimator != "trak":
            return {"target": batch["target"].cpu(), "t": batch["t"].cpu(), "scores": self.influence_pass(batch)}
        solved = [self.solve_checkpoint(m, batch) for m in range(len(self.stores))]
        where = f"of targets {batch['target'].tolist()} at steps {batch['t'].tolist()}"
        result = score_pass(self.stores, solved, device=self.device, precision=self.hparams.precision,
                            columns=True, scratch_dir=self.out_dir / "pairs", what=f"scores {where}")
        return {"target": batch["target"].cpu(), "t": batch["t"].cpu(), "scores": result.columns}

    def solve_checkpoint(self, m: int, batch: dict) -> torch.Tensor:
        """``(d, pairs)`` solve ``(K_m + lambda_m I)^-1 G_m^T`` of the batch's target gradients at checkpoint ``m``
        (vmap batches of ``pair_batch_size``), in the compute precision."""
        file = self.stores[m].meta["checkpoint"].get("file")
        grads = []
        with torch.inference_mode(False), torch.enable_grad():
            for rows in torch.arange(len(batch["t"])).split(self.hparams.pair_batch_size):
                x_t, t, target = batch["x_t"][rows].clone(), batch["t"][rows].clone(), batch["target"][rows].clone()
                cond = batch["cond"][rows].clone() if "cond" in batch else None
                g = self.target_gradients(m, x_t, t, target, cond).detach()
                require_finite(g, "target gradients", f"at checkpoint {file} for targets {target.tolist()} at steps "
                               f"{t.tolist()}")
                grads.append(g)
        dtype = torch.float64 if self.hparams.precision == "float64" else torch.float32
        return solve_targets(self.stores[m], torch.cat(grads), self.lams[m], kernel=self.member_kernel(m)).to(dtype)

    def influence_pass(self, batch: dict) -> torch.Tensor:
        """``(N, pairs)`` float32 K-FAC / EK-FAC scores of the batch's pairs, averaged over the checkpoints: per
        checkpoint, the pairs' layer gradients (vmap-free hooks, ``pair_batch_size`` at a time), then one pass over
        the N training examples (:func:`attribution.ekfac.ekfac_scores`) in the compute ``precision``. The
        preconditioned gradients of at most ``INFLUENCE_BUDGET_BYTES`` are held at once: a batch whose
        ``pairs x p`` exceeds it takes one training pass per share (said in the log)."""
        dtype = torch.float64 if self.hparams.precision == "float64" else torch.float32
        total = None
        zero = getattr(self, "_trainer", None) is None or self.trainer.is_global_zero
        with torch.inference_mode(False), torch.enable_grad():
            for m, (store, factors) in enumerate(zip(self.stores, self.factors)):
                task, model, _, module = self.resident.get(m)
                share = max(1, INFLUENCE_BUDGET_BYTES // (16 * factors.p))  # float64 preconditioned + a copy
                chunks = torch.arange(len(batch["t"])).split(share)
                if len(chunks) > 1:
                    rank_zero_info(f"score: {len(batch['t'])} pairs x p = {factors.p} exceed the influence memory "
                                   f"budget: {len(chunks)} passes over the training examples of {share} pairs each")
                parts = []
                for rows in chunks:
                    part = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    grads = self.influence_gradients(m, factors, part)
                    train = TrainingRows(self.data, module, self.hparams.influence_batch_size, device=self.device,
                                         progress=f"{self.hparams.estimator} scores {store.path.name}" if zero else None)
                    parts.append(ekfac_scores(factors, task, model, store_train_output(store), train, grads,
                                              self.hparams.damping, strategy=self.hparams.estimator,
                                              dtype=torch.float64))
                scores = torch.cat(parts, dim=1)
                if scores.shape[0] != store.N:
                    raise SettingsError(f"Expected {self.hparams.estimator} scores for the N = {store.N} training "
                                        f"examples of store {store.path}, but the training data gave {scores.shape[0]}")
                total = scores if total is None else total + scores
        return (total / len(self.stores)).to(dtype).float()

    def influence_gradients(self, m: int, factors, batch: dict) -> dict:
        """``{layer: (pairs, out, in')}`` unprojected gradients of the step output at checkpoint ``m``."""
        task, model = self.tasks[m], self.denoisers[m].eval()
        file = self.stores[m].meta["checkpoint"].get("file")
        parts: dict = {}
        for rows in torch.arange(len(batch["t"])).split(self.hparams.pair_batch_size):
            x_t, t = batch["x_t"][rows].clone().to(self.device), batch["t"][rows].clone().to(self.device)
            target = batch["target"][rows].clone()
            cond = batch["cond"][rows].clone().to(self.device) if "cond" in batch else None
            with torch.no_grad():
                estimate = task.x0_hat(model, x_t, t, cond)
            block: dict = {}
            for group, mask, kind in self._output_groups(m, target, t):
                output = StepOutput(self.hparams.num_draws, self.hparams.draw_seed, kind=kind,
                                    mask=None if mask is None else mask.to(x_t.device),
                                    share_noise=self.hparams.share_noise)
                grads = ekfac_gradients(task, model, output, factors, estimate[group], target[group].to(self.device),
                                        cond=None if cond is None else cond[group], steps=t[group])
                for name, g in grads.items():
                    if name not in block:
                        block[name] = g.new_zeros((len(rows),) + tuple(g.shape[1:]))
                    block[name][group.to(g.device)] = g
            for name, g in block.items():
                require_finite(g, "target gradients", f"of layer {name!r} at checkpoint {file} for targets "
                               f"{target.tolist()} at steps {t.tolist()}")
                parts.setdefault(name, []).append(g)
        return {name: torch.cat(p) for name, p in parts.items()}

    def target_gradients(self, m: int, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                         cond: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, d)`` projected gradients of the step output at checkpoint ``m``."""
        task, model = self.tasks[m], self.denoisers[m].eval()
        with torch.no_grad():
            estimate = task.x0_hat(model, x_t, t, cond)
        out = torch.empty(len(t), self.projectors[m].d, device=x_t.device)
        for rows, mask, kind in self._output_groups(m, target, t):
            output = StepOutput(self.hparams.num_draws, self.hparams.draw_seed, kind=kind,
                                mask=None if mask is None else mask.to(x_t.device), share_noise=self.hparams.share_noise)
            out[rows] = featurize_batch(task, model, output, self.projectors[m], estimate[rows], target[rows],
                                             cond=None if cond is None else cond[rows], steps=t[rows],
                                             param_names=self.stores[m].meta.get("param_names"))
        return out

    def target_kind(self, t: int, num_train_timesteps: int) -> str:
        """The target-side output at step ``t``: "square" from ``square_from * T`` on, else ``output``."""
        threshold = self.hparams.square_from
        return "square" if threshold is not None and t >= threshold * num_train_timesteps else self.hparams.output

    def target_kinds(self, steps, num_train_timesteps: Optional[int] = None) -> list[str]:
        """The target-side output of each of ``steps`` (:meth:`target_kind`; written beside each target's scores),
        with T = ``num_train_timesteps``, by default the T the stores record."""
        T = num_train_timesteps or (self.stores[0].meta.get("task") or {}).get("num_train_timesteps")
        if T is None:
            T = self.tasks[0].num_train_timesteps
        return [self.target_kind(int(t), int(T)) for t in steps]

    def _output_groups(self, m: int, target: torch.Tensor, t: torch.Tensor):
        """Rows sharing a patch mask and a target-side output (:meth:`target_kinds` at checkpoint ``m``'s T):
        ``(rows, mask, kind)``."""
        kinds = self.target_kinds(t.tolist(), self.tasks[m].num_train_timesteps)
        for rows, mask in self._mask_groups(target):
            for kind in dict.fromkeys(kinds[int(r)] for r in rows.tolist()):
                yield rows[torch.tensor([kinds[int(r)] == kind for r in rows.tolist()])], mask, kind

    def _mask_groups(self, target: torch.Tensor):
        """Rows sharing a patch mask: all rows when there is one mask (or none), else per target."""
        if not isinstance(self.masks, dict):
            yield torch.arange(len(target)), self.masks
            return
        for tid in target.unique().tolist():
            yield (target == tid).nonzero().reshape(-1), self.masks[tid]


class ResidentCheckpoint:
    """The ``(task, denoiser, projector, module)`` of ONE checkpoint at a time: asking for another checkpoint drops the
    current one, then loads the other (``load(m)``). ``view(i)`` indexes like a list: ``view(1)[m]`` is the
    denoiser of checkpoint ``m``."""

    def __init__(self, load) -> None:
        self._load, self._index, self._items = load, None, None

    def get(self, m: int) -> tuple:
        if m != self._index:
            self.release()  # free the resident checkpoint before loading the next
            self._items, self._index = self._load(m), m
        return self._items

    def release(self) -> None:
        """Drop the resident checkpoint."""
        self._index, self._items = None, None

    def view(self, i: int) -> "_ResidentView":
        return _ResidentView(self, i)


class _ResidentView:
    def __init__(self, resident: ResidentCheckpoint, i: int) -> None:
        self._resident, self._i = resident, i

    def __getitem__(self, m: int):
        return self._resident.get(m)[self._i]


def target_output_for(stores) -> str:
    """The target-side output that pairs with the stores' training side: "square" when every store was featurized
    with D-TRAK's square output (both sides square), else "loss" (Eq. 3)."""
    kinds = {(store.meta.get("train_output") or {}).get("kind", "loss") for store in stores}
    return "square" if kinds == {"square"} else "loss"


SQUARE_FROM_AUTO = 0.6   # "auto" for the kfac / ekfac estimators (the digits held-out choice, README)


def check_square_from(value) -> None:
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise SettingsError(f"Expected `square_from` to be a fraction of T in (0, 1], None or 'auto', but got "
                            f"{value!r}")


def resolve_square_from(value, estimator: str, output: str) -> Optional[float]:
    """``square_from`` as a fraction of T, or None: "auto" is :data:`SQUARE_FROM_AUTO` for the kfac / ekfac
    estimators with the loss target side, None for TRAK (the paper's method) and for a square target side."""
    if value == "auto":
        return SQUARE_FROM_AUTO if estimator in ("kfac", "ekfac") and output == "loss" else None
    return None if value is None or output == "square" else float(value)


def check_score_settings(output: str, num_draws: int, draw_seed: int, relative_lam: float, topk: int,
                         steps: Optional[list[int]], target_ids: Optional[list[int]], pair_batch_size: int,
                         pairs_per_pass: int = 1024, precision: str = "float32", members: Optional[str] = "auto",
                         rank: str = "members") -> None:
    """Refuse settings that cannot give useful scores (before any file is read)."""
    check_members_setting(members)
    if rank not in RANKS:
        raise SettingsError(f"Expected `rank` to be one of {', '.join(map(repr, RANKS))}, but got {rank!r}")
    if output not in (None, "loss", "square"):
        raise SettingsError(f"Expected `output` to be 'loss', 'square' or None (the stores' own), but got {output!r}")
    if precision not in ("float32", "float64"):
        raise SettingsError(f"Expected `precision` to be 'float32' or 'float64', but got {precision!r}")
    for name, value in (("num_draws", num_draws), ("topk", topk), ("pair_batch_size", pair_batch_size),
                        ("pairs_per_pass", pairs_per_pass)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingsError(f"Expected `{name}` to be a positive int, but got {value!r}")
    if isinstance(draw_seed, bool) or not isinstance(draw_seed, int) or draw_seed < 0:
        raise SettingsError(f"Expected `draw_seed` to be a non-negative int, but got {draw_seed!r}")
    if not isinstance(relative_lam, (int, float)) or not 0 < relative_lam < float("inf"):
        raise SettingsError(f"Expected `relative_lam` > 0 (a ridge relative to the mean eigenvalue), but got "
                            f"{relative_lam}")
    for name, values in (("steps", steps), ("target_ids", target_ids)):
        if values is not None and not values:
            raise SettingsError(f"Expected `{name}` to list at least one value (or None: all), but got []")
        if values is not None and len(set(values)) != len(values):
            raise SettingsError(f"Expected `{name}` without repeats, but got {values}")


def check_influence_settings(estimator: str, damping: float, fisher: str, influence_batch_size: int) -> None:
    """Refuse an unknown estimator, a damping that is not a finite float >= 0, an unknown Fisher or batch size."""
    if estimator not in ESTIMATORS:
        raise SettingsError(f"Expected `estimator` to be one of {', '.join(map(repr, ESTIMATORS))}, but got "
                            f"{estimator!r}")
    check_damping(damping)
    if fisher not in FISHERS:
        raise SettingsError(f"Expected `fisher` to be one of {', '.join(map(repr, FISHERS))}, but got {fisher!r}")
    if isinstance(influence_batch_size, bool) or not isinstance(influence_batch_size, int) or influence_batch_size < 1:
        raise SettingsError(f"Expected `influence_batch_size` to be a positive int, but got {influence_batch_size!r}")


def ranking_rows(members: list[Members], rank: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(member mask (N,) bool, ranked rows (n,) int64 or None: every row)``. A row is a member when some
    checkpoint was trained on it; ``rank`` "members" ranks those, "nonmembers" the others, "all" every row."""
    mask = torch.stack([mem.mask() for mem in members]).any(dim=0)
    chosen = {"members": mask, "nonmembers": ~mask, "all": torch.ones_like(mask)}[rank]
    if not bool(chosen.any()):
        raise SettingsError(f"Expected `rank`={rank!r} to leave rows to rank, but every one of the {len(mask)} rows is "
                            f"a member ({'; '.join(sorted({mem.source for mem in members}))}): there are no "
                            "non-members; use rank='members' or 'all', or give `members`")
    return mask, None if bool(chosen.all()) else chosen.nonzero().reshape(-1)


def member_kernel_dir(store: FeatureStore, members_hash: str, out_dir: Path) -> Path:
    """Where a store's members' kernel is kept: its own folder (beside ``kernel.json``), unless that folder is
    read-only and holds none; then ``<out_dir>/member_kernels/<store name>-<path hash>``."""
    if os.access(store.path, os.W_OK) or (store.path / member_kernel_files(members_hash)[2]).exists():
        return store.path
    tag = hashlib.sha256(str(store.path.resolve()).encode()).hexdigest()[:8]
    return Path(out_dir) / "member_kernels" / f"{store.path.name}-{tag}"


def read_store_checkpoint(store: FeatureStore) -> dict:
    """The checkpoint a store was made from: present, readable, finite, matching its stamped checksum. Returns what
    it records about its training set (:func:`attribution.members.recorded_membership`)."""
    info = store.meta.get("checkpoint")
    file = info.get("file") if isinstance(info, dict) else None
    if not file:
        raise CorruptFileError(f"Expected feature store {store.path} to record the checkpoint file it was made from, "
                               f"but its meta.json records {info!r}; featurize a saved checkpoint")
    return recorded_membership(read_checkpoint(file, what=f"the checkpoint {file} of `features` store {store.path}"))


def read_targets(folder: str, target_ids: Optional[list[int]]) -> list[Trajectory]:
    """The recorded targets, with one clear error for a missing, unreadable or empty folder or unknown ids."""
    index = Path(folder) / "targets.json"
    if not index.is_file():
        raise FileNotFoundError(f"Expected recorded targets in `targets` folder {str(folder)!r} (a targets.json "
                                f"written by `cli.py sample`), but found none")
    try:
        listed = [int(t["target_id"]) for t in json.loads(index.read_text())["targets"]]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptFileError(f"Expected `targets` index {index} to be a targets.json written by `cli.py sample`, "
                               f"but it is unreadable ({type(err).__name__}: {err})") from None
    if not listed:
        raise TargetsError(f"Expected `targets` folder {folder} to hold at least one target, but {index} lists none")
    unknown = sorted(set(target_ids or []) - set(listed))
    if unknown:
        raise TargetsError(f"Expected `target_ids` among the recorded targets {listed}, but got {unknown}")
    try:
        return load_targets(folder, target_ids)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - a target file that does not load is a corrupt input
        raise CorruptFileError(f"Expected the target files listed in {index} to be readable, but loading them failed "
                               f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None


def check_targets_data(trajectories: list[Trajectory], stores: list[FeatureStore]) -> None:
    """Refuse targets recorded from a model trained on other data than the features (N, fingerprint)."""
    meta, cache = stores[0].meta, {}
    expected = (meta["N"], meta.get("dataset_fingerprint"))
    for traj in trajectories:
        data = _recorded_data(traj, cache)
        if data and (data.get("num_examples"), data.get("dataset_fingerprint")) != expected:
            raise CheckpointMismatchError(
                f"Expected `targets` sampled from a model trained on the features' data (N = {expected[0]}, "
                f"fingerprint {expected[1]}), but target {traj.target_id} comes from checkpoint "
                f"{traj.info.get('checkpoint')} trained on N = {data.get('num_examples')}, fingerprint "
                f"{data.get('dataset_fingerprint')}")
        if traj.source.startswith("real:") and not 0 <= int(traj.source.split(":")[1]) < expected[0]:
            raise TargetsError(f"Expected real targets of training images in [0, {expected[0]}), but target "
                               f"{traj.target_id} is {traj.source}")


def _recorded_data(traj: Trajectory, cache: dict) -> Optional[dict]:
    """The data identity a target records (``info["data"]``), else that of the checkpoint it names, if present."""
    if traj.info.get("data"):
        return traj.info["data"]
    file = traj.info.get("checkpoint")
    if not file or not Path(file).is_file():
        return None
    if file not in cache:
        try:
            cache[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=False).get(IDENTITY_KEY)
        except Exception:  # noqa: BLE001 - an unreadable old checkpoint: nothing recorded to compare
            cache[file] = None
    return cache[file]


def check_steps(trajectories: list[Trajectory], steps: Optional[list[int]]) -> None:
    """Refuse ``steps`` that some target did not record (they would score nothing)."""
    if steps is None:
        return
    for traj in trajectories:
        recorded = traj.timesteps.tolist()
        missing = sorted(set(int(t) for t in steps) - set(recorded))
        if missing:
            raise TargetsError(f"Expected `steps` to be timesteps recorded in every target, but target "
                               f"{traj.target_id} records {recorded}, not {missing}")
