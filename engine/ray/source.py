"""Ray Data sources: the train split as rows {id, label, image}, with every unusable row recorded."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray

from engine.config import DataConfig
from engine.data import class_names, decode_rows, inspect_shards, load_split, shard_paths
from engine.location import location


SKIPPED_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def write_skipped(skip_dir: str | Path, skipped: dict, tag: str) -> None:
    """One small parquet file of skipped rows, named by its content: a retried task rewrites the same file, so
    rows are never counted twice, and no driver-side re-read of the data is needed to count them."""
    import hashlib

    from engine.store import atomic_write_table

    if not skipped["id"]:
        return
    table = pa.table({k: pa.array(skipped[k], pa.string()) for k in SKIPPED_SCHEMA.names}, schema=SKIPPED_SCHEMA)
    digest = hashlib.sha256("\0".join([tag, *skipped["id"], *skipped["reason"]]).encode()).hexdigest()[:24]
    atomic_write_table(location(skip_dir) / f"{digest}.parquet", table)


def decode_and_record_skips(batch: dict, size: int, num_classes: int, max_pixels: int, skip_dir: str) -> dict:
    """Ray Data map over raw shard rows: decoded rows go on to the encoder, skipped rows to `skip_dir`."""
    decoded, skipped = decode_rows(batch, size, num_classes, max_pixels)
    tag = "\0".join(sorted(set(map(str, batch.get("path", ()))))) + "\0" + "\0".join(map(str, decoded["id"]))
    write_skipped(skip_dir, skipped, tag)
    return decoded


def source_dataset(data: DataConfig, size: int | None = None, skip_dir=None) -> ray.data.Dataset:
    """Rows {id, label, image (H, W, 3) uint8} of the train split, decoded straight to `size` (the prior's
    resolution, e.g. 512 for sd15; default the data's). Rows that cannot be used are recorded as
    {id, reason, detail} files under `skip_dir` (parquet sources only: the digits are known good)."""
    if data.source == "digits":
        images = load_split(data, "train")
        table = pa.table({
            "id": pa.array(images.ids.tolist()),
            "label": pa.array(images.labels),
            "image": ArrowTensorArray.from_numpy(images.images),
        })
        return ray.data.from_arrow(table)
    if skip_dir is None:
        raise ValueError("a parquet source needs a folder for the records of skipped rows")
    readable, shard_skips = inspect_shards(shard_paths(data.path, "train"))  # footers only
    write_skipped(skip_dir, shard_skips, "shards")
    if not readable:
        raise ValueError(f"no shard under {data.path} has both an image and a label column")
    raw = ray.data.read_parquet(readable, columns=["image", "label"], include_paths=True)
    return raw.map_batches(decode_and_record_skips, batch_size=256, fn_kwargs={
        "size": size or data.image_size, "num_classes": len(class_names(data)),
        "max_pixels": data.max_image_pixels, "skip_dir": str(skip_dir)})


def gather_skipped(skip_dir) -> pa.Table:
    """Every skipped-row record of a stage, sorted by id (order-independent, so re-runs compare equal)."""
    from engine.store import read_table

    files = sorted(location(skip_dir).glob("*.parquet"))  # none when the folder does not exist
    if not files:
        return SKIPPED_SCHEMA.empty_table()
    return pa.concat_tables([read_table(f) for f in files]).sort_by([("id", "ascending"), ("reason", "ascending")])
