"""Several Ray nodes: node-local files refused before any stage (pure, no Ray), the teacher cache kept where every
node finds it, and the rehearsal: the smoke path on a real 2-node Ray cluster on this machine
(ray.cluster_utils.Cluster: a head and a worker node, one CPU each) with its run folder and data on an object store
(the local S3 endpoint), every node named in each stage's record, the result equal to a one-node run."""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest

from engine.config import RunError
from engine.config import ConfigError, load_config
from engine.pipeline import check_cluster_places, shared_cache, teacher_cache_path

ROOT = Path(__file__).resolve().parents[1]


def config_with(*overrides: str):
    return load_config(None, ["data.source=parquet", "data.path=/data/digits", *overrides])


# ---------------------------------------------------------------- refusal (pure)


def test_one_node_takes_local_paths_and_several_nodes_refuse_them_naming_each_key():
    config = config_with("runs_dir=runs", "prior.kind=sd15", "prior.path=/models/sd15",
                         "evaluate.teacher_path=/models/resnet18.safetensors")
    check_cluster_places(config, nodes=1)  # a laptop: nothing to refuse
    check_cluster_places(config, nodes=1, address="10.0.0.5:6379")  # a driver on the head of a one-node cluster
    with pytest.raises(RunError) as error:
        check_cluster_places(config, nodes=2)
    message = str(error.value)
    for key, value in (("runs_dir", config.runs_dir), ("data.path", "/data/digits"), ("prior.path", "/models/sd15"),
                       ("evaluate.teacher_path", "/models/resnet18.safetensors")):
        assert f"{key}={value}" in message
    assert "cluster of 2 nodes" in message and "s3://" in message and "runtime.shared_paths" in message
    assert "\n" not in message and message.count(": ") == 1  # one sentence: the problem, then what to use
    with pytest.raises(RunError, match="on a cluster of any number of nodes"):  # an autoscaler without a limit
        check_cluster_places(config, nodes=math.inf)


def test_uris_and_declared_mounts_pass_and_only_the_offending_key_is_named():
    uris = config_with("runs_dir=s3://bucket/runs", "data.path=gs://bucket/imagenet", "prior.kind=dit",
                       "prior.path=s3://bucket/models/dit", "evaluate.teacher_path=s3://bucket/resnet18.safetensors")
    check_cluster_places(uris, nodes=16)
    mounted = config_with("runs_dir=/mnt/efs/runs", "data.path=/mnt/efs/../data", "runtime.shared_paths=[/mnt/efs]")
    with pytest.raises(RunError) as error:  # normalised first: /mnt/efs/../data is /mnt/data, outside the mount
        check_cluster_places(mounted, nodes=2)
    assert "data.path=" in str(error.value) and "runs_dir" not in str(error.value)
    assert "declared now: ['/mnt/efs']" in str(error.value)
    check_cluster_places(config_with("runs_dir=/mnt/efs/runs", "data.path=/mnt/data/digits",
                                     "runtime.shared_paths=[/mnt/efs, /mnt/data]"), nodes=2)
    with pytest.raises(RunError, match="data.path=/mnt/efs2/digits"):  # a prefix of the name is not the mount
        check_cluster_places(config_with("runs_dir=/mnt/efs/runs", "data.path=/mnt/efs2/digits",
                                         "runtime.shared_paths=[/mnt/efs]"), nodes=2)
    # The embedded digits have no files: nothing to name but the run folder.
    digits = load_config(None, ["runs_dir=s3://bucket/runs"])
    check_cluster_places(digits, nodes=2)


def test_a_driver_joined_through_ray_client_refuses_local_paths_even_on_one_node():
    with pytest.raises(RunError, match="joined from another machine.*runs_dir="):
        check_cluster_places(config_with("runs_dir=runs", "data.path=s3://b/digits"), nodes=1,
                             address="ray://head:10001")


def test_shared_paths_must_be_absolute_mount_points():
    with pytest.raises(ConfigError, match="runtime.shared_paths"):
        config_with("runtime.shared_paths=[mnt/efs]")
    with pytest.raises(ConfigError, match="runtime.shared_paths"):
        config_with("runtime.shared_paths=[s3://bucket]")


