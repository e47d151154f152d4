"""Baselines: cosine scores vs dense references, top-k, a real-digits classifier, FID vs numpy and torchmetrics."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.baselines import (SmallConvClassifier, class_fraction, classifier_features, embedding_cosine_scores,
                                   fid_from_features, pixel_cosine_scores, random_scores, topk_indices,
                                   train_classifier)
from tolerances import EPS32

F64 = torch.float64


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0    # 0..16 -> [-1, 1]
    labels = torch.tensor(d.target)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images, labels, perm[:1300], perm[1300:]


@pytest.fixture(scope="module")
def classifier(digits):
    images, labels, train, _ = digits
    torch.set_num_threads(1)
    return train_classifier(images[train], labels[train], epochs=10, seed=0)


# ----------------------------------------------------------------------------- similarity baselines
def test_pixel_cosine_streamed_equals_dense_reference_and_memmap(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(103, 2, 4, 4, generator=g)
    x0 = torch.randn(5, 2, 4, 4, generator=g)
    expected = F.cosine_similarity(train.reshape(103, 1, -1).double(), x0.reshape(1, 5, -1).double(), dim=2)
    got = pixel_cosine_scores(train, x0, block_rows=10)
    assert got.shape == (103, 5)
    # float32 cosine of 32-long vectors: a dot product and two norms, each within 32 eps32 (relative)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=EPS32 * (2 * 32 + 4))
    np.save(tmp_path / "train.npy", train.numpy())
    mm = np.load(tmp_path / "train.npy", mmap_mode="r")
    torch.testing.assert_close(pixel_cosine_scores(mm, x0, block_rows=7), got)


def test_pixel_cosine_ranks_an_exact_copy_first():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(50, 1, 8, 8, generator=g)
    x0 = torch.stack([train[17] * 0.5, train[3]])
    top = topk_indices(pixel_cosine_scores(train, x0), k=1)
    assert top.tolist() == [[17, 3]]


def test_pixel_cosine_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="`x0_hat`.*\\(1, 8, 8\\)"):
        pixel_cosine_scores(torch.zeros(4, 1, 8, 8), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="`train_images`"):
        pixel_cosine_scores(torch.zeros(4, 64), torch.zeros(2, 1, 8, 8))


def test_embedding_cosine_equals_dense_reference():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 12, generator=g)

    def encoder(x):
        return x.reshape(x.shape[0], -1) @ W

    train, x0 = torch.randn(33, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    expected = F.cosine_similarity(encoder(train).double()[:, None], encoder(x0).double()[None], dim=2)
    # float32 embeddings (16-term sums, each within 16 eps32) and their cosine (12-term sums)
    torch.testing.assert_close(embedding_cosine_scores(encoder, train, x0, batch_size=8).double(), expected,
                               rtol=0, atol=EPS32 * (2 * 16 + 2 * 12 + 4))
    with pytest.raises(ValueError, match="`encoder`"):
        embedding_cosine_scores(lambda x: x, train, x0)


def test_random_scores_and_topk():
    a, b = random_scores(100, 3, seed=5), random_scores(100, 3, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, random_scores(100, 3, seed=6))
    s = torch.tensor([[0.1, 5.0], [3.0, -1.0], [2.0, 0.0]])
    assert topk_indices(s, 2).tolist() == [[1, 0], [2, 2]]
    assert topk_indices(s, 1, largest=False).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="`k` <= N = 3"):
        topk_indices(s, 4)


# ----------------------------------------------------------------------------- classifier
def test_classifier_learns_real_digits(digits, classifier):
    images, labels, _, test = digits
    acc = (classifier(images[test]).argmax(1) == labels[test]).float().mean().item()
    assert acc > 0.9, acc
    feats = classifier_features(classifier, images[test[:10]])
    assert feats.shape == (10, classifier.num_features)


def test_train_classifier_is_deterministic_and_leaves_global_rng(digits):
    images, labels, train, _ = digits
    state = torch.get_rng_state()
    a = train_classifier(images[train[:200]], labels[train[:200]], epochs=1, seed=3, width=8)
    assert torch.equal(state, torch.get_rng_state())
    b = train_classifier(images[train[:200]], labels[train[:200]], epochs=1, seed=3, width=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_classifier_checks_input_shape():
    model = SmallConvClassifier(1, 10, 8, width=8)
    with pytest.raises(ValueError, match="\\(n, 1, 8, 8\\)"):
        model(torch.zeros(2, 3, 8, 8))


def test_class_fraction(digits, classifier):
    images, labels, _, test = digits
    zeros = images[test][labels[test] == 0]
    assert class_fraction(classifier, zeros, 0) > 0.9
    assert class_fraction(classifier, zeros, 1) < 0.1
    mixed = torch.cat([zeros[:20], images[test][labels[test] == 7][:20]])
    assert abs(class_fraction(classifier, mixed, 7) - 0.5) < 0.1


def test_embedding_similarity_with_the_classifier_prefers_the_same_class(digits, classifier):
    images, labels, train, test = digits
    scores = embedding_cosine_scores(classifier.embed, images[train], images[test[:20]])
    top = topk_indices(scores, 5)
    agree = (labels[train][top] == labels[test[:20]]).float().mean().item()
    assert agree > 0.8, agree


# ----------------------------------------------------------------------------- FID
def _fid_numpy(a, b):
    """Reference: tr sqrt(Ca Cb) = sum sqrt(eig(sqrt(Ca) Cb sqrt(Ca))) with symmetric eigendecompositions."""
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sa @ cb @ sa)
    return float(((ma - mb) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_fid_matches_numpy_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(250, 6)) * 2.0 + 0.5
    assert fid_from_features(a, b) == pytest.approx(_fid_numpy(a, b), rel=1e-8)
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(_fid_numpy(a, b), rel=1e-8)


def test_fid_known_cases():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    assert abs(fid_from_features(a, a)) < 1e-6
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert fid_from_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    with pytest.raises(ValueError, match="same width"):
        fid_from_features(a, a[:, :3])


class _EmbedFeatures(torch.nn.Module):
    """``classifier.embed`` as torchmetrics' custom feature extractor (``num_features``, always eval)."""

    def __init__(self, classifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def forward(self, x):
        with torch.no_grad():
            return self.classifier.embed(x)

    def train(self, mode: bool = True):
        return super().train(False)


def test_fid_agrees_with_torchmetrics_on_the_classifier_features(digits, classifier):
    """The independent reference: torchmetrics' FID (offline with a custom extractor) on the same images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    images, labels, _, test = digits
    real, fake = images[test][:150], images[test][labels[test] < 5][:120]
    metric = FrechetInceptionDistance(feature=_EmbedFeatures(classifier), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    got = float(metric.compute())
    expected = fid_from_features(classifier_features(classifier, real), classifier_features(classifier, fake))
    assert expected > 0.1
    assert got == pytest.approx(expected, rel=1e-3)
    assert not math.isnan(got)
