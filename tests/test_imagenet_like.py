"""benchmarks/imagenet_like.py: ImageNet's counts, decodable shards the engine reads, reproducible and resumable."""

import io
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.data.images import decode_rows
from engine.data.classes import read_class_names
from engine.data.formats.parquet import shard_paths

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import imagenet_like  # noqa: E402

TINY = {"classes": 12, "per_class": 20, "test_per_class": 3, "resolution": 16, "train_shards": 3, "seed": 7}


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def read(root: Path, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(path) for path in shard_paths(root, split))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rehearsal") / "tiny"
    imagenet_like.generate(root, **TINY, workers=1, log=lambda line: None)
    return root


def test_class_counts_have_imagenets_shape():
    counts = imagenet_like.class_counts(1000, None)
    assert counts.dtype == np.int64 and counts.sum() == 1_281_167
    assert counts.max() == 1300 and counts.min() == 732 and 50 <= (counts < 1300).sum() <= 150
    assert np.array_equal(counts, imagenet_like.class_counts(1000, None, seed=0))
    other = imagenet_like.class_counts(1000, None, seed=1)
    assert other.sum() == 1_281_167 and not np.array_equal(counts, other)
    assert imagenet_like.class_counts(10, None).sum() == round(1_281_167 / 100)
    small = imagenet_like.class_counts(100, 130, seed=3)
    assert small.max() == 130 and 1 <= (small < 130).sum() <= 20 and small.min() >= 130 * 732 // 1300
    assert (imagenet_like.class_counts(3, 5) < 5).sum() == 1  # uneven classes even at toy sizes


def test_class_combinations_are_distinct():
    specs = [imagenet_like.class_spec(c) for c in range(imagenet_like.MAX_CLASSES)]
    assert imagenet_like.MAX_CLASSES >= 1000 and len(set(specs)) == len(specs)
    names = imagenet_like.class_names(1000)
    assert len(set(names)) == 1000 and names[0] == "class_0000_circle_red"


def test_default_root_is_a_cache_outside_the_repo(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    root = imagenet_like.default_root(1000, None, 32, 0)
    assert root == Path.home() / ".cache/ddoq/rehearsal/1000ximagenet-r32-s0"
    assert imagenet_like.default_root(10, 50, 64, 1).name == "10x50-r64-s1"
    assert ROOT not in root.parents


def test_layout_counts_and_ids(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == [
        "classes.txt", "generated.json", "test-00000-of-00001.parquet",
        *(f"train-{i:05d}-of-00003.parquet" for i in range(3))]
    assert read_class_names(tiny) == tuple(imagenet_like.class_names(12))
    expected = imagenet_like.class_counts(12, 20, seed=7)
    train, test = read(tiny, "train"), read(tiny, "test")
    assert train.schema.field("label").type == pa.int64()
    assert np.array_equal(np.bincount(train["label"].to_numpy(), minlength=12), expected)
    assert np.array_equal(np.bincount(test["label"].to_numpy(), minlength=12), np.full(12, 3))
    ids = [row["path"] for row in train["image"].to_pylist() + test["image"].to_pylist()]
    assert len(set(ids)) == len(ids) == expected.sum() + 36 and ids[0].endswith(".jpg")


def test_images_decode_with_pil_and_the_engine(tiny):
    rows = read(tiny, "train").to_pydict()
    with Image.open(io.BytesIO(rows["image"][0]["bytes"])) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (16, 16)
    decoded, skipped = decode_rows(rows, 16, num_classes=12)
    assert skipped["id"] == [] and decoded["image"].shape == (len(rows["label"]), 16, 16, 3)
    assert np.array_equal(decoded["label"], rows["label"])


def test_shards_mix_classes(tiny):
    for path in shard_paths(tiny, "train"):
        labels = pq.read_table(path)["label"].to_numpy()
        assert len(np.unique(labels)) >= 6 and not np.all(np.diff(labels) >= 0)


def test_classes_look_different(tiny):
    """Shapes sit at random places, so compare amplitude spectra (translation-invariant): the nearest class-mean
    spectrum of the train images names most held-out test images (chance is 1 in 12)."""
    def spectra(split: str) -> tuple[np.ndarray, np.ndarray]:
        decoded, _ = decode_rows(read(tiny, split).to_pydict(), 16)
        images = decoded["image"].astype(np.float64)
        amplitude = np.abs(np.fft.fft2(images - images.mean((1, 2), keepdims=True), axes=(1, 2)))
        return np.log1p(amplitude).reshape(len(images), -1), decoded["label"]

    (train, train_labels), (test, test_labels) = spectra("train"), spectra("test")
    mean, std = train.mean(0), train.std(0) + 1e-6
    centroids = np.stack([(train[train_labels == c] - mean).mean(0) / std for c in range(12)])
    assert min(np.abs(a - b).max() for a, b in itertools.combinations(centroids, 2)) > 0.1
    distances = ((((test - mean) / std)[:, None] - centroids[None]) ** 2).sum(-1)
    predicted = distances.argmin(1)
    assert (predicted == test_labels).mean() >= 0.5


def test_reproducible_across_workers_and_resumable(tiny, tmp_path):
    other = tmp_path / "pool"
    result = imagenet_like.generate(other, **TINY, workers=2, log=lambda line: None)
    assert result["written"] == 4 and files(other) == files(tiny)

    (other / "train-00001-of-00003.parquet").unlink()
    (other / "generated.json").unlink()
    lines = []
    assert imagenet_like.generate(other, **TINY, workers=1, log=lines.append)["written"] == 1
    assert files(other) == files(tiny) and "3 of 4 shards already there" in lines[0]
    assert imagenet_like.generate(other, **TINY, workers=1, log=lines.append)["written"] == 0  # complete: at once

    with pytest.raises(FileExistsError):
        imagenet_like.generate(other, **{**TINY, "seed": 8}, workers=1, log=lines.append)
    (tmp_path / "mixed").mkdir()
    shutil.copy(tiny / "train-00000-of-00003.parquet", tmp_path / "mixed")
    with pytest.raises(FileExistsError):  # a shard of other parameters, no generated.json yet
        imagenet_like.generate(tmp_path / "mixed", **{**TINY, "seed": 8}, workers=1, log=lines.append)


def test_command_line(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/imagenet_like.py", "--classes", "3", "--per-class", "4",
                          "--test-per-class", "2", "--workers", "1", "--root", str(tmp_path / "cli")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "11 train images in 1 shards" in out.stdout.splitlines()[-1]
    assert len(read(tmp_path / "cli", "train")) == imagenet_like.class_counts(3, 4).sum() == 11
