"""The row contract every file source is read into, before any image is decoded.

A raw row is {image: {bytes, path}, label, skip, path}:
    image.bytes  the encoded image, or None (the row is skipped as missing_image)
    image.path   the row's id: unique in the dataset and stable across reads, never a path that can repeat
                 (parquet `<shard>#<row>`, ImageFolder `<split>/<class>/<file>`, WebDataset `<shard>/<key>`)
    label        an int64 that parsed as a decimal integer (its range is checked against the classes later), or None
    skip         "reason: detail" when the reader already knows the row is unusable (a label that is not a
                 decimal integer, a file over data.max_image_bytes, a dangling link), else None
    path         the file the row was read from (for reading a chosen row back)
`engine.data.images.decode_rows` turns such rows into images or skip records; nothing else interprets a label.
This module never imports ray.
"""

from __future__ import annotations

import math
import re
from typing import TypedDict

import numpy as np
import pyarrow as pa

# Why a row was skipped. Everything else a row can hold (any PIL mode, any size) is converted.
SKIP_REASONS = ("empty", "corrupt", "truncated", "too_large", "missing_image", "missing_label",
                "label_out_of_range", "bad_name", "link_not_followed")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ROW_SCHEMA = pa.schema([("image", IMAGE_TYPE), ("label", pa.int64()), ("skip", pa.string()), ("path", pa.string())])
# A decimal integer with an optional sign, ASCII digits only: Python's int() also takes "0_3" and non-ASCII digits.
_DECIMAL = re.compile(r"[+-]?[0-9]+")
_INT64 = (-(2**63), 2**63 - 1)


class SourceError(ValueError):
    """A problem of a whole source (a shard, a folder, classes.txt), not of one row: one sentence naming the file
    and what to do. Raised while listing, before any stage starts; jobs print it without a traceback."""


def empty_rows() -> dict:
    return {"image": [], "label": [], "skip": [], "path": []}


def batched_rows(rows, batch_size: int):
    """(image bytes | None, id, label, skip | None, path) tuples -> row batches of at most batch_size."""
    batch = empty_rows()
    for data, row_id, label, skip, path in rows:
        batch["image"].append({"bytes": data, "path": row_id})
        batch["label"].append(label)
        batch["skip"].append(skip)
        batch["path"].append(path)
        if len(batch["label"]) == batch_size:
            yield batch
            batch = empty_rows()
    if batch["label"]:
        yield batch


def rows_to_table(rows: dict) -> pa.Table:
    """A row batch as the Arrow table Ray Data carries (parquet's image struct, nullable int64 label)."""
    count = len(rows["label"])
    return pa.table({"image": pa.array(rows["image"], IMAGE_TYPE), "label": pa.array(rows["label"], pa.int64()),
                     "skip": pa.array(rows.get("skip") or [None] * count, pa.string()),
                     "path": pa.array(rows["path"], pa.string())}, schema=ROW_SCHEMA)


class SkipRecords(TypedDict):
    """Rows left out, as equal-length columns (the form Ray Data carries and skipped.parquet stores): each row's
    id, its reason (one of SKIP_REASONS) and a detail for a person."""

    id: list[str]
    reason: list[str]
    detail: list[str]


def no_skips() -> SkipRecords:
    return {"id": [], "reason": [], "detail": []}


def add_skip(skipped: SkipRecords, row_id: str, reason: str, detail: str) -> None:
    skipped["id"].append(row_id)
    skipped["reason"].append(reason)
    skipped["detail"].append(detail)


def safe_text(name: str) -> str:
    """A file or member name as valid UTF-8: bytes that are not UTF-8 (which Python keeps as surrogates) escaped
    as \\xNN, so ids hash, print and go into parquet."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    return safe_text(name) is name


def shown(text: str, limit: int = 40) -> str:
    """Raw text for a skip detail: quoted, control characters escaped, cut to `limit` characters."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def parse_label(value) -> tuple[int | None, str | None]:
    """The one label grammar, for .cls text, parquet int / float / string columns alike -> (label, skip).
    A decimal integer (an int; a float with no fraction, as pandas writes an int column holding a null; ASCII
    digits with an optional sign and surrounding spaces) is the label; anything else is a missing_label skip with
    the raw text, and an integer too large for int64 a label_out_of_range one. None is no label (skip None:
    decode_rows names it)."""
    if value is None:
        return None, None
    if isinstance(value, (bool, np.bool_)):
        return None, f"missing_label: label {value!r} is a boolean, not a decimal integer"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != math.floor(value):
            return None, f"missing_label: label {float(value)!r} is not a whole number"
        value = int(value)
    elif isinstance(value, (bytes, str)):
        text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else value
        if not _DECIMAL.fullmatch(text.strip()):
            return None, f"missing_label: label {shown(text)} is not a decimal integer"
        value = int(text.strip())
    elif not isinstance(value, (int, np.integer)):
        return None, f"missing_label: label of type {type(value).__name__} is not a decimal integer"
    value = int(value)
    if not _INT64[0] <= value <= _INT64[1]:
        return None, f"label_out_of_range: label {shown(str(value))} does not fit a 64-bit integer"
    return value, None


def parse_labels(values) -> tuple[list[int | None], list[str | None]]:
    """parse_label over a column -> (labels, skips)."""
    parsed = [parse_label(v) for v in values]
    return [p[0] for p in parsed], [p[1] for p in parsed]


def image_struct(value) -> dict:
    """A parquet `image` cell as {bytes, path}: HF's struct, or plain binary (bytes alone)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value), "path": None}
    return value if isinstance(value, dict) else {"bytes": None, "path": None}


def is_image_column(kind: pa.DataType) -> bool:
    """What the engine reads as a parquet image column: HF's struct with a `bytes` field, or plain binary."""
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and is_binary(kind.field(index).type)
    return is_binary(kind)


def is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
