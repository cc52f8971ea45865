"""Quantize one class with torch, on a GPU where faiss-gpu cannot be installed (its only wheels are CUDA 12 builds
needing hundreds of MB of CUDA 12 libraries; the pinned torch is a CUDA 13 build). Pure torch + numpy: no faiss,
no POT, so it also runs on a machine that has neither. It also holds the one k-means++ seeding, which the faiss
path runs on the CPU through the same code.

A backend of engine.quantize.quantizer.quantize_class (the entry point that validates the latents and keeps the best of
`nredo` seeded runs): `TorchLloyd(latents, k, config, device)` gives, per seed, the start and the centroids, and
assigns every point to a set of centroids. The algorithm of the faiss `lloyd` path, step for step:
- greedy k-means++ seeding (`kmeans_plus_plus`, shared by both paths) from the numpy generator of the seed;
- Lloyd iterations on every point, in chunks of 5, stopping once a chunk improves the objective by less than `tol`
  (relative), at most `niter` iterations;
- counts and distortion from assigning ALL points afterwards.
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


def as_tensor(points: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor sharing `points`' memory. Latents read from parquet can be read-only arrays; seeding never writes
    to them, so torch's warning about that is silenced rather than paying for a copy of the class."""
    if isinstance(points, torch.Tensor):
        return points
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(points)


def _squared_distances(points: torch.Tensor, norms: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(n, d) points with their (n,) squared norms, (m, d) centers -> (n, m) float32 squared distances."""
    d2 = norms[:, None] - 2.0 * (points @ centers.T) + (centers * centers).sum(1)[None, :]
    return d2.clamp_min_(0.0)


def kmeans_plus_plus(points: torch.Tensor | np.ndarray, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as sklearn's) on `points`' device: D^2 sampling with 2 + log(k) candidates per
    step, keeping the candidate that lowers the potential most. (n, d) float32 -> (k, d) float32 initial
    centroids; a numpy array is seeded on the CPU without a copy."""
    points = as_tensor(points)
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
    iterations, and iteration stops once those 5 improved it by at most `tol` (relative), as engine.quantize.quantizer."""
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


def initial_centroids(points: torch.Tensor | np.ndarray, k: int, init: str, rng: np.random.Generator) -> torch.Tensor:
    """k-means++, or k distinct points drawn from `rng` ("random", and "faiss" where faiss does not seed)."""
    if init == "kmeans++":
        return kmeans_plus_plus(points, k, rng)
    points = as_tensor(points)
    index = torch.as_tensor(rng.choice(len(points), size=k, replace=False), device=points.device)
    return points[index].clone()


class TorchLloyd:
    """The torch backend of engine.quantize.quantizer.quantize_class: Lloyd on `device`, one seeded run per `run` call.
    `latents` (n, ...) may already be a tensor on the device (no copy then)."""

    def __init__(self, latents: np.ndarray | torch.Tensor, k: int, config: QuantizeConfig,
                 device: str | torch.device):
        if config.algorithm != "lloyd":
            raise ValueError(f"the torch quantizer implements Lloyd only, not quantize.algorithm={config.algorithm}")
        self.points = torch.as_tensor(latents).to(device, torch.float32).reshape(len(latents), -1).contiguous()
        self.norms = (self.points * self.points).sum(1)
        self.k, self.config = k, config

    def all_finite(self) -> bool:
        return bool(torch.isfinite(self.points).all())

    @torch.no_grad()
    def run(self, seed: int) -> tuple[torch.Tensor, np.ndarray]:
        """One seeded run -> (its start, on the device; its centroids (k, d) float32)."""
        start = initial_centroids(self.points, self.k, self.config.init, np.random.default_rng(seed))
        centroids = lloyd_torch(self.points, start, self.config.niter, self.config.tol)
        return start, centroids.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def assign(self, centroids: np.ndarray | torch.Tensor) -> tuple[np.ndarray, float]:
        """Every point to its nearest centroid -> ((k,) int64 counts, mean squared distance)."""
        centroids = torch.as_tensor(centroids, device=self.points.device)
        nearest_d2, nearest = _squared_distances(self.points, self.norms, centroids).min(1)
        counts = torch.bincount(nearest, minlength=len(centroids)).cpu().numpy().astype(np.int64)
        return counts, float(nearest_d2.mean(dtype=torch.float64))
