"""The Ray layer on small inputs: encode through Ray Data, quantize on the actor pool, decode through Ray Data."""

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine.config import load_config
from engine.io import store
from engine.quantize.class_task import class_result_paths
from engine.quantize.quantizer import quantize_class
from engine.ray.decode import decode_centroids_to_sets

pytestmark = pytest.mark.ray


@pytest.fixture
def config(tmp_path, saved_prior):
    return load_config(None, [f"runs_dir={tmp_path}", "name=t", f"prior.path={saved_prior}", "quantize.ipc=[1,3]",
                              "decode.num_steps=3", "encode.batch_size=128", "runtime.quantize_actors=2"])


def test_encode_quantize_decode_on_ray(ray_session, config, saved_prior, tmp_path):
    from engine.data.images import load_split
    from engine.encode import encode_images
    from engine.priors.tiny import load_tiny_prior
    from engine.ray.encode import encode_to_parquet
    from engine.ray.quantize import quantize_classes

    latents_dir = tmp_path / "latents"
    encoded = encode_to_parquet(config, saved_prior, latents_dir)
    count, records = encoded.images, encoded.files
    train = load_split(config.data, "train")
    assert count == len(train)
    class_dirs = store.class_latent_dirs(latents_dir)
    assert sorted(class_dirs) == list(range(10))
    assert not latents_dir.with_name("latents.partial").exists()
    # One file per class, and the writers' records are the files' real hashes (the manifest trusts them).
    assert all(len(list(d.iterdir())) == 1 for d in class_dirs.values()) and len(records) == 10
    for path, record in records.items():
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == record["sha256"]

    # The Ray path gives the same latents as the pure function, class by class, in id order.
    ids, got = store.read_class_latents(class_dirs[2])
    expected = encode_images(load_tiny_prior(saved_prior).vae, train.images[train.labels == 2])
    assert list(ids) == sorted(train.ids[train.labels == 2])
    np.testing.assert_allclose(got, expected.reshape(len(expected), -1), atol=1e-5)

    # Actor pool: a few classes, every IPC; identical to calling the pure function directly.
    subset = {label: class_dirs[label] for label in (0, 1, 2)}  # the test prior knows 3 classes
    quantized = tmp_path / "quantized"
    stats, records = quantize_classes(config, subset, quantized)
    assert len(records) == 3 * 3  # centroids, picks, stats of each class
    assert sorted(set(stats.column("label").to_pylist())) == [0, 1, 2]
    assert store.quantized_labels(quantized) == [0, 1, 2]
    centroids = pa.concat_tables([store.read_table(class_result_paths(quantized, c)[0]) for c in (0, 1, 2)])
    assert centroids.num_rows == 2 * 3 * (1 + 3)  # the engine's and D4M's centroids
    direct = quantize_class(got, 3, config.quantize)
    rows = centroids.to_pandas().query("label == 2 and ipc == 3 and quantizer == 'ddoq'")
    np.testing.assert_allclose(np.stack(rows.latent), direct.centroids, atol=1e-5)
    assert rows["count"].tolist() == direct.counts.tolist()
    for mode in ("uniform", "mass", "sqrt"):
        assert rows[f"weight_{mode}"].mean() == pytest.approx(1.0)

    # Decode through Ray Data: one PNG per centroid in every target folder (written once, shared by the second).
    targets = {(ipc, "ddoq"): [str(tmp_path / f"a{ipc}"), str(tmp_path / f"b{ipc}")] for ipc in (1, 3)}
    files = {c: class_result_paths(quantized, c)[0] for c in (0, 1, 2)}
    decoded = decode_centroids_to_sets(config, saved_prior, files, targets)
    assert decoded.num_rows == centroids.num_rows // 2  # only the pairs asked for: D4M's centroids stay undecoded
    for ipc in (1, 3):
        for folder in targets[ipc, "ddoq"]:
            assert len(list(Path(folder).glob("*/*.png"))) == 3 * ipc
        first, second = (Path(f) / "00002" / "c00002_0000.png" for f in targets[ipc, "ddoq"])
        assert first.read_bytes() == second.read_bytes() and first.stat().st_ino == second.stat().st_ino


