"""Quantize one class: latents (n, d) float32 -> K centroids (K, d), cell counts (K,), weights, distortion.

Centroids: faiss Lloyd iterations (default) or CLVQ, the competitive-learning algorithm of optimal quantization,
from a greedy k-means++ (engine.quantize.lloyd_torch.kmeans_plus_plus, the one implementation), random or faiss
seeding; the best of `nredo` seeded runs. `quantize_class` is the one entry point: it checks the latents, picks a
backend (`FaissQuantizer` here, `TorchLloyd` in engine/quantize/lloyd_torch.py), which gives the centroids of each seed
and assigns points, and keeps the best run. Lloyd trains on all of the
class's points, and cell counts always come from assigning ALL points afterwards. Weights per centroid are scaled
to average 1.0 within the class (so `uniform` is all ones and the weighted loss of `uniform` is the plain loss):
  uniform  1                         D4M (CVPR'24)
  mass     count_k * K / n           the Voronoi cell mass: optimal quantization's W2-best weights
  sqrt     proportional to sqrt(count_k)   the variance-reduction reading of DDOQ's heuristic

Devices: "cpu" (faiss-cpu), or "cuda": faiss-gpu when it imports and sees a GPU, else the same algorithm in torch
(engine/quantize/lloyd_torch.py: faiss-gpu's wheels are CUDA 12 builds, the pinned torch is CUDA 13); backend="torch"
runs that path on any device. A quantize actor
given a GPU gets its device from `quantize_device`, which fails rather than quietly quantizing on the CPU.
faiss and POT are imported where they are used, so the torch path runs on a machine with neither.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from engine.config import QuantizeConfig

WEIGHT_MODES = ("uniform", "mass", "sqrt")
INITS = ("kmeans++", "random", "faiss")
DEVICES = ("cpu", "cuda")
BACKENDS = ("faiss", "torch")


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


def quantize_device(gpus_per_actor: float) -> str:
    """The device of a quantize actor given `gpus_per_actor` GPUs: "cpu" for none, else "cuda", and an error
    rather than a silent CPU run when the GPU it was given is not visible to torch."""
    if gpus_per_actor <= 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"runtime.quantize_gpus_per_actor={gpus_per_actor} but no CUDA device is visible to "
                           f"this quantize actor (torch.cuda.is_available() is False)")
    return "cuda"


def faiss_sees_gpu() -> bool:
    """faiss imports here and is the faiss-gpu build with a GPU visible (`pip install .[gpu]`)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


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


