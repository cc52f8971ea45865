"""Read chosen rows back from their source file: the real-image baselines pick a few ids per class in the quantize
stage, and only those rows are read again, shard by shard (pure: no Ray).

    read_rows_by_id(data, source, ids) -> {"image": [{bytes, path}], "label": [...]}   (the parquet row form)

`source` is the file a row came from, relative to `data.path`, as the encode stage recorded it beside each latent.
Each file format reads its own rows back (engine/data/formats/: a parquet shard only the row groups that hold
them, an ImageFolder image its one file, a WebDataset shard streamed once). The embedded digits are small and
are simply reloaded, as images, here: no format module imports engine/data/images.py.
"""

from __future__ import annotations

import numpy as np

from engine.config import DataConfig
from engine.data.formats import source_format


def read_rows_by_id(data: DataConfig, source: str, ids: list[str]) -> dict:
    """The chosen rows of one source file, in the parquet row form {image: [{bytes, path}], label: [...]} that
    engine.data.images.decode_rows reads; for the digits, already decoded rows {id, label, image}."""
    if data.source == "digits":
        from engine.data.images import load_split

        train = load_split(data, "train")  # the embedded digits: 1437 images, never a large split
        position = {str(i): row for row, i in enumerate(train.ids)}
        rows = np.array([position[i] for i in ids], dtype=np.int64)
        return {"id": np.array(ids, dtype=object), "label": train.labels[rows], "image": train.images[rows]}
    # An ImageFolder's or a tar's labels are only checked by decode_rows, not used: the picks carry each class.
    return source_format(data.source).read_rows_by_id(data, source, ids)
