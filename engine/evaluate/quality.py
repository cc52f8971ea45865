"""How realistic a set of images is, judged by a classifier (the evaluation's teacher) against real images.

- class agreement: the fraction of images the teacher classifies as the class they were made for;
- Fréchet distance between the teacher's penultimate features of the set and of real images (FID's formula,
  with the task's own classifier in place of Inception: no pretrained network exists for most domains);
- precision and recall on k-NN manifolds (Kynkäänniemi et al. 2019, "Improved precision and recall metric for
  assessing generative models"): a feature's manifold is the union of balls around its points, each of radius the
  distance to its k-th nearest neighbour; precision = the share of generated points inside the real manifold
  (realism), recall = the share of real points inside the generated manifold (coverage).

Pure: torch and numpy, no Ray. The reference images are a bounded sample of the validation split, never test.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.evaluate.protocols import network_input
from engine.evaluate.train import model_input

NEIGHBOURS = 3  # k of the k-NN manifolds (the paper's default)


@torch.no_grad()
def teacher_outputs(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (n, d) float32, predicted class (n,)) of uint8 images (n, H, W, 3)."""
    model.eval()
    device = next(model.parameters()).device
    features, predicted = [], []
    for start in range(0, len(images), batch_size):
        x = model_input(images[start : start + batch_size], device)
        features.append(penultimate(model, x).float().cpu().numpy())
        predicted.append(model(x).argmax(1).cpu().numpy())
    return np.concatenate(features), np.concatenate(predicted)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features the classifier's last linear layer reads: ConvNet's flattened blocks, timm's pre-logits. The
    network's forward hook is bypassed here, so its input scale and channels are applied first."""
    x = network_input(model, x)
    if hasattr(model, "features") and hasattr(model, "classifier"):  # engine.evaluate.students.ConvNet
        return model.features(x).flatten(1)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (n, d), in float64. The trace of
    the square root is the sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), symmetric, so it
    needs no complex sqrtm; it is exact for rank-deficient covariances (fewer points than dimensions)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"two feature sets (n >= 2, d) of one dimension d are needed, got {a.shape} and {b.shape}")
    mean = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(max(0.0, mean @ mean + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def knn_radii(points: torch.Tensor, k: int = NEIGHBOURS, chunk: int = 2048) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point (itself excluded), in chunks of rows: memory is
    chunk x n distances, never n x n."""
    if len(points) <= k:
        raise ValueError(f"a k-NN manifold with k={k} needs more than {k} points, got {len(points)}")
    radii = []
    for start in range(0, len(points), chunk):
        distances = torch.cdist(points[start : start + chunk], points)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the 0 to itself is the first
    return torch.cat(radii)


def inside_manifold(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor,
                    chunk: int = 2048) -> torch.Tensor:
    """For each query, whether it lies in some ball (point, radius)."""
    inside = []
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start : start + chunk], points)
        inside.append((distances <= radii[None, :]).any(1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = NEIGHBOURS) -> tuple[float, float]:
    """(precision, recall) of generated features against real ones on k-NN manifolds (see the module)."""
    real_t, generated_t = (torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in (real, generated))
    precision = inside_manifold(generated_t, real_t, knn_radii(real_t, k)).float().mean()
    recall = inside_manifold(real_t, generated_t, knn_radii(generated_t, k)).float().mean()
    return float(precision), float(recall)


def set_quality(teacher: nn.Module, images: np.ndarray, labels: np.ndarray, real_features: np.ndarray,
                k: int = NEIGHBOURS) -> dict:
    """The figures of one set of images made for `labels`, against the teacher's features of real images."""
    return quality_of_features(*teacher_outputs(teacher, images), np.asarray(labels), real_features, k)


def quality_of_features(features: np.ndarray, predicted: np.ndarray, labels: np.ndarray, real_features: np.ndarray,
                        k: int = NEIGHBOURS) -> dict:
    """set_quality from the teacher's outputs on the set (a caller may compute them chunk by chunk)."""
    quality = {"images": int(len(labels)), "class_agreement": float(np.mean(predicted == labels))}
    # A covariance needs two rows on each side (a tiny validation split may hold one image).
    enough = len(labels) >= 2 and len(real_features) >= 2
    quality["frechet_distance"] = frechet_distance(features, real_features) if enough else None
    if len(labels) > k and len(real_features) > k:
        quality["precision"], quality["recall"] = precision_recall(real_features, features, k)
    else:
        quality["precision"] = quality["recall"] = None  # too few images for a k-NN manifold
    return quality
