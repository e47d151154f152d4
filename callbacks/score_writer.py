"""``ScoreWriter``: saves the AttributionModule's predictions, then per target the scores and pictures.

Each (target, step) pair is written atomically to ``<out_dir>/pairs/`` as soon as its batch (one pass over
the stores, whose scores wait column by column in an unlinked scratch file) ends, so a killed run resumes
with the pairs still missing, and DDP ranks never write the same file. A pair
file holds its scores, their checksum and the *key* of what made them (the module's ``pair_keys``: the
features, the target's x_t, the output function, draws, lambda, patch, ...); a rerun reuses a pair only
when its key matches and its checksum holds, so scores of other inputs are never passed off as these.

Assembly (per target ``<out_dir>/target_XXXX.pt``: scores (N x steps, float32, every row), timesteps, top-k
positive and negative influencers per step chosen among the module's ``rank`` rows (the members by default),
the member mask and the member fraction of each top-k, the key and a checksum; the Figure-1-like picture, PNG +
TensorBoard; the index page) runs on rank 0 after the predict loop, and also when the loop had nothing
to compute (Lightning then skips it, and only ``teardown`` runs): whatever is missing or stale is rebuilt,
so a run killed during assembly is completed by the next one. ``member_fraction.json`` / ``.csv`` give, per
target and step, the fraction of the top-k that are training members (1 by construction with ``rank``
"members"; with "all" a sanity figure against the base rate, the members' share of N), and their mean.
"""
from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from attribution.atomic import atomic_torch_save, atomic_write_json, atomic_write_text
from attribution.errors import CorruptFileError
from attribution.integrity import require_finite, tensor_checksum
from callbacks.report import influencer_figure, write_index

PAIR_FORMAT = 2
TARGET_FORMAT = 2  # 2: top-k among the `rank` rows, the member mask and the member fractions
RANK_LABELS = {
    "members": "top-k among the training members (positive: including it lowered f_t)",
    "all": "top-k among all N rows, members and non-members (a non-member's score is the predicted effect of "
           "adding it, without the damping 1/(1 + leverage) of an exact add: non-members are favoured)",
    "nonmembers": "top-k among the non-members: the predicted effect of ADDING each (positive: adding it would "
                  "lower f_t)",
}


def pair_file(out_dir: Path, target_id: int, t: int) -> Path:
    """The file of one scored (target, timestep) pair: ``<out_dir>/pairs/target_XXXX_tYYYY.pt``."""
    return Path(out_dir) / "pairs" / f"target_{int(target_id):04d}_t{int(t):04d}.pt"


def target_file(out_dir: Path, target_id: int) -> Path:
    """The assembled scores of one target: ``<out_dir>/target_XXXX.pt``."""
    return Path(out_dir) / f"target_{int(target_id):04d}.pt"


def save_pair(path: Path, scores: torch.Tensor, key: str) -> None:
    """Write one pair's ``scores (N,)`` with the key of what made them and their checksum."""
    scores = scores.detach().cpu().float().contiguous()
    atomic_torch_save({"format": PAIR_FORMAT, "key": key, "scores": scores, "checksum": tensor_checksum(scores)}, path)


def _load(path: Path) -> Optional[dict]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - an unreadable file is treated as corrupt by the callers
        return None


def pair_status(path: Path, key: str) -> str:
    """``"ok"`` (reusable), ``"missing"``, ``"stale"`` (made with other inputs) or ``"corrupt"``."""
    if not path.exists():
        return "missing"
    saved = _load(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("scores"), torch.Tensor):
        return "corrupt" if saved is None else "stale"  # a bare tensor: a pair of an older version
    if tensor_checksum(saved["scores"]) != saved.get("checksum"):
        return "corrupt"
    return "ok" if saved.get("key") == key else "stale"


def load_pair(path: Path, key: str) -> torch.Tensor:
    """The ``(N,)`` scores of a pair file, refused unless its key matches and its checksum holds."""
    status = pair_status(path, key)
    if status != "ok":
        raise CorruptFileError(f"Expected pair file {path} made with the current inputs and intact, but it is "
                               f"{status}; rerun the same `cli.py score` to recompute it")
    return torch.load(path, map_location="cpu", weights_only=False)["scores"]


