"""AttributionModule scores 64 (target, step) pairs with ONE read of each store (whatever ``pair_batch_size``),
one eigenvector load and one denoiser at a time per checkpoint, and its float32 scores equal the float64
reference (dense solve of the same target gradients) within the derived rounding bound; ``precision="float64"``
equals it to float32 storage."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

import attribution.scoring as scoring
import lightning_modules.attribution_module as attribution_module
from attribution import FeatureStore, dense_scores_float64
from attribution.store import open_feature_stores
from attribution.trajectory import from_samples, save_targets
from callbacks import TrakFeaturizeCallback
from callbacks.score_writer import load_target_scores
from helpers import fit_trainer, small_data, tiny_module
from lightning_modules import AttributionModule
from tolerances import EPS32

EPS64 = torch.finfo(torch.float64).eps
STEPS = [900, 600, 300, 0]
SCORE = dict(estimator="trak", num_draws=2, relative_lam=0.5, topk=3, pair_batch_size=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model with 2 featurized checkpoints and 16 recorded targets x 4 steps = 64 pairs."""
    root = tmp_path_factory.mktemp("one_pass")
    dm = small_data(root)
    seed_everything(0)
    module = tiny_module()
    fit_trainer(root / "fit", [TrakFeaturizeCallback(proj_dim=16, num_draws=1, batch_size=64)]).fit(module, datamodule=dm)
    module.eval()
    save_targets(from_samples(module.sample(list(range(100, 116)), num_inference_steps=10, record=True,
                                            record_steps=STEPS)), root / "targets")
    return root, dm


def score(run, out, monkeypatch, **kw):
    """Score every pair, recording the reads, eigenvector loads, checkpoint loads and each checkpoint's solve."""
    root, dm = run
    reads, kernels, checkpoints, solves = [], [], [], []
    read, load_kernel = FeatureStore.read, scoring.load_kernel
    load_module, solve = attribution_module.load_diffusion_module, attribution_module.solve_targets

    def counted_read(self, start=0, stop=None, dtype=torch.float32, out=None):
        tensor = read(self, start, stop, dtype, out)
        reads.append((str(self.path), start, start + tensor.shape[0]))
        return tensor

    def recorded_solve(store, grads, lam, kernel=None):
        solves.append((str(store.path), grads.detach().clone(), lam))
        return solve(store, grads, lam, kernel)

    monkeypatch.setattr(FeatureStore, "read", counted_read)
    monkeypatch.setattr(scoring, "load_kernel", lambda s: kernels.append(str(s.path)) or load_kernel(s))
    monkeypatch.setattr(attribution_module, "load_diffusion_module",
                        lambda f, **kw: checkpoints.append(f) or load_module(f, **kw))
    monkeypatch.setattr(attribution_module, "solve_targets", recorded_solve)
    module = AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"),
                               out_dir=str(root / out), **{**SCORE, **kw})
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False).predict(
        module.attach_data(dm), return_predictions=False)
    monkeypatch.undo()
    return module, reads, kernels, checkpoints, solves


def reference(run, solves):
    """Per pair, in pass order: 1/M sum_m dense float64 solve of the module's own gradients, and the rounding
    bounds of a float32 pass and of a float64 pass against it."""
    root, _ = run
    stores = {str(s.path): s for s in open_feature_stores(str(root / "fit" / "features"))}
    M, ref, bound32, bound64 = len(solves), 0, 0, 0
    for path, grads, lam in solves:
        Phi = stores[path].read(dtype=torch.float64)
        d = Phi.shape[1]
        V = torch.linalg.solve(Phi.T @ Phi + lam * torch.eye(d, dtype=torch.float64), grads.double().T)
        s = torch.linalg.eigvalsh(Phi.T @ Phi)
        kappa = float((s.max() + lam) / (s.min() + lam))
        terms = Phi.abs() @ V.abs()
        ref = ref + dense_scores_float64(Phi, grads, lam)
        solve64 = EPS64 * kappa * d ** 2  # the eigen-solve against this LU solve, both float64
        # float32 pass: V cast (u), d-term products (d u), M-term mean (M + 1 u), with eps = 2u
        bound32 = bound32 + (EPS32 * (d + M + 3) + solve64) * terms
        bound64 = bound64 + (EPS64 * (d + M + 3) + solve64) * terms
    return ref / M, bound32 / M, bound64 / M


def pair_scores(root, out, module):
    """(N, 64) scores of the assembled target files, in the pass order (targets, then steps)."""
    columns = []
    for traj in module.trajectories:
        columns.append(load_target_scores(root / out / f"target_{traj.target_id:04d}.pt")["scores"])
    return torch.cat(columns, dim=1)


def test_64_pairs_read_each_store_once_and_equal_the_float64_reference(run, monkeypatch):
    root, _ = run
    module, reads, kernels, checkpoints, solves = score(run, "f32", monkeypatch)
    stores = module.stores
    assert len(module.pending_pairs()) == 0 and module.resume_counts["missing"] == 64
    for store in stores:  # 64 pairs, pair_batch_size 4: the old path read every store 16 times
        covered = torch.zeros(store.N, dtype=torch.long)
        for path, a, b in reads:
            if path == str(store.path):
                covered[a:b] += 1
        assert torch.equal(covered, torch.ones(store.N, dtype=torch.long)), store.path
    assert kernels == [str(s.path) for s in stores]  # one eigenvector load per checkpoint
    assert len(checkpoints) == 2 * len(stores)  # setup checks each once, the pass loads each once
    assert [p for p, _, _ in solves] == [str(s.path) for s in stores] and solves[0][1].shape == (64, 16)
    got = pair_scores(root, "f32", module).double()
    ref, bound, _ = reference(run, solves)
    assert bool(((got - ref).abs() <= bound).all())
    assert float(bound.max()) < 1e-4 * float(ref.abs().max())  # tight enough to mean something


def test_the_float64_option_equals_the_reference_to_float32_storage(run, monkeypatch):
    root, _ = run
    module, reads, _, _, solves = score(run, "f64", monkeypatch, precision="float64", pairs_per_pass=40)
    for store in module.stores:  # 64 pairs in passes of 40 and 24: each store read once per pass
        assert sum(b - a for path, a, b in reads if path == str(store.path)) == 2 * store.N
    got = pair_scores(root, "f64", module).double()
    (ref1, _, b1), (ref2, _, b2) = reference(run, solves[:2]), reference(run, solves[2:])
    ref, bound = torch.cat([ref1, ref2], dim=1), torch.cat([b1, b2], dim=1)
    # float64 pass, then the pair files store float32: half an ulp of float32 (eps32 / 2) on top
    assert bool(((got - ref).abs() <= bound + EPS32 / 2 * got.abs() * (1 + EPS32)).all())


def test_bad_pass_settings_are_refused_before_work(run):
    root, _ = run
    with pytest.raises(ValueError, match="precision"):
        AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"), precision="half")
    with pytest.raises(ValueError, match="pairs_per_pass"):
        AttributionModule(features=str(root / "fit" / "features"), targets=str(root / "targets"), pairs_per_pass=0)