def test_decode_gives_every_actor_of_the_pool_work(ray_session, config, saved_prior, tmp_path):
    """Input split by classes: with 2 decode actors (half a CPU each, one CPU left for the write tasks) both decode."""
    import dataclasses

    rng = np.random.default_rng(0)
    quantized = tmp_path / "quantized"
    for label in range(3):
        latents = rng.standard_normal((4, 4 * 8 * 8)).astype(np.float32)
        rows = pa.table({"label": [label] * 4, "ipc": [4] * 4, "quantizer": ["ddoq"] * 4, "index": list(range(4)),
                         "count": [1] * 4,
                         **{f"weight_{m}": [1.0] * 4 for m in ("uniform", "mass", "sqrt")}})
        store.atomic_write_table(class_result_paths(quantized, label)[0],
                                 rows.append_column("latent", store.float32_rows(latents)))
    runtime = dataclasses.replace(config.runtime, decode_actors=2, decode_cpus_per_actor=0.5)
    config = dataclasses.replace(config, runtime=runtime,
                                 decode=dataclasses.replace(config.decode, batch_size=4))  # one class per batch
    files = {c: class_result_paths(quantized, c)[0] for c in range(3)}
    decoded = decode_centroids_to_sets(config, saved_prior, files, {(4, "ddoq"): [str(tmp_path / "set")]}).to_pandas()
    assert len(decoded) == 12 and decoded.actor.nunique() == 2


def test_parquet_shards_stream_through_ray_data(ray_session, tmp_path, saved_prior):
    """The Hugging-Face parquet layout (ImageNet's, Fashion-MNIST's) through the Ray Data read + encode path."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from engine.ray.encode import encode_to_parquet

    rng = np.random.default_rng(0)
    for shard in range(2):  # two shards, as ImageNet has many
        rows = []
        for i in range(6):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(buffer, format="PNG")
            rows.append({"bytes": buffer.getvalue(), "path": f"train/{shard * 6 + i:06d}.png"})
        table = pa.table({"image": pa.array(rows), "label": pa.array([i % 2 for i in range(6)], pa.int64())})
        pq.write_table(table, tmp_path / f"train-{shard:05d}-of-00002.parquet")
    (tmp_path / "classes.txt").write_text("even\nodd\n")
    config = load_config(None, [f"runs_dir={tmp_path}", "data.source=parquet", f"data.path={tmp_path}",
                                "data.name=toy", f"prior.path={saved_prior}", "data.val_fraction=0"])
    assert encode_to_parquet(config, saved_prior, tmp_path / "latents").images == 12
    class_dirs = store.class_latent_dirs(tmp_path / "latents")
    ids, latents = store.read_class_latents(class_dirs[1])
    assert list(ids) == [f"train-0000{shard}-of-00002.parquet#{i}" for shard in range(2) for i in (1, 3, 5)]
    assert latents.shape == (6, 4 * 8 * 8)


def test_disk_shuffle_buffers_at_most_an_eighth_of_the_smallest_store(ray_session):
    """Ray's 1 GiB default merge buffer, held in a store of a few GiB, starved the encoder pool upstream of it."""
    import ray
    import ray.data

    from engine.ray.cluster import shuffle_on_disk

    shuffle_on_disk(True)
    store = min(node["Resources"]["object_store_memory"] for node in ray.nodes() if node["Alive"])
    context = ray.data.DataContext.get_current()
    assert context.use_disk_based_hash_shuffle
    assert 0 < context.shuffle_input_batch_bytes <= store // 8


def test_task_workers_outlive_a_pause_of_the_stream(monkeypatch):
    """Ray kills a task worker idle for over a second once a node holds more workers than CPUs, and long-lived
    actors (Ray Train's controller and workers, a dataset coordinator) count: a stream's read/decode workers were
    restarted at every pause of the training they feed (~1 s of CPU each). A Ray started by init_ray keeps them."""
    import os
    import time

    import ray

    from engine.ray.cluster import init_ray

    setting = "RAY_idle_worker_killing_time_threshold_ms"
    monkeypatch.setenv(setting, "unset")  # recorded first, so that the value init_ray sets is undone after the test
    monkeypatch.delenv(setting)
    ray.shutdown()  # the session's Ray (conftest) is started without init_ray
    try:
        init_ray(load_config(None, ["runtime.num_cpus=2"]).runtime)

        @ray.remote(num_cpus=0)
        class LongLived:
            def pid(self) -> int:
                return os.getpid()

        actors = [LongLived.remote() for _ in range(2)]
        ray.get([a.pid.remote() for a in actors])

        @ray.remote(num_cpus=0.5)
        def worker_pid() -> int:
            time.sleep(0.5)  # four at once: four task workers
            return os.getpid()

        first = set(ray.get([worker_pid.remote() for _ in range(4)]))
        time.sleep(4)  # the stream held back by training, longer than Ray's default second
        second = set(ray.get([worker_pid.remote() for _ in range(4)]))
        assert second <= first
    finally:
        ray.shutdown()