def load_target_scores(path: str | Path) -> dict:
    """An assembled ``target_XXXX.pt``, refused when it is unreadable or its scores fail their checksum."""
    saved = _load(Path(path))
    if not isinstance(saved, dict) or "scores" not in saved:
        raise CorruptFileError(f"Expected {path} to be a target's score file, but it is unreadable")
    if tensor_checksum(saved["scores"]) != saved.get("checksum"):
        raise CorruptFileError(f"Expected the scores in {path} to match their checksum, but they differ: the file is "
                               "corrupt; delete it and rerun `cli.py score` (it is rebuilt from the pair files)")
    return saved


def target_key(pl_module: LightningModule, traj) -> str:
    """What an assembled target file is made of: the keys of its pairs, in step order, and ``topk``."""
    keys = [pl_module.pair_keys[(traj.target_id, t)] for _, t in pl_module.selected_steps(traj)]
    members = "/".join(mem.hash for mem in pl_module.members)
    return hashlib.sha256(("|".join(keys) + f"|topk={pl_module.hparams.topk}|rank={pl_module.hparams.rank}"
                           f"|members={members}|format={TARGET_FORMAT}").encode()).hexdigest()[:32]


class ScoreWriter(BasePredictionWriter):
    """Write AttributionModule predictions (added by ``AttributionModule.configure_callbacks``)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._finished = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finished = False

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: dict,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        """One pair file per column of ``prediction["scores"]`` (a ``ScoreColumns`` on disk, closed after, or an
        ``(N, pairs)`` tensor), each refused when not finite."""
        scores = prediction["scores"]
        column = scores.column if hasattr(scores, "column") else (lambda j: scores[:, j])
        try:
            for j, (target, t) in enumerate(zip(prediction["target"].tolist(), prediction["t"].tolist())):
                values = column(j)
                require_finite(values, "scores", f"of target {target} at step {t}")
                save_pair(pair_file(pl_module.out_dir, target, t), values, pl_module.pair_keys[(target, t)])
        finally:
            if hasattr(scores, "close"):
                scores.close()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict" and not self._finished:  # no pair was pending: Lightning skipped the loop
            self._finish(trainer, pl_module)

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.assemble(trainer, pl_module)
        trainer.strategy.barrier()
        self._finished = True

    def assemble(self, trainer: Trainer, pl_module: LightningModule) -> list[Path]:
        """Per-target score files, pictures and the index page: rebuilt where missing or stale, else reused."""
        entries, rebuilt = [], 0
        for traj in pl_module.trajectories:
            entry = self._reusable(pl_module, traj)
            if entry is None:
                entry, rebuilt = self._build(trainer, pl_module, traj), rebuilt + 1
            entries.append(entry)
        index = Path(pl_module.out_dir) / "index.html"
        if rebuilt or not index.exists() or not index.with_suffix(".md").exists():
            index = write_index(entries, pl_module.out_dir)
        write_member_fractions(entries, pl_module)
        rank_zero_info(f"scores of {len(entries)} targets in {pl_module.out_dir} ({rebuilt} assembled now, "
                       f"{len(entries) - rebuilt} already complete); open {index}")
        return [e["picture"] for e in entries]

    @staticmethod
    def _picture_path(pl_module: LightningModule, traj) -> Optional[Path]:
        datamodule = pl_module.data
        if datamodule is None or not hasattr(datamodule, "images"):
            return None
        return Path(pl_module.out_dir) / f"target_{traj.target_id:04d}.png"

    def _reusable(self, pl_module: LightningModule, traj) -> Optional[dict]:
        """The entry of a target whose file (and picture) are complete and made of the current pairs, or None."""
        path, picture = target_file(pl_module.out_dir, traj.target_id), self._picture_path(pl_module, traj)
        if not path.exists() or (picture is not None and not picture.exists()):
            return None
        try:
            result = load_target_scores(path)
        except CorruptFileError:
            return None
        if result.get("key") != target_key(pl_module, traj):
            return None
        return {"trajectory": traj, "result": result, "picture": picture}

    def _build(self, trainer: Trainer, pl_module: LightningModule, traj) -> dict:
        result = self._target_result(pl_module, traj)
        atomic_torch_save(result, target_file(pl_module.out_dir, traj.target_id))
        picture = self._picture_path(pl_module, traj)
        if picture is not None:
            influencer_figure(traj, result, pl_module.data.images, picture, k=min(4, len(result["positive_indices"])),
                              logger=trainer.logger)
        return {"trajectory": traj, "result": result, "picture": picture}

    @staticmethod
    def _target_result(pl_module: LightningModule, traj) -> dict:
        steps = [t for _, t in pl_module.selected_steps(traj)]
        scores = torch.stack([load_pair(pair_file(pl_module.out_dir, traj.target_id, t),
                                        pl_module.pair_keys[(traj.target_id, t)]) for t in steps], dim=1)  # (N, S)
        ranked, members = pl_module.ranked_rows, pl_module.member_mask  # ranked: None (every row) or (n,) rows
        pool = scores if ranked is None else scores[ranked]
        k = min(pl_module.hparams.topk, pool.shape[0])
        pos_v, pos_i = pool.topk(k, dim=0)
        neg_v, neg_i = pool.topk(k, dim=0, largest=False)
        if ranked is not None:
            pos_i, neg_i = ranked[pos_i], ranked[neg_i]
        rank = pl_module.hparams.rank
        kinds = getattr(pl_module, "target_kinds", None)
        return {"target_id": traj.target_id, "timesteps": torch.tensor(steps), "scores": scores,
                "target_outputs": kinds(steps) if callable(kinds) else None,   # the target side of each step
                "positive_indices": pos_i, "positive_values": pos_v,
                "negative_indices": neg_i, "negative_values": neg_v,
                "rank": rank, "rank_label": RANK_LABELS[rank], "members": members.clone(),
                "members_hashes": [mem.hash for mem in pl_module.members],
                "member_fraction_positive": members[pos_i].double().mean(0),
                "member_fraction_negative": members[neg_i].double().mean(0),
                "member_base_rate": float(members.double().mean()),
                "settings": dict(pl_module.hparams), "key": target_key(pl_module, traj),
                "checksum": tensor_checksum(scores)}


def write_member_fractions(entries: list[dict], pl_module: LightningModule) -> Path:
    """``<out_dir>/member_fraction.json`` and ``.csv``: per (target, step) the fraction of the top-k positive and
    negative influencers that are training members, their means and the base rate; also said in the log."""
    rows = [{"target": int(e["result"]["target_id"]), "t": int(t), "k": int(e["result"]["positive_indices"].shape[0]),
             "positive": float(e["result"]["member_fraction_positive"][s]),
             "negative": float(e["result"]["member_fraction_negative"][s])}
            for e in entries for s, t in enumerate(e["result"]["timesteps"].tolist())]
    mean = {sign: sum(r[sign] for r in rows) / max(len(rows), 1) for sign in ("positive", "negative")}
    steps = sorted({r["t"] for r in rows}, reverse=True)
    by_step = {str(t): {sign: sum(r[sign] for r in rows if r["t"] == t) / sum(r["t"] == t for r in rows)
                        for sign in ("positive", "negative")} for t in steps}
    rank, base = pl_module.hparams.rank, float(pl_module.member_mask.double().mean())
    out = Path(pl_module.out_dir) / "member_fraction.json"
    atomic_write_json(out, {"rank": rank, "rank_label": RANK_LABELS[rank], "topk": pl_module.hparams.topk,
                            "base_rate": base, "members": int(pl_module.member_mask.sum()),
                            "num_examples": int(pl_module.member_mask.numel()),
                            "members_hashes": [mem.hash for mem in pl_module.members],
                            "mean_positive": mean["positive"], "mean_negative": mean["negative"],
                            "mean_by_step": by_step, "pairs": rows})
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["target", "t", "k", "member_fraction_positive", "member_fraction_negative"])
    writer.writerows([r["target"], r["t"], r["k"], f"{r['positive']:.6g}", f"{r['negative']:.6g}"] for r in rows)
    atomic_write_text(out.with_suffix(".csv"), text.getvalue())
    rank_zero_info(f"score: member fraction of the top-{pl_module.hparams.topk} positive influencers "
                   f"{mean['positive']:.3f} (negative {mean['negative']:.3f}) over {len(rows)} (target, step) pairs, "
                   f"base rate {base:.3f} (rank={rank!r}: {RANK_LABELS[rank]}); per pair in {out}")
    return out
