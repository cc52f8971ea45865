"""D4M's quantizer (Su et al., CVPR 2024), as its code runs it (distillation/gen_prototype.py of suduo94/D4M).

One scikit-learn MiniBatchKMeans(n_clusters=K, random_state=seed, batch_size=km_expand * K, n_init="auto") per
class, fed by `partial_fit` on each km_expand * K latents in the order a shuffled loader brings them: a single
pass, each batch seen once. Its centroids are trained on with uniform weights. D4M's published ImageNet command
sets km_expand 1 (its argument's default is 10); its random_state is 0, the engine's quantize.seed default.

Deviation, named: D4M fits the last partial batch (at least K latents) only for the class of the loader's very
last image (the loop variable after the loop); here every class's last partial batch of at least K latents is
fitted, as the code's intent reads. With ImageNet's 1,300 images per class and km_expand 1 there is no partial
batch at IPC 10 or 50, so the two agree there.
"""

from __future__ import annotations

import warnings

import numpy as np

from engine.quantize.quantizer import Quantization
from engine.quantize.transport import squared_distances


def d4m_batches(n: int, k: int, km_expand: int, seed: int) -> list[np.ndarray]:
    """Row positions of each partial_fit call, in order: a seeded shuffle cut into batches of km_expand * K, the
    last (shorter) one kept when it holds at least K rows."""
    order = np.random.default_rng(seed).permutation(n)
    size = km_expand * k
    batches = [order[start:start + size] for start in range(0, n, size)]
    return [b for b in batches if len(b) == size or len(b) >= k]


def d4m_quantize(latents: np.ndarray, k: int, km_expand: int = 1, seed: int = 0) -> Quantization:
    """One class's latents (n, ...) -> D4M's K = min(k, n) centroids, with cell counts and distortion from
    assigning every latent afterwards (as the engine's quantizer reports them)."""
    from sklearn.cluster import MiniBatchKMeans

    if len(latents) == 0:
        raise ValueError("cannot quantize an empty class")
    points = np.asarray(latents, dtype=np.float32).reshape(len(latents), -1)
    if k < 1 or km_expand < 1:
        raise ValueError(f"k and km_expand must be >= 1, got {k} and {km_expand}")
    requested_k, k = k, min(k, len(points))
    if k == len(points):  # every point its own centroid, as the engine's quantizer does for a small class
        centroids = points.copy()
    else:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=km_expand * k, n_init="auto")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's note that a tiny batch may converge poorly: D4M's setting
            for rows in d4m_batches(len(points), k, km_expand, seed):
                model.partial_fit(points[rows])
        centroids = model.cluster_centers_.astype(np.float32)
    distances = squared_distances(points, centroids)
    nearest = distances.argmin(axis=1)
    counts = np.bincount(nearest, minlength=k).astype(np.int64)
    distortion = float(distances[np.arange(len(points)), nearest].mean())
    return Quantization(centroids, counts, distortion, float("nan"), requested_k)
