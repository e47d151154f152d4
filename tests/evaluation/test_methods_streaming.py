"""The LDS report's methods bounded in memory: TRAK serves every ridge from ONE pass over the stores (predictions
``masks @ scores`` streamed, the chosen ridge's scores read back from disk) and equals the dense float64 sweep
within the derived float32 bound, in one chunk or several; baselines and the classifier read the training images
block by block and equal the all-in-memory results; labels come without decoding an image."""
from __future__ import annotations

import pytest
import torch

from attribution import (FeatureStore, SmallConvClassifier, embedding_cosine_scores, finalize, lambda_sweep,
                         pixel_cosine_scores, predicted_outputs, train_classifier)
from attribution.lds import lds_from_predictions, linear_datamodeling_score
from attribution.scoring import sweep_solves
from datamodules.array_dataset import ArrayImageDataset
from evaluation.methods import dataset_images, dataset_labels, trak_scores
from evaluation.report import build_report, chosen_scores
from helpers import small_data
from tolerances import EPS32

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
N, D, B, S, J = 200, 12, 3, 2, 9
LAMBDAS = [0.01, 1.0, 100.0]


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    root = tmp_path_factory.mktemp("trak")
    g = torch.Generator().manual_seed(0)
    stores = []
    for m in range(2):
        store = FeatureStore.open(root / f"s{m}", {"N": N, "d": D, "dtype": "float32"})
        store.write(torch.arange(N), torch.randn(N, D, generator=g))
        finalize(store)
        stores.append(store)
    grads = [torch.randn(B * S, D, generator=g) for _ in stores]
    masks = torch.rand(J, N, generator=g) < 0.5
    return stores, grads, masks, root


def _dense_and_bound(stores, grads):
    """The float64 sweep (L, N, B, S) and the float32 pass's elementwise rounding bound on it."""
    dense = lambda_sweep(stores, grads, LAMBDAS, relative=True, dtype=F64).reshape(len(LAMBDAS), N, B, S)
    solved = sweep_solves(stores, grads, LAMBDAS, relative=True)
    terms = sum(s.read(dtype=F64).abs() @ V.abs() for s, V in zip(stores, solved)) / len(stores)
    bound = (EPS32 * (D + len(stores) + 3) * terms).reshape(N, len(LAMBDAS), B, S).permute(1, 0, 2, 3)
    return dense, bound


@pytest.mark.parametrize("budget", [2 << 30, 1])  # one pass for all targets, or one pass per target
def test_trak_one_pass_equals_the_dense_float64_sweep(problem, monkeypatch, budget):
    stores, grads, masks, root = problem
    reads = []
    original = FeatureStore.read
    monkeypatch.setattr(FeatureStore, "read", lambda self, *a, **k: reads.append(str(self.path)) or original(self, *a, **k))
    result = trak_scores(stores, grads, LAMBDAS, B, S, masks, root, budget_bytes=budget)
    passes = 1 if budget > 1 else B
    assert sorted(reads) == sorted([str(s.path) for s in stores] * passes)  # one block each: N < block rows
    dense, bound = _dense_and_bound(stores, grads)
    expected = torch.stack([torch.einsum("jn,nbs->jbs", masks.double(), d) for d in dense])
    pred_bound = torch.stack([torch.einsum("jn,nbs->jbs", masks.double(), b) for b in bound]) \
        + EPS64 * N * torch.stack([torch.einsum("jn,nbs->jbs", masks.double(), d.abs()) for d in dense])
    assert result.predictions.shape == (len(LAMBDAS), J, B, S)
    assert bool(((result.predictions - expected).abs() <= pred_bound).all())
    chosen = torch.tensor([2, 0])  # a ridge per step
    at = result.at(chosen)
    for s in range(S):
        assert bool(((at[:, :, s].double() - dense[2 if s == 0 else 0, :, :, s]).abs()
                     <= bound[int(chosen[s]), :, :, s]).all())
    result.close()
    assert not any(p.is_file() for p in root.iterdir())  # scratch columns are unnamed and gone


def test_the_report_from_predictions_equals_the_report_from_scores(problem, tmp_path):
    stores, grads, masks, root = problem
    actual = torch.randn(J, B, S, generator=torch.Generator().manual_seed(3), dtype=F64)
    dense, _ = _dense_and_bound(stores, grads)
    streamed = trak_scores(stores, grads, LAMBDAS, B, S, masks, tmp_path)
    pixel = torch.randn(N, B, S, generator=torch.Generator().manual_seed(4))
    from_scores = build_report({"trak": dense.float(), "pixel": pixel}, masks, actual, None, [900, 500], LAMBDAS,
                               0, 0.5, True, 1)
    from_predictions = build_report({"trak": streamed, "pixel": pixel}, masks, actual, None, [900, 500], LAMBDAS,
                                    0, 0.5, True, 1)
    assert torch.equal(from_scores["results"]["trak"].chosen_index, from_predictions["results"]["trak"].chosen_index)
    # float32 against float64 predictions: no rank among the 9 subset models moves, so the Spearman LDS is the same
    assert torch.equal(from_predictions["results"]["trak"].report.per_target,
                       from_scores["results"]["trak"].report.per_target)
    chosen = chosen_scores(streamed, from_predictions["results"]["trak"])
    assert chosen.shape == (N, B, S) and not streamed.chunks  # read back, then released
    ref = linear_datamodeling_score(pixel, masks, actual)
    assert torch.equal(lds_from_predictions(predicted_outputs(pixel, masks), actual).per_target, ref.per_target)


