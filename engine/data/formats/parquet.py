"""Parquet (Hugging Face's layout): `<path>/<split>-*.parquet` shards (`shard_paths` / `inspect_shards`), classes.txt
beside them (required, one name per line), the image column HF's struct {bytes, path} or plain binary. Ids:
`<shard name>#<row>` (the `image.path` a dataset stores can repeat across classes, so it is never the id); labels of
any column type go through engine.data.rows.parse_label. A shard holds train and val rows both: its readers keep the
split's rows (engine/data/splits.py), and since ids are row numbers, a split is counted from the footers alone and
chosen rows are read back by their row groups only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.config import DataConfig
from engine.data.classes import listed_class_names
from engine.data.formats.base import SourceFormat, SourceListing, source_root
from engine.data.rows import ROW_SCHEMA, SkipRecords, SourceError, add_skip, is_image_column, no_skips, parse_labels
from engine.data.splits import in_split, source_split
from engine.io.location import ObjectPath, filesystem_and_path, location


def shard_paths(root: str | Path, split: str) -> list[str]:
    """The split's shards under a local folder or an object-store URI (s3://bucket/imagenet-1k/data)."""
    paths = sorted(str(p) for p in location(root).glob(f"{split}-*.parquet"))
    if not paths:
        raise SourceError(f"no parquet shards matching {split}-*.parquet under {root}: point data.path at the "
                          f"folder that holds them")
    return paths


def parquet_row_id(shard: str, row: int) -> str:
    """A parquet row's id: its shard's name and its row number there (the stored `image.path` can repeat)."""
    return f"{shard}#{row}"


def parquet_ids(place: Path | ObjectPath) -> list[str]:
    """The row ids of a parquet shard, from its footer alone."""
    fs, inner = filesystem_and_path(place)
    with fs.open_input_file(inner) as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    return [parquet_row_id(place.name, row) for row in range(rows)]


def inspect_shards(paths: list[str]) -> tuple[list[str], SkipRecords]:
    """Check each shard's schema from its footer (no data read): a shard without an `image` or `label` column
    contributes every row to the skip records (id `<shard>#<row>`) and is left out of the returned readable list.
    A file that is not parquet (a zero-byte or cut file), or an image column the engine cannot read, stops the run
    with one sentence (SourceError) naming the shard."""
    readable, skipped = [], no_skips()
    for path in paths:
        try:
            metadata = pq.read_metadata(path)
            schema = metadata.schema.to_arrow_schema()
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError variants for damaged footers
            raise SourceError(f"{path} is not a readable parquet file ({error.__class__.__name__}: {error}): "
                              f"re-export or remove it") from None
        if "image" in schema.names and not is_image_column(schema.field("image").type):
            raise SourceError(f"{path}: its image column is {schema.field('image').type}, where the engine reads "
                              f"encoded image bytes (a struct<bytes, path> as Hugging Face writes, or binary): "
                              f"store the image files' bytes in it")
        reason = "missing_image" if "image" not in schema.names else \
            "missing_label" if "label" not in schema.names else None
        if reason is None:
            readable.append(path)
            continue
        shard = location(path).name
        for row in range(metadata.num_rows):
            add_skip(skipped, parquet_row_id(shard, row), reason, f"shard has no {reason.split('_')[1]} column")
    return readable, skipped


def scan(config: DataConfig, split: str) -> SourceListing:
    """The readable shards of the source split that holds `split`'s rows, from their footers."""
    source_root(config)  # refuses an empty data.path
    readable, skipped = inspect_shards(shard_paths(config.path, source_split(split)))
    names = tuple(location(path).name for path in readable)
    return SourceListing("parquet", config.path, names, sizes=(None,) * len(names), skipped=skipped)


def count_rows(config: DataConfig, split: str) -> int:
    """From the footers: ids are `<shard>#<row>`, so train and val are carved without reading a column."""
    paths = scan(config, split).paths()
    if split == "test":
        return sum(pq.read_metadata(path).num_rows for path in paths)
    return sum(int(in_split(parquet_ids(location(path)), split, config.val_fraction, config.split_seed).sum())
               for path in paths)


