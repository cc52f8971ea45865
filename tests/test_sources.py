"""ImageFolder trees and WebDataset tars (engine/data/formats/, engine/ray/readers.py): tiny generated sets with bad
files; every row converted or skipped with its reason, counts exact, Ray Data rows equal to the in-process ones."""

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import DataConfig
from engine.data.images import count_skipped, decode_image_bytes, decode_rows, load_split
from engine.data.rows import SourceError
from engine.data.formats.webdataset import TAR_DAMAGE, iter_tar_samples
from engine.data.sources import class_names, iter_row_batches, scan_source

SIZE = 8
NOT_AN_IMAGE = b"not an image at all\n" * 20


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    data = encode(np.random.default_rng(9).integers(0, 256, (32, 32, 3), dtype=np.uint8), "JPEG")
    return data[: len(data) // 2]


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---------------------------------------------------------------- ImageFolder


# train/: id -> (bytes, label or the skip reason); labels are those of classes.txt (cat, dog, bird).
def imagefolder_train() -> dict:
    return {
        "train/cat/a.png": (encode(pixels(1), "PNG"), 0),
        "train/cat/b.PNG": (encode(pixels(2), "PNG"), 0),  # extensions in any case
        "train/cat/sub/c.png": (encode(pixels(3), "PNG"), 0),  # any depth below the class folder
        "train/cat/corrupt.jpg": (NOT_AN_IMAGE, "corrupt"),
        "train/dog/d.jpg": (encode(pixels(4), "JPEG"), 1),
        "train/dog/e.png": (encode(pixels(5), "PNG"), 1),
        "train/dog/empty.png": (b"", "empty"),
        "train/bird/f.bmp": (encode(pixels(6), "BMP"), 2),
        "train/bird/trunc.jpg": (truncated_jpeg(), "truncated"),
        "train/extra/x.png": (encode(pixels(7), "PNG"), "missing_label"),  # a folder classes.txt does not list
        "train/loose.png": (encode(pixels(8), "PNG"), "missing_label"),  # not in any class folder
    }


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "imagenet"
    for name, (data, _) in imagefolder_train().items():
        write(root / name, data)
    write(root / "train/cat/notes.txt", b"a stray file")
    write(root / "train/dog/.DS_Store", b"\0\1")
    for i, folder in enumerate(("cat", "dog", "bird")):
        write(root / f"val/{folder}/v{i}.png", encode(pixels(20 + i), "PNG"))
    (root / "classes.txt").write_text("cat\tThe cat\ndog\tdomestic dog\nbird\n")
    return root


def folder_config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(source="imagefolder", path=str(root), image_size=SIZE, max_skip_fraction=0.5, val_fraction=0,
                      **kwargs)  # the whole train split: these tests are about reading it


def expected_images(rows: dict) -> dict:
    """id -> (label, decoded image) of the rows that are images with an int label."""
    return {i: (label, decode_image_bytes(data, SIZE)) for i, (data, label) in rows.items() if isinstance(label, int)}


def assert_split_equals(images, expected: dict, skipped: dict) -> None:
    assert sorted(images.ids) == sorted(expected)
    for row_id, label, image in zip(images.ids, images.labels, images.images):
        assert label == expected[row_id][0], row_id
        np.testing.assert_array_equal(image, expected[row_id][1], err_msg=row_id)
    assert images.skipped == skipped


def test_imagefolder_rows_are_converted_or_skipped_with_their_reason(imagefolder):
    train = imagefolder_train()
    images = load_split(folder_config(imagefolder), "train")
    reasons = [label for _, label in train.values() if isinstance(label, str)]
    assert_split_equals(images, expected_images(train), count_skipped(reasons))
    assert images.skipped == {"empty": 1, "corrupt": 1, "truncated": 1, "missing_label": 2}
    assert len(images) + sum(images.skipped.values()) == len(train) == 11  # no row lost
    assert images.class_names == ("The cat", "domestic dog", "bird")
    np.testing.assert_array_equal(images.images[list(images.ids).index("train/cat/a.png")], pixels(1))  # lossless
    listing = scan_source(folder_config(imagefolder), "train")
    assert listing.ignored == ("train/cat/notes.txt", "train/dog/.DS_Store")  # not rows, not counted
    assert dict(zip(listing.skipped["id"], listing.skipped["detail"])) == {
        "train/extra/x.png": "class folder 'extra' is not in classes.txt",
        "train/loose.png": "image directly in train/, not in a class folder"}
    assert scan_source(folder_config(imagefolder), "train").paths()[0] == str(imagefolder / "train/bird/f.bmp")


def test_imagefolder_classes_from_folder_names_and_the_val_split(imagefolder):
    (imagefolder / "classes.txt").unlink()
    config = folder_config(imagefolder)
    assert class_names(config) == ("bird", "cat", "dog", "extra")  # train/'s folders, sorted
    images = load_split(config, "train")
    assert dict(zip(images.ids, images.labels))["train/extra/x.png"] == 3
    assert images.skipped == {"empty": 1, "corrupt": 1, "truncated": 1, "missing_label": 1}
    test = load_split(config, "test")  # the engine's "test" is val/
    assert sorted(test.ids) == ["val/bird/v2.png", "val/cat/v0.png", "val/dog/v1.png"]
    assert dict(zip(test.ids, test.labels)) == {"val/bird/v2.png": 0, "val/cat/v0.png": 1, "val/dog/v1.png": 2}
    np.testing.assert_array_equal(test.images[list(test.ids).index("val/dog/v1.png")], pixels(21))


def test_imagefolder_errors_are_named(tmp_path, imagefolder):
    strict = DataConfig(val_fraction=0, source="imagefolder", path=str(imagefolder), image_size=SIZE, max_skip_fraction=0.1)
    with pytest.raises(ValueError, match=r"5 of 11 rows .*first: train/bird/trunc.jpg \(truncated"):
        load_split(strict, "train")
    with pytest.raises(SourceError, match="no val or validation or test split"):
        load_split(folder_config(tmp_path / "nothing"), "test")
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(SourceError, match=r"lists 'a' on lines \[1, 3\]"):
        class_names(folder_config(tmp_path / "dup"))


# ---------------------------------------------------------------- WebDataset


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """member name -> (offset of its header, offset of its data)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar}


# train-000000.tar: (member name, bytes); expected label or skip reason per sample id.
SHARD0 = [
    ("s0.png", encode(pixels(30), "PNG")), ("s0.cls", b"0"),
    ("s1.jpg", encode(pixels(31), "JPEG")), ("s1.cls", b"1"), ("s1.json", b"{}"),
    ("s2.png", encode(pixels(32), "PNG")),  # no .cls
    ("s3.cls", b"2"), ("s3.txt", b"a caption"),  # no image
    ("s4.png", encode(pixels(34), "PNG")), ("s4.cls", b"cat"),  # unparsable label
    ("README", b"no dot: part of no sample"),
    ("s5.PNG", encode(pixels(35), "PNG")), ("s5.cls", b" 2\n"),
    ("s6.png", encode(pixels(36), "PNG")), ("s6.cls", b"7"),  # 3 classes
    ("s7.png", NOT_AN_IMAGE), ("s7.cls", b"1"),
]
SHARD1 = [("t0.png", encode(pixels(40), "PNG")), ("t0.cls", b"0"), ("t1.png", encode(pixels(41), "PNG")),
          ("t1.cls", b"1"), ("t2.png", encode(pixels(42), "PNG")), ("t2.cls", b"2")]
DAMAGE_ID = "train-000001.tar/<damaged after t1: unexpected end of data>"
WDS_TRAIN = {"train-000000.tar/s0": 0, "train-000000.tar/s1": 1, "train-000000.tar/s2": "missing_label",
             "train-000000.tar/s3": "missing_image", "train-000000.tar/s4": "missing_label",
             "train-000000.tar/s5": 2, "train-000000.tar/s6": "label_out_of_range", "train-000000.tar/s7": "corrupt",
             "train-000001.tar/t0": 0, "train-000001.tar/t1": 1, DAMAGE_ID: "corrupt"}


@pytest.fixture
def webdataset(tmp_path):
    root = tmp_path / "wds"
    write(root / "train-000000.tar", tar_bytes(SHARD0))
    whole = tar_bytes(SHARD1)
    write(root / "train-000001.tar", whole[: offsets(whole)["t2.png"][1] + 20])  # cut inside t2.png
    write(root / "val-000000.tar", tar_bytes([("v0.png", encode(pixels(50), "PNG")), ("v0.cls", b"2")]))
    (root / "classes.txt").write_text("a\nb\nc\n")
    return root


def wds_config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(source="webdataset", path=str(root), image_size=SIZE, max_skip_fraction=0.6, val_fraction=0,
                      **kwargs)


def test_webdataset_rows_are_converted_or_skipped_with_their_reason(webdataset):
    images = load_split(wds_config(webdataset), "train")
    image_of = {name.split(".")[0]: data for name, data in SHARD0 + SHARD1 if name.lower().endswith((".png", ".jpg"))}
    expected = {i: (label, decode_image_bytes(image_of[i.split("/")[1]], SIZE)) for i, label in WDS_TRAIN.items()
                if isinstance(label, int)}
    reasons = [r for r in WDS_TRAIN.values() if isinstance(r, str)]
    assert_split_equals(images, expected, count_skipped(reasons))
    assert images.skipped == {"corrupt": 2, "missing_image": 1, "missing_label": 2, "label_out_of_range": 1}
    assert images.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(images.images[list(images.ids).index("train-000001.tar/t1")], pixels(41))
    test = load_split(wds_config(webdataset), "test")  # val-*.tar
    assert list(test.ids) == ["val-000000.tar/v0"] and list(test.labels) == [2]
    batches = iter_row_batches(wds_config(webdataset), "train")
    rows = [row for batch in batches for row in zip(batch["image"], batch["label"])]
    assert [(image["path"], label) for image, label in rows if image["bytes"] == TAR_DAMAGE] == [(DAMAGE_ID, 0)]
    with pytest.raises(SourceError, match="classes.txt"):
        (webdataset / "classes.txt").unlink()
        load_split(wds_config(webdataset), "train")


WHOLE = tar_bytes(SHARD1)
AT = offsets(WHOLE)


@pytest.mark.parametrize("data, kept, after", [
    (WHOLE[: AT["t2.png"][1] + 20], ["t0", "t1"], "t1"),  # cut inside a member's data
    (WHOLE[: AT["t2.png"][0]], ["t0", "t1"], "t1"),  # cut at a header: t1 was read whole
    (WHOLE[: AT["t2.png"][0] + 100], ["t0", "t1"], "t1"),  # cut inside a header
    (WHOLE[: AT["t1.cls"][0]], ["t0"], "t0"),  # t1 has no label yet: part of the damage
    (WHOLE[: AT["t2.png"][0]] + b"x" * 512 + WHOLE[AT["t2.png"][0] + 512:], ["t0", "t1"], "t1"),  # garbled header
    (WHOLE + b"junk" * 300, ["t0", "t1", "t2"], "t2"),  # bytes after the end-of-archive block
    (b"", [], "the start"),
    (NOT_AN_IMAGE, [], "the start"),
], ids=["data", "at-header", "in-header", "half-sample", "garbled", "trailing", "empty", "not-a-tar"])
def test_a_damaged_tar_keeps_what_was_read_and_records_one_corrupt_row(data, kept, after):
    samples = list(iter_tar_samples(io.BytesIO(data), "x.tar"))
    assert [s.id for s in samples if s.image != TAR_DAMAGE] == [f"x.tar/{k}" for k in kept]
    damage = [s.id for s in samples if s.image == TAR_DAMAGE]
    assert len(damage) == 1 and damage[0].startswith(f"x.tar/<damaged after {after}: ")
    decoded, skipped = decode_rows({"image": [{"bytes": TAR_DAMAGE, "path": damage[0]}], "label": [0]}, SIZE, 3)
    assert skipped["reason"] == ["corrupt"] and len(decoded["id"]) == 0


def test_shard_names_with_a_prefix_are_split_by_their_last_part(tmp_path):
    for name in ("imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar", "imagenet1k-validation-00.tar",
                 "notes.tar"):
        write(tmp_path / name, tar_bytes([]))
    assert scan_source(wds_config(tmp_path), "train").paths() == [
        str(tmp_path / f"imagenet1k-train-000{i}.tar") for i in (0, 1)]
    assert scan_source(wds_config(tmp_path), "test").paths() == [str(tmp_path / "imagenet1k-validation-00.tar")]


def test_tar_keys_follow_webdataset_and_stay_unique():
    data = tar_bytes([("./d/a.png", encode(pixels(1), "PNG")), ("./d/a.cls", b"1"), ("b.png", b"1"),
                      ("b.cls", b"0"), ("./d/a.cls", b"2"), ("c.seg.png", b"?"), ("c.cls", b"0"),
                      ("e.JPEG", b"?"), ("e.x.cls", b"1")])
    samples = list(iter_tar_samples(io.BytesIO(data), "s.tar"))
    # key: up to the first dot of the base name, suffix: the rest ("seg.png", "x.cls" are neither image nor label);
    # a key met again later in the shard gets #2.
    assert [(s.id, s.image is not None, s.label) for s in samples] == [
        ("s.tar/d/a", True, 1), ("s.tar/b", True, 0), ("s.tar/d/a#2", False, 2), ("s.tar/c", False, 0),
        ("s.tar/e", True, None)]


# ---------------------------------------------------------------- purity, object stores, Ray Data


def test_sources_never_import_ray():
    code = "import sys, engine.data.sources, engine.data.images; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_data_source_has_one_format_and_every_file_format_a_ray_reader():
    """The registry holds each value data.source takes; the Ray layer, which the formats cannot name, reads each
    file format."""
    import typing

    from engine.data.formats import FILE_SOURCES, FORMATS
    from engine.ray import readers

    assert tuple(FORMATS) == typing.get_args(typing.get_type_hints(DataConfig)["source"])
    assert sorted(readers.READERS) == sorted(FILE_SOURCES)


def copy_tree(local: Path, remote) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            (remote / path.relative_to(local).as_posix()).write_bytes(path.read_bytes())


def test_both_layouts_read_from_an_object_store(imagefolder, webdataset, s3_env):
    from engine.io.location import location

    for local, config in ((imagefolder, folder_config), (webdataset, wds_config)):
        remote = location(f"s3://{s3_env['bucket']}/test_sources/{local.name}")
        copy_tree(local, remote)
        a, b = load_split(config(local), "train"), load_split(config(str(remote)), "train")
        assert list(a.ids) == list(b.ids) and np.array_equal(a.images, b.images) and a.skipped == b.skipped
        assert class_names(config(local)) == class_names(config(str(remote)))


@pytest.fixture
def parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, image = tmp_path / "hf", pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    root.mkdir()
    rows = [{"bytes": encode(pixels(60 + i), "PNG"), "path": f"p{i}.png"} for i in range(3)] + [
        {"bytes": NOT_AN_IMAGE, "path": "bad.png"}]
    pq.write_table(pa.table({"image": pa.array(rows, image), "label": pa.array([0, 1, 2, 1], pa.int64())}),
                   root / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"image": pa.array(rows[:2], image)}), root / "train-00001-of-00002.parquet")  # no label
    (root / "classes.txt").write_text("a\nb\nc\n")
    return root


CONFIGS = {"imagefolder": folder_config, "webdataset": wds_config,
           "parquet": lambda root: DataConfig(source="parquet", path=str(root), image_size=SIZE, max_skip_fraction=0.6,
                                              val_fraction=0)}


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()[:16]


@pytest.mark.ray
@pytest.mark.parametrize("kind", [*sorted(CONFIGS), "imagefolder@s3", "webdataset@s3"])
def test_ray_readers_give_the_in_process_rows(kind, request, ray_session, s3_env):
    from engine.io.location import location
    from engine.ray.readers import read_source_rows

    source, _, store = kind.partition("@")
    root = request.getfixturevalue(source)
    if store:  # Ray's workers read the bucket as a cluster's nodes would
        root = location(f"s3://{s3_env['bucket']}/test_sources/ray-{source}")
        copy_tree(request.getfixturevalue(source), root)
    config = CONFIGS[source](str(root))
    listing = scan_source(config, "train")
    dataset = read_source_rows(config, "train", listing)
    ray_rows = dataset.take_all()
    local = [dict(image=i, label=l, path=p) for batch in iter_row_batches(config, "train", listing=listing)
             for i, l, p in zip(batch["image"], batch["label"], batch["path"])]
    key = lambda row: (row["image"]["path"], row["label"], digest(row["image"]["bytes"]), row["path"])
    assert sorted(map(key, ray_rows)) == sorted(map(key, local)) and len(local) > 0
    # decode_rows mapped over Ray's (numpy) batches, as the encode stage maps it, + the listing's skips = load_split.
    num_classes = len(class_names(config))

    def outcomes(batch: dict) -> dict:
        decoded, skipped = decode_rows(batch, SIZE, num_classes)
        return {"id": np.array([*decoded["id"], *skipped["id"]], dtype=object),
                "reason": np.array(["kept"] * len(decoded["id"]) + skipped["reason"], dtype=object)}

    rows = dataset.map_batches(outcomes, batch_size=256).take_all()
    images = load_split(config, "train")
    assert sorted(r["id"] for r in rows if r["reason"] == "kept") == sorted(images.ids)
    assert count_skipped([r["reason"] for r in rows] + listing.skipped["reason"]) == images.skipped


@pytest.mark.ray
def test_read_tasks_are_sized_by_files_and_shards(imagefolder, webdataset, ray_session, monkeypatch):
    from engine.ray import readers

    monkeypatch.setattr(readers, "IMAGES_PER_READ_TASK", 3)
    listing = scan_source(folder_config(imagefolder), "train")  # 9 image files in class folders
    tasks = readers.ImageFilesDatasource(listing, max_bytes=1 << 20).get_read_tasks(3)
    assert [t.metadata.num_rows for t in tasks] == [3, 3, 3]
    assert readers.read_source_rows(folder_config(imagefolder), "train").materialize().num_blocks() == 3
    assert readers.read_source_rows(wds_config(webdataset), "train").materialize().num_blocks() == 2  # a shard each


@pytest.mark.ray
def test_parquet_read_tasks_are_whole_row_groups_in_shard_order(tmp_path, ray_session, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.ray import readers

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for shard in range(2):  # 7 rows in row groups of 2: tasks of >= 3 rows end at a group or at the shard's end
        rows = [{"bytes": encode(pixels(shard * 10 + i), "PNG"), "path": f"s{shard}-{i}.png"} for i in range(7)]
        pq.write_table(pa.table({"image": pa.array(rows, image), "label": pa.array([i % 3 for i in range(7)])}),
                       tmp_path / f"train-0000{shard}-of-00002.parquet", row_group_size=2)
    monkeypatch.setattr(readers, "IMAGES_PER_READ_TASK", 3)
    config = DataConfig(source="parquet", path=str(tmp_path), image_size=SIZE, val_fraction=0)
    datasource = readers.ParquetShardsDatasource(scan_source(config, "train").paths(), max_bytes=1 << 20)
    assert [(Path(p).name[:14], groups, rows) for p, groups, rows, _ in datasource.pieces] == [
        ("train-00000-of", [0, 1], 4), ("train-00000-of", [2, 3], 3),
        ("train-00001-of", [0, 1], 4), ("train-00001-of", [2, 3], 3)]
    ids = [r["image"]["path"] for r in readers.read_source_rows(config, "train").take_all()]
    assert sorted(ids) == sorted(f"train-0000{s}-of-00002.parquet#{i}" for s in range(2) for i in range(7))


# ---------------------------------------------------------------- class names (the prompts)


def test_imagenet_class_names_ship_in_synset_order_and_are_unique():
    from engine.data.classes import read_classes_file

    synsets, names = read_classes_file(Path(__file__).resolve().parents[1] / "configs" / "imagenet1k_classes.txt")
    assert len(synsets) == 1000 and list(synsets) == sorted(synsets) and len(set(names)) == 1000
    assert (synsets[0], names[0]) == ("n01440764", "tench") and names[999] == "toilet tissue"
    assert all(name and not name.startswith("n0") for name in names)


@pytest.mark.parametrize("text, names", [
    ("n01440764 tench, Tinca tinca\nn01443537 goldfish\n", ("tench, Tinca tinca", "goldfish")),  # LOC_synset_mapping
    ("n01440764\ttench\nn01443537\tgoldfish\n", ("tench", "goldfish")),
    ("n01440764\nn01443537\n\n", ("n01440764", "n01443537")),  # bare synsets; trailing blank lines are fine
    ("T-shirt/top\nAnkle boot\n", ("T-shirt/top", "Ankle boot")),  # a name with a space is one name
])
def test_class_lines_are_parsed_the_same_in_every_source(text, names, tmp_path):
    """One parser: the same classes.txt gives the same names (the prompts) from parquet, WebDataset and an
    ImageFolder whose folders are the lines' keys."""
    from engine.data.classes import parse_class_lines

    keys, _ = parse_class_lines(text)
    for source in ("parquet", "webdataset", "imagefolder"):
        root = tmp_path / source
        root.mkdir()
        (root / "classes.txt").write_text(text)
        for key in keys:
            (root / "train" / key).mkdir(parents=True)
        assert class_names(DataConfig(source=source, path=str(root))) == names


def test_a_classes_file_gives_readable_names_for_bare_synsets_and_must_match_them(tmp_path):
    (tmp_path / "classes.txt").write_text("n01440764\nn01443537\n")
    (tmp_path / "names.txt").write_text("n01440764\ttench\nn01443537\tgoldfish\n")
    config = DataConfig(source="parquet", path=str(tmp_path), classes_file=str(tmp_path / "names.txt"))
    assert class_names(config) == ("tench", "goldfish")
    (tmp_path / "names.txt").write_text("n01443537\tgoldfish\nn01440764\ttench\n")
    with pytest.raises(SourceError, match="line 1 is 'n01443537' where the data's label 0 is 'n01440764'"):
        class_names(config)
    (tmp_path / "names.txt").write_text("tench\n")
    with pytest.raises(SourceError, match="lists 1 classes, the data 2"):
        class_names(config)
