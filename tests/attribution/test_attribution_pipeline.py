"""End to end: identical seeds give identical features and scores; resumed featurizing matches."""
import torch
from diffusers import DDPMScheduler

from attribution import (DiffusionTask, FeatureStore, SparseProjector, StepOutput, TrainLoss, add_noise,
                         checkpoint_seed, featurize_batch, finalize, num_parameters, score, x0_hat)
from attribution.testing import tiny_unet


N, D = 24, 16


def _featurize_all(root, data, models, task, train, rows_per_batch=8, stop_after=None):
    stores = []
    for m, model in enumerate(models):
        proj = SparseProjector(num_parameters(model), D, seed=checkpoint_seed(0, m))
        meta = {"N": N, "d": D, "dtype": "float32", "projector": proj.describe(), "output": train.describe(),
                "checkpoint": m}
        store = FeatureStore.open(root / f"ckpt{m}", meta)
        missing = store.missing_rows()
        for i, s in enumerate(range(0, len(missing), rows_per_batch)):
            if stop_after is not None and i == stop_after:
                break
            rows = missing[s:s + rows_per_batch]
            store.write(rows, featurize_batch(task, model, train, proj, data[rows], rows, chunk_size=5))
        stores.append((store, proj))
    return stores


def _target_grads(task, models, projs, x_t, steps):
    target = StepOutput(num_draws=3, seed=9)
    grads = []
    for model, proj in zip(models, projs):
        with torch.no_grad():
            eps = model(x_t, steps).sample
        x0 = x0_hat(x_t, eps, steps, task.alphas_cumprod)  # fixed, detached
        grads.append(featurize_batch(task, model, target, proj, x0, torch.zeros_like(steps), steps=steps))
    return grads


def test_identical_seeds_identical_features_and_scores(tmp_path):
    task = DiffusionTask.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    data = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_t = add_noise(data[:1].expand(2, -1, -1, -1), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                    torch.tensor([200, 600]), task.alphas_cumprod)
    steps = torch.tensor([200, 600])
    train = TrainLoss(num_draws=2, seed=3)
    results = []
    for run in ("a", "b"):
        models = [tiny_unet(seed=s) for s in (10, 11)]
        stores = _featurize_all(tmp_path / run, data, models, task, train)
        for store, _ in stores:
            finalize(store)
        G = _target_grads(task, models, [p for _, p in stores], x_t, steps)
        results.append(([s.read() for s, _ in stores], G, score([s for s, _ in stores], G, lam=1e-2)))
    (fa, ga, sa), (fb, gb, sb) = results
    assert all(torch.equal(x, y) for x, y in zip(fa, fb)) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert torch.equal(sa, sb) and sa.shape == (N, 2) and float(sa.abs().max()) > 0
    assert not torch.equal(fa[0], fa[1])  # different checkpoints / projections differ

    # a crashed-and-resumed featurization fills the same rows with the same features
    models = [tiny_unet(seed=s) for s in (10, 11)]
    partial = _featurize_all(tmp_path / "c", data, models, task, train, stop_after=1)
    assert partial[0][0].missing_rows().tolist() == list(range(8, N))
    resumed = _featurize_all(tmp_path / "c", data, models, task, train)
    assert all(s.is_complete for s, _ in resumed)
    assert torch.equal(resumed[0][0].read(), fa[0])  # same batches and chunks as the uninterrupted run: same bits
