"""Quantize one class with torch, on a GPU where faiss-gpu cannot be installed (its only wheels are CUDA 12 builds
needing hundreds of MB of CUDA 12 libraries; the pinned torch is a CUDA 13 build). Pure torch + numpy: no faiss,
no POT, so it also runs on a machine that has neither.

The algorithm of engine/quantize.py's `lloyd` path, step for step:
- greedy k-means++ seeding with the same numpy generator and the same draws, so on the CPU it picks the same seeds
  as the numpy seeding (up to float rounding in a tie);
- Lloyd iterations on every point, in chunks of 5, stopping once a chunk improves the objective by less than `tol`
  (relative), at most `niter` iterations;
- the best of `nredo` runs seeded seed, seed + 1, ...; counts and distortion from assigning ALL points afterwards.
One difference: a cell that empties is moved onto the point farthest from its centroid (as scikit-learn does),
which never raises the objective; faiss splits a large cell instead. init "faiss" (faiss's own sampling) has no
torch counterpart and draws K distinct points from the seed, as "random" does.
float32 throughout (distances via one GEMM, like faiss), objectives summed in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from engine.config import QuantizeConfig
from engine.quantize import INITS, Quantization


def _squared_distances(points: torch.Tensor, norms: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(n, d) points with their (n,) squared norms, (m, d) centers -> (n, m) float32 squared distances."""
    d2 = norms[:, None] - 2.0 * (points @ centers.T) + (centers * centers).sum(1)[None, :]
    return d2.clamp_min_(0.0)


def kmeans_plus_plus_torch(points: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """engine.quantize.kmeans_plus_plus on `points`' device: D^2 sampling with 2 + log(k) candidates per step,
    keeping the one that lowers the potential most. The draws come from the numpy `rng` in the same order."""
    n = len(points)
    norms = (points * points).sum(1)
    trials = 2 + int(np.log(k))
    first = int(rng.integers(n))
    chosen = [first]
    closest = _squared_distances(points, norms, points[first : first + 1])[:, 0]  # (n,)
    potential = float(closest.sum())
    for _ in range(1, k):
        if potential <= 0:  # every point coincides with a chosen one (duplicates): any point will do
            candidates = torch.as_tensor(rng.integers(n, size=trials), device=points.device)
        else:
            cumulative = torch.cumsum(closest, 0, dtype=torch.float64)
            draws = torch.as_tensor(rng.random(trials) * potential, device=points.device)
            candidates = torch.searchsorted(cumulative, draws).clamp_max_(n - 1)
        trial_closest = torch.minimum(closest[:, None], _squared_distances(points, norms, points[candidates]))
        potentials = trial_closest.sum(0, dtype=torch.float64)  # (trials,)
        best = int(torch.argmin(potentials))
        chosen.append(int(candidates[best]))
        closest, potential = trial_closest[:, best], float(potentials[best])
    return points[chosen].clone()


def lloyd_torch(points: torch.Tensor, start: torch.Tensor, niter: int, tol: float) -> torch.Tensor:
    """Lloyd iterations on every point from `start` (k, d); the objective is checked (one host sync) every 5
    iterations, and iteration stops once those 5 improved it by at most `tol` (relative), as engine.quantize."""
    norms = (points * points).sum(1)
    centroids, previous = start.clone(), float("inf")
    k = len(centroids)
    for iteration in range(niter):
        nearest_d2, nearest = _squared_distances(points, norms, centroids).min(1)
        objective = nearest_d2.sum(dtype=torch.float64)  # of the centroids before this update, as faiss's obj
        counts = torch.bincount(nearest, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, points)
        means = sums / counts.clamp_min(1)[:, None].to(sums.dtype)
        # Empty cells take the points farthest from their centroids, without a host sync: the r-th empty cell
        # gets the r-th farthest point (K <= n, so there are always enough points).
        empty = counts == 0
        farthest = torch.topk(nearest_d2, k).indices
        rank = (torch.cumsum(empty, 0) - 1).clamp_min(0)
        centroids = torch.where(empty[:, None], points[farthest[rank]], means)
        if (iteration + 1) % 5 == 0 or iteration + 1 == niter:
            value = float(objective)
            if previous - value <= tol * previous:
                break
            previous = value
    return centroids


def _start(points: torch.Tensor, k: int, init: str, rng: np.random.Generator) -> torch.Tensor:
    if init == "kmeans++":
        return kmeans_plus_plus_torch(points, k, rng)
    if init in ("random", "faiss"):
        index = torch.as_tensor(rng.choice(len(points), size=k, replace=False), device=points.device)
        return points[index].clone()
    raise ValueError(f"unknown init {init!r}; expected one of {INITS}")


@torch.no_grad()
def quantize_class_torch(latents: np.ndarray | torch.Tensor, k: int, config: QuantizeConfig = QuantizeConfig(),
                         device: str | torch.device = "cuda") -> Quantization:
    """engine.quantize.quantize_class with torch on `device`: K = min(k, n) centroids, the best of `nredo` runs.
    `latents` (n, ...) may already be a tensor on the device (no copy then)."""
    if config.algorithm != "lloyd":
        raise ValueError(f"the torch quantizer implements Lloyd only, not quantize.algorithm={config.algorithm}")
    if len(latents) == 0:
        raise ValueError("cannot quantize an empty class")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    points = torch.as_tensor(latents).to(device, torch.float32).reshape(len(latents), -1).contiguous()
    n = len(points)
    if not bool(torch.isfinite(points).all()):
        raise ValueError("latents contain NaN or Inf")
    requested_k, k = k, min(k, n)
    if k < requested_k:
        warnings.warn(f"class has {n} points < K={requested_k}: using K={n}", stacklevel=2)
    norms = (points * points).sum(1)
    best = None
    for attempt in range(config.nredo):
        rng = np.random.default_rng(config.seed + attempt)
        start = _start(points, k, config.init, rng)
        centroids = lloyd_torch(points, start, config.niter, config.tol)
        nearest_d2, nearest = _squared_distances(points, norms, centroids).min(1)  # all points
        run_distortion = float(nearest_d2.mean(dtype=torch.float64))
        if best is None or run_distortion < best.distortion:
            initial = float(_squared_distances(points, norms, start).min(1).values.mean(dtype=torch.float64))
            counts = torch.bincount(nearest, minlength=k).cpu().numpy().astype(np.int64)
            best = Quantization(centroids.cpu().numpy().astype(np.float32), counts, run_distortion, initial,
                                requested_k)
    return best
