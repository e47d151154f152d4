"""``LDSPlan``: every setting of the counterfactual evaluation, shared by the four LDS subcommands.

One plan (a YAML file given with ``--plan``, or flags such as ``--plan.num_masks=32``) drives
``lds_train``, ``lds_outputs``, ``lds_report`` and ``counterfactual``, so the subset models, the
actual outputs and the scores always agree on masks, seeds, targets, steps and the output function.

Folder layout under ``out_dir``::

    masks/mask_000.npy ...          the J subset masks (attribution.masks.write_random_masks)
    models/mask_007_seed_1/         one `cli.py fit` run per (mask, seed); done.json marks it finished
    models/mask_007_seed_1.claim    held while a worker trains it (evaluation.sweep: atomic job claims)
    launcher/                       submitit's job files and logs (local workers, SLURM arrays)
    outputs/...                     actual outputs, one cached file per model (lds_outputs)
    report/                         scores per method, LDS tables (CSV/JSON), plots (lds_report)
    counterfactual/                 retrained models, completions, tables and plots (counterfactual)
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

METHODS = ("trak", "trak_1ckpt", "trak_square", "pixel", "embedding", "random")
BASELINES = ("pixel", "embedding", "random")
ESTIMATORS = ("trak", "dual", "ekfac", "kfac")
LAUNCHERS = ("inprocess", "local", "slurm")
TRAK_METHODS = {"trak": ("loss", None), "trak_1ckpt": ("loss", 1), "trak_square": ("square", None)}
_METHOD = re.compile(r"^(trak|dual|ekfac|kfac)(_1ckpt)?(_square|_stepwise)?(?:@([A-Za-z0-9_.-]+))?$")


@dataclass(frozen=True)
class EstimatorMethod:
    """A gradient-based method of the report, parsed from its name
    ``<estimator>[_1ckpt][_square|_stepwise][@<features>]``:

    * estimator: ``trak`` (Eq. 3: ``Phi (Phi^T Phi + lambda I)^-1 g``, projected features), ``dual`` (the
      same through the N x N Gram matrix, :mod:`attribution.dual`: exact on unprojected features, ridge
      relative to the members' mean squared feature norm, independent of d), ``ekfac`` / ``kfac``
      (influence with the EK-FAC / K-FAC curvature of :mod:`attribution.ekfac`, damping per layer);
    * ``_1ckpt``: the last checkpoint only (else the average over every checkpoint's store);
    * ``_square``: D-TRAK's square output on the target side (else the step output f_t, the paper's);
      ``_stepwise``: per step, whichever of the two predicts better on the held-out targets (both are scored;
      the choice, like lambda, never sees the report targets: :class:`evaluation.methods.KindChoiceScores`);
    * ``@<features>``: the stores of ``plan.extra_features[<features>]`` (else ``plan.features``): e.g.
      features made with another training-side output, timestep draws, projector or no projection.
      EK-FAC/K-FAC read only the checkpoints and the training-side output (draws, timesteps) of those
      stores, never their projected rows.
    """

    estimator: str
    last_only: bool = False
    kind: str = "loss"
    features: Optional[str] = None


def parse_method(name: str) -> Optional[EstimatorMethod]:
    """The :class:`EstimatorMethod` a method name spells, or None (a baseline or unknown)."""
    found = _METHOD.match(name) if isinstance(name, str) else None
    if found is None:
        return None
    estimator, one, kind, features = found.groups()
    return EstimatorMethod(estimator, one is not None, kind[1:] if kind else "loss", features)


@dataclass
class LDSPlan:
    """Settings of the LDS and counterfactual evaluation.

    Args:
        out_dir: root folder of everything the workflow writes.
        fit_config: config files of `cli.py fit` for every subset model (the same fit a user runs).
        fit_args: extra `cli.py fit` flags for every subset model (e.g. "--trainer.max_steps=500").
        featurize_args: extra `cli.py featurize` flags of ``lds_featurize`` (each subset model's final checkpoint
            into ``models/<job>/features``), e.g. "--settings.proj_dim=2048".
        num_masks: J, the number of random subsets.
        mask_seed: seed of the masks (mask j depends only on (mask_seed, j)).
        fraction: probability that an example is in a subset.
        seeds_per_mask: training seeds per mask whose outputs are averaged for the LDS (paper: 5).
        replicate_masks: the first this many masks get `replicate_seeds` seeds in all; the extra
            models only measure the seed-noise ceiling (0: no ceiling unless seeds_per_mask >= 2).
        replicate_seeds: seeds per replicated mask (>= 2).
        seed: base training seed.
        share_seed: every mask uses the same seeds (seed + r): shared initialisation and data order
            across masks. Otherwise model (j, r) uses seed + 1000 * (j + 1) + r.
        features: folder of the full model's finalized feature stores (one per checkpoint).
        targets: folder of the recorded targets (`cli.py sample` with the full model).
        steps: recorded timesteps to evaluate (None: all recorded steps).
        target_ids: targets to evaluate (None: all).
        num_draws: K' of the step output f_t (same for actual outputs and TRAK's target gradients).
        draw_seed: seed of those draws.
        share_noise: D-TRAK noise sharing (must match how the stores were featurized).
        use_ema: None: the EMA weights of every model when it keeps them (TRAK's target side: what each store
            recorded); True: the EMA weights (an error for a model without); False: the raw weights.
        methods: compared methods: the baselines pixel, embedding, random and the estimators
            ``<trak|dual|ekfac|kfac>[_1ckpt][_square|_stepwise][@<name>]`` (:class:`EstimatorMethod`; ``<name>`` an entry
            of ``extra_features``), e.g. trak, trak_1ckpt, trak_square, dual@identity, ekfac_1ckpt.
        extra_features: name -> another folder of the full model's feature stores (e.g. made with another
            projector: ``{"gaussian": "runs/x/features_gaussian"}``); method ``trak@<name>`` is TRAK (Eq. 3)
            on every store of that folder, scored exactly like ``trak``. A folder containing ``{step}``
            holds step-matched stores: step t is scored with the stores of the folder with t in place of
            ``{step}`` (each featurized with ``--settings.timestep_range`` around t).
        paired_versus: methods every other method is compared with (paired differences over targets).
        relative_lambdas: candidate ridge values (trak: relative to each kernel's mean eigenvalue trace / d;
            dual: to the members' mean squared feature norm; ekfac/kfac: the damping relative to each layer's
            mean curvature eigenvalue).
        extend_grid: when the held-out choice of a ridge lands on the first or last value of the grid, extend
            the grid by a factor 10 past that edge and score again, at most this many times; a choice still at
            the edge is flagged in the tables (``lambda_at_grid_edge``).
        ekfac_fisher: the Fisher of the EK-FAC/K-FAC factors, "empirical" (the training loss's own gradients)
            or "sampled" (seeded pseudo-targets: the GGN), see :func:`attribution.ekfac.fit_ekfac`.
        ekfac_batch_size: training examples per forward/backward of the EK-FAC/K-FAC passes.
        lambda_per_step: choose lambda per step (else one for all steps).
        heldout_fraction: share of the targets that choose lambda (never reported).
        split_seed: seed of the held-out / report split of the targets.
        classifier_epochs: epochs of the offline classifier (embedding baseline, FID, feature formation).
        cf_targets: counterfactuals for the first this many report targets.
        cf_step: step t of the top-k retraining with completions (paper: 400 of 1000).
        forget_step: step t of the forgetting experiment (paper: 300); same as cf_step shares the models.
        cf_ks: k values (paper: 200, 500, 1000 of 50000; scale with N).
        cf_methods: methods whose top-k are removed.
        cf_delta: completions use the retrained model for timesteps t .. t - cf_delta (paper: 100).
        num_completions: completions per target (and per step for feature formation).
        consistency_seeds: extra full-data models (other seeds) for seed consistency.
        formation_steps: sampling steps of the feature-formation curves (None: the recorded steps).
        formation_targets: feature formation for the first this many report targets (None: all; 0: no
            feature-formation pass). The pass samples targets x steps x num_completions completions.
        workers: ``launcher: local``: worker processes side by side on this machine, each training one model
            at a time (on a small CPU several one-thread workers beat one multi-thread process).
        threads_per_worker: OMP/MKL/torch threads of each worker and its fits.
        runner: how a worker runs a fit: "subprocess" (`python cli.py fit ...`) or "inprocess" (the same
            arguments through LightningCLI in the worker's own process).
        keep_checkpoints: keep every checkpoint of a subset model (else only the final one, to save disk).
        launcher: where the fits of ``lds_train`` and ``counterfactual`` run (evaluation.sweep):
            "inprocess" (one after another in this process), "local" (submitit LocalExecutor: ``workers``
            processes on this machine) or "slurm" (submitit SlurmExecutor: one job array over the (mask, seed)
            jobs; submits and returns). None: "inprocess" when ``runner`` is "inprocess", else "local".
        gpus_per_job: GPUs of each fit. local: worker k sees GPUs [k g, (k + 1) g) of this machine through
            CUDA_VISIBLE_DEVICES (0: none, the fits run on CPU); slurm: ``--gpus-per-node``.
        cpus_per_job: slurm: ``--cpus-per-task`` of each array task (None: ``threads_per_worker``).
        timeout_min: time limit of one fit in minutes (local: the fit subprocess is stopped; slurm: ``--time``).
        claim_stale_min: a job claim whose owner runs on another host and has not renewed it (every
            claim_stale_min / 4) for this many minutes is stale and may be taken over; the claim of a live
            process on this host never is.
        slurm_partition: ``--partition`` (None: the cluster's default).
        slurm_account: ``--account`` (None: the user's default).
        slurm_mem_gb: ``--mem`` in GB per task (None: the partition's default).
        slurm_array_parallelism: array tasks running at once (``--array=0-<n-1>%<this>``).
        slurm_setup: shell lines run before each task (e.g. ``module load cuda``, ``source .venv/bin/activate``).
        slurm_extra: more sbatch flags, name -> value (e.g. ``{"qos": "high", "constraint": "a100"}``).
    """

    out_dir: str = "runs/lds_digits"
    fit_config: list[str] = field(default_factory=lambda: ["configs/lds_digits.yaml"])
    fit_args: list[str] = field(default_factory=list)
    featurize_args: list[str] = field(default_factory=list)
    num_masks: int = 32
    mask_seed: int = 0
    fraction: float = 0.5
    seeds_per_mask: int = 1
    replicate_masks: int = 8
    replicate_seeds: int = 2
    seed: int = 0
    share_seed: bool = False
    features: Optional[str] = None
    targets: Optional[str] = None
    steps: Optional[list[int]] = None
    target_ids: Optional[list[int]] = None
    num_draws: int = 16
    draw_seed: int = 0
    share_noise: bool = False
    use_ema: Optional[bool] = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    extra_features: dict[str, str] = field(default_factory=dict)
    paired_versus: list[str] = field(default_factory=lambda: ["pixel"])
    relative_lambdas: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    extend_grid: int = 2
    ekfac_fisher: str = "empirical"
    ekfac_batch_size: int = 64
    lambda_per_step: bool = False
    heldout_fraction: float = 0.5
    split_seed: int = 0
    classifier_epochs: int = 30
    cf_targets: int = 2
    cf_step: int = 400
    forget_step: int = 400
    cf_ks: list[int] = field(default_factory=lambda: [36, 180])
    cf_methods: list[str] = field(default_factory=lambda: ["trak", "pixel", "embedding", "random"])
    cf_delta: int = 100
    num_completions: int = 64
    consistency_seeds: int = 1
    formation_steps: Optional[list[int]] = None
    formation_targets: Optional[int] = None
    workers: int = 2
    threads_per_worker: int = 1
    runner: str = "subprocess"
    keep_checkpoints: bool = False
    launcher: Optional[str] = None
    gpus_per_job: int = 0
    cpus_per_job: Optional[int] = None
    timeout_min: float = 1440.0
    claim_stale_min: float = 10.0
    slurm_partition: Optional[str] = None
    slurm_account: Optional[str] = None
    slurm_mem_gb: Optional[float] = None
    slurm_array_parallelism: int = 64
    slurm_setup: list[str] = field(default_factory=list)
    slurm_extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_masks", "seeds_per_mask", "num_draws", "workers", "threads_per_worker",
                     "classifier_epochs", "num_completions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Expected `plan.{name}` to be a positive int, but got {getattr(self, name)!r}")
        if self.formation_targets is not None and (not isinstance(self.formation_targets, int)
                                                   or self.formation_targets < 0):
            raise ValueError(f"Expected `plan.formation_targets` to be an int >= 0 (or null: all report targets), "
                             f"but got {self.formation_targets!r}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"Expected `plan.fraction` in (0, 1), but got {self.fraction}")
        if self.replicate_masks < 0 or self.replicate_masks > self.num_masks or self.replicate_seeds < 2:
            raise ValueError(f"Expected 0 <= `plan.replicate_masks` <= num_masks = {self.num_masks} and "
                             f"`plan.replicate_seeds` >= 2, but got {self.replicate_masks} and {self.replicate_seeds}")
        unknown = [m for m in list(self.methods) + list(self.cf_methods) if not self.known_method(m)]
        if unknown:
            raise ValueError(f"Expected `plan.methods` and `plan.cf_methods` among {list(BASELINES)} and "
                             f"<trak|dual|ekfac|kfac>[_1ckpt][_square|_stepwise][@<name>] (@<name> needs "
                             f"`plan.extra_features.<name>`; known: {sorted(self.extra_features)}), but got {unknown}")
        if self.ekfac_fisher not in ("empirical", "sampled"):
            raise ValueError(f"Expected `plan.ekfac_fisher` 'empirical' or 'sampled', but got {self.ekfac_fisher!r}")
        for name in ("extend_grid", "ekfac_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "ekfac_batch_size" else 0):
                raise ValueError(f"Expected `plan.{name}` to be an int >= {1 if name == 'ekfac_batch_size' else 0}, "
                                 f"but got {getattr(self, name)!r}")
        if not self.relative_lambdas or min(self.relative_lambdas) <= 0:
            raise ValueError(f"Expected `plan.relative_lambdas` to be positive relative ridges, but got "
                             f"{self.relative_lambdas}")
        if self.runner not in ("subprocess", "inprocess"):
            raise ValueError(f"Expected `plan.runner` to be 'subprocess' or 'inprocess', but got {self.runner!r}")
        if self.launcher not in (None, *LAUNCHERS):
            raise ValueError(f"Expected `plan.launcher` among {list(LAUNCHERS)} (or null), but got {self.launcher!r}")
        for name in ("slurm_array_parallelism",) + (("cpus_per_job",) if self.cpus_per_job is not None else ()):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Expected `plan.{name}` to be a positive int, but got {getattr(self, name)!r}")
        if not isinstance(self.gpus_per_job, int) or self.gpus_per_job < 0:
            raise ValueError(f"Expected `plan.gpus_per_job` to be an int >= 0, but got {self.gpus_per_job!r}")
        for name in ("timeout_min", "claim_stale_min") + (("slurm_mem_gb",) if self.slurm_mem_gb is not None else ()):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"Expected `plan.{name}` to be positive (minutes or GB), but got {getattr(self, name)!r}")

    def known_method(self, name: str) -> bool:
        """A baseline, or an estimator whose ``@<name>`` (if any) is in ``extra_features``."""
        if name in BASELINES:
            return True
        spec = parse_method(name)
        return spec is not None and (spec.features is None or spec.features in self.extra_features)

    @property
    def launch_with(self) -> str:
        """The launcher in use: ``launcher``, or by default "inprocess" for ``runner: inprocess`` else "local"."""
        if self.launcher is not None:
            return self.launcher
        return "inprocess" if self.runner == "inprocess" else "local"

    # ----------------------------------------------------------------------- layout
    @property
    def root(self) -> Path:
        return Path(self.out_dir)

    def mask_dir(self) -> Path:
        return self.root / "masks"

    def model_dir(self, mask: int, seed_index: int) -> Path:
        return self.root / "models" / f"mask_{mask:03d}_seed_{seed_index}"

    def seeds_for(self, mask: int) -> int:
        """How many seeds mask ``mask`` is trained with (LDS seeds, or more on replicated masks)."""
        return max(self.seeds_per_mask, self.replicate_seeds if mask < self.replicate_masks else 0)

    def training_seed(self, mask: int, seed_index: int) -> int:
        return self.seed + seed_index if self.share_seed else self.seed + 1000 * (mask + 1) + seed_index

    def require(self, *names: str) -> None:
        """Refuse a plan lacking settings a subcommand needs (e.g. features, targets)."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"Expected `plan.{missing[0]}` to be set (a folder), but got None")

    def output_settings(self) -> dict:
        """What the actual outputs depend on (their cache key)."""
        return {"targets": str(Path(self.targets).resolve()) if self.targets else None, "steps": self.steps,
                "target_ids": self.target_ids, "num_draws": self.num_draws, "draw_seed": self.draw_seed,
                "share_noise": self.share_noise, "use_ema": self.use_ema, "kind": "loss"}

    def describe(self) -> dict:
        return asdict(self)


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
