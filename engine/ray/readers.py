"""Ray Data readers of the file sources: raw rows {image: {bytes, path}, label, path}, the parquet row form, for
decode_rows to be mapped over. The row functions are those of the format modules (engine/data/formats/), so Ray and
`load_split` see the same rows; READERS holds one reader per file format, under the registry's names (the data
package never imports ray, so its format records cannot hold these).

parquet      ParquetShardsDatasource: read tasks of whole row groups, about IMAGES_PER_READ_TASK rows each, from the
             footers (read once, on a thread pool). Not read_parquet: Ray Data 2.60 starts every execution of it
             with a ListFiles task of 1 CPU (1.4-5 s measured, once per epoch of a streamed teacher, and a whole
             CPU that must be free), and gives a shard one read task, so a 6,000-row shard decodes serially and
             reaches the trainer as one block when it is all done.
imagefolder  ImageFilesDatasource: the files of one listing (engine/data/formats/imagefolder.py: one scandir per folder
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pyarrow.parquet as pq

import ray.data
from engine.config import DataConfig
from engine.data.formats.base import SourceListing
from engine.data.formats.imagefolder import iter_image_rows
from engine.data.formats.parquet import parquet_table
from engine.data.formats.webdataset import iter_tar_rows
from engine.data.rows import ROW_SCHEMA, rows_to_table
from engine.data.sources import scan_source
from engine.io.location import filesystem_and_path, location
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.datasource import FileBasedDatasource

# ImageNet-1K train: 1282 read tasks of ~110 MB of JPEGs; small enough to retry, large enough to amortize a task.
IMAGES_PER_READ_TASK = 1000
ROWS_PER_BLOCK = 256


def read_images(root: str, names: list[str], labels: list[int], sizes: list, max_bytes: int):
    for rows in iter_image_rows(root, names, labels, ROWS_PER_BLOCK, max_bytes, sizes):
        yield rows_to_table(rows)


class ImageFilesDatasource(Datasource):
    """The image files of an ImageFolder listing, each a row with its label; read tasks carry only their files."""

    def __init__(self, listing: SourceListing, max_bytes: int):
        super().__init__()
        self.listing, self.max_bytes = listing, max_bytes

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
            read = partial(read_images, listing.root, list(listing.names[first:stop]), list(listing.labels[first:stop]),
                           list(sizes), self.max_bytes)
            tasks.append(ReadTask(read, metadata, schema=ROW_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks


def read_row_groups(place: str, groups: list[int], max_bytes: int):
    """Raw rows of some consecutive row groups of one shard, ROWS_PER_BLOCK at a time, with the shard's
    filesystem path (as read_parquet's include_paths gives it) and ids `<shard>#<row>`."""
    filesystem, inner = filesystem_and_path(location(place))
    with filesystem.open_input_file(inner) as f:
        shard = pq.ParquetFile(f)
        first = sum(shard.metadata.row_group(g).num_rows for g in range(groups[0]))
        columns = [c for c in ("image", "label") if c in shard.schema_arrow.names]  # a missing one: null rows
        for batch in shard.iter_batches(batch_size=ROWS_PER_BLOCK, row_groups=groups, columns=columns):
            yield parquet_table(batch, location(place).name, first, inner, max_bytes)
            first += batch.num_rows


class ParquetShardsDatasource(Datasource):
    """Parquet shards as read tasks of consecutive row groups (~IMAGES_PER_READ_TASK rows), in shard order."""

    def __init__(self, places: list[str], max_bytes: int):
        super().__init__()
        self.max_bytes = max_bytes
        with ThreadPoolExecutor(8) as pool:  # an object store answers footers one request each
            footers = list(pool.map(self._row_groups, places))
        self.pieces = []  # (shard, [row groups], rows, bytes)
        for place, groups in zip(places, footers):
            chunk, rows, size = [], 0, 0
            for index, (group_rows, group_bytes) in enumerate(groups):
                chunk, rows, size = [*chunk, index], rows + group_rows, size + group_bytes
                if rows >= IMAGES_PER_READ_TASK or index == len(groups) - 1:
                    self.pieces.append((place, chunk, rows, size))
                    chunk, rows, size = [], 0, 0

    @staticmethod
    def _row_groups(place: str) -> list[tuple[int, int]]:
        filesystem, inner = filesystem_and_path(location(place))
        with filesystem.open_input_file(inner) as f:
            meta = pq.ParquetFile(f).metadata
        return [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]

    def estimate_inmemory_data_size(self) -> int | None:
        return int(sum(piece[3] for piece in self.pieces))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(partial(read_row_groups, place, groups, self.max_bytes),
                         BlockMetadata(num_rows=rows, size_bytes=size, input_files=[place], exec_stats=None),
                         schema=ROW_SCHEMA, per_task_row_limit=per_task_row_limit)
                for place, groups, rows, size in self.pieces]


class TarShardsDatasource(FileBasedDatasource):
    """WebDataset shards; FileBasedDatasource opens each as a stream and retries transient storage errors
    (a retry replays the shard, skipping the blocks already given: the reader is deterministic)."""

    def __init__(self, paths, max_bytes: int, **kwargs):
        super().__init__(paths, **kwargs)
        self.max_bytes = max_bytes

    def _read_stream(self, f, path: str):
        for rows in iter_tar_rows(f, path.rsplit("/", 1)[-1], path, ROWS_PER_BLOCK, self.max_bytes):
            yield rows_to_table(rows)


def read_parquet_shards(listing: SourceListing, max_bytes: int, remote: dict) -> ray.data.Dataset:
    datasource = ParquetShardsDatasource(listing.paths(), max_bytes)
    return ray.data.read_datasource(datasource, override_num_blocks=len(datasource.pieces), **remote)


def read_image_files(listing: SourceListing, max_bytes: int, remote: dict) -> ray.data.Dataset:
    return ray.data.read_datasource(ImageFilesDatasource(listing, max_bytes),
                                    override_num_blocks=math.ceil(len(listing.names) / IMAGES_PER_READ_TASK), **remote)


def read_tar_shards(listing: SourceListing, max_bytes: int, remote: dict) -> ray.data.Dataset:
    root = location(listing.root)
    filesystem, _ = filesystem_and_path(root)
    shards = [filesystem_and_path(root / name)[1] for name in listing.names]
    return ray.data.read_datasource(TarShardsDatasource(shards, max_bytes, filesystem=filesystem),
                                    override_num_blocks=len(shards), **remote)


# (listing, data.max_image_bytes, Ray remote args) -> the raw rows, per file format of engine/data/formats/.
READERS: dict[str, Callable[[SourceListing, int, dict], ray.data.Dataset]] = {
    "parquet": read_parquet_shards, "imagefolder": read_image_files, "webdataset": read_tar_shards}


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
    return READERS[listing.source](listing, data.max_image_bytes, remote)
