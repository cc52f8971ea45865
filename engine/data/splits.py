"""The engine's three splits: train, val (carved from the source's train split) and test (its held-out split).

Every choice a run makes is scored on val: Tune's early stopping and best config, the report curves, the prior's
quality, decode settings. The test split is read only for the final result rows. Val never trains anything: the
prior, the teacher, the latents that become distilled sets and the `full` baseline all see train without it.

Val is a seeded coin per row, drawn from a hash of the row's id: a row is in val iff its coin < data.val_fraction.
So the same row lands in the same split whoever reads it (in this process, a Ray Data read task, any batch order,
any shard layout); no pass over the data is needed before it can be carved (ImageNet's 1.28M rows are never
counted or held to split them); and it is stratified by construction, every class giving its fraction of rows in
expectation (a class of n train rows gives n·f ± √(n·f(1−f)) val rows: 128 ± 11 of ImageNet's 1281 at f = 0.1).
"""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS = ("train", "val", "test")
# The salt keeps the val coin independent of engine.data.images.sample_key's order (the prior's training sample).
VAL_SALT = "val"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def source_split(split: str) -> str:
    """The source's split a split is read from: val rows are rows of the source's train split."""
    return "train" if check_split(split) == "val" else split


def val_coin(row_id: str, seed: int) -> float:
    """A row's coin in [0, 1): uniform over ids, fixed by (seed, id) alone."""
    digest = hashlib.blake2b(f"{VAL_SALT}\0{seed}\0{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_split(ids, split: str, fraction: float, seed: int) -> np.ndarray:
    """Which of a source split's rows (by id) belong to `split`: train and val divide the source's train rows by
    the coin, test keeps every row. A row without an id (None) stays in train: it has no stable coin."""
    check_split(split)
    ids = list(ids)
    if split == "test":
        return np.ones(len(ids), dtype=bool)
    in_val = np.array([i is not None and val_coin(str(i), seed) < fraction for i in ids], dtype=bool)
    return in_val if split == "val" else ~in_val


def row_ids(rows: dict) -> list:
    """The id of each raw source row ({image: [{bytes, path}], ...}, engine/data/rows.py's row form)."""
    return [(image or {}).get("path") for image in rows.get("image", ())]


def take_rows(rows: dict, keep: np.ndarray) -> dict:
    """Raw source rows (a dict of equal-length columns: lists, or numpy arrays in Ray Data) where `keep`."""
    index = np.flatnonzero(keep)
    if len(index) == len(keep):
        return rows
    return {key: values[index] if isinstance(values, np.ndarray) else [values[i] for i in index]
            for key, values in rows.items()}


def rows_of_split(rows: dict, split: str, fraction: float, seed: int) -> dict:
    """Raw rows of the source's split -> those of `split` (by their ids' coins)."""
    if split == "test":
        return rows
    return take_rows(rows, in_split(row_ids(rows), split, fraction, seed))


def skipped_of_split(skipped: dict, split: str, fraction: float, seed: int) -> dict:
    """Skip records ({id, reason, detail}) of the source's split -> those of rows of `split`."""
    if split == "test":
        return skipped
    return take_rows(skipped, in_split(skipped["id"], split, fraction, seed))
