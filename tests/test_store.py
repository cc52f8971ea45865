from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine.io import store


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    store.atomic_write_json(tmp_path / "a" / "x.json", {"v": 1})
    store.atomic_write_json(tmp_path / "a" / "x.json", {"v": 2})
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    assert (tmp_path / "a" / "x.json").read_text().strip().endswith("}")


def test_stage_markers_match_on_key(tmp_path):
    assert store.finished_stage(tmp_path, "encode", "k1") is None
    store.mark_stage_finished(tmp_path, "encode", "k1", images=5)
    assert store.finished_stage(tmp_path, "encode", "k1")["images"] == 5
    assert store.finished_stage(tmp_path, "encode", "k2") is None  # config changed: stage must run again


def test_class_latents_round_trip_sorted_by_id(tmp_path):
    latents = np.random.default_rng(0).standard_normal((4, 4, 2, 2)).astype(np.float32)
    ids = np.array(["d", "b", "a", "c"])
    table = store.latents_to_table(ids, np.zeros(4, int), latents)
    class_dir = tmp_path / "label=0"
    store.atomic_write_table(class_dir / "part-1.parquet", table.slice(0, 2))
    store.atomic_write_table(class_dir / "part-0.parquet", table.slice(2, 2))
    got_ids, got = store.read_class_latents(class_dir)
    assert list(got_ids) == ["a", "b", "c", "d"]
    order = np.argsort(ids)
    np.testing.assert_array_equal(got, latents.reshape(4, -1)[order])
    assert store.class_latent_dirs(tmp_path) == {0: class_dir}
    # The same folder as a file:// URI (what a shared mount's runs_dir may be written as).
    uri = f"file://{tmp_path}"
    assert store.class_latent_dirs(uri) == {0: class_dir}
    uri_ids, uri_latents = store.read_class_latents(f"{uri}/label=0")
    assert list(uri_ids) == list(got_ids)
    np.testing.assert_array_equal(uri_latents, got)


def test_distilled_set_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    files = [store.image_file_name(label, i) for i, label in enumerate([0, 1, 1])]
    for name, image in zip(files, images):
        store.write_png(tmp_path / name, image)
    store.write_set_index(tmp_path, files, [0, 1, 1], ("zero", "one"), [1.0, 0.5, 1.5], [7, 2, 5])
    got_images, labels, weights = store.read_distilled_set(tmp_path)
    np.testing.assert_array_equal(got_images, images)  # PNG is lossless
    assert labels.tolist() == [0, 1, 1] and weights.tolist() == [1.0, 0.5, 1.5]
    index = pa.parquet.read_table(tmp_path / "index.parquet").to_pydict()
    assert index["class_name"] == ["zero", "one", "one"] and index["count"] == [7, 2, 5]


def test_index_paths_cannot_escape_the_set_folder(tmp_path):
    store.write_png(tmp_path / "outside.png", np.zeros((2, 2, 3), np.uint8))
    folder = tmp_path / "set"
    store.write_set_index(folder, ["../outside.png"], [0], ("a",), [1.0], [1])
    with pytest.raises(ValueError, match="outside its folder"):
        store.read_distilled_set(folder)


def test_a_distilled_set_loads_as_it_is_with_torchvision_and_its_metadata(tmp_path):
    """Every set is an ImageFolder tree (class subfolders) with metadata.jsonl beside index.parquet: torchvision's
    ImageFolder reads the labels from the folders, the weights come from metadata.jsonl by file name."""
    import json

    from torchvision.datasets import ImageFolder

    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    labels, weights = [0, 0, 2, 2], [0.5, 1.5, 1.25, 0.75]  # class 1 has no image: its folder is absent
    files = [store.image_file_name(label, i) for i, label in enumerate(labels)]
    for name, image in zip(files, images):
        store.write_png(tmp_path / name, image)
    store.write_set_index(tmp_path, files, labels, ("zero", "one", "two"), weights, [3, 1, 2, 2])
    loaded = ImageFolder(str(tmp_path))
    assert loaded.classes == ["00000", "00002"]  # zero-padded labels sort as the labels do
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    metadata = {row["file_name"]: row for row in map(json.loads, lines)}
    for (path, target), label, weight, image in zip(loaded.samples, labels, weights, images):
        row = metadata[str(Path(path).relative_to(tmp_path))]
        assert int(loaded.classes[target]) == row["label"] == label and row["weight"] == weight
        assert row["class_name"] == ("zero", "one", "two")[label]
        np.testing.assert_array_equal(np.asarray(loaded.loader(path)), image)


def test_shared_files_are_one_copy(tmp_path):
    store.write_png(tmp_path / "a" / "x.png", np.zeros((2, 2, 3), np.uint8))
    store.share_file(tmp_path / "a" / "x.png", tmp_path / "b" / "00001" / "x.png")
    first, second = tmp_path / "a" / "x.png", tmp_path / "b" / "00001" / "x.png"
    assert first.read_bytes() == second.read_bytes() and first.stat().st_ino == second.stat().st_ino
    assert not [p for p in tmp_path.rglob(".*")]  # no staging name left behind