def test_the_teacher_cache_goes_under_a_shared_runs_dir(tmp_path, s3_env):
    """A per-node cache would leave the students of other nodes without the teacher: on an object store or a
    declared mount it lives under runs_dir/_cache, on one machine in cache_dir."""
    local = config_with(f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}")
    assert shared_cache(local) is None and teacher_cache_path(local).parent == tmp_path / "cache" / "teachers"
    mounted = config_with(f"runs_dir={tmp_path / 'efs' / 'runs'}", f"runtime.shared_paths=[{tmp_path / 'efs'}]",
                          f"cache_dir={tmp_path / 'cache'}")
    assert teacher_cache_path(mounted).parent == tmp_path / "efs" / "runs" / "_cache" / "teachers"
    remote = config_with(f"runs_dir=s3://{s3_env['bucket']}/runs", f"cache_dir={tmp_path / 'cache'}")
    assert str(teacher_cache_path(remote).parent) == f"s3://{s3_env['bucket']}/runs/_cache/teachers"


def test_stage_records_name_the_nodes_that_did_the_work_when_known(tmp_path):
    from engine.io import store

    store.mark_stage_finished(tmp_path, "encode", "k1", ("b" * 56, "a" * 56), images=5)
    store.mark_stage_finished(tmp_path, "real_sets", "k2")  # a stage whose workers report no node
    encode, real = store.stage_history(tmp_path)
    assert encode["node_ids"] == ["b" * 56, "a" * 56] and "node_ids" not in real
    assert store.finished_stage(tmp_path, "encode", "k1")["node_ids"] == ["b" * 56, "a" * 56]


# ---------------------------------------------------------------- the rehearsal (Ray, two nodes)


def write_digits_shards(root, bad_rows: int = 3) -> None:
    """scikit-learn's digits as parquet shards {image: {bytes, path}, label} (2 train shards, 1 test) + classes.txt
    under `root` (a local folder or an ObjectPath), with `bad_rows` truncated PNGs in train."""
    from PIL import Image

    from engine.config import DataConfig
    from engine.data.images import load_split
    from engine.io.store import atomic_write_bytes, table_bytes

    def png(image) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    digits = DataConfig(val_fraction=0.0)  # every train row: the parquet source carves val itself
    for split in ("train", "test"):
        images = load_split(digits, split)
        rows = [({"bytes": png(im), "path": f"{split}/{i:05d}.png"}, int(c))
                for i, (im, c) in enumerate(zip(images.images, images.labels))]
        if split == "train":
            rows += [({"bytes": png(images.images[i])[:40], "path": f"train/bad-{i}.png"}, 0) for i in range(bad_rows)]
        shards = 2 if split == "train" else 1
        for s in range(shards):
            part = rows[s::shards]
            table = pa.table({"image": pa.array([r for r, _ in part]), "label": pa.array([c for _, c in part],
                                                                                           pa.int64())})
            atomic_write_bytes(root / f"{split}-{s:05d}-of-{shards:05d}.parquet", table_bytes(table))
    atomic_write_bytes(root / "classes.txt", ("\n".join(str(c) for c in range(10)) + "\n").encode())


def deterministic_outputs(run_dir) -> dict[str, str]:
    """{file: sha256} of what a run must reproduce whatever the nodes: latents, skipped rows, the quantizer's
    centroid files and picks, the decoded sets with their images (the quantizer's timings left out of its stats)."""
    from engine.io.location import list_files
    from engine.io.store import read_table

    out = {}
    for name in list_files(run_dir):
        decoded = name.startswith(("distilled/d4m-", "distilled/ddoq-"))
        if decoded or name.startswith("latents/") or name == "skipped.parquet" or name.endswith(
                (".centroids.parquet", ".picks.parquet")):
            out[name] = hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
    stats = read_table(run_dir / "quantization.parquet").to_pandas()
    out["quantization.parquet (no timings)"] = stats[[c for c in stats.columns if "second" not in c]].to_json()
    return out