def test_the_report_gives_the_uncertainty_over_subset_models_and_the_target_specific_lds():
    """Every s.e. of the report also has its jackknife over the subset models (leave one model out, written
    here as loops over scipy's Spearman) and the total; the target-specific LDS stands beside the paper's."""
    import math

    import numpy as np
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(11)
    masks = torch.rand(J, N, generator=g) < 0.5
    pixel = torch.randn(N, B * 2, S, generator=g, dtype=torch.float64)
    noise = torch.randn(N, B * 2, S, generator=g, dtype=torch.float64)
    actual = -predicted_outputs(pixel, masks) + 4.0 * torch.randn(J, 1, S, generator=g, dtype=torch.float64)
    report = build_report({"pixel": pixel.float(), "random": noise.float()}, masks, actual, None, [900, 500],
                          LAMBDAS, 0, 0.5, True, 1)
    rows = {(r["method"], r["step"]): r for r in report["tables"]["lds"]}
    targets = report["report"].tolist()
    pred = predicted_outputs(pixel.float(), masks).numpy()
    per_step = []
    for s, t in enumerate([900, 500]):
        loo = [np.mean([spearmanr(np.delete(pred[:, b, s], j), -np.delete(actual[:, b, s].numpy(), j)).statistic
                        for b in targets]) for j in range(J)]
        per_step.append(loo)
        want = math.sqrt((J - 1) / J * sum((v - np.mean(loo)) ** 2 for v in loo))
        row = rows[("pixel", t)]
        assert abs(row["lds_se_masks"] - want) < 1e-12
        assert abs(row["lds_se_total"] - math.hypot(row["lds_se"], want)) < 1e-12
        assert math.isfinite(row["specific_mean"]) and row["specific_se_total"] > 0
    pixel_row = {r["method"]: r for r in report["tables"]["comparison"]}["random"]
    for key in ("lds_mean_se_masks", "lds_mean_se_total", "specific_mean_over_steps", "specific_se_total",
                "minus_pixel_se_total", "specific_minus_pixel", "specific_minus_pixel_se_total"):
        assert math.isfinite(pixel_row[key]), key
    assert pixel_row["lds_mean_se_total"] >= pixel_row["lds_mean_se"]
    over_steps = np.mean(per_step, axis=0)  # (J,) each left-out model's LDS, mean over the steps
    want = math.sqrt((J - 1) / J * sum((v - over_steps.mean()) ** 2 for v in over_steps))
    assert abs({r["method"]: r for r in report["tables"]["comparison"]}["pixel"]["lds_mean_se_masks"] - want) < 1e-12
    assert all(math.isfinite(r["diff_se_total"]) and r["diff_se_total"] >= r["diff_se"]
               for r in report["tables"]["paired"])


def test_baselines_and_the_classifier_stream_the_images(tmp_path, monkeypatch):
    dm = small_data(tmp_path)
    dm.setup()
    images, source = dm.images(range(dm.num_examples)), dataset_images(dm)
    assert source.shape == tuple(images.shape) and torch.equal(source[5:9], images[5:9])
    x0 = torch.rand(4, *images.shape[1:], generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert torch.equal(pixel_cosine_scores(source, x0, block_rows=50), pixel_cosine_scores(images, x0, block_rows=50))
    encoder = SmallConvClassifier(1, 10, 8).eval()
    streamed = embedding_cosine_scores(encoder.embed, source, x0, batch_size=50)
    with torch.no_grad():  # the all-at-once formula, same encoder batches
        train = torch.cat([encoder.embed(images[i:i + 50]).double() for i in range(0, len(images), 50)])
        target = encoder.embed(x0).double()
    ref = (train / train.norm(dim=1, keepdim=True)) @ (target / target.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(streamed.double(), ref.float().double(), rtol=0,
                               atol=EPS64 * (train.shape[1] + 2) + EPS32)
    monkeypatch.setattr(ArrayImageDataset, "__getitem__", lambda self, i: pytest.fail("decoded an image"))
    labels = dataset_labels(dm)
    assert labels.shape == (dm.num_examples,) and labels.dtype == torch.int64
    monkeypatch.undo()
    assert torch.equal(labels, torch.tensor([int(dm.full_dataset()[i]["label"]) for i in range(dm.num_examples)]))
    a = train_classifier(source, labels, epochs=1, batch_size=32, width=8)
    b = train_classifier(images, labels, epochs=1, batch_size=32, width=8)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
