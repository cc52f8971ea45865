"""What every source format shares: the record a format registers (`SourceFormat`), the listing of a split
(`SourceListing`), the on-disk names of the splits, and reading one file's bytes. Pure: no Ray."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import DataConfig
from engine.data.rows import SkipRecords, SourceError, no_skips
from engine.io.location import ObjectPath, location

# On disk, in the order tried: the engine asks for "train" and "test"; held-out sets are usually called val.
SPLIT_NAMES = {"train": ("train",), "test": ("val", "validation", "test")}


@dataclass(frozen=True)
class SourceListing:
    """One listing of a split: what to read, and what is already known unusable."""

    source: str  # the format's name (data.source)
    root: str  # data.path
    names: tuple[str, ...]  # files to read, relative to root: shards, or image ids (imagefolder)
    labels: tuple[int, ...] = ()  # imagefolder: each file's label, from its class folder
    sizes: tuple[int | None, ...] = ()  # bytes when the listing gave them (object stores), else None
    skipped: SkipRecords = field(default_factory=no_skips)
    ignored: tuple[str, ...] = ()  # imagefolder: files that are not images (not rows, not counted)

    def paths(self) -> list[str]:
        base = location(self.root)
        return [str(base / name) for name in self.names]


@dataclass(frozen=True)
class SourceFormat:
    """One value of data.source: how it names its classes, lists and reads a split, counts its rows and reads chosen
    rows back. A format without `scan` is not read from files (the embedded digits): it has no listing and no rows
    in the file row form, so engine/data/images.py and engine/data/readback.py load it themselves."""

    name: str
    class_names: Callable[[DataConfig], tuple[str, ...]]  # display names in label order
    # Rows of a split ("train", "val" or "test") from what is known without reading them (memory, footers, a
    # listing); None: the format has no index and its rows are streamed once to be counted.
    count_rows: Callable[[DataConfig, str], int] | None = None
    # The files holding a split's rows, listed once, no image bytes read; rows known unusable go to `skipped`.
    scan: Callable[[DataConfig, str], SourceListing] | None = None
    # (listing, batch_size, max_bytes) -> row batches of every listed file, in listing order, all of their rows.
    iter_rows: Callable[[SourceListing, int, int | None], Iterator[dict]] | None = None
    # What check_source asks of a source split before any stage; None: that it can be listed (`scan`).
    check_split: Callable[[DataConfig, str], object] | None = None
    # (config, file relative to data.path, ids) -> the chosen rows of that file, in the row form.
    read_rows_by_id: Callable[[DataConfig, str, list[str]], dict] | None = None


def source_root(config: DataConfig) -> Path | ObjectPath:
    """data.path of a file source, which it cannot do without."""
    if not config.path:
        raise ValueError(f"data.source={config.source} needs data.path")
    return location(config.path)


def find_split(root: Path | ObjectPath, split: str, exists: Callable[[str], bool]) -> str:
    """The on-disk name of a source split ("test" -> val, validation or test, the first that exists)."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"a source split is 'train' or 'test', got {split!r}")
    for name in SPLIT_NAMES[split]:
        if exists(name):
            return name
    raise SourceError(f"no {' or '.join(SPLIT_NAMES[split])} split under {root}: see docs/guide.md for the "
                      f"layout of each source")


def read_file_bytes(place: Path | ObjectPath, max_bytes: int | None = None, size: int | None = None,
                    attempts: int = 3) -> tuple[bytes | None, str | None]:
    """A file's bytes, or (None, skip) when it cannot be read at all (missing_image) or holds more than max_bytes
    (too_large: refused from its size, never read whole). Other I/O errors are retried with back-off, then raised:
    a storage outage must not look like a set of bad images."""
    for attempt in range(attempts):
        try:
            if isinstance(place, ObjectPath):
                size = place.stat().st_size if size is None and max_bytes else size
                if max_bytes and size is not None and size > max_bytes:
                    return None, f"too_large: {size} bytes > data.max_image_bytes={max_bytes}"
                return place.read_bytes(), None
            with open(place, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if max_bytes and size > max_bytes:
                    return None, f"too_large: {size} bytes > data.max_image_bytes={max_bytes}"
                return f.read(), None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as error:
            return None, f"missing_image: file not readable ({error.__class__.__name__})"
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2 ** attempt)
    return None, None
