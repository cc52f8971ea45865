"""Distances between the empirical measure of a class's latents and its quantized measure.

points (n, d) carry mass 1/n each; centroids (K, d) carry weights w (any positive scale, normalized here).
W2 is exact optimal transport (POT's network simplex), fine for n*K up to ~10^6. With mass (Voronoi) weights
the Voronoi assignment is an optimal coupling, so W2^2 equals the distortion: the tests check that identity.
"""

from __future__ import annotations

import numpy as np
import ot


def squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, d), (K, d) -> (n, K) float64 squared Euclidean distances, clipped at 0 against round-off.
    float32 inputs stay float32 for the GEMM (a float64 copy of a 16384-d class costs more than the rest of the
    stage); the small (n, K) result is float64 for the transport solver."""
    dtype = np.float32 if points.dtype == np.float32 and centroids.dtype == np.float32 else np.float64
    p, c = points.astype(dtype, copy=False), centroids.astype(dtype, copy=False)
    d2 = (p * p).sum(1, dtype=np.float64)[:, None] - 2.0 * (p @ c.T) + (c * c).sum(1, dtype=np.float64)[None, :]
    return np.maximum(d2, 0.0)


def distortion(points: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance of each point to its nearest centroid (the k-means objective, per point)."""
    return float(squared_distances(points, centroids).min(axis=1).mean())


def w2_distance(points: np.ndarray, centroids: np.ndarray, centroid_weights: np.ndarray,
                cost: np.ndarray | None = None) -> float:
    """Exact W2 between (1/n) sum delta_points and sum w_k delta_centroids (w normalized to sum 1).
    `cost` = squared_distances(points, centroids), when the caller already has it (several weightings)."""
    weights = np.asarray(centroid_weights, dtype=np.float64)
    if weights.min() < 0 or weights.sum() <= 0:
        raise ValueError("centroid weights must be non-negative with a positive sum")
    a = np.full(len(points), 1.0 / len(points))
    b = weights / weights.sum()
    cost = squared_distances(points, centroids) if cost is None else cost
    return float(np.sqrt(max(ot.emd2(a, b, cost, numItermax=10_000_000), 0.0)))
