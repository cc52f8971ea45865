import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.config import DataConfig
from engine.data import decode_image_batch, load_split

FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion_mnist"


def test_digits_split_is_stratified_disjoint_and_seeded():
    config = DataConfig()
    train, test = load_split(config, "train"), load_split(config, "test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    assert not set(train.ids) & set(test.ids)
    # Stratified: class proportions agree within one image per class.
    assert np.abs(np.bincount(train.labels) / len(train) - np.bincount(test.labels) / len(test)).max() < 0.01
    assert (load_split(config, "train").ids == train.ids).all()
    other = load_split(DataConfig(split_seed=1), "train")
    assert set(other.ids) != set(train.ids)


def png_bytes(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_round_trip_in_hugging_face_layout(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    rows = [{"bytes": png_bytes(g, "L"), "path": f"train/{i:06d}.png"} for i, g in enumerate(gray)]
    table = pa.table({"image": pa.array(rows), "label": pa.array([0, 1, 2, 1, 0], pa.int64())})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    images = load_split(DataConfig(source="parquet", path=str(tmp_path), image_size=28), "train")
    assert images.class_names == ("a", "b", "c")
    assert images.images.shape == (5, 28, 28, 3)
    # Grayscale is replicated to RGB, pixels unchanged at the native size.
    assert (images.images[..., 0] == gray).all() and (images.images[..., 2] == gray).all()
    assert list(images.labels) == [0, 1, 2, 1, 0]


def test_decode_batch_converts_rgba_and_resizes():
    rgba = np.zeros((10, 12, 4), np.uint8)
    batch = {"image": [{"bytes": png_bytes(rgba, "RGBA"), "path": "x.png"}], "label": [3]}
    out = decode_image_batch(batch, 16)
    assert out["image"].shape == (1, 16, 16, 3) and list(out["id"]) == ["x.png"]


def test_missing_shards_and_class_names_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-"):
        load_split(DataConfig(source="parquet", path=str(tmp_path)), "train")


@pytest.mark.skipif(not FASHION.exists(), reason="../shared/data/fashion_mnist is not present")
def test_fashion_mnist_test_split_reads():
    images = load_split(DataConfig(source="parquet", path=str(FASHION), name="fashion_mnist", image_size=28), "test")
    assert len(images) == 10_000 and images.class_names[0] == "T-shirt/top"
    assert np.bincount(images.labels).tolist() == [1000] * 10
