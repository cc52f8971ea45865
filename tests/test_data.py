import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.config import DataConfig
from engine.data.images import BadImage, count_skipped, decode_image_bytes, decode_rows, load_split
from engine.data.rows import SourceError

FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion_mnist"


def test_digits_split_is_stratified_disjoint_and_seeded():
    config = DataConfig()
    train, val, test = (load_split(config, split) for split in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == 1797
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    assert not set(train.ids) & set(test.ids) and not set(val.ids) & (set(train.ids) | set(test.ids))
    # Stratified: the test split's class proportions agree with train's within one image per class (sklearn).
    whole = np.bincount(np.concatenate([train.labels, val.labels]))
    assert np.abs(whole / whole.sum() - np.bincount(test.labels) / len(test)).max() < 0.01
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
    images = load_split(DataConfig(val_fraction=0, source="parquet", path=str(tmp_path), image_size=28), "train")
    assert images.class_names == ("a", "b", "c")
    assert images.images.shape == (5, 28, 28, 3)
    # Grayscale is replicated to RGB, pixels unchanged at the native size.
    assert (images.images[..., 0] == gray).all() and (images.images[..., 2] == gray).all()
    assert list(images.labels) == [0, 1, 2, 1, 0]


def test_decode_batch_converts_rgba_and_resizes():
    rgba = np.zeros((10, 12, 4), np.uint8)
    batch = {"image": [{"bytes": png_bytes(rgba, "RGBA"), "path": "x.png"}], "label": [3]}
    out, _ = decode_rows(batch, 16)
    assert out["image"].shape == (1, 16, 16, 3) and list(out["id"]) == ["x.png"]


@pytest.mark.parametrize("shape, quality, subsampling, size, mode", [
    ((32, 32, 3), 90, 0, 32, "squash"),        # the size already: libjpeg-turbo's pixels as they are
    ((375, 500, 3), 75, 2, 64, "center_crop"),  # ImageNet-like, 4:2:0, resized by PIL from the decoded pixels
    ((300, 400), 85, 2, 48, "squash"),           # grey
])
def test_the_fast_jpeg_path_gives_pils_pixels(shape, quality, subsampling, size, mode):
    from PIL import ImageFilter

    from engine.data.images import decode_jpeg_fast, to_rgb_square

    smooth = Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(2))
    buffer = io.BytesIO()
    smooth.save(buffer, "JPEG", quality=quality, subsampling=subsampling)
    data = buffer.getvalue()
    fast = decode_jpeg_fast(data, size, 10**9, mode)
    assert fast is not None  # the fast path took it
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert np.array_equal(fast, to_rgb_square(image, size, mode))
    assert np.array_equal(decode_image_bytes(data, size, mode=mode), fast)
    # Cut short, or too large: not the fast path's to judge / refused from the header, as PIL's path does.
    assert decode_jpeg_fast(data[: len(data) // 2], size, 10**9, mode) is None
    with pytest.raises(BadImage, match="max_image_pixels"):
        decode_jpeg_fast(data, size, 100, mode)


def test_missing_shards_and_class_names_are_named(tmp_path):
    with pytest.raises(SourceError, match="train-"):
        load_split(DataConfig(source="parquet", path=str(tmp_path)), "train")


@pytest.mark.skipif(not FASHION.exists(), reason="../shared/data/fashion_mnist is not present")
def test_fashion_mnist_test_split_reads():
    images = load_split(DataConfig(source="parquet", path=str(FASHION), name="fashion_mnist", image_size=28), "test")
    assert len(images) == 10_000 and images.class_names[0] == "T-shirt/top"
    assert np.bincount(images.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- bad input: every row converted or skipped


def encoded(array: np.ndarray, mode: str, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    if mode == "LA":  # PIL builds LA images from two planes, not from an (H, W, 2) array
        image = Image.merge("LA", [Image.fromarray(array[..., 0]), Image.fromarray(array[..., 1])])
    else:
        image = Image.fromarray(array) if mode == "I;16" else Image.fromarray(array, mode=mode)
    assert image.mode == mode
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header (IHDR, with a valid CRC) claims width x height: a decompression bomb's shape."""
    import struct
    import zlib

    data = bytearray(encoded(np.zeros((1, 1), np.uint8), "L"))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def good_and_bad_rows() -> tuple[list[dict], list, dict, dict]:
    """Rows of every kind a web-scraped shard holds; returns (image structs, labels, expected good ids, expected
    skip reason per id)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk_jpeg = io.BytesIO()
    cmyk.save(cmyk_jpeg, format="JPEG")
    palette = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(palette, format="PNG", transparency=0)
    png, jpeg = encoded(rgb, "RGB"), encoded(rgb, "RGB", "JPEG")
    good = {
        "gray.png": encoded(rgb[..., 0], "L"),
        "rgba.png": encoded(rng.integers(0, 256, (9, 9, 4), dtype=np.uint8), "RGBA"),
        "la.png": encoded(rng.integers(0, 256, (9, 9, 2), dtype=np.uint8), "LA"),
        "palette.png": palette.getvalue(),
        "cmyk.jpg": cmyk_jpeg.getvalue(),
        "sixteen.png": encoded(rng.integers(0, 65536, (12, 12), dtype=np.uint16), "I;16"),
        "one.png": encoded(rgb[:1, :1], "RGB"),
        "odd.jpg": encoded(rng.integers(0, 256, (7, 31, 3), dtype=np.uint8), "RGB", "JPEG"),
        "large.png": encoded(np.zeros((1500, 2000, 3), np.uint8), "RGB"),
        "rgb.webp": encoded(rgb, "RGB", "WEBP"),
    }
    bad = {
        "empty.png": (b"", "empty"),
        "junk.png": (b"<html>404 not found</html>", "corrupt"),
        "header-only.png": (png[:30], "corrupt"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bomb.png": (png_claiming_size(100_000, 100_000), "too_large"),
    }
    structs = [{"bytes": b, "path": p} for p, b in good.items()]
    structs += [{"bytes": b, "path": p} for p, (b, _) in bad.items()]
    labels = [i % 3 for i in range(len(structs))]
    structs += [{"bytes": png, "path": "label-7.png"}, {"bytes": png, "path": "label-neg.png"},
                {"bytes": png, "path": "label-null.png"}, None]
    labels += [7, -1, None, 0]
    reasons = {p: r for p, (_, r) in bad.items()}
    reasons.update({"label-7.png": "label_out_of_range", "label-neg.png": "label_out_of_range",
                    "label-null.png": "missing_label", "<row 19 of its batch, no path>": "missing_image"})
    return structs, labels, set(good), reasons


def test_every_row_is_converted_or_skipped_with_its_reason():
    structs, labels, good, reasons = good_and_bad_rows()
    decoded, skipped = decode_rows({"image": structs, "label": labels}, 16, num_classes=3)
    assert set(decoded["id"]) == good
    assert decoded["image"].shape == (len(good), 16, 16, 3) and decoded["image"].dtype == np.uint8
    assert dict(zip(skipped["id"], skipped["reason"])) == reasons
    assert len(decoded["id"]) + len(skipped["id"]) == len(structs)  # nothing lost without a trace
    assert count_skipped(skipped["reason"]) == {"empty": 1, "corrupt": 2, "truncated": 2, "too_large": 1,
                                                "missing_image": 1, "missing_label": 1, "label_out_of_range": 2}


def test_conversions_keep_the_pixels():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    out = decode_image_bytes(encoded(ramp, "I;16"), 8)
    np.testing.assert_array_equal(out[..., 0], np.rint(ramp / 257).astype(np.uint8))  # scaled, not saturated
    gray = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    out = decode_image_bytes(encoded(np.dstack([gray, np.full_like(gray, 9)]), "LA"), 8)
    assert (out == gray[..., None]).all()  # alpha dropped, gray replicated


def test_the_pixel_limit_is_read_from_the_header():
    with pytest.raises(BadImage, match="too_large"):
        decode_image_bytes(png_claiming_size(5000, 5000), 16, max_pixels=1_000_000)
    assert decode_image_bytes(encoded(np.zeros((10, 10), np.uint8), "L"), 16, max_pixels=100).shape == (16, 16, 3)


def write_shard(path: Path, structs, labels) -> None:
    columns = {"image": pa.array(structs, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    pq.write_table(pa.table(columns), path)


def test_bad_shards_are_counted_and_the_skip_fraction_is_enforced(tmp_path):
    structs, labels, good, reasons = good_and_bad_rows()
    write_shard(tmp_path / "train-00000-of-00002.parquet", structs, labels)
    write_shard(tmp_path / "train-00001-of-00002.parquet", structs[:2], None)  # no label column
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    config = DataConfig(val_fraction=0, source="parquet", path=str(tmp_path), max_skip_fraction=0.6)
    images = load_split(config, "train")
    # Ids are `<shard>#<row>`, whatever path a row stores.
    assert set(images.ids) == {f"train-00000-of-00002.parquet#{row}" for row, s in enumerate(structs)
                               if s is not None and s["path"] in good}
    assert images.skipped["missing_label"] == 1 + 2 and sum(images.skipped.values()) == len(reasons) + 2
    with pytest.raises(ValueError, match=r"12 of 22 rows .* first: train-00000-of-00002.parquet#"):
        load_split(DataConfig(val_fraction=0, source="parquet", path=str(tmp_path), max_skip_fraction=0.5), "train")


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "train-00000-of-00001.parquet").write_bytes(b"PAR1 but not really")
    (tmp_path / "classes.txt").write_text("a\n")
    with pytest.raises(ValueError, match="train-00000-of-00001.parquet is not a readable parquet file"):
        load_split(DataConfig(source="parquet", path=str(tmp_path)), "train")


def test_a_bounded_sample_is_stratified_seeded_and_order_free(tmp_path):
    """The tiny prior's training sample: at most `limit` images, the same number per class, the same rows whatever
    the shard order, streamed (never the split decoded whole)."""
    from engine.data.images import sample_split

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [40, 25, 30])
    rows = [{"bytes": png_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L"), "path": f"train/{i:06d}.png"}
            for i in range(len(labels))]
    order = rng.permutation(len(labels))
    for name, part in (("a", order[:50]), ("b", order[50:])):
        shard = pa.table({"image": pa.array([rows[i] for i in part]), "label": pa.array(labels[part], pa.int64())})
        pq.write_table(shard, tmp_path / f"train-0000{0 if name == 'a' else 1}-of-00002.parquet")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    config = DataConfig(val_fraction=0, source="parquet", path=str(tmp_path), image_size=8)
    sample = sample_split(config, "train", 30, seed=3)
    assert len(sample) == 30 and np.bincount(sample.labels).tolist() == [10, 10, 10]
    again = sample_split(config, "train", 30, seed=3)
    assert again.ids.tolist() == sample.ids.tolist()
    assert sample_split(config, "train", 30, seed=4).ids.tolist() != sample.ids.tolist()
    assert len(sample_split(config, "train", 0, seed=3)) == len(labels)  # 0 = the whole split


def test_a_reference_sample_may_leave_bad_rows_out_without_judging_the_split(tmp_path):
    from engine.data.images import TooManyBadRows, sample_split

    good = png_bytes(np.zeros((8, 8), np.uint8), "L")
    write_shard(tmp_path / "train-00000-of-00001.parquet",
                [{"bytes": good, "path": "a"}, {"bytes": good, "path": "b"}, {"bytes": b"junk", "path": "c"}], [0, 1, 0])
    (tmp_path / "classes.txt").write_text("a\nb\n")
    config = DataConfig(source="parquet", path=str(tmp_path), image_size=8, val_fraction=0, max_skip_fraction=0.3)
    with pytest.raises(TooManyBadRows, match="1 of 3 rows"):
        sample_split(config, "train", 10, seed=0)
    assert len(sample_split(config, "train", 10, seed=0, enforce_skip_limit=False)) == 2
