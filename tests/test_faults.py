"""Faults: an encode or a decode actor dies mid-stage (armed by tests/faults.py, fired through engine/faults.py);
Ray restarts it, retries its batch, the stage completes and its outputs are identical to an uninterrupted run's."""

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.config import load_config
from engine.io import store
from engine.io.manifest import build_manifest
from tests import faults

pytestmark = pytest.mark.ray


def latents_digest(latents_dir: Path) -> dict[int, str]:
    """Per class: sha256 of its ids and latent bytes in id order (file names are Ray's and differ per run)."""
    digests = {}
    for label, folder in store.class_latent_dirs(latents_dir).items():
        ids, latents = store.read_class_latents(folder)
        digests[label] = hashlib.sha256("\n".join(ids).encode() + latents.tobytes()).hexdigest()
    return digests


def write_dirty_shards(root: Path) -> int:
    """Two shards of 3-class images, one bad row in every five; returns the number of good rows."""
    rng = np.random.default_rng(0)
    good = 0
    for shard in range(2):
        rows, labels = [], []
        for i in range(20):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
            data = buffer.getvalue()
            bad = i % 5 == 4
            # Paths are data, never file names: hostile ones must not make anything appear outside the run.
            hostile = ["../../escape.png", str(root / "abs-escape.png")][shard]
            path = hostile if i == 7 else f"train/{shard}/{i:03d}.png"
            rows.append({"bytes": data[: len(data) // 3] if bad else data, "path": path})
            labels.append(i % 3)
            good += not bad
        pq.write_table(pa.table({"image": pa.array(rows), "label": pa.array(labels, pa.int64())}),
                       root / f"train-{shard:05d}-of-00002.parquet")
    (root / "classes.txt").write_text("a\nb\nc\n")
    return good


def test_encode_actor_killed_mid_stage_loses_nothing(ray_session, tmp_path, saved_prior):
    from engine.ray.encode import encode_to_parquet

    data = tmp_path / "data"
    data.mkdir()
    good = write_dirty_shards(data)
    digests = {}
    for name in ("clean", "killed"):
        config = load_config(None, [f"runs_dir={tmp_path}", f"name={name}", "data.source=parquet",
                                    f"data.path={data}", "data.max_skip_fraction=0.25", "encode.batch_size=8",
                                        "data.val_fraction=0"])  # every train row is encoded
        if name == "killed":
            faults.request_crash(config.run_dir, "encode")
        latents_dir = config.run_dir / "latents"
        assert encode_to_parquet(config, saved_prior, latents_dir).images == good
        digests[name] = (latents_digest(latents_dir), build_manifest(config.run_dir)["skipped.parquet"])
    assert faults.crash_fired(tmp_path / "killed", "encode")  # an actor really died mid-stage
    assert digests["killed"] == digests["clean"]
    skipped = pq.read_table(tmp_path / "killed" / "skipped.parquet").to_pydict()
    assert len(skipped["id"]) == 40 - good and set(skipped["reason"]) == {"truncated"}  # counted once each
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "data", "killed", "prior"]
    assert not list(tmp_path.rglob("*escape*")) and not (tmp_path.parent / "escape.png").exists()
    assert sorted(p.name for p in data.iterdir()) == ["classes.txt", "train-00000-of-00002.parquet",
                                                      "train-00001-of-00002.parquet"]


def test_decode_actor_killed_mid_stage_loses_nothing(ray_session, tmp_path, saved_prior):
    from engine.ray.decode import decode_centroids_to_sets

    from tests.centroid_files import write_centroid_files

    rng = np.random.default_rng(0)
    files = write_centroid_files(tmp_path / "quantized", {
        c: {k: rng.standard_normal((k, 4 * 8 * 8)).astype(np.float32) for k in (1, 3)} for c in range(3)})
    rows = range(3 * (1 + 3))
    manifests = {}
    for name in ("clean", "killed"):
        config = load_config(None, [f"runs_dir={tmp_path}", f"name={name}", "decode.num_steps=2",
                                    "decode.batch_size=2"])
        if name == "killed":
            faults.request_crash(config.run_dir, "decode")
        targets = {(k, "ddoq"): [str(config.run_dir / "distilled" / f"set-ipc{k}")] for k in (1, 3)}
        decoded = decode_centroids_to_sets(config, saved_prior, files, targets)
        assert decoded.num_rows == len(rows)
        manifests[name] = build_manifest(config.run_dir / "distilled")
    assert faults.crash_fired(tmp_path / "killed", "decode")
    assert len(manifests["clean"]) == len(rows)
    assert manifests["killed"] == manifests["clean"]  # every PNG byte-identical
