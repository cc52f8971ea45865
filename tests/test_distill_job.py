"""The whole job: `--smoke-test` end to end in-process, a re-run that reuses finished work, and `ray job submit`
against a real local head."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.local_head import submit_to_local_head

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))


def smoke_config(tmp_path):
    import distill

    config, _ = distill.parse_args(["--smoke-test", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"])
    return config


def test_smoke_run_writes_every_output_and_reruns_from_cache(ray_session, tmp_path):
    import distill

    config = smoke_config(tmp_path)
    metrics = distill.run(config)
    run_dir = config.run_dir
    for name in ("config.yaml", "metrics.json", "quantization.parquet", "centroids.parquet"):
        assert (run_dir / name).exists(), name

    rows = metrics["results"]
    methods = ("random", "herding", "d4m", "ddoq")
    assert {(r["method"], r["ipc"]) for r in rows} == {(m, k) for m in methods for k in (1, 2)} | {("full", 0)}
    for row in rows:
        assert {"method", "weights", "ipc", "protocol", "student", "teacher", "seed"} <= set(row)
        assert 0.0 <= row["top1"] <= 1.0

    for method in ("random", "herding", "d4m", "ddoq-mass"):
        index = pq.read_table(run_dir / "distilled" / f"{method}-ipc2" / "index.parquet").to_pandas()
        assert list(index.columns) == ["path", "label", "class_name", "weight", "count"]
        assert len(index) == 20 and all((run_dir / "distilled" / f"{method}-ipc2" / p).exists() for p in index.path)
        np.testing.assert_allclose(index.groupby("label").weight.mean(), 1.0)
    # The digits are grey, so the decoded images are written grey: no colour noise the source never had.
    from PIL import Image

    assert {Image.open(p).mode for p in (run_dir / "distilled" / "ddoq-mass-ipc2").glob("*/*.png")} == {"L"}
    ddoq = pq.read_table(run_dir / "distilled" / "ddoq-mass-ipc2" / "index.parquet").to_pandas()
    np.testing.assert_allclose(ddoq.weight, ddoq["count"] * 2 / ddoq.groupby("label")["count"].transform("sum"))

    stats = pq.read_table(run_dir / "quantization.parquet").to_pandas()
    assert (stats.w2_mass <= stats.w2_uniform + 1e-9).all()
    np.testing.assert_allclose(stats.w2_mass**2, stats.distortion, rtol=1e-3)

    # The manifest came from the writers' records, not a re-read: it equals a re-read of the folder, and only the
    # files Ray Train's workers write (results/) had no record.
    from engine.io.manifest import build_manifest

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["files"] == build_manifest(run_dir)
    read = [p for p in manifest["files"] if not p.startswith("results/") or p.endswith("/set_quality.json")]
    assert manifest["hashed_by_reading"] == len(manifest["files"]) - len(read)

    # Same command again: every stage and every student is reused, results identical.
    again = distill.run(config)
    assert again["results"] == metrics["results"]
    assert again["timings_s"]["prior"] < 5 and again["timings_s"]["decode"] < metrics["timings_s"]["decode"] + 5


def test_smoke_run_on_an_object_store_run_folder(ray_session, s3_env, tmp_path):
    """runs_dir=s3://...: every stage writes its files to the bucket (latents from Ray Data, class files from the
    quantize actors, PNGs from the decoders, results and the teacher from Ray Train), nothing lands locally, and
    the same command again reuses every stage and every student."""
    import distill
    from engine.io import store
    from engine.io.location import ObjectPath, list_files, location
    from engine.io.manifest import verify_manifest

    runs = f"s3://{s3_env['bucket']}/{tmp_path.name}/runs"
    config, _ = distill.parse_args(["--smoke-test", f"runs_dir={runs}", f"cache_dir={tmp_path / 'cache'}"])
    metrics = distill.run(config)
    run_dir = config.run_dir
    assert isinstance(run_dir, ObjectPath) and str(run_dir) == f"{runs}/smoke"
    assert len(metrics["results"]) == 9 and metrics["counts"]["images_encoded"] > 0
    files = list_files(run_dir)
    assert {"config.yaml", "metrics.json", "report.html", "manifest.json", "centroids.parquet"} <= set(files)
    assert sum(f.startswith("latents/label=") for f in files) >= 10  # every class's partition
    assert sum(f.startswith("distilled/ddoq-mass-ipc2/") for f in files) == 22  # 20 PNGs, index.parquet, metadata.jsonl
    assert verify_manifest(run_dir) == []
    images, labels, weights = store.read_distilled_set(run_dir / "distilled" / "ddoq-mass-ipc2")
    assert images.shape[0] == 20 and np.isclose(weights.sum(), 20)
    # The teacher and the prior the driver trained are cached beside the run folders, where every node finds them.
    cached = list_files(location(runs) / "_cache")
    assert any(f.startswith("teachers/") for f in cached) and any(f.startswith("priors/") and f.endswith("/_published") for f in cached)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["priors"]  # only the driver's prior is local

    import results  # jobs/results.py reads the rows back from the bucket

    assert len(results.load_rows([str(run_dir)])) == 9
    computed = store.stage_history(run_dir)
    assert sorted(h["stage"] for h in computed) == ["baselines", "decode", "encode", "quantize"]
    again = distill.run(config)
    assert again["results"] == metrics["results"]
    assert store.stage_history(run_dir) == computed  # nothing recomputed


def test_ray_job_submit_against_a_local_head(tmp_path, s3_env):
    """The cluster way: a job on a head whose processes share one run folder on an object store (the head and
    its workers get the endpoint from the environment, as nodes get credentials from their instance role)."""
    from engine.io.location import location

    runs = f"s3://{s3_env['bucket']}/{tmp_path.name}/runs"
    out = submit_to_local_head(["python", "jobs/distill.py", "--smoke-test", f"runs_dir={runs}",
                                f"cache_dir={tmp_path / 'cache'}"], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout
    metrics = json.loads((location(runs) / "smoke" / "metrics.json").read_text())
    assert len(metrics["results"]) == 9


def test_noise_space_run_inverts_quantizes_the_states_and_samples_them_back(ray_session, tmp_path, capsys):
    """quantize.space=noise end to end as far as the decoded sets: the invert stage writes every class's states in
    the latents' layout (same ids) and says so class by class, the quantizer works on them (centroids rescaled to
    their cells' norm), both quantizers' centroids are sampled back into their sets, and a re-run inverts nothing
    again."""
    import distill

    from engine import pipeline
    from engine.io import store

    config, _ = distill.parse_args(["--smoke-test", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
                                    "quantize.space=noise", "decode.strength=0.5", "name=noise"])
    pipeline.run(config, until="decode")
    progress = [line for line in capsys.readouterr().out.splitlines() if "invert: class" in line]
    assert len(progress) == 10 and "10/10 classes" in progress[-1]
    run_dir = config.run_dir
    (inverted,) = list((run_dir / "inverted").iterdir())
    latents, states = store.class_latent_dirs(run_dir / "latents"), store.class_latent_dirs(inverted)
    assert sorted(states) == sorted(latents) == list(range(10))
    ids, before = store.read_class_latents(latents[3])
    state_ids, after = store.read_class_latents(states[3])
    assert list(state_ids) == list(ids) and after.shape == before.shape and not np.allclose(after, before)
    stats = pq.read_table(run_dir / "quantization.parquet").to_pandas()
    assert (stats[stats.ipc == 2].norm_scale > 1.0).all()  # the averages of noisy states were scaled back up
    for name in ("d4m-ipc2", "ddoq-mass-ipc2"):
        assert len(list((run_dir / "distilled" / name).glob("*/*.png"))) == 20
    marker = store.finished_stage(run_dir, "invert", inverted.name)
    assert marker is not None and marker["classes"] == 10
    again = pipeline.run(config, until="decode")
    assert "invert" not in again["timings_s"] or again["timings_s"]["invert"] < 5
