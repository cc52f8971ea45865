"""Digits: scikit-learn's embedded 8x8 digits (`read_digits`), split train/test by a seeded stratified draw; classes
"0".."9" (data.classes_file does not rename them). Held in memory, not read from files: no listing and no rows in
the file row form; engine/data/images.py turns them into images.
"""

from __future__ import annotations

import numpy as np

from engine.config import DataConfig
from engine.data.formats.base import SourceFormat
from engine.data.splits import in_split, source_split

DIGIT_NAMES = tuple(str(digit) for digit in range(10))


def read_digits(config: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 images, 8x8, values 0..16) with a seeded stratified train/test split (sklearn);
    val is carved from train by the same per-id coin as every source's (engine/data/splits.py), so its rows keep
    their train ids. -> (pixels (N, 8, 8) uint8 scaled to 0..255, labels (N,) int64, ids (N,) str)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_index, test_index = train_test_split(
        index, test_size=config.test_fraction, stratify=labels, random_state=config.split_seed
    )
    chosen = np.sort(train_index if source_split(split) == "train" else test_index)
    ids = np.array([f"digits/{source_split(split)}/{i:06d}" for i in chosen], dtype=object)
    keep = in_split(ids, split, config.val_fraction, config.split_seed)
    chosen = chosen[keep]
    return pixels[chosen], labels[chosen], ids[keep]


def class_names(config: DataConfig) -> tuple[str, ...]:
    return DIGIT_NAMES


def count_rows(config: DataConfig, split: str) -> int:
    return len(read_digits(config, split)[2])


FORMAT = SourceFormat(name="digits", class_names=class_names, count_rows=count_rows)
