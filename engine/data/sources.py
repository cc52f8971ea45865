"""Every source through one registry (engine/data/formats/: one module per format, whose docstring holds that
format's layout rules): its class names, its splits listed and read as batches of rows, its rows counted.

Every file source (parquet shards, ImageFolder trees, WebDataset tars) is read as batches of rows in one row form
(engine/data/rows.py: image {bytes, path = the row's unique id}, label, skip, path), so
`engine.data.images.decode_rows` (decoding, resizing, every skip reason) applies unchanged, in-process (`load_split`,
through `iter_row_batches`) and in Ray Data (`engine/ray/readers.py`, same row functions). Reading is done in two
steps: `scan_source` lists the split once (no image bytes read) into a `SourceListing` whose `skipped` records
({id, reason, detail}) are the rows already known unusable; then the rows of `listing.names` are streamed. The
embedded digits are held in memory instead (engine/data/formats/digits.py). This module never imports
engine/data/images.py nor ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from engine.config import DataConfig
from engine.data.formats import FILE_SOURCES, FORMATS, source_format
from engine.data.formats.base import SourceListing
from engine.data.splits import rows_of_split, skipped_of_split


def scan_source(config: DataConfig, split: str) -> SourceListing:
    """List a file source's split once (what `iter_row_batches` and the Ray readers then read). Split "train" or
    "val" lists the source's train split: an ImageFolder listing keeps only the split's files (its ids are known
    there); shards hold both, and their readers keep the split's rows (`rows_of_split`). Skip records of the
    listing are the split's own."""
    source = FORMATS.get(config.source)
    if source is None or source.scan is None:
        raise ValueError(f"data.source={config.source!r} is not a file source ({', '.join(FILE_SOURCES)})")
    listing = source.scan(config, split)
    return dataclasses.replace(listing, skipped=skipped_of_split(listing.skipped, split, config.val_fraction,
                                                                 config.split_seed))


def check_source(config: DataConfig) -> None:
    """Whole-source problems as one sentence (SourceError) before any stage: the class list, and that both
    splits are there and readable as far as their listing tells (parquet footers; the tars and the folders of an
    ImageFolder are only found here, their contents checked as they are read)."""
    class_names(config)
    check_split = source_format(config.source).check_split or scan_source
    for split in ("train", "test"):
        check_split(config, split)


def count_rows(config: DataConfig, split: str) -> int:
    """Rows of a split, read as cheaply as the layout allows (it sizes the streamed training schedules; rows that
    will not decode are still counted): digits from memory, parquet from the footers, an ImageFolder from its
    listing; a format without a count of its own (WebDataset tars hold no index) is streamed once."""
    count = source_format(config.source).count_rows
    if count is None:
        return sum(len(rows["label"]) for rows in iter_row_batches(config, split))
    return count(config, split)


def class_names(config: DataConfig) -> tuple[str, ...]:
    """Class names in label order, of any source: "0".."9" for the digits; else from the classes.txt beside the
    data (ImageFolder: the display names, or the folder names without one); data.classes_file, when set, gives the
    display names instead (engine/data/classes.py)."""
    return source_format(config.source).class_names(config)


def iter_row_batches(config: DataConfig, split: str, batch_size: int = 256,
                     listing: SourceListing | None = None) -> Iterator[dict]:
    """Every row of the split's readable files, in listing order, in batches of at most batch_size (fewer where
    val's rows are taken out of a train batch, or train's out of a val one), read in this process (small splits
    and tests; Ray Data reads big ones). listing.skipped holds the rows that are not here."""
    listing = listing or scan_source(config, split)
    for rows in source_format(listing.source).iter_rows(listing, batch_size, config.max_image_bytes):
        rows = rows_of_split(rows, split, config.val_fraction, config.split_seed)  # an ImageFolder listing is carved already
        if rows["label"]:
            yield rows