def computed_nodes(run_dir) -> dict[str, set[str]]:
    from engine.io import store

    return {h["stage"]: set(h["node_ids"]) for h in store.stage_history(run_dir) if h.get("node_ids")}


@contextmanager
def two_node_cluster():
    """A head and a worker node of one CPU each on this machine, this process connected as the driver -> (the two
    node ids, the cluster's address). Started after the S3 endpoint, so every node's workers reach it through the
    same variables."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a session Ray of other tests: one Ray instance at a time on this machine
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 300 * 2**20})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=300 * 2**20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert len(nodes) == 2
        yield nodes, cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def smoke_config(*overrides: str):
    sys.path.insert(0, str(ROOT / "jobs"))
    import distill

    return distill.parse_args(["--smoke-test", *overrides])[0]


@pytest.mark.ray
def test_a_two_node_cluster_refuses_a_local_run_folder_before_anything_is_written(s3_env, tmp_path, monkeypatch):
    """Both ways a job meets a cluster: a driver already connected, and one that joins by RAY_ADDRESS (what
    `ray job submit` sets) when the run starts."""
    import ray

    from engine import pipeline
    from engine.ray.cluster import cluster_span

    config = smoke_config(f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}")
    pattern = f"on a cluster of 2 nodes .* runs_dir={tmp_path / 'runs'} is a path"
    with two_node_cluster() as (_, address):
        with pytest.raises(RunError, match=pattern):
            pipeline.run(config)
        ray.shutdown()
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert cluster_span(config.runtime).nodes == 2 and ray.is_initialized()  # joined, not started
        with pytest.raises(RunError, match=pattern):
            pipeline.run(config)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # no stage started


@pytest.mark.slow  # ~3.5 min on 2 cores: the full smoke path on two nodes, then a one-node run to compare
def test_the_smoke_path_on_two_nodes_uses_both_and_equals_one_node(s3_env, tmp_path):
    """Both runs share one runs_dir (so the prior published there and the teacher are made once) under different
    names; the one-node reference stops after decode, which is all that is deterministic to compare."""
    import ray

    from engine import pipeline
    from engine.io.location import location

    root = location(f"s3://{s3_env['bucket']}/{tmp_path.name}")
    write_digits_shards(root / "digits")
    same = [f"runs_dir={root / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "data.source=parquet",
            f"data.path={root / 'digits'}", "data.name=digits-shards", "prior.vae_steps=10", "prior.unet_steps=10",
            "runtime.encode_actors=2", "runtime.encode_cpus_per_actor=0.5", "runtime.decode_actors=2",
            "runtime.decode_cpus_per_actor=0.5", "runtime.quantize_actors=2"]
    two = smoke_config(*same, "name=two-nodes")
    with two_node_cluster() as (nodes, _):
        start = time.perf_counter()
        metrics = pipeline.run(two)
        seconds = time.perf_counter() - start
    # Some of the truncated rows fall in train (the rest in val, by the split's coin), and are skipped there.
    assert len(metrics["results"]) == 9 and 0 < sum(metrics["counts"]["skipped"].values()) <= 3
    seen = computed_nodes(two.run_dir)
    for stage in ("encode", "quantize", "decode"):
        assert seen[stage] == nodes, (stage, seen)  # every node did some of every stage's work
    print(f"two nodes: {seconds:.0f}s, stages {json.dumps({s: sorted(n) for s, n in seen.items()})}")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        one = smoke_config(*same, "name=one-node")
        reference = pipeline.run(one, until="decode")
        (single,) = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert computed_nodes(one.run_dir) == {stage: {single} for stage in ("encode", "quantize", "decode")}
    assert reference["counts"] == metrics["counts"]
    expected, got = deterministic_outputs(one.run_dir), deterministic_outputs(two.run_dir)
    assert sum(name.endswith(".png") for name in expected) == 2 * 10 * (1 + 2)  # d4m + ddoq-mass, IPC 1 and 2
    assert sum(name.startswith("latents/") for name in expected) == 10
    assert got == expected
    assert reference["quantization"] == metrics["quantization"]
