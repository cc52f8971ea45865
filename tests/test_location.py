"""engine/io/location.py and the run-folder store on an object store (a local S3 endpoint, tests/object_store.py):
the same calls as on a local folder, with the object store's own rules (no rename, no append, no folders)."""

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine.io import store
from engine.io.location import ObjectPath, list_files, location, ray_storage, remove_tree
from engine.io.manifest import build_manifest, verify_manifest, write_manifest


@pytest.fixture
def remote(s3_env, request) -> ObjectPath:
    """A fresh prefix of the test bucket for this test."""
    return location(f"s3://{s3_env['bucket']}/{request.node.name}")


def test_local_places_stay_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert location("runs") == tmp_path / "runs"
    assert location(f"file://{tmp_path}/x") == tmp_path / "x"
    assert location("~/x") == Path.home() / "x"
    assert ray_storage(tmp_path) == {"storage_path": str(tmp_path)}


def test_object_paths_name_join_and_pickle(remote):
    child = remote / "a" / "b.json"
    assert child.uri.endswith("/a/b.json") and child.name == "b.json" and child.parent == remote / "a"
    assert child.with_name("c.json") == remote / "a/c.json"
    assert str(child.relative_to(remote)) == "a/b.json"
    assert pickle.loads(pickle.dumps(child)) == child  # Ray ships paths to actors
    with pytest.raises(ValueError, match="bad child"):
        remote / "../escape"
    options = location("s3://bucket/runs?endpoint_override=127.0.0.1:1&scheme=http") / "x"
    assert options.uri == "s3://bucket/runs/x" and str(options).endswith("/runs/x?endpoint_override=127.0.0.1:1&scheme=http")
    storage = ray_storage(remote)
    assert storage["storage_path"] == remote.inner and storage["storage_filesystem"].type_name == "s3"


