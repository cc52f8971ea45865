"""Distances between the empirical measure of a class's latents and its quantized measure.

points (n, d) carry mass 1/n each; centroids (K, d) carry weights w (any positive scale, normalized here).
W2 is exact optimal transport (POT's network simplex), fine for n*K up to ~10^6. With mass (Voronoi) weights
the Voronoi assignment is an optimal coupling, so W2^2 equals the distortion: the tests check that identity.
"""

from __future__ import annotations

import numpy as np
import ot


def squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, d), (K, d) -> (n, K) float64 squared Euclidean distances, clipped at 0 against round-off."""
    p, c = points.astype(np.float64), centroids.astype(np.float64)
    d2 = (p * p).sum(1)[:, None] - 2.0 * p @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def distortion(points: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance of each point to its nearest centroid (the k-means objective, per point)."""
    return float(squared_distances(points, centroids).min(axis=1).mean())


def w2_distance(points: np.ndarray, centroids: np.ndarray, centroid_weights: np.ndarray) -> float:
    """Exact W2 between (1/n) sum delta_points and sum w_k delta_centroids (w normalized to sum 1)."""
    weights = np.asarray(centroid_weights, dtype=np.float64)
    if weights.min() < 0 or weights.sum() <= 0:
        raise ValueError("centroid weights must be non-negative with a positive sum")
    a = np.full(len(points), 1.0 / len(points))
    b = weights / weights.sum()
    cost = squared_distances(points, centroids)
    return float(np.sqrt(max(ot.emd2(a, b, cost, numItermax=10_000_000), 0.0)))
