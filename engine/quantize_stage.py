"""The quantize stage for one class, as a retryable unit of work (pure: no Ray).

class latents folder -> <out_dir>/class-<label>.centroids.parquet + class-<label>.stats.parquet, every IPC.
The stats file is written last and is the class's completion marker: a retried or re-run task whose class is
already done returns at once, and a task killed half-way leaves no file behind (writes are atomic).
Peak memory is one class's latents plus the k-means working set, whatever the number of classes.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import pyarrow as pa

from engine.config import QuantizeConfig
from engine.location import location
from engine.quantize import WEIGHT_MODES, quantize_and_measure
from engine.store import atomic_write_table, read_class_latents, read_table


def class_result_paths(out_dir, label: int) -> tuple:
    """(centroids file, stats file) of one class, in a local folder or on an object store."""
    folder = location(out_dir)
    return folder / f"class-{label:05d}.centroids.parquet", folder / f"class-{label:05d}.stats.parquet"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def quantize_class_folder(label: int, class_dir: str, config: QuantizeConfig, out_dir: str) -> dict:
    """Quantize one class at every IPC of the config; returns {label, n, seconds, skipped, peak_rss_mb}."""
    centroids_path, stats_path = class_result_paths(out_dir, label)
    if stats_path.exists():
        return {"label": label, "n": -1, "seconds": 0.0, "skipped": True, "peak_rss_mb": peak_rss_mb()}
    start = time.perf_counter()
    _, latents = read_class_latents(class_dir)
    if not np.isfinite(latents).all():
        bad = int((~np.isfinite(latents)).any(axis=1).sum())
        raise ValueError(f"class {label}: {bad} of {len(latents)} latents in {class_dir} contain NaN or Inf")
    centroid_rows, stat_rows = [], []
    for ipc in config.ipc:
        ipc_start = time.perf_counter()
        report = quantize_and_measure(latents, ipc, config)
        q = report.quantization
        for index in range(q.k):
            centroid_rows.append({
                "label": label, "ipc": ipc, "index": index, "count": int(q.counts[index]),
                **{f"weight_{m}": float(report.weights[m][index]) for m in WEIGHT_MODES},
                "latent": q.centroids[index].tolist(),
            })
        stat_rows.append({
            "label": label, "ipc": ipc, "n": report.n, "k": q.k, "requested_k": q.requested_k,
            # K > n: the class keeps every point as a centroid; the run records it here.
            "warning": f"{report.n} points < K={ipc}: K={q.k}" if q.k < ipc else "",
            "distortion": q.distortion, "initial_distortion": q.initial_distortion,
            **{f"w2_{m}": report.w2[m] for m in WEIGHT_MODES},
            "seconds": time.perf_counter() - ipc_start,
        })
    atomic_write_table(centroids_path, pa.Table.from_pylist(centroid_rows))
    atomic_write_table(stats_path, pa.Table.from_pylist(stat_rows))
    return {"label": label, "n": len(latents), "seconds": time.perf_counter() - start, "skipped": False,
            "peak_rss_mb": peak_rss_mb()}


def gather_class_results(out_dir, labels: list[int]) -> tuple[pa.Table, pa.Table]:
    """Every class's files -> (centroids, stats) tables sorted by (ipc, label, index)."""
    centroids = pa.concat_tables([read_table(class_result_paths(out_dir, c)[0]) for c in labels])
    stats = pa.concat_tables([read_table(class_result_paths(out_dir, c)[1]) for c in labels])
    return (centroids.sort_by([("ipc", "ascending"), ("label", "ascending"), ("index", "ascending")]),
            stats.sort_by([("ipc", "ascending"), ("label", "ascending")]))