def test_object_path_reads_writes_and_lists(remote):
    assert not remote.exists() and remote.glob("*") == []
    (remote / "a" / "x.json").write_text("1")
    (remote / "a" / "y.parquet").write_bytes(b"2")
    (remote / "b" / "c" / "z.parquet").write_bytes(b"345")
    assert remote.is_dir() and (remote / "a" / "x.json").is_file() and (remote / "a" / "x.json").read_text() == "1"
    assert [p.name for p in remote.glob("a/*.parquet")] == ["y.parquet"]
    assert [p.name for p in remote.rglob("*.parquet")] == ["y.parquet", "z.parquet"]
    assert [p.name for p in remote.iterdir()] == ["a", "b"]
    assert list_files(remote) == {"a/x.json": 1, "a/y.parquet": 1, "b/c/z.parquet": 3}
    (remote / "a" / "x.json").unlink()
    (remote / "a" / "x.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (remote / "a" / "x.json").unlink()
    remove_tree(remote / "b")
    assert list_files(remote) == {"a/y.parquet": 1}
    with pytest.raises(ValueError, match="mode"):
        (remote / "a" / "y.parquet").open("ab")  # no appends on an object store


def test_store_on_an_object_store(remote):
    store.atomic_write_json(remote / "m.json", {"v": 1})
    assert store.finished_stage(remote, "encode", "k1") is None
    store.mark_stage_finished(remote, "encode", "k1", images=5)
    store.mark_stage_finished(remote, "quantize", "k2")
    assert store.finished_stage(remote, "encode", "k1")["images"] == 5
    assert [h["stage"] for h in store.stage_history(remote)] == ["encode", "quantize"]
    store.invalidate_stage(remote, "encode")
    assert store.finished_stage(remote, "encode", "k1") is None

    latents = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    table = store.latents_to_table(np.array(["c", "a", "b"]), np.zeros(3, int), latents)
    store.atomic_write_table(remote / "latents" / "label=0" / "part-0.parquet", table)
    assert store.class_latent_dirs(remote / "latents") == {0: remote / "latents" / "label=0"}
    ids, got = store.read_class_latents(str(remote / "latents" / "label=0"))
    assert list(ids) == ["a", "b", "c"] and np.array_equal(got, latents[[1, 2, 0]])
    assert store.parquet_rows(remote / "latents" / "label=0" / "part-0.parquet") == 3

    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    folder = store.distilled_dir(remote, "ddoq-mass", 1)
    files = [store.image_file_name(c, 0) for c in (0, 1)]
    for name, image in zip(files, images):
        store.write_png(folder / name, image)
    store.write_set_index(folder, files, [0, 1], ("zero", "one"), [1.0, 1.0], [3, 4])
    got_images, labels, _ = store.read_distilled_set(str(folder))
    assert np.array_equal(got_images, images) and labels.tolist() == [0, 1]


def test_manifest_on_an_object_store_finds_changes(remote):
    store.atomic_write_bytes(remote / "a.bin", b"one")
    store.atomic_write_table(remote / "t.parquet", pa.table({"x": [1, 2]}))
    files = write_manifest(remote)
    assert sorted(files) == ["a.bin", "t.parquet"] and files["a.bin"]["bytes"] == 3
    assert build_manifest(remote) == files and verify_manifest(remote) == []
    (remote / "a.bin").write_bytes(b"two")
    store.atomic_write_bytes(remote / "new.bin", b"")
    assert verify_manifest(remote) == ["a.bin", "new.bin"]


def test_a_missing_bucket_is_one_clear_sentence(s3_env, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import distill

    with pytest.raises(SystemExit) as exit_info:
        distill.main(["--smoke-test", "runs_dir=s3://no-such-bucket-ddoq/runs", f"cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "cannot write the run folder under runs_dir=s3://no-such-bucket-ddoq/runs" in err and "not found" in err


def test_parquet_shards_read_from_an_object_store(remote, tmp_path):
    """data.path=s3://...: shards and classes.txt are listed and read through pyarrow, as from a local folder."""
    from engine.config import DataConfig
    from engine.data.images import load_split
    from engine.data.formats.parquet import shard_paths
    from engine.data.sources import class_names
    from tests.test_reliability import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", "cat dog", {0: 3, 1: 2})
    for path in (tmp_path / "toy").iterdir():
        (remote / "toy" / path.name).write_bytes(path.read_bytes())
    local = DataConfig(source="parquet", path=str(tmp_path / "toy"), name="toy", image_size=16)
    on_s3 = DataConfig(source="parquet", path=str(remote / "toy"), name="toy", image_size=16)
    assert shard_paths(on_s3.path, "train") == [str(remote / "toy" / "train-00000-of-00001.parquet")]
    assert class_names(on_s3) == class_names(local) == ("cat", "dog")
    for split in ("train", "test"):
        a, b = load_split(local, split), load_split(on_s3, split)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels) and len(a.labels) > 0


def test_a_prior_on_an_object_store_is_copied_once_per_machine_then_loaded(remote, saved_prior, tmp_path,
                                                                              monkeypatch):
    """prior.path=s3://...: every actor loads a local copy (diffusers loads local folders), made once per machine."""
    import torch

    from engine.io.location import PUBLISHED, local_copy, publish_folder
    from engine.priors import load_prior
    from tests.conftest import CLASS_NAMES

    place = publish_folder(saved_prior, remote / "prior")
    assert (place / PUBLISHED).exists()
    assert {f.split("/")[0] for f in list_files(place)} == {p.name for p in saved_prior.iterdir()} | {PUBLISHED}
    monkeypatch.setenv("DDOQ_REMOTE_CACHE", str(tmp_path / "copies"))
    copy = local_copy(place)
    assert copy.parent == tmp_path / "copies" and (copy / "SOURCE").read_text().strip() == place.uri
    assert local_copy(place) == copy  # no second download
    loaded, original = load_prior("tiny", str(place), CLASS_NAMES), load_prior("tiny", saved_prior, CLASS_NAMES)
    for a, b in zip(loaded.vae.parameters(), original.vae.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        local_copy(remote / "missing")


def test_a_missing_prior_on_an_object_store_is_one_clear_sentence(s3_env, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import distill

    with pytest.raises(SystemExit) as exit_info:
        distill.main(["--smoke-test", f"prior.path=s3://{s3_env['bucket']}/no/prior", f"cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and "does not exist" in err


def test_fsspec_protocols_go_through_pyarrows_wrapper(request):
    """A protocol pyarrow has no filesystem for (here fsspec's in-memory one) works the same way."""
    place = location(f"memory://ddoq/{request.node.name}")
    assert isinstance(place, ObjectPath) and place.uri == f"memory://ddoq/{request.node.name}"
    store.mark_stage_finished(place, "encode", "k", images=3)
    store.atomic_write_table(place / "t.parquet", pa.table({"x": [1, 2, 3]}))
    assert store.finished_stage(place, "encode", "k")["images"] == 3
    assert store.read_table(place / "t.parquet").num_rows == 3 and store.parquet_rows(place / "t.parquet") == 3
    assert write_manifest(place).keys() == {"t.parquet", "_stages/encode.json"} | {
        f for f in list_files(place) if f.startswith("_stages/history/")}
    assert verify_manifest(place) == []


def test_shared_places_are_uris_or_inside_a_declared_mount(tmp_path, monkeypatch):
    from engine.io.location import is_shared_place

    assert is_shared_place("s3://bucket/runs") and is_shared_place("gs://bucket/x", ("/mnt/efs",))
    assert not is_shared_place("runs") and not is_shared_place("/mnt/efs/runs")  # nothing declared
    mounts = ("/mnt/efs", "/data/")
    assert is_shared_place("/mnt/efs", mounts) and is_shared_place("/mnt/efs/runs/x", mounts)
    assert is_shared_place("file:///data/imagenet", mounts) and is_shared_place("/data", mounts)
    assert not is_shared_place("/mnt/efs2/runs", mounts)  # a longer name, not a folder inside
    assert not is_shared_place("/mnt/efs/../home/runs", mounts)  # normalised before the comparison
    monkeypatch.chdir(tmp_path)
    assert is_shared_place("runs", (str(tmp_path),)) and not is_shared_place("runs", (str(tmp_path / "other"),))


def test_a_prior_is_published_once_to_a_shared_mount(saved_prior, tmp_path):
    """With runs_dir on a mount every node sees, the prior the driver trained is copied there (marker last)."""
    from engine.io.location import PUBLISHED, publish_folder

    place = publish_folder(saved_prior, tmp_path / "efs" / "priors" / "tiny")
    assert place == tmp_path / "efs" / "priors" / "tiny" and (place / PUBLISHED).read_text().strip() == str(saved_prior)
    assert set(list_files(place)) == set(list_files(saved_prior)) | {PUBLISHED}
    (saved_prior / "extra.txt").write_text("changed after publishing")
    assert publish_folder(saved_prior, place) == place and not (place / "extra.txt").exists()  # published once
