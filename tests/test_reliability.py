"""Reliability: clear errors instead of deep tracebacks, NaN/Inf stopped before the decoder, manifests, hostile
paths, and (slow) a driver killed mid-run then re-run, compared file by file with an uninterrupted run."""

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from engine.checks import check_finite_centroids, check_finite_parameters
from engine.config import RunError
from engine.io import store
from engine.io.manifest import build_manifest, diff_manifests, read_manifest, verify_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))


def run_main(args: list[str], capsys) -> str:
    """jobs/distill.py's main in-process: returns its stderr; it must exit with status 2 and no traceback."""
    import distill

    with pytest.raises(SystemExit) as exit_info:
        distill.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and err.startswith("distill: error: ")
    return err


def write_toy_dataset(root: Path, class_names: str, per_class: dict[int, int], bad: int = 0, size: int = 16) -> None:
    """train/test shards of random RGB images: `per_class` images per label in train, `bad` rows cut to 40 bytes (corrupt), one
    row with a label outside the classes, 2 test images per class."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    names = class_names.split()
    for split, counts in (("train", per_class), ("test", {c: 2 for c in range(len(names))})):
        rows = [({"bytes": png(), "path": f"{split}/{c}/{i}.png"}, c) for c, n in counts.items() for i in range(n)]
        if split == "train" and bad:
            rows += [({"bytes": png()[:40], "path": f"{split}/bad/{i}.png"}, 0) for i in range(bad)]
            rows += [({"bytes": png(), "path": "../../../escape.png"}, len(names) + 5)]
        table = pa.table({"image": pa.array([r for r, _ in rows]), "label": pa.array([c for _, c in rows], pa.int64())})
        pq.write_table(table, root / f"{split}-00000-of-00001.parquet")
    (root / "classes.txt").write_text("\n".join(names) + "\n")


# ---------------------------------------------------------------- clear errors, never a deep traceback


@pytest.mark.parametrize("override, message", [
    ("quantize.ipc=0", "quantize.ipc"), ("quantize.ipc=[-3]", "quantize.ipc"), ("quantize.ipcs=10", "unknown key"),
    ("data.image_size=big", "data.image_size: expected int"), ("decode.strength=2", "decode.strength"),
    ("data.max_skip_fraction=1.5", "data.max_skip_fraction"), ("prior.path=/no/such/prior", "prior.path"),
])
def test_bad_configs_and_a_missing_model_folder_are_one_clear_sentence(override, message, capsys, tmp_path):
    err = run_main([f"runs_dir={tmp_path}", override], capsys)
    assert message in err


def test_a_single_class_dataset_cannot_be_evaluated(capsys, tmp_path):
    write_toy_dataset(tmp_path / "one", "only", {0: 3})
    err = run_main([f"runs_dir={tmp_path}", "data.source=parquet", f"data.path={tmp_path / 'one'}"], capsys)
    assert "single class ('only')" in err and "--until quantize" in err


def test_too_many_bad_rows_fail_naming_them(capsys, tmp_path):
    write_toy_dataset(tmp_path / "dirty", "a b", {0: 3, 1: 3}, bad=4)
    err = run_main(["--smoke-test", f"runs_dir={tmp_path}", f"cache_dir={tmp_path}", "data.source=parquet",
                    f"data.path={tmp_path / 'dirty'}"], capsys)  # fails while training the prior: before Ray
    # 11 train rows, 2 carved into the validation split by their ids' coins: 3 bad of the 9 read. The row whose
    # stored path is "../../../escape.png" is named by its id, shard and row (row 10: the rows' order is written).
    assert "3 of 9 rows could not be used" in err
    assert "train-00000-of-00001.parquet#10 (label_out_of_range: label 7 not in [0, 2))" in err


def test_nan_in_weights_is_named():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_finite_parameters({"vae": module}, "prior p")
    with torch.no_grad():
        module[1].bias[0] = float("inf")
    with pytest.raises(RunError, match=r"prior p: vae\.1\.bias has 1 NaN/Inf"):
        check_finite_parameters({"vae": module}, "prior p")


def test_nan_centroids_are_stopped_before_the_decoder_naming_the_class():
    rows = [{"label": c, "ipc": 2, "index": i, "weight_mass": 1.0, "latent": [0.0, 1.0]}
            for c in (0, 1) for i in (0, 1)]
    check_finite_centroids(pa.Table.from_pylist(rows))
    rows[3]["latent"] = [float("nan"), 0.0]
    rows[0]["weight_mass"] = float("inf")
    with pytest.raises(RunError, match=r"2 centroid\(s\) .* \(class, ipc\): \[\(0, 2\), \(1, 2\)\]"):
        check_finite_centroids(pa.Table.from_pylist(rows))


# ---------------------------------------------------------------- manifests and hostile paths


def test_manifest_hashes_every_output_and_finds_changes(tmp_path):
    store.atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    store.write_png(tmp_path / "distilled" / "x" / "c00000_0000.png", np.zeros((2, 2, 3), np.uint8))
    (tmp_path / "distilled" / "x" / ".c00000_0001.png.tmp").write_bytes(b"half")  # a killed write's leftover
    files = write_manifest(tmp_path)
    assert sorted(files) == ["distilled/x/c00000_0000.png", "metrics.json"]
    assert read_manifest(tmp_path) == files and verify_manifest(tmp_path) == []
    store.write_png(tmp_path / "distilled" / "x" / "c00000_0000.png", np.ones((2, 2, 3), np.uint8))
    assert verify_manifest(tmp_path) == ["distilled/x/c00000_0000.png"]
    assert diff_manifests(files, build_manifest(tmp_path), ("metrics",)) == []


@pytest.mark.parametrize("hostile", ["../../x.png", "../outside.png", "/etc/passwd", "sub/../../outside.png"])
def test_paths_from_data_cannot_leave_the_set_folder(tmp_path, hostile):
    store.write_png(tmp_path / "outside.png", np.zeros((2, 2, 3), np.uint8))
    folder = tmp_path / "set"
    store.write_set_index(folder, [hostile], [0], ("a",), [1.0], [1])
    with pytest.raises(ValueError, match="outside its folder"):
        store.read_distilled_set(folder)


# ---------------------------------------------------------------- the driver killed mid-run (slow)


def distill_command(runs: Path, cache: Path, data: Path) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "distill.py"), "--smoke-test", f"runs_dir={runs}",
            f"cache_dir={cache}", "data.source=parquet", f"data.path={data}", "data.name=toy",
            "data.max_skip_fraction=0.3", "runtime.quantize_actors=1", "evaluate.methods=[random,d4m,ddoq]"]


def latent_rows(run_dir: Path) -> dict:
    return {c: (list(ids), lat.tobytes()) for c, d in store.class_latent_dirs(run_dir / "latents").items()
            for ids, lat in [store.read_class_latents(d)]}


@pytest.mark.ray
@pytest.mark.slow
def test_driver_killed_mid_decode_then_rerun_gives_the_same_run(tmp_path):
    import ray

    ray.shutdown()  # the job starts its own Ray; two on one node contend for ports
    data, cache = tmp_path / "data", tmp_path / "cache"
    # Class 0 is normal, class 1 has fewer images (1) than IPC 2, class 2 is empty; 4 bad rows of 17.
    write_toy_dataset(data, "zero one two", {0: 12, 1: 1}, bad=3)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT),
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="r8-", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    clean = subprocess.run(distill_command(tmp_path / "a", cache, data), env=env, capture_output=True, text=True,
                           timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]

    run_b = tmp_path / "b" / "smoke"
    job = subprocess.Popen(distill_command(tmp_path / "b", cache, data), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        pattern = "distilled/d*/*/*.png"  # a set is an ImageFolder: <set>/<class folder>/<image>
        while not list(run_b.glob(pattern)) and job.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started: a preempted node
        job.wait()
    assert job.returncode == -signal.SIGKILL
    assert not (run_b / "_stages" / "decode.json").exists() and not (run_b / "metrics.json").exists()

    again = subprocess.run(distill_command(tmp_path / "b", cache, data), env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "encode: reusing" in again.stdout and "quantizing" not in again.stdout  # finished stages skipped

    run_a = tmp_path / "a" / "smoke"
    a, b = read_manifest(run_a), read_manifest(run_b)
    assert verify_manifest(run_b) == []
    compared = ("distilled/", "centroids.parquet", "skipped.parquet")  # config.yaml differs: runs_dir
    assert diff_manifests(a, b, compared) == []
    # 3 methods x IPC 1, 2: class 0 gets IPC images, class 1 (one image) 1, class 2 (empty) none; + 6 indexes.
    assert sum(p.startswith("distilled/") for p in b) == 3 * (2 + 3) + 6
    assert latent_rows(run_a) == latent_rows(run_b)
    metrics_a, metrics_b = (json.loads((r / "metrics.json").read_text()) for r in (run_a, run_b))
    assert metrics_b["counts"] == metrics_a["counts"] == {
        "images_read": 17, "images_encoded": 13, "skipped": {"corrupt": 3, "label_out_of_range": 1},
        "classes": 2, "empty_classes": ["two"]}
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in m["results"]] for m in (metrics_a, metrics_b)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 3 * 2  # same students, same top-1
    assert not (tmp_path / "escape.png").exists() and not (ROOT.parent / "escape.png").exists()
