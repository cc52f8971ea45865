"""Read chosen rows back from their source file: the real-image baselines pick a few ids per class in the quantize
stage, and only those rows are read again, shard by shard (pure: no Ray).

    read_rows_by_id(data, source, ids) -> {"image": [{bytes, path}], "label": [...]}   (the parquet row form)

`source` is the file a row came from, relative to `data.path`, as the encode stage recorded it beside each latent.
A parquet row's id names its shard and row number (`<shard>#<row>`), so only the row groups that hold the chosen
rows are read; an ImageFolder image is its own source file; a WebDataset shard is streamed once, keeping
the chosen samples. The embedded digits are small and are simply reloaded.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import DataConfig
from engine.io.location import filesystem_and_path, location


def read_parquet_rows_by_id(file, ids: list[str]) -> dict:
    """Rows of one parquet shard by their ids (`<shard>#<row>`), in the order of `ids`, in the row form; ids of
    another shard, or past its end, raise."""
    from engine.data.sources import parquet_table

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


def read_rows_by_id(data: DataConfig, source: str, ids: list[str]) -> dict:
    """The chosen rows of one source file, in the parquet row form {image: [{bytes, path}], label: [...]} that
    engine.data.images.decode_rows reads; for the digits, already decoded rows {id, label, image}."""
    if data.source == "digits":
        from engine.data.images import load_split

        train = load_split(data, "train")  # the embedded digits: 1437 images, never a large split
        position = {str(i): row for row, i in enumerate(train.ids)}
        rows = np.array([position[i] for i in ids], dtype=np.int64)
        return {"id": np.array(ids, dtype=object), "label": train.labels[rows], "image": train.images[rows]}
    place = location(data.path) / source
    if data.source == "parquet":
        return read_parquet_rows_by_id(place, ids)
    if data.source == "imagefolder":  # the source is the image file itself: its one id
        from engine.data.sources import read_file_bytes

        if len(set(ids)) != 1:
            raise ValueError(f"{place}: an image file holds one image, asked for {len(set(ids))} ids")
        images = [{"bytes": read_file_bytes(place, data.max_image_bytes)[0], "path": ids[0]}]
    else:  # webdataset: stream the shard and keep the chosen samples
        from engine.data.sources import iter_tar_samples

        wanted, found = set(ids), {}
        with place.open("rb") as stream:
            for sample in iter_tar_samples(stream, source, data.max_image_bytes):
                if sample.id in wanted:
                    found[sample.id] = sample.image
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"{place}: {len(missing)} chosen sample(s) no longer in the shard, e.g. {missing[:3]}")
        images = [{"bytes": found[i], "path": i} for i in ids]
    # The label is only checked by decode_rows, not used: the picks carry each image's class.
    return {"image": images, "label": [0] * len(ids)}
