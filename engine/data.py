"""Image sources: scikit-learn's embedded digits and Hugging-Face-style parquet shards.

Every source yields the same in-memory form, `ImageSet`: uint8 RGB images (N, H, W, 3) at the configured square
size, int64 labels (N,), a unique string id per image (the parquet `image.path`, or `digits/<split>/<index>`),
and the class names. Parquet shards hold rows `{image: {bytes, path}, label}` (the layout of ImageNet-1K and
../shared/data/fashion_mnist); `decode_image_batch` turns such rows into images and is what the Ray Data read
stage maps over shards.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from engine.config import DataConfig


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) str
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def to_rgb_square(image: Image.Image, size: int) -> np.ndarray:
    """Any PIL image -> (size, size, 3) uint8. Non-square images are resized without cropping (digits, MNIST-likes
    are square; center-cropping for ImageNet belongs to the data-loading issue)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def decode_image_bytes(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return to_rgb_square(image, size)


def decode_image_batch(batch: dict, size: int) -> dict:
    """Parquet rows -> {id, label, image (B, size, size, 3) uint8}. `batch["image"]` holds {bytes, path} structs."""
    structs = batch["image"]
    decoded = [decode_image_bytes(s["bytes"], size) for s in structs]
    images = np.stack(decoded) if decoded else np.zeros((0, size, size, 3), np.uint8)
    return {
        "id": np.array([s["path"] for s in structs], dtype=object),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "image": images,
    }


def load_digits_split(config: DataConfig, split: str) -> ImageSet:
    """scikit-learn's digits (1797 images, 8x8, values 0..16) with a seeded stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_index, test_index = train_test_split(
        index, test_size=config.test_fraction, stratify=labels, random_state=config.split_seed
    )
    chosen = np.sort(train_index if split == "train" else test_index)
    images = np.stack([to_rgb_square(Image.fromarray(pixels[i], mode="L"), config.image_size) for i in chosen])
    ids = np.array([f"digits/{split}/{i:06d}" for i in chosen], dtype=object)
    names = tuple(str(n) for n in digits.target_names)
    return ImageSet(images, labels[chosen], ids, names)


def shard_paths(root: str | Path, split: str) -> list[str]:
    paths = sorted(str(p) for p in Path(root).glob(f"{split}-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no parquet shards matching {split}-*.parquet under {root}")
    return paths


def read_class_names(root: str | Path) -> tuple[str, ...]:
    """classes.txt beside the shards (one name per line, in label order)."""
    path = Path(root) / "classes.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the dataset folder must list class names in label order")
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def load_parquet_split(config: DataConfig, split: str) -> ImageSet:
    """Read and decode a whole split in this process (small sets and evaluation; encoding streams through Ray)."""
    parts = [decode_image_batch(pq.read_table(p).to_pydict(), config.image_size) for p in shard_paths(config.path, split)]
    return ImageSet(
        np.concatenate([p["image"] for p in parts]),
        np.concatenate([p["label"] for p in parts]),
        np.concatenate([p["id"] for p in parts]),
        read_class_names(config.path),
    )


def load_split(config: DataConfig, split: str) -> ImageSet:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if config.source == "digits":
        return load_digits_split(config, split)
    return load_parquet_split(config, split)


def class_names(config: DataConfig) -> tuple[str, ...]:
    if config.source == "digits":
        return tuple(str(i) for i in range(10))
    return read_class_names(config.path)

