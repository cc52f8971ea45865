"""Per-class quantizer benchmark: the engine's default quantizer against D4M's procedure and the best of sklearn,
side by side on the same seeded Gaussian-mixture classes of ImageNet shape (1300 x 16384 float32: SD v1.5
latents 4x64x64 of one ImageNet class).

    python benchmarks/quantize.py [--n 1300] [--dim 16384] [--ks 10 50] [--seeds 0 1 2]

d4m   sklearn MiniBatchKMeans(n_clusters=K, batch_size=K, n_init="auto") fed by partial_fit in one shuffled pass of
      batches of K (D4M's ImageNet script uses batch = IPC).
best  the lower-distortion of sklearn KMeans (Lloyd, k-means++) and MiniBatchKMeans(...).fit over many epochs;
      its time is the time of the one that won.
engine  engine.quantize.quantizer.quantize_class with the defaults of QuantizeConfig.
Distortion = mean squared distance of every point to its nearest centroid, computed the same way for all three.
Prints medians over seeds and ends with one line of K = 10 ratios (engine / d4m, engine / best).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import QuantizeConfig  # noqa: E402
from engine.quantize.quantizer import quantize_class  # noqa: E402
from engine.quantize.transport import distortion  # noqa: E402


def gaussian_mixture(n: int, dim: int, seed: int, components: int = 40) -> np.ndarray:
    """Unequal clusters (Dirichlet sizes) with unequal spreads, like a class's latents: (n, dim) float32."""
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(n, rng.dirichlet(np.full(components, 0.7)))
    means = rng.standard_normal((components, dim)).astype(np.float32)
    spreads = rng.uniform(0.5, 1.5, components).astype(np.float32)
    parts = [means[c] + spreads[c] * rng.standard_normal((s, dim), dtype=np.float32) for c, s in enumerate(sizes)]
    points = np.concatenate(parts)
    return points[rng.permutation(n)]


def run_d4m(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(n_clusters=k, batch_size=k, n_init="auto", random_state=seed)
    order = np.random.default_rng(seed).permutation(len(points))
    for start in range(0, len(points) - k + 1, k):  # one pass; a last partial batch smaller than K is dropped
        model.partial_fit(points[order[start : start + k]])
    return model.cluster_centers_


def run_sklearn_kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, algorithm="lloyd", init="k-means++", n_init=1, random_state=seed).fit(points).cluster_centers_


def run_sklearn_minibatch(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(n_clusters=k, batch_size=1024, n_init=3, max_iter=100, random_state=seed)
    return model.fit(points).cluster_centers_


def run_engine(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    config = QuantizeConfig()
    return quantize_class(points, k, dataclasses.replace(config, seed=seed)).centroids


def timed(fn, points, k, seed) -> tuple[float, float]:
    start = time.perf_counter()
    centroids = fn(points, k, seed)
    seconds = time.perf_counter() - start
    return distortion(points, centroids), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1300)
    parser.add_argument("--dim", type=int, default=16384)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    summary = {}
    print(f"{'K':>3} {'seed':>4} {'method':<10} {'distortion':>12} {'seconds':>8}")
    for k in args.ks:
        rows = {"d4m": [], "best": [], "engine": []}
        for seed in args.seeds:
            points = gaussian_mixture(args.n, args.dim, seed)
            d4m = timed(run_d4m, points, k, seed)
            lloyd = timed(run_sklearn_kmeans, points, k, seed)
            minibatch = timed(run_sklearn_minibatch, points, k, seed)
            engine = timed(run_engine, points, k, seed)
            best = min(lloyd, minibatch)  # lower distortion wins, with its own time
            for name, (dist, secs) in (("d4m", d4m), ("sk-lloyd", lloyd), ("sk-minibatch", minibatch),
                                       ("engine", engine)):
                print(f"{k:>3} {seed:>4} {name:<12} {dist:>10.2f} {secs:>8.2f}")
            rows["d4m"].append(d4m)
            rows["best"].append(best)
            rows["engine"].append(engine)
        med = {name: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for name, v in rows.items()}
        summary[k] = med
        print(f"K={k} medians: " + ", ".join(f"{n} {d:.2f} in {s:.2f}s" for n, (d, s) in med.items()))
        print(f"K={k} ratios: distortion_vs_d4m={med['engine'][0] / med['d4m'][0]:.3f} "
              f"distortion_vs_best={med['engine'][0] / med['best'][0]:.3f} "
              f"time_vs_best={med['engine'][1] / med['best'][1]:.3f} time_vs_d4m={med['engine'][1] / med['d4m'][1]:.2f}")
    k = 10 if 10 in summary else args.ks[0]
    med = summary[k]
    print(f"distortion_vs_d4m={med['engine'][0] / med['d4m'][0]:.3f} "
          f"distortion_vs_best={med['engine'][0] / med['best'][0]:.3f} "
          f"time_vs_best={med['engine'][1] / med['best'][1]:.3f}")


if __name__ == "__main__":
    main()
