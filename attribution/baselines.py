"""Baseline attributions and the small offline classifier used by the counterfactual metrics.

Baseline scores share TRAK's orientation: higher = more helpful / "more responsible" for the
target, so the same :func:`attribution.lds.lds` and top-k code applies to them.

* :func:`pixel_cosine_scores`: cosine similarity of flattened pixels between each training image
  and ``x0_hat``, streamed over blocks of training rows.
* :func:`embedding_cosine_scores`: the same in the feature space of any encoder (CLIP in the
  paper; offline here: :class:`SmallConvClassifier`'s penultimate features), encoded and compared
  block by block (no N x D features).
* :func:`random_scores`: the random baseline.

Training images may be a tensor, a (memory-mapped) numpy array, or any *image source*: an object with
``shape (N, C, H, W)`` whose ``source[start:stop]`` and ``source[index_tensor]`` return float images (e.g.
``evaluation.methods.DatasetImages`` over a datamodule): the baselines and :func:`train_classifier` read
it block by block, so the N training images never have to be in memory as float32.

For FID and feature formation: :class:`SmallConvClassifier` / :func:`train_classifier` (plain torch,
deterministic), :func:`fid_from_features` (the project's one FID: Frechet distance with ``scipy.linalg.sqrtm``, tested
against torchmetrics' ``FrechetInceptionDistance`` with the classifier as its feature extractor),
:func:`class_fraction`.
"""
from __future__ import annotations

import logging
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks

__all__ = ["pixel_cosine_scores", "embedding_cosine_scores", "random_scores", "topk_indices",
           "SmallConvClassifier", "train_classifier", "classifier_features", "fid_from_features",
           "class_fraction"]

log = logging.getLogger(__name__)
Images = Union[Tensor, np.ndarray]
_EPS = 1e-12


def _check_images(name: str, images, expect: str = "(n, C, H, W)") -> None:
    source = not isinstance(images, (Tensor, np.ndarray)) and hasattr(images, "shape") and hasattr(images, "__getitem__")
    if not isinstance(images, (Tensor, np.ndarray)) and not source:
        raise TypeError(f"Expected `{name}` to be a tensor, array or image source {expect}, but got "
                        f"{type(images).__name__}")
    if len(images.shape) != 4 or images.shape[0] == 0:
        raise ValueError(f"Expected `{name}` of shape {expect} with n >= 1, but got {tuple(images.shape)}")


def _rows(images: Images, start: int, stop: int) -> Tensor:
    block = images[start:stop]
    return torch.from_numpy(np.array(block)) if isinstance(block, np.ndarray) else block  # copies one block


def _batch(images: Images, index: Tensor) -> Tensor:
    """Float images at ``index (k,)`` of a tensor, array or image source."""
    block = images[index.numpy()] if isinstance(images, np.ndarray) else images[index]
    return (torch.from_numpy(np.array(block)) if isinstance(block, np.ndarray) else block).float()