def parquet_table(batch: pa.RecordBatch, shard: str, first_row: int, path: str,
                  max_bytes: int | None = None) -> pa.Table:
    """A batch of a parquet shard (rows first_row.. of `shard`) in the row form: ids `<shard>#<row>`, the image
    from HF's struct or plain binary bytes, labels of any type through parse_label, images over max_bytes
    dropped as too_large. A missing column gives null cells, which decode_rows skips with their reason. The
    image bytes are not copied through Python."""
    n, names = batch.num_rows, batch.schema.names
    ids = pa.array([parquet_row_id(shard, first_row + i) for i in range(n)], pa.string())
    image = batch.column("image") if "image" in names else pa.nulls(n, pa.binary())
    data = pc.struct_field(image, "bytes") if pa.types.is_struct(image.type) else image
    data = data.cast(pa.binary()) if not pa.types.is_null(data.type) else pa.nulls(n, pa.binary())
    if "label" not in names:
        labels, skips = pa.nulls(n, pa.int64()), [None] * n
    elif pa.types.is_signed_integer(batch.column("label").type):
        labels, skips = batch.column("label").cast(pa.int64()), [None] * n
    else:
        parsed, skips = parse_labels(batch.column("label").to_pylist())
        labels = pa.array(parsed, pa.int64())
    if max_bytes:
        sizes = pc.binary_length(data).to_pylist()
        over = [size is not None and size > max_bytes for size in sizes]
        if any(over):
            skips = [skip or (f"too_large: {size} bytes > data.max_image_bytes={max_bytes}" if big else None)
                     for skip, size, big in zip(skips, sizes, over)]
            data = pc.if_else(pa.array(over), pa.nulls(n, pa.binary()), data)
    struct = pa.StructArray.from_arrays([data, ids], fields=list(ROW_SCHEMA.field("image").type))
    return pa.table({"image": struct, "label": labels, "skip": pa.array(skips, pa.string()),
                     "path": pa.array([path] * n, pa.string())}, schema=ROW_SCHEMA)


def iter_parquet_rows(place: Path | ObjectPath, batch_size: int = 256, max_bytes: int | None = None) -> Iterator[dict]:
    fs, inner = filesystem_and_path(place)
    with fs.open_input_file(inner) as f:
        shard = pq.ParquetFile(f)
        columns = [c for c in ("image", "label") if c in shard.schema_arrow.names]
        first = 0
        for batch in shard.iter_batches(batch_size=batch_size, columns=columns):
            yield parquet_table(batch, place.name, first, inner, max_bytes).to_pydict()
            first += batch.num_rows


def iter_rows(listing: SourceListing, batch_size: int, max_bytes: int | None) -> Iterator[dict]:
    base = location(listing.root)
    for name in listing.names:
        yield from iter_parquet_rows(base / name, batch_size, max_bytes)


def read_parquet_rows_by_id(file, ids: list[str]) -> dict:
    """Rows of one parquet shard by their ids (`<shard>#<row>`), in the order of `ids`, in the row form; ids of
    another shard, or past its end, raise. Only the row groups holding them are read."""
    fs, inner = filesystem_and_path(location(file))
    shard = pq.ParquetFile(fs.open_input_file(inner))
    name = location(file).name
    rows = []
    for row_id in ids:
        shard_name, _, row = row_id.rpartition("#")
        if shard_name != name or not row.isdigit() or int(row) >= shard.metadata.num_rows:
            raise KeyError(f"{file}: chosen row {row_id!r} is not a row of this shard (was the data changed?)")
        rows.append(int(row))
    starts = np.cumsum([0] + [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    columns = [c for c in ("image", "label") if c in shard.schema_arrow.names]
    groups = sorted(set(group_of.tolist()))
    parts = [parquet_table(shard.read_row_group(g, columns=columns).combine_chunks().to_batches()[0], name,
                           int(starts[g]), inner) for g in groups]
    offset = dict(zip(groups, np.cumsum([0] + [part.num_rows for part in parts]).tolist()))  # group -> first row
    taken = [offset[g] + r - int(starts[g]) for r, g in zip(rows, group_of.tolist())]
    return pa.concat_tables(parts).take(pa.array(taken)).to_pydict()


def read_rows_by_id(config: DataConfig, source: str, ids: list[str]) -> dict:
    return read_parquet_rows_by_id(location(config.path) / source, ids)


FORMAT = SourceFormat(name="parquet", class_names=listed_class_names, count_rows=count_rows, scan=scan,
                      iter_rows=iter_rows, read_rows_by_id=read_rows_by_id)
