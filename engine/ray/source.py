"""Ray Data sources: the train split as rows {id, label, image}, with every unusable row recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray

from engine.config import DataConfig
from engine.data.images import decode_rows, load_split, resize_mode
from engine.data.sources import class_names, scan_source
from engine.data.splits import rows_of_split
from engine.io.location import filesystem_and_path, location
from engine.ray.readers import ROWS_PER_BLOCK, read_source_rows


SKIPPED_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def write_skipped(skip_dir: str | Path, skipped: dict, tag: str) -> None:
    """One small parquet file of skipped rows, named by its content: a retried task rewrites the same file, so
    rows are never counted twice, and no driver-side re-read of the data is needed to count them."""
    import hashlib

    from engine.io.store import atomic_write_table

    if not skipped["id"]:
        return
    table = pa.table({k: pa.array(skipped[k], pa.string()) for k in SKIPPED_SCHEMA.names}, schema=SKIPPED_SCHEMA)
    digest = hashlib.sha256("\0".join([tag, *skipped["id"], *skipped["reason"]]).encode()).hexdigest()[:24]
    atomic_write_table(location(skip_dir) / f"{digest}.parquet", table)


def decode_and_record_skips(batch: dict, size: int, num_classes: int, max_pixels: int, skip_dir: str,
                            root: str = "", mode: str = "squash", split: tuple = ("test", 0.0, 0)) -> dict:
    """Ray Data map over raw source rows: the rows of `split` ((name, data.val_fraction, data.split_seed):
    engine/data/splits.py carves val out of the train rows before anything is decoded), decoded (resized by `mode`,
    data.resize resolved), go on to the encoder, each with the `source` file it came from (relative to the data's
    root, so the baselines stage can read the row back); skipped rows to `skip_dir`."""
    batch = rows_of_split(batch, *split)
    decoded, skipped = decode_rows(batch, size, num_classes, max_pixels, mode=mode)
    files = [str(p) for p in batch.get("path", [""] * len(batch["label"]))]
    tag = "\0".join(sorted(set(files))) + "\0" + "\0".join(map(str, decoded["id"]))
    write_skipped(skip_dir, skipped, tag)
    by_id = {str((image or {}).get("path")): relative_source(file, root) for image, file in zip(batch["image"], files)}
    decoded["source"] = np.array([by_id.get(str(i), "") for i in decoded["id"]], dtype=object)
    return decoded


def relative_source(file: str, root: str) -> str:
    """A file Ray Data names (its filesystem's path, no scheme) relative to the data root's path."""
    root = root.rstrip("/") + "/"
    return file[len(root):] if root != "/" and file.startswith(root) else file


def source_dataset(data: DataConfig, size: int | None = None, skip_dir=None, split: str = "train",
                   task_cpus: float | None = None, columns: tuple[str, ...] | None = None) -> ray.data.Dataset:
    """Rows {id, label, image (H, W, 3) uint8, source} of a split, decoded straight to `size` (the prior's
    resolution, e.g. 512 for sd15; default the data's), resized as data.resize says (resolved from data.image_size,
    whatever `size` is: at 512 the same centre fraction as at 224). Rows that cannot be used are recorded as
    {id, reason, detail} files under `skip_dir` (file sources: engine/data/sources.py; the digits are known good).
    `task_cpus`: the CPU each read/decode task reserves (None: Ray Data's 1); `columns`: keep only these."""
    if data.source == "digits":
        images = load_split(data, split)  # the embedded digits: 1437 train / 360 test images
        table = pa.table({
            "id": pa.array(images.ids.tolist()),
            "label": pa.array(images.labels),
            "image": ArrowTensorArray.from_numpy(images.images),
            "source": pa.array(["digits"] * len(images.labels)),  # the embedded set: rows read back by id
        })
        # In blocks of ROWS_PER_BLOCK, as the file readers yield them, so that every actor of a pool gets work.
        blocks = range(0, table.num_rows, ROWS_PER_BLOCK)
        dataset = ray.data.from_arrow([table.slice(i, ROWS_PER_BLOCK) for i in blocks])
    else:
        if skip_dir is None:
            raise ValueError("a file source needs a folder for the records of skipped rows")
        listing = scan_source(data, split)  # one listing; parquet: footers only
        write_skipped(skip_dir, listing.skipped, "listing")  # rows known unusable from the listing alone
        raw = read_source_rows(data, split, listing, task_cpus)  # raises if nothing is readable
        remote = {"num_cpus": task_cpus} if task_cpus is not None else {}
        # batch_size=None: each block the reader yields (<= ROWS_PER_BLOCK rows) is one batch. With a batch size
        # Ray Data will not fuse the decode into the read task (nor into the encoder actors: engine/ray/encode.py).
        dataset = raw.map_batches(decode_and_record_skips, batch_size=None, **remote, fn_kwargs={
            "size": size or data.image_size, "num_classes": len(class_names(data)),
            "max_pixels": data.max_image_pixels, "skip_dir": str(skip_dir),
            "root": filesystem_and_path(location(data.path))[1], "mode": resize_mode(data),
            "split": (split, data.val_fraction, data.split_seed)})
    if not columns:
        return dataset
    # A task of its own over in-memory blocks (digits): it must ask for no more CPU than the stream may take.
    return dataset.select_columns(list(columns), **({"num_cpus": task_cpus} if task_cpus is not None else {}))


def gather_skipped(skip_dir) -> pa.Table:
    """Every skipped-row record of a stage, sorted by id (order-independent, so re-runs compare equal)."""
    from engine.io.store import read_table

    files = sorted(location(skip_dir).glob("*.parquet"))  # none when the folder does not exist
    if not files:
        return SKIPPED_SCHEMA.empty_table()
    return pa.concat_tables([read_table(f) for f in files]).sort_by([("id", "ascending"), ("reason", "ascending")])
