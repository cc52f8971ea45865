"""The quantize stage for one class, as a retryable unit of work (pure: no Ray).

class latents folder -> <out_dir>/class-<label>.{centroids,picks,stats}.parquet, every IPC:
  centroids  {label, ipc, index, count, weight_<mode>..., latent: fixed_size_list<float32>}
  picks      {method, ipc, rank, label, id, source}: the real-image baselines (random, herding, kcenter), chosen
             here because the class's latents are loaded here; only these rows are ever read back from the source
  stats      {label, ipc, n, k, distortion, w2_<mode>, ...}
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
from engine.io.location import location
from engine.io.store import atomic_write_table, float32_rows, read_class_table, read_table, table_latents
from engine.quantize.baselines import select_herding, select_kcenter, select_random_in_class
from engine.quantize.quantizer import WEIGHT_MODES, quantize_and_measure


def class_result_paths(out_dir, label: int) -> tuple:
    """(centroids file, stats file) of one class, in a local folder or on an object store."""
    folder = location(out_dir)
    return folder / f"class-{label:05d}.centroids.parquet", folder / f"class-{label:05d}.stats.parquet"


def class_picks_path(out_dir, label: int):
    return location(out_dir) / f"class-{label:05d}.picks.parquet"


def select_real_images(ids: np.ndarray, sources: list[str], latents: np.ndarray, label: int, ipcs: tuple[int, ...],
                       seed: int) -> pa.Table:
    """The real-image baselines of one class at every IPC -> rows {method, ipc, rank, label, id, source}.
    herding and kcenter are greedy: IPC k is their first k picks; random draws each IPC on its own."""
    rows = []
    for ipc in ipcs:
        rows += [("random", ipc, rank, r) for rank, r in enumerate(select_random_in_class(len(ids), ipc, seed, label))]
    for method, select in (("herding", select_herding), ("kcenter", select_kcenter)):
        order = select(latents, max(ipcs))
        rows += [(method, ipc, rank, int(order[rank])) for ipc in ipcs for rank in range(min(ipc, len(order)))]
    return pa.table({
        "method": pa.array([r[0] for r in rows], pa.string()), "ipc": pa.array([r[1] for r in rows], pa.int64()),
        "rank": pa.array([r[2] for r in rows], pa.int64()), "label": pa.array([label] * len(rows), pa.int64()),
        "id": pa.array([str(ids[r[3]]) for r in rows], pa.string()),
        "source": pa.array([sources[r[3]] for r in rows], pa.string()),
    })


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def quantize_class_folder(label: int, class_dir: str, config: QuantizeConfig, out_dir: str,
                          device: str = "cpu") -> dict:
    """Quantize one class at every IPC of the config; returns {label, n, seconds, skipped, peak_rss_mb, files: the
    records {path: {sha256, bytes}} of what it wrote}."""
    centroids_path, stats_path = class_result_paths(out_dir, label)
    if stats_path.exists():
        return {"label": label, "n": -1, "seconds": 0.0, "skipped": True, "peak_rss_mb": peak_rss_mb(), "files": {}}
    start = time.perf_counter()
    table = read_class_table(class_dir, ("id", "source", "latent"))
    ids, latents = np.asarray(table.column("id").to_pylist(), dtype=object), table_latents(table)
    if not np.isfinite(latents).all():
        bad = int((~np.isfinite(latents)).any(axis=1).sum())
        raise ValueError(f"class {label}: {bad} of {len(latents)} latents in {class_dir} contain NaN or Inf")
    centroid_rows, stat_rows, centroid_latents = [], [], []
    for ipc in config.ipc:
        ipc_start = time.perf_counter()
        report = quantize_and_measure(latents, ipc, config, device)
        q = report.quantization
        for index in range(q.k):
            centroid_rows.append({
                "label": label, "ipc": ipc, "index": index, "count": int(q.counts[index]),
                **{f"weight_{m}": float(report.weights[m][index]) for m in WEIGHT_MODES},
            })
        centroid_latents.append(np.asarray(q.centroids, dtype=np.float32).reshape(q.k, -1))
        stat_rows.append({
            "label": label, "ipc": ipc, "n": report.n, "k": q.k, "requested_k": q.requested_k,
            # K > n: the class keeps every point as a centroid; the run records it here.
            "warning": f"{report.n} points < K={ipc}: K={q.k}" if q.k < ipc else "",
            "distortion": q.distortion, "initial_distortion": q.initial_distortion,
            **{f"w2_{m}": report.w2[m] for m in WEIGHT_MODES},
            "seconds": time.perf_counter() - ipc_start,
        })
    centroids = pa.Table.from_pylist(centroid_rows).append_column(
        "latent", float32_rows(np.concatenate(centroid_latents)))
    picks = select_real_images(ids, table.column("source").to_pylist(), latents, label, tuple(config.ipc), config.seed)
    files = {str(centroids_path): atomic_write_table(centroids_path, centroids),
             str(class_picks_path(out_dir, label)): atomic_write_table(class_picks_path(out_dir, label), picks),
             # last: the class's completion marker
             str(stats_path): atomic_write_table(stats_path, pa.Table.from_pylist(stat_rows))}
    return {"label": label, "n": len(latents), "seconds": time.perf_counter() - start, "skipped": False,
            "peak_rss_mb": peak_rss_mb(), "files": files}


def gather_class_stats(out_dir, labels: list[int]) -> pa.Table:
    """Every class's statistics (a few rows each) -> one table sorted by (ipc, label). The centroids themselves
    stay in their class files: the decode stage reads them class by class."""
    stats = pa.concat_tables([read_table(class_result_paths(out_dir, c)[1]) for c in labels])
    return stats.sort_by([("ipc", "ascending"), ("label", "ascending")])


def gather_centroid_weights(out_dir, labels: list[int]) -> pa.Table:
    """Every centroid's {label, ipc, index, count, weight_<mode>} (its latent left in the class file)."""
    columns = ["label", "ipc", "index", "count"] + [f"weight_{m}" for m in WEIGHT_MODES]
    table = pa.concat_tables([read_table(class_result_paths(out_dir, c)[0], columns) for c in labels])
    return table.sort_by([("ipc", "ascending"), ("label", "ascending"), ("index", "ascending")])


def gather_picks(out_dir, labels: list[int], ipcs: tuple[int, ...], methods: tuple[str, ...]) -> pa.Table:
    """The real-image picks of the given methods and IPCs, every class -> one table (ids only: classes x IPC rows)."""
    import pyarrow.compute as pc

    picks = pa.concat_tables([read_table(class_picks_path(out_dir, c)) for c in labels])
    keep = pc.and_(pc.is_in(picks["method"], pa.array(list(methods), pa.string())),
                   pc.is_in(picks["ipc"], pa.array(list(ipcs), pa.int64())))
    return picks.filter(keep)
