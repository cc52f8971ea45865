"""The real-image baselines stage: the ids the quantize actors picked (random, herding, kcenter) -> one Ray Data
task per group of source files reads only those rows back, decodes them and writes the set folders.

An image picked by several sets (herding's IPC 1 pick is also its first IPC 10 pick) is read and written once and
shared with the others (`store.share_file`). No process holds more than one source file's chosen rows.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import ray
import ray.data

from engine.config import DataConfig, DistillConfig
from engine.io.location import location


def fetch_and_write(batch: dict, data: DataConfig) -> dict:
    """Ray Data task over rows {source, ids, targets}: read the chosen rows of each source file, write each image
    once (at data.image_size) into its first target and share it with the rest."""
    from engine.data.images import decode_rows, resize_mode
    from engine.data.readback import read_rows_by_id
    from engine.io.store import share_file, write_png

    written: list[tuple[str, str, int]] = []  # (file, sha256, bytes) of every file, shared copies included
    for source, ids, targets in zip(batch["source"], batch["ids"], batch["targets"]):
        ids, targets = [str(i) for i in ids], [list(t) for t in targets]
        rows = read_rows_by_id(data, str(source), ids)
        if "id" not in rows:  # raw file rows: decode exactly as the encode stage did
            rows, skipped = decode_rows(rows, data.image_size, None, data.max_image_pixels, mode=resize_mode(data))
            if skipped["id"]:
                raise ValueError(f"{source}: chosen row(s) no longer decode: {skipped['id'][:3]} "
                                 f"({skipped['reason'][:3]})")
        by_id = {str(i): image for i, image in zip(rows["id"], rows["image"])}
        for image_id, image_targets in zip(ids, targets):
            first, *others = [location(t) for t in image_targets]
            record = write_png(first, np.asarray(by_id[image_id]))
            for target in others:
                share_file(first, target)
            written += [(str(t), record["sha256"], record["bytes"]) for t in (first, *others)]
    return {"file": np.array([w[0] for w in written], dtype=object),
            "sha256": np.array([w[1] for w in written], dtype=object),
            "bytes": np.array([w[2] for w in written], dtype=np.int64)}


def write_real_sets(config: DistillConfig, picks: pa.Table, set_dirs: dict[tuple[str, int, int], str]) -> dict:
    """Write every (method, ipc, draw) set of `set_dirs` from the picks {method, ipc, draw, rank, label, id,
    source}; returns
    the records {file: {sha256, bytes}} of the images. Indexes are the caller's: they need no pixels."""
    from engine.io.store import image_file_name

    targets: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for row in picks.to_pylist():
        key = (row["method"], int(row["ipc"]), int(row["draw"]))
        if key in set_dirs:
            path = str(location(set_dirs[key]) / image_file_name(int(row["label"]), int(row["rank"])))
            targets[row["source"]][row["id"]].append(path)
    items = [{"source": source, "ids": list(chosen), "targets": list(chosen.values())}
             for source, chosen in sorted(targets.items())]
    if not items:
        return {}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = max(1, min(len(items), 4 * cpus))
    done = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        fetch_and_write, fn_kwargs={"data": config.data}, batch_size=max(1, math.ceil(len(items) / blocks)))
    # One small row per image file: classes x IPC x methods, never the pixels.
    return {r["file"]: {"sha256": r["sha256"], "bytes": int(r["bytes"])} for r in done.take_all()}
