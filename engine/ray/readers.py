"""Ray Data readers of the file sources: raw rows {image: {bytes, path}, label, path}, the parquet row form, for
decode_rows to be mapped over. The row functions are engine/sources.py's, so Ray and `load_split` see the same rows.

parquet      ray.data.read_parquet(shards, columns=[image, label], include_paths=True), as before.
imagefolder  ImageFilesDatasource: the files of one listing (engine.sources.scan_source: one scandir per folder
             locally, one recursive listing on an object store), IMAGES_PER_READ_TASK files per read task.
             Not read_binary_files: given 1.28M file paths it resolves each (~40 us) and, on an object store,
             requests each file's size (a HEAD per object); given the folders it lists them again and drops
             names starting with '_' or '.' without a trace.
webdataset   TarShardsDatasource, one read task per shard, the tar streamed member by member, tables of <= 256
             rows. Not read_webdataset: a truncated tar raises out of its reader (the task, then the dataset,
             fails), a garbled header ends the shard silently, and missing members become missing columns.
Rows known unusable without reading (listing.skipped) are not in the dataset: the caller records them.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.datasource import FileBasedDatasource

from engine.config import DataConfig
from engine.location import filesystem_and_path, location
from engine.sources import ROW_SCHEMA, SourceListing, iter_image_rows, iter_tar_rows, rows_to_table, scan_source

# ImageNet-1K train: 1282 read tasks of ~110 MB of JPEGs; small enough to retry, large enough to amortize a task.
IMAGES_PER_READ_TASK = 1000
ROWS_PER_BLOCK = 256


def read_images(root: str, names: list[str], labels: list[int]):
    for rows in iter_image_rows(root, names, labels, ROWS_PER_BLOCK):
        yield rows_to_table(rows)


class ImageFilesDatasource(Datasource):
    """The image files of an ImageFolder listing, each a row with its label; read tasks carry only their files."""

    def __init__(self, listing: SourceListing):
        super().__init__()
        self.listing = listing

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = self.listing.sizes
        return None if not sizes or None in sizes else int(sum(sizes))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        listing, tasks = self.listing, []
        if not listing.names:
            return tasks
        for chunk in np.array_split(np.arange(len(listing.names)), max(1, min(parallelism, len(listing.names)))):
            first, stop = int(chunk[0]), int(chunk[-1]) + 1
            sizes = listing.sizes[first:stop]
            metadata = BlockMetadata(num_rows=stop - first, size_bytes=None if None in sizes else int(sum(sizes)),
                                     input_files=None, exec_stats=None)
            read = partial(read_images, listing.root, list(listing.names[first:stop]), list(listing.labels[first:stop]))
            tasks.append(ReadTask(read, metadata, schema=ROW_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks


class TarShardsDatasource(FileBasedDatasource):
    """WebDataset shards; FileBasedDatasource opens each as a stream and retries transient storage errors
    (a retry replays the shard, skipping the blocks already given: the reader is deterministic)."""

    def _read_stream(self, f, path: str):
        for rows in iter_tar_rows(f, path.rsplit("/", 1)[-1], path, ROWS_PER_BLOCK):
            yield rows_to_table(rows)


def read_source_rows(data: DataConfig, split: str, listing: SourceListing | None = None,
                     task_cpus: float | None = None) -> ray.data.Dataset:
    """The raw rows of a file source's split, streamed. Pass the listing when its `skipped` rows are also needed
    (the caller writes them, as it writes decode_rows' skips), so the split is listed once. `task_cpus`: the CPU
    each read task reserves (Ray Data's default, 1, when None)."""
    listing = listing or scan_source(data, split)
    remote = {"ray_remote_args": {"num_cpus": task_cpus}} if task_cpus is not None else {}
    if not listing.names:
        raise ValueError(f"nothing readable in the {split} split under {data.path} "
                         f"({len(listing.skipped['id'])} rows skipped while listing it)")
    if listing.source == "parquet":
        return ray.data.read_parquet(listing.paths(), columns=["image", "label"], include_paths=True,
                                     **remote)
    if listing.source == "imagefolder":
        return ray.data.read_datasource(ImageFilesDatasource(listing),
                                        override_num_blocks=math.ceil(len(listing.names) / IMAGES_PER_READ_TASK), **remote)
    root = location(listing.root)
    filesystem, _ = filesystem_and_path(root)
    shards = [filesystem_and_path(root / name)[1] for name in listing.names]
    return ray.data.read_datasource(TarShardsDatasource(shards, filesystem=filesystem),
                                    override_num_blocks=len(shards), **remote)