def _squared_distances32(points: np.ndarray, norms: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(n, d) float32 points with precomputed (n,) squared norms, (m, d) centers -> (n, m) float32 via one GEMM.
    float32 on purpose: a float64 copy of an ImageNet class (1300 x 16384) costs more than the whole seeding."""
    d2 = norms[:, None] - 2.0 * (points @ centers.T) + (centers * centers).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def lloyd(points: np.ndarray, start: np.ndarray | None, k: int, niter: int, seed: int, tol: float,
          on_gpu: bool = False) -> np.ndarray:
    """faiss Lloyd iterations on every point (faiss would otherwise subsample to 256 per centroid), run in chunks
    of 5 so it can stop once a chunk improves the objective by less than `tol` (relative): faiss itself always
    runs all `niter`, and most classes converge in far fewer. `on_gpu`: faiss-gpu (see quantize_class)."""
    import faiss

    n, d = points.shape
    centroids, previous, done = start, np.inf, 0
    while done < niter:
        steps = min(5, niter - done)
        kmeans = faiss.Kmeans(d, k, niter=steps, seed=seed + done, verbose=False, min_points_per_centroid=1,
                              max_points_per_centroid=-(-n // k), gpu=on_gpu)
        kmeans.train(points, init_centroids=centroids)
        centroids, done = kmeans.centroids.copy(), done + steps
        objective = float(kmeans.obj[-1])
        if previous - objective <= tol * previous:
            break
        previous = objective
    return centroids


def clvq(points: np.ndarray, start: np.ndarray, epochs: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Competitive learning vector quantization, the stochastic algorithm of optimal-quantization theory,
    in mini-batches: each centroid moves toward the mean of the batch points it wins, with the Robbins-Monro step
    1 / (points it has won so far) (MacQueen's online k-means; the initial centroid counts as one point)."""
    centroids = start.astype(np.float32).copy()
    won = np.ones(len(centroids))
    norms = (points * points).sum(1)
    for _ in range(epochs):
        order = rng.permutation(len(points))
        for begin in range(0, len(points), batch_size):
            index = order[begin : begin + batch_size]
            winners = _squared_distances32(points[index], norms[index], centroids).argmin(1)  # (B,)
            one_hot = np.zeros((len(centroids), len(index)), np.float32)
            one_hot[winners, np.arange(len(index))] = 1.0
            batch_counts = one_hot.sum(1)  # (K,)
            batch_sums = one_hot @ points[index]  # (K, d)
            won += batch_counts
            centroids += (batch_sums - batch_counts[:, None] * centroids) / won[:, None].astype(np.float32)
    return centroids


class FaissQuantizer:
    """The faiss / numpy backend: faiss Lloyd (faiss-gpu with `on_gpu`) or CLVQ, one seeded run per `run` call;
    every point assigned through one flat faiss index."""

    def __init__(self, latents: np.ndarray, k: int, config: QuantizeConfig, on_gpu: bool = False):
        import faiss

        self.points = np.ascontiguousarray(latents, dtype=np.float32).reshape(len(latents), -1)  # (n, d)
        self.index = faiss.IndexFlatL2(self.points.shape[1])
        self.k, self.config, self.on_gpu = k, config, on_gpu

    def all_finite(self) -> bool:
        return bool(np.isfinite(self.points).all())

    def run(self, seed: int) -> tuple[np.ndarray | None, np.ndarray]:
        """One seeded run -> (its start, None where faiss seeds itself; its centroids (k, d) float32)."""
        from engine.quantize.lloyd_torch import initial_centroids

        config, rng = self.config, np.random.default_rng(seed)
        start = None if config.init == "faiss" else initial_centroids(self.points, self.k, config.init, rng).numpy()
        if config.algorithm == "clvq":
            start = start if start is not None else initial_centroids(self.points, self.k, "random", rng).numpy()
            return start, clvq(self.points, start, config.clvq_epochs, config.clvq_batch_size, rng)
        return start, lloyd(self.points, start, self.k, config.niter, seed, config.tol, on_gpu=self.on_gpu)

    def assign(self, centroids: np.ndarray) -> tuple[np.ndarray, float]:
        """Every point (not a training subsample) to its nearest centroid -> ((k,) int64 counts, mean squared
        distance)."""
        self.index.reset()
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        nearest_d2, nearest = self.index.search(self.points, 1)
        return np.bincount(nearest.ravel(), minlength=len(centroids)).astype(np.int64), float(nearest_d2.mean())


def choose_backend(config: QuantizeConfig, device: str) -> str:
    """faiss, unless a GPU is asked for and faiss does not see one (then torch). Fails rather than running a GPU
    actor's work on the CPU unannounced."""
    if device not in DEVICES:
        raise ValueError(f"unknown quantize device {device!r}; expected one of {DEVICES}")
    if device == "cuda" and config.algorithm != "lloyd":  # clvq is numpy: it would run on the CPU unannounced
        raise ValueError(f"quantize.algorithm={config.algorithm} runs on the CPU only; use lloyd on a GPU or set "
                         f"runtime.quantize_gpus_per_actor=0")
    return "torch" if device == "cuda" and not faiss_sees_gpu() else "faiss"


def make_quantizer(latents, k: int, config: QuantizeConfig, device: str, backend: str):
    if backend == "torch":
        from engine.quantize.lloyd_torch import TorchLloyd

        return TorchLloyd(latents, k, config, device)
    if backend == "faiss":
        return FaissQuantizer(latents, k, config, on_gpu=device == "cuda")
    raise ValueError(f"unknown quantize backend {backend!r}; expected one of {BACKENDS}")


def quantize_class(latents, k: int, config: QuantizeConfig = QuantizeConfig(), device: str = "cpu",
                   backend: str | None = None) -> Quantization:
    """Quantize one class's latents (n, ...) (a numpy array, or for the torch backend a tensor, on the device
    or not) into K = min(k, n) centroids; the best of `nredo` runs seeded seed, seed + 1, ... `backend` None
    chooses (`choose_backend`); "faiss" or "torch" forces one."""
    backend = choose_backend(config, device) if backend is None else backend
    if config.init not in INITS:
        raise ValueError(f"unknown init {config.init!r}; expected one of {INITS}")
    if len(latents) == 0:
        raise ValueError("cannot quantize an empty class")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    requested_k, k = k, min(k, len(latents))
    quantizer = make_quantizer(latents, k, config, device, backend)
    if not quantizer.all_finite():
        raise ValueError("latents contain NaN or Inf")
    if k < requested_k:
        warnings.warn(f"class has {len(latents)} points < K={requested_k}: using K={len(latents)}", stacklevel=2)
    best = None
    for seed in range(config.seed, config.seed + config.nredo):
        start, centroids = quantizer.run(seed)
        counts, run_distortion = quantizer.assign(centroids)
        if best is None or run_distortion < best.distortion:
            initial = float("nan") if start is None else quantizer.assign(start)[1]
            best = Quantization(centroids, counts, run_distortion, initial, requested_k)
    return best


@dataclass(frozen=True)
class ClassReport:
    """One class quantized at one IPC: the centroids with every weighting, and W2 for each weighting."""

    quantization: Quantization
    weights: dict[str, np.ndarray]  # mode -> (K,) weights averaging 1
    w2: dict[str, float]  # mode -> W2(class latents, weighted centroids)
    n: int


def quantize_and_measure(latents: np.ndarray, k: int, config: QuantizeConfig = QuantizeConfig(),
                         device: str = "cpu") -> ClassReport:
    """quantize_class (on `device`), then every weighting and its exact W2 to the class's empirical measure."""
    from engine.quantize.transport import squared_distances, w2_distance

    points = np.asarray(latents, dtype=np.float32).reshape(len(latents), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K > n is recorded in the report (k < requested_k), not printed per class
        q = quantize_class(points, k, config, device)
    weights = {mode: weights_from_counts(q.counts, mode) for mode in WEIGHT_MODES}
    cost = squared_distances(points, q.centroids)  # (n, K), shared by the three weightings
    w2 = {mode: w2_distance(points, q.centroids, w, cost) for mode, w in weights.items()}
    return ClassReport(q, weights, w2, len(points))
