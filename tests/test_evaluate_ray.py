"""The evaluation through Ray Train: DDP over 2 gloo workers on CPU, stored soft labels, every result field; the
real splits streamed; student jobs on 2 trainers side by side, resumed after a kill."""

import json

import numpy as np
import pytest

from engine.config import load_config
from engine.data.images import load_split
from engine.io import store
from engine.evaluate.sets import SetKey
from engine.quantize.baselines import select_random

pytestmark = pytest.mark.ray

FIELDS = {"method", "weights", "ipc", "protocol", "student", "teacher", "seed", "draw", "learning_rate", "top1",
          "val_top1", "teacher_top1", "images", "epochs", "val_curve", "workers", "seconds", "select", "top1_last",
          "top1_best_val", "best_val_step"}


def test_students_train_with_ddp_on_two_workers(ray_session, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import engine.ray.evaluate
    from engine.evaluate.train import evaluate_top1, load_teacher
    from engine.pipeline import student_jobs
    from engine.ray.evaluate import evaluate_students

    # A validation slice smaller than the 360 test digits: the test split is streamed, half to each worker.
    monkeypatch.setattr(engine.ray.evaluate, "VAL_IMAGES", 100)

    config = load_config(None, [f"runs_dir={tmp_path}", "name=ddp", f"cache_dir={tmp_path}/cache",
                                "evaluate.protocol=fkd", "evaluate.methods=[random]", "quantize.ipc=[2]",
                                "evaluate.seeds=[0]", "evaluate.width=8", "evaluate.teacher_epochs=1",
                                "evaluate.student_epochs=3", "evaluate.reports=2", "evaluate.batch_size=8",
                                "runtime.train_workers=2", "runtime.train_cpus_per_worker=0.75"])
    train = load_split(config.data, "train")
    chosen = select_random(train.labels, 2, seed=0)
    folder = tmp_path / "set"
    files = [store.image_file_name(int(train.labels[i]), r) for r, i in enumerate(chosen)]
    for name, i in zip(files, chosen):
        store.write_png(folder / name, train.images[i])
    store.write_set_index(folder, files, train.labels[chosen], train.class_names, np.ones(len(chosen)),
                          np.ones(len(chosen), int))

    jobs = student_jobs(config, {SetKey("random", "none", 2): folder})
    assert [j.name for j in jobs] == ["random-ipc2-convnet3-seed0"]
    results_dir = tmp_path / "results"
    rows = evaluate_students(config, jobs, tmp_path / "cache" / "teacher.safetensors", results_dir,
                             train_rows=len(train))
    (row,) = rows
    assert set(row) == FIELDS
    assert row["workers"] == 2 and row["protocol"] == "fkd" and row["teacher"] == "convnet3"
    assert row["images"] == 20 and 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["val_top1"] <= 1.0
    assert row["select"] == "last" and row["top1"] == row["top1_last"] and 0.0 <= row["top1_best_val"] <= 1.0
    curve = dict(row["val_curve"])
    assert row["best_val_step"] == max(curve, key=curve.get)  # the first of equal maxima
    assert (results_dir / "soft_labels" / "random-ipc2-seed0" / "steps.json").exists()
    assert not list((results_dir / "checkpoints").glob("*.pt"))  # removed once the job finished
    assert (tmp_path / "cache" / "teacher.safetensors").exists()
    # The streamed, sharded, summed held-out top-1 is the teacher's top-1 on the whole split in memory.
    test = load_split(config.data, "test")
    teacher = load_teacher(tmp_path / "cache" / "teacher.safetensors", "convnet3", 10, 16, 8, "cpu")
    assert row["teacher_top1"] == pytest.approx(evaluate_top1(teacher, test.images, test.labels))
    val = load_split(config.data, "val")  # the first 100 rows of val, in the stream's order (the digits' id order)
    scored = json.loads((results_dir / "teacher.json").read_text())
    assert scored["teacher_val_top1"] == pytest.approx(evaluate_top1(teacher, val.images[:100], val.labels[:100]))
    assert json.loads((results_dir / f"{jobs[0].name}.json").read_text()) == row
    assert scored["teacher"] == "teacher.safetensors"
    # The same folder with another teacher (other settings = another cache key): its figures, not the old ones'.
    from engine.ray.evaluate import prepare_teacher, scores

    other = tmp_path / "cache" / "other-teacher.safetensors"
    other.write_bytes((tmp_path / "cache" / "teacher.safetensors").read_bytes())
    assert scores(results_dir / "teacher.json", tmp_path / "cache" / "teacher.safetensors")
    assert not scores(results_dir / "teacher.json", other)
    prepare_teacher(config, other, results_dir, train_rows=len(train))
    assert json.loads((results_dir / "teacher.json").read_text())["teacher"] == other.name


def _write_set(train, folder, ipc, seed=0):
    chosen = select_random(train.labels, ipc, seed=seed)
    files = [store.image_file_name(int(train.labels[i]), r) for r, i in enumerate(chosen)]
    for name, i in zip(files, chosen):
        store.write_png(folder / name, train.images[i])
    store.write_set_index(folder, files, train.labels[chosen], train.class_names, np.ones(len(chosen)),
                          np.ones(len(chosen), int))


def test_jobs_on_two_trainers_side_by_side_resume_after_a_kill_with_the_same_results(ray_session, tmp_path,
                                                                                    monkeypatch):
    """Two trainers run a run's jobs side by side (the real split streamed for the teacher and `full`); one of
    their workers is killed right after a checkpoint: Ray Train restarts it, the job resumes from its checkpoint,
    finished jobs are not redone, and every result equals the unbroken run's."""
    import ray.data

    from engine.pipeline import student_jobs
    from engine.ray.evaluate import evaluate_students
    from tests import faults

    # A fresh driver's Ray Data default (an earlier test's encode or decode stage in this process leaves it True):
    # the trainers must read the streams in the source's order whatever the driver's own setting.
    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", False)
    results = {}
    for name in ("clean", "killed"):
        config = load_config(None, [f"runs_dir={tmp_path}", f"name={name}", f"cache_dir={tmp_path}/cache",
                                    "evaluate.methods=[random,full]", "quantize.ipc=[2]", "evaluate.seeds=[0,1]",
                                    "quantize.random_draws=1",
                                    "evaluate.width=8", "evaluate.teacher_epochs=2", "evaluate.student_epochs=6",
                                    "evaluate.full_epochs=2", "evaluate.reports=2", "evaluate.batch_size=16"])
        train = load_split(config.data, "train")
        _write_set(train, tmp_path / "set", 2)
        if name == "killed":
            faults.request_crash(config.run_dir, "evaluate")
        jobs = student_jobs(config, {SetKey("random", "none", 2): tmp_path / "set"})
        rows = evaluate_students(config, jobs, tmp_path / "cache" / "teacher.safetensors",
                                 config.run_dir / "results", train_rows=len(train))
        results[name] = {(r["method"], r["seed"]): (r["top1"], r["val_curve"]) for r in rows}
        assert {r["images"] for r in rows} == {20, len(train)}
    assert faults.crash_fired(tmp_path / "killed", "evaluate")  # a worker really died mid-job
    assert results["killed"] == results["clean"]  # top-1 and every report of the validation curve
    assert all(len(curve) >= 2 for _, curve in results["clean"].values())  # evaluate.reports=2
    assert len(list((tmp_path / "clean" / "ray_train").glob("evaluate-[0-9]*"))) == 2  # two trainers
    # The teacher was trained and scored once: the second run copied its score from beside it, no trainer.
    assert (tmp_path / "cache" / "teacher.safetensors.json").exists()
    assert not (tmp_path / "killed" / "ray_train" / "evaluate-teacher").exists()


def test_trainers_that_cannot_fit_beside_the_stream_are_refused(ray_session, tmp_path):
    from engine.config import RunError
    from engine.ray.jobs import trainer_count

    config = load_config(None, ["runtime.concurrent_trainers=3", "runtime.train_cpus_per_worker=0.75"])
    with pytest.raises(RunError, match="do not fit"):
        trainer_count(config, 10, streams=True)
    assert trainer_count(load_config(None, []), 10, streams=True) == 2  # the default on 2 CPUs: 2 x 0.75 + 0.5
    assert trainer_count(load_config(None, []), 1, streams=True) == 1  # never more trainers than jobs


def test_reports_and_val_top1_score_validation_rows_never_test(ray_session, tmp_path):
    """A dataset whose test labels are all wrong (each test digit labelled as the next digit): a student that
    learned the digits scores high on validation and near zero on test. Reports (Tune's metric) and val_top1 must
    be the high figure; only the final top1 may read test."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.io.store import png_bytes
    from engine.pipeline import student_jobs
    from engine.ray.evaluate import evaluate_students

    digits = load_config(None, []).data
    root = tmp_path / "shifted"
    root.mkdir()
    for split, parts, shift in (("train", ("train", "val"), 0), ("test", ("test",), 1)):
        rows, labels = [], []
        for part in parts:
            images = load_split(digits, part)
            rows += [{"bytes": png_bytes(image), "path": str(i)} for image, i in zip(images.images, images.ids)]
            labels += ((images.labels + shift) % 10).tolist()
        pq.write_table(pa.table({"image": pa.array(rows), "label": pa.array(labels, pa.int64())}),
                       root / f"{split}-00000-of-00001.parquet")
    (root / "classes.txt").write_text("".join(f"{d}\n" for d in range(10)))
    config = load_config(None, [f"runs_dir={tmp_path}", "name=shifted", f"cache_dir={tmp_path}/cache",
                                "data.source=parquet", f"data.path={root}", "data.name=shifted",
                                "evaluate.protocol=hard", "evaluate.methods=[random]", "quantize.ipc=[10]",
                                "evaluate.seeds=[0]", "evaluate.width=16", "evaluate.student_epochs=150",
                                "evaluate.reports=2", "evaluate.batch_size=32"])
    train = load_split(config.data, "train")
    # Validation is carved from the correctly labelled train shard (parquet ids are <shard>#<row>, so its coin
    # takes other rows than the digits' own), never from the shifted test split.
    assert len(train) + len(load_split(config.data, "val")) == sum(len(load_split(digits, s)) for s in ("train", "val"))
    _write_set(train, tmp_path / "set", 10)
    jobs = student_jobs(config, {SetKey("random", "none", 10): tmp_path / "set"})
    (row,) = evaluate_students(config, jobs, tmp_path / "cache" / "teacher.safetensors", tmp_path / "results",
                               train_rows=len(train))
    assert row["val_top1"] > 0.6 and row["top1"] < 0.2, row


def test_the_validation_slice_is_the_same_rows_whichever_read_task_finishes_first(ray_session, tmp_path,
                                                                                    monkeypatch):
    """Two train shards, the first slow to decode (large noisy PNGs), the second fast (8x8): without the source's
    order the fast shard's rows arrive first and a sweep's trials could be ranked on different validation images.
    The slice must be the first VAL_IMAGES rows of val as `load_split` reads them, in every run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import engine.ray.evaluate
    from engine.io.store import png_bytes
    from engine.ray.evaluate import _stream_inputs

    root = tmp_path / "two-shards"
    root.mkdir()
    rng = np.random.default_rng(0)
    for shard, (rows, side) in enumerate(((120, 384), (120, 8))):
        images = rng.integers(0, 256, (rows, side, side, 3), dtype=np.uint8)
        column = [{"bytes": png_bytes(image), "path": f"s{shard}_{i}.png"} for i, image in enumerate(images)]
        pq.write_table(pa.table({"image": pa.array(column), "label": pa.array(np.arange(rows) % 2, pa.int64())}),
                       root / f"train-0000{shard}-of-00002.parquet")
    pq.write_table(pa.table({"image": pa.array(column[:4]), "label": pa.array([0, 1, 0, 1], pa.int64())}),
                   root / "test-00000-of-00001.parquet")
    (root / "classes.txt").write_text("a\nb\n")
    config = load_config(None, [f"runs_dir={tmp_path}", "name=two", "data.source=parquet", f"data.path={root}",
                                "data.name=two", "data.image_size=16", "data.val_fraction=0.5"])
    monkeypatch.setattr(engine.ray.evaluate, "VAL_IMAGES", 40)
    expected = load_split(config.data, "val")
    for _ in range(2):
        base, _held_out = _stream_inputs(config, tmp_path / "results", tmp_path / "teacher.safetensors", 240)
        images, labels = base.val_set
        assert np.array_equal(images, expected.images[:40]) and np.array_equal(labels, expected.labels[:40])


def test_a_wrongly_scaled_teacher_stops_the_run_below_min_teacher_top1(ray_session, tmp_path):
    """A digits teacher that learned the digits (~0.8), given as evaluate.teacher_path: at its own scale it passes
    min_teacher_top1 = 0.6; told a mean/std it was not trained with it scores ~0.4 and the run stops, in one
    sentence, before any student. ConvNet-3's instance norm absorbs a rescale common to all channels (a BN ResNet
    falls to chance under it, but trains too slowly for this test), so the wrong scale differs per channel."""
    from safetensors.torch import save_file

    from engine.config import RunError
    from engine.config import DataConfig, EvaluateConfig
    from engine.evaluate.train import TrainSet
    from engine.ray.evaluate import prepare_teacher
    from tests.training import train_teacher

    train = load_split(DataConfig(), "train")
    teacher = train_teacher(TrainSet(train.images, train.labels, np.ones(len(train))), 10, "convnet3",
                            EvaluateConfig(width=16, teacher_epochs=3, batch_size=64), seed=0)
    path = tmp_path / "digits-teacher.safetensors"
    save_file(teacher.state_dict(), str(path))
    given = [f"runs_dir={tmp_path}", "name=scale", f"evaluate.teacher_path={path}", "evaluate.width=16",
             "evaluate.min_teacher_top1=0.6"]
    right = load_config(None, given)
    assert prepare_teacher(right, path, tmp_path / "results", train_rows=len(train)) > 0.6
    wrong = load_config(None, given + ["evaluate.teacher_mean=[0.9,0.1,0.5]", "evaluate.teacher_std=[0.05,1.0,0.2]"])
    with pytest.raises(RunError, match=r"below evaluate\.min_teacher_top1 = 60\.0%") as stopped:
        prepare_teacher(wrong, path, tmp_path / "results", train_rows=len(train))  # scored again at the new scale
    assert "teacher_mean" in str(stopped.value) and str(stopped.value).count(". ") == 0  # one sentence
    scored = json.loads((tmp_path / "results" / "teacher.json").read_text())
    assert scored["input_norm"] == {"mean": [0.9, 0.1, 0.5], "std": [0.05, 1.0, 0.2]}
    assert scored["teacher_val_top1"] < 0.6


def test_trainers_are_counted_from_the_autoscalers_largest_cluster(ray_session):
    """An autoscaling cluster published its node groups (16 GPU workers, 2 CPU workers) but has none alive: the
    trainers are planned for its largest size, not for the 2 CPUs alive; the teacher's threads stay the alive
    node's. Without the record the count is the resources alive, as before."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from engine.config import RunError
    from engine.ray.cluster import Capacity, cluster_capacity
    from engine.ray.jobs import teacher_threads, trainer_count

    groups = [autoscaler_pb2.NodeGroupConfig(name="gpu.worker", resources={"CPU": 8, "GPU": 1}, max_count=16),
              autoscaler_pb2.NodeGroupConfig(name="cpu.worker", resources={"CPU": 16}, max_count=2)]
    key, namespace = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    gpu = load_config(None, ["runtime.train_use_gpu=true", "runtime.train_cpus_per_worker=4"])
    assert cluster_capacity() == Capacity(2.0, 0.0, False)
    with pytest.raises(RunError, match="do not fit"):  # planned on the 2 CPUs and 0 GPUs alive, as before
        trainer_count(gpu, 54, streams=True)
    internal_kv._internal_kv_put(key, autoscaler_pb2.ClusterConfig(node_group_configs=groups).SerializeToString(),
                                 overwrite=True, namespace=namespace)
    try:
        assert cluster_capacity() == Capacity(16 * 8 + 2 * 16, 16.0, True)
        assert trainer_count(gpu, 54, streams=True) == 16 and trainer_count(gpu, 5, streams=True) == 5
        assert trainer_count(load_config(None, []), 54, streams=True) == 54  # CPU trainers: 212 fit
        assert teacher_threads(load_config(None, [])) == 2  # 2 trainers' threads on the 2-CPU node alive
    finally:
        internal_kv._internal_kv_del(key, namespace=namespace)
    assert not cluster_capacity().autoscaled
