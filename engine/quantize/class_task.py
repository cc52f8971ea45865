"""The quantize stage for one class, as a retryable unit of work (pure: no Ray).

class latents folder -> <out_dir>/class-<label>.{centroids,picks,stats}.parquet, every IPC:
  centroids  {label, ipc, quantizer, index, count, weight_<mode>..., latent: fixed_size_list<float32>}: quantizer
             "ddoq" (the engine's weighted quantizer) or "d4m" (D4M's MiniBatchKMeans, engine/quantize/d4m.py)
  picks      {method, ipc, draw, rank, label, id, source}: the real-image baselines (random: quantize.random_draws
             subsets per IPC; herding, kcenter: draw 0), chosen here because the class's latents are loaded here;
             only these rows are ever read back from the source
  stats      {label, ipc, n, k, distortion, w2_<mode>, d4m_distortion, w2_d4m, ...}
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
from engine.invert import match_norms
from engine.quantize.d4m import d4m_quantize
from engine.quantize.quantizer import WEIGHT_MODES, quantize_and_measure, weights_from_counts
from engine.quantize.transport import w2_distance


def class_result_paths(out_dir, label: int) -> tuple:
    """(centroids file, stats file) of one class, in a local folder or on an object store."""
    folder = location(out_dir)
    return folder / f"class-{label:05d}.centroids.parquet", folder / f"class-{label:05d}.stats.parquet"


def class_picks_path(out_dir, label: int):
    return location(out_dir) / f"class-{label:05d}.picks.parquet"


def select_real_images(ids: np.ndarray, sources: list[str], latents: np.ndarray, label: int, ipcs: tuple[int, ...],
                       config: QuantizeConfig) -> pa.Table:
    """The real-image baselines of one class at every IPC -> rows {method, ipc, draw, rank, label, id, source}.
    herding and kcenter are greedy and deterministic (draw 0): IPC k is their first k picks; random draws each IPC
    and each of its quantize.random_draws subsets on its own."""
    rows = []
    for ipc in ipcs:
        for draw in range(config.random_draws):
            chosen = select_random_in_class(len(ids), ipc, config.seed, label, draw)
            rows += [("random", ipc, draw, rank, r) for rank, r in enumerate(chosen)]
    for method, select in (("herding", select_herding), ("kcenter", select_kcenter)):
        order = select(latents, max(ipcs))
        rows += [(method, ipc, 0, rank, int(order[rank])) for ipc in ipcs for rank in range(min(ipc, len(order)))]
    methods, row_ipcs, draws, ranks, positions = zip(*rows)
    return pa.table({
        "method": pa.array(methods, pa.string()), "ipc": pa.array(row_ipcs, pa.int64()),
        "draw": pa.array(draws, pa.int64()), "rank": pa.array(ranks, pa.int64()),
        "label": pa.array([label] * len(rows), pa.int64()), "id": pa.array([str(ids[p]) for p in positions], pa.string()),
        "source": pa.array([sources[p] for p in positions], pa.string()),
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
        d4m = d4m_quantize(latents, ipc, config.d4m_km_expand, config.seed)
        d4m_weights = {m: weights_from_counts(d4m.counts, m) for m in WEIGHT_MODES}
        norm_scale = {}
        for quantizer, result, weights in (("ddoq", q, report.weights), ("d4m", d4m, d4m_weights)):
            centroids = np.asarray(result.centroids, dtype=np.float32).reshape(result.k, -1)
            if config.space == "noise":  # the sampler expects states of its members' norm (engine/invert.py)
                centroids, factors = match_norms(centroids, latents)
                norm_scale[quantizer] = float(factors.mean())
            centroid_rows += [{
                "label": label, "ipc": ipc, "quantizer": quantizer, "index": index, "count": int(result.counts[index]),
                **{f"weight_{m}": float(weights[m][index]) for m in WEIGHT_MODES},
            } for index in range(result.k)]
            centroid_latents.append(centroids)
        stat_rows.append({
            "label": label, "ipc": ipc, "n": report.n, "k": q.k, "requested_k": q.requested_k,
            # K > n: the class keeps every point as a centroid; the run records it here.
            "warning": f"{report.n} points < K={ipc}: K={q.k}" if q.k < ipc else "",
            "distortion": q.distortion, "initial_distortion": q.initial_distortion,
            **{f"w2_{m}": report.w2[m] for m in WEIGHT_MODES},
            # D4M's own quantizer (engine/quantize/d4m.py) on the same latents, trained on with uniform weights.
            "d4m_distortion": d4m.distortion, "w2_d4m": w2_distance(latents, d4m.centroids, d4m_weights["uniform"]),
            # noise space: the mean factor centroids were scaled by to their members' norm (1 in latent space)
            "norm_scale": norm_scale.get("ddoq", 1.0), "d4m_norm_scale": norm_scale.get("d4m", 1.0),
            "seconds": time.perf_counter() - ipc_start,
        })
    centroids = pa.Table.from_pylist(centroid_rows).append_column(
        "latent", float32_rows(np.concatenate(centroid_latents)))
    picks = select_real_images(ids, table.column("source").to_pylist(), latents, label, tuple(config.ipc), config)
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
    """Every centroid's {label, ipc, quantizer, index, count, weight_<mode>} (its latent left in the class file)."""
    columns = ["label", "ipc", "quantizer", "index", "count"] + [f"weight_{m}" for m in WEIGHT_MODES]
    table = pa.concat_tables([read_table(class_result_paths(out_dir, c)[0], columns) for c in labels])
    return table.sort_by([("quantizer", "descending"), ("ipc", "ascending"), ("label", "ascending"),
                          ("index", "ascending")])


def gather_picks(out_dir, labels: list[int], ipcs: tuple[int, ...], methods: tuple[str, ...]) -> pa.Table:
    """The real-image picks of the given methods and IPCs, every class -> one table (ids only: classes x IPC rows)."""
    import pyarrow.compute as pc

    picks = pa.concat_tables([read_table(class_picks_path(out_dir, c)) for c in labels])
    keep = pc.and_(pc.is_in(picks["method"], pa.array(list(methods), pa.string())),
                   pc.is_in(picks["ipc"], pa.array(list(ipcs), pa.int64())))
    return picks.filter(keep)
