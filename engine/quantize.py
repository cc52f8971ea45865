"""Quantize one class: latents (n, d) float32 -> K centroids (K, d), cell counts (K,), weights, distortion.

k-means (faiss Lloyd, seeded, k-means++ or random init) finds the centroids, trained on all of the class's points
(faiss would otherwise subsample to 256 per centroid), and cell counts come from assigning ALL points afterwards. Weights per centroid, scaled
to average 1.0 within the class (so `uniform` is all ones and the weighted loss of `uniform` is the plain loss):
  uniform  1                         D4M (CVPR'24)
  mass     count_k * K / n           the Voronoi cell mass: optimal quantization's W2-best weights
  sqrt     proportional to sqrt(count_k)   the variance-reduction reading of DDOQ's heuristic
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import faiss
import numpy as np

from engine.transport import squared_distances

WEIGHT_MODES = ("uniform", "mass", "sqrt")


@dataclass(frozen=True)
class Quantization:
    centroids: np.ndarray  # (K, d) float32
    counts: np.ndarray  # (K,) int64, points of the class nearest each centroid
    distortion: float  # mean squared distance to the nearest centroid
    initial_distortion: float  # the same for the initial centroids (k-means never ends above it)
    requested_k: int  # K asked for; len(centroids) is smaller when the class has fewer points

    @property
    def k(self) -> int:
        return len(self.centroids)


def weights_from_counts(counts: np.ndarray, mode: str) -> np.ndarray:
    """(K,) counts -> (K,) float64 weights averaging 1.0."""
    counts = np.asarray(counts, dtype=np.float64)
    if mode == "uniform":
        raw = np.ones_like(counts)
    elif mode == "mass":
        raw = counts
    elif mode == "sqrt":
        raw = np.sqrt(counts)
    else:
        raise ValueError(f"unknown weights mode {mode!r}; expected one of {WEIGHT_MODES}")
    if raw.sum() <= 0:
        raise ValueError("all cells are empty: cannot weight centroids")
    return raw * (len(raw) / raw.sum())


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling) -> (k, d) float32 initial centroids."""
    chosen = [int(rng.integers(len(points)))]
    nearest = squared_distances(points, points[chosen]).ravel()  # (n,)
    for _ in range(1, k):
        total = nearest.sum()
        # All remaining points coincide with chosen ones (duplicates): any point will do.
        index = int(rng.integers(len(points))) if total <= 0 else int(rng.choice(len(points), p=nearest / total))
        chosen.append(index)
        nearest = np.minimum(nearest, squared_distances(points, points[index : index + 1]).ravel())
    return points[chosen].astype(np.float32)


def quantize_class(latents: np.ndarray, k: int, init: str = "kmeans++", niter: int = 50, seed: int = 0) -> Quantization:
    """k-means with K = min(k, n) centroids on one class's latents (n, d)."""
    if len(latents) == 0:
        raise ValueError("cannot quantize an empty class")
    points = np.ascontiguousarray(latents, dtype=np.float32).reshape(len(latents), -1)
    n, d = points.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not np.isfinite(points).all():
        raise ValueError("latents contain NaN or Inf")
    requested_k, k = k, min(k, n)
    if k < requested_k:
        warnings.warn(f"class has {n} points < K={requested_k}: using K={n}", stacklevel=2)

    rng = np.random.default_rng(seed)
    if init == "kmeans++":
        start = kmeans_plus_plus(points, k, rng)
    elif init == "random":
        start = points[rng.choice(n, size=k, replace=False)].astype(np.float32)
    else:
        raise ValueError(f"unknown init {init!r}; expected 'kmeans++' or 'random'")
    initial = squared_distances(points, start).min(axis=1).mean()

    # Train on every point (faiss would subsample to 256 per centroid): a class is ~1300 points at most.
    kmeans = faiss.Kmeans(d, k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=-(-n // k))
    kmeans.train(points, init_centroids=start)
    centroids = kmeans.centroids.copy()  # (k, d)

    index = faiss.IndexFlatL2(d)
    index.add(centroids)
    nearest_d2, nearest = index.search(points, 1)  # all points, not faiss's training subsample
    counts = np.bincount(nearest.ravel(), minlength=k).astype(np.int64)
    return Quantization(centroids, counts, float(nearest_d2.mean()), float(initial), requested_k)


@dataclass(frozen=True)
class ClassReport:
    """One class quantized at one IPC: the centroids with every weighting, and W2 for each weighting."""

    quantization: Quantization
    weights: dict[str, np.ndarray]  # mode -> (K,) weights averaging 1
    w2: dict[str, float]  # mode -> W2(class latents, weighted centroids)
    n: int


def quantize_and_measure(latents: np.ndarray, k: int, init: str, niter: int, seed: int) -> ClassReport:
    """quantize_class, then every weighting and its exact W2 to the class's empirical measure."""
    from engine.transport import w2_distance

    points = np.asarray(latents, dtype=np.float32).reshape(len(latents), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K > n is recorded in the report (k < requested_k), not printed per class
        q = quantize_class(points, k, init=init, niter=niter, seed=seed)
    weights = {mode: weights_from_counts(q.counts, mode) for mode in WEIGHT_MODES}
    w2 = {mode: w2_distance(points, q.centroids, w) for mode, w in weights.items()}
    return ClassReport(q, weights, w2, len(points))