def _unit_rows(x: Tensor) -> Tensor:
    """Flatten to ``(n, D)`` float64 rows of unit norm (a zero row stays zero: cosine 0)."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    return x / x.norm(dim=1, keepdim=True).clamp(min=_EPS)


def pixel_cosine_scores(train_images: Images, x0_hat: Tensor, block_rows: int = 4096) -> Tensor:
    """Cosine similarity of flattened pixels, ``(N, B)`` float32.

    Args:
        train_images: ``(N, C, H, W)`` tensor or (memory-mapped) numpy array, read ``block_rows`` at a time.
        x0_hat: ``(B, C, H, W)`` one-step estimates of the final images (one per target or step).
        block_rows: training rows per block.
    """
    _check_images("train_images", train_images, "(N, C, H, W)")
    _check_images("x0_hat", x0_hat, "(B, C, H, W)")
    _checks.positive_int("block_rows", block_rows)
    if tuple(train_images.shape[1:]) != tuple(x0_hat.shape[1:]):
        raise ValueError(f"Expected `x0_hat` images of shape {tuple(train_images.shape[1:])} like `train_images`, "
                         f"but got {tuple(x0_hat.shape[1:])}")
    targets = _unit_rows(x0_hat.detach().cpu())
    out = []
    for start in range(0, train_images.shape[0], block_rows):
        block = _unit_rows(_rows(train_images, start, start + block_rows).detach().cpu())
        out.append((block @ targets.T).float())
    return torch.cat(out)


@torch.no_grad()
def _encode(encoder: Callable[[Tensor], Tensor], images: Images, batch_size: int, name: str) -> Tensor:
    feats = []
    for start in range(0, images.shape[0], batch_size):
        batch = _rows(images, start, start + batch_size)
        f = encoder(batch)
        if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[0] != batch.shape[0]:
            raise ValueError(f"Expected `encoder` to map {batch.shape[0]} images of `{name}` to a tensor "
                             f"({batch.shape[0]}, D), but got {getattr(f, 'shape', type(f))}")
        feats.append(f.detach().cpu().to(torch.float64))
    return torch.cat(feats)


def embedding_cosine_scores(encoder: Callable[[Tensor], Tensor], train_images: Images, x0_hat: Tensor,
                            batch_size: int = 256) -> Tensor:
    """Cosine similarity in an encoder's feature space, ``(N, B)`` float32.

    Args:
        encoder: images ``(n, C, H, W)`` -> features ``(n, D)`` (e.g. ``SmallConvClassifier.embed``),
            called under ``torch.no_grad`` on batches of ``batch_size``.
        train_images: ``(N, C, H, W)``; x0_hat: ``(B, C, H, W)``.
    """
    _check_images("train_images", train_images, "(N, C, H, W)")
    _check_images("x0_hat", x0_hat, "(B, C, H, W)")
    _checks.positive_int("batch_size", batch_size)
    targets = _unit_rows(_encode(encoder, x0_hat, batch_size, "x0_hat"))
    out = torch.empty(train_images.shape[0], targets.shape[0])
    for start in range(0, train_images.shape[0], batch_size):
        stop = min(start + batch_size, train_images.shape[0])
        train = _unit_rows(_encode(encoder, _rows(train_images, start, stop), batch_size, "train_images"))
        if train.shape[1] != targets.shape[1]:
            raise ValueError(f"Expected `encoder` features of one width, but got {train.shape[1]} and "
                             f"{targets.shape[1]}")
        out[start:stop] = (train @ targets.T).float()
    return out


def random_scores(N: int, B: int, seed: int) -> Tensor:
    """Standard normal ``(N, B)`` float32 scores from ``torch.Generator().manual_seed(seed)``."""
    _checks.positive_int("N", N)
    _checks.positive_int("B", B)
    _checks.int_seed("seed", seed)
    return torch.randn(N, B, generator=torch.Generator().manual_seed(seed))


def topk_indices(scores: Tensor, k: int, largest: bool = True) -> Tensor:
    """Indices ``(k, B)`` of the k highest (``largest``) or lowest scores per column of ``scores (N, B)``."""
    _checks.tensor_ndim("scores", scores, 2, " (N, B)")
    _checks.positive_int("k", k)
    if k > scores.shape[0]:
        raise ValueError(f"Expected `k` <= N = {scores.shape[0]}, but got {k}")
    return torch.topk(scores, k, dim=0, largest=largest).indices


# ----------------------------------------------------------------------------- classifier
class SmallConvClassifier(nn.Module):
    """A few 3x3 conv layers, global average pooling and a linear head.

    ``embed(x (n, C, H, W)) -> (n, 2 * width)`` penultimate features; ``forward`` gives logits
    ``(n, num_classes)``. ``num_features`` (= ``2 * width``) lets torchmetrics use ``embed``.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("image_size", image_size), ("width", width)):
            _checks.positive_int(name, value)
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.num_features = 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(4 if width % 4 == 0 else 1, width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2 if image_size >= 8 else 1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def _check(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"Expected images of shape (n, {', '.join(map(str, expected))}), "
                             f"but got {getattr(x, 'shape', type(x))}")

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features ``(n, num_features)``."""
        self._check(x)
        return self.features(x.to(self.head.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(n, num_classes)``."""
        return self.head(self.embed(x))


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 30, lr: float = 3e-3, seed: int = 0,
                     batch_size: int = 64, width: int = 32, weight_decay: float = 1e-4) -> SmallConvClassifier:
    """Train a :class:`SmallConvClassifier` with AdamW and cross-entropy; deterministic given ``seed``.

    Args:
        images: ``(n, C, H, W)`` float, square, e.g. scaled to [-1, 1] like the diffusion data: a tensor, or an
            image source read one minibatch at a time (see the module docstring).
        labels: ``(n,)`` integer classes in ``[0, num_classes)``; ``num_classes = labels.max() + 1``.

    Returns the model in eval mode. Initialisation and shuffling use their own generator
    (``torch.random.fork_rng``), so the global RNG state is left as it was.
    """
    _check_images("images", images)
    labels = _checks.long_vector("labels", labels, images.shape[0])
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"Expected square `images` (n, C, H, H), but got {tuple(images.shape)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        _checks.positive_int(name, value)
    _checks.int_seed("seed", seed)
    if int(labels.min()) < 0:
        raise ValueError(f"Expected `labels` >= 0, but got a minimum of {int(labels.min())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallConvClassifier(images.shape[1], int(labels.max()) + 1, images.shape[2], width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(labels) // batch_size))
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(_batch(images, idx)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classifier_features(classifier: SmallConvClassifier, images: Images, batch_size: int = 512) -> Tensor:
    """``classifier.embed`` over batches: ``(n, C, H, W)`` -> ``(n, D)`` float64 (for :func:`fid_from_features`)."""
    _check_images("images", images)
    classifier.eval()
    return _encode(classifier.embed, images, batch_size, "images")


@torch.no_grad()
def class_fraction(classifier: nn.Module, images: Tensor, target_class: int, batch_size: int = 512) -> float:
    """Fraction of ``images (n, C, H, W)`` (e.g. completions sampled from ``x_t``) that ``classifier``
    assigns to ``target_class`` (the final image's class): the feature-formation curve of Figure 3."""
    _check_images("images", images)
    if isinstance(target_class, bool) or not isinstance(target_class, int) or target_class < 0:
        raise ValueError(f"Expected `target_class` to be a non-negative int, but got {target_class!r}")
    classifier.eval()
    hits = sum(int((classifier(_rows(images, s, s + batch_size)).argmax(1) == target_class).sum())
               for s in range(0, images.shape[0], batch_size))
    return hits / images.shape[0]


# ----------------------------------------------------------------------------- Frechet distance
def _mean_cov(name: str, feats) -> tuple[np.ndarray, np.ndarray]:
    f = feats.detach().cpu().double().numpy() if isinstance(feats, Tensor) else np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"Expected `{name}` of shape (n, D) with n >= 2, but got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def fid_from_features(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (covariances with ddof=1).

    ``||mu_a - mu_b||^2 + tr(C_a + C_b - 2 sqrtm(C_a C_b))``, with ``scipy.linalg.sqrtm``. If the
    product is singular enough that ``sqrtm`` is not finite, ``eps * I`` is added to both
    covariances (as in pytorch-fid) and a warning is logged.

    Args:
        feats_a: ``(n, D)``; feats_b: ``(m, D)``; tensors or arrays.
    """
    from scipy import linalg

    mu_a, cov_a = _mean_cov("feats_a", feats_a)
    mu_b, cov_b = _mean_cov("feats_b", feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"Expected `feats_a` and `feats_b` with the same width D, but got {mu_a.size} and {mu_b.size}")
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        log.warning("fid_from_features: sqrtm of a singular product; adding %g to the covariance diagonals", eps)
        offset = eps * np.eye(cov_a.shape[0])
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
