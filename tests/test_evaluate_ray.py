"""The evaluation through Ray Train: DDP over 2 gloo workers on CPU, stored soft labels, every result field."""

import json

import numpy as np
import pytest

from engine import store
from engine.baselines import select_random
from engine.config import load_config
from engine.data import load_split

pytestmark = pytest.mark.ray

FIELDS = {"method", "weights", "ipc", "protocol", "student", "teacher", "seed", "top1", "teacher_top1", "images",
          "epochs", "workers", "seconds"}


def test_students_train_with_ddp_on_two_workers(ray_session, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engine.ray.evaluate import evaluate_students
    from engine.pipeline import student_jobs

    config = load_config(None, [f"runs_dir={tmp_path}", "name=ddp", f"cache_dir={tmp_path}/cache",
                                "evaluate.protocol=fkd", "evaluate.methods=[random]", "quantize.ipc=[2]",
                                "evaluate.seeds=[0]", "evaluate.width=8", "evaluate.teacher_epochs=1",
                                "evaluate.student_epochs=3", "evaluate.reports=2", "evaluate.batch_size=8",
                                "runtime.train_workers=2", "runtime.train_cpus_per_worker=1"])
    train = load_split(config.data, "train")
    chosen = select_random(train.labels, 2, seed=0)
    folder = tmp_path / "set"
    files = [store.image_file_name(int(train.labels[i]), r) for r, i in enumerate(chosen)]
    for name, i in zip(files, chosen):
        store.write_png(folder / name, train.images[i])
    store.write_set_index(folder, files, train.labels[chosen], train.class_names, np.ones(len(chosen)),
                          np.ones(len(chosen), int))

    jobs = student_jobs(config, {("random", "none", 2): folder})
    assert [j["job"] for j in jobs] == ["random-ipc2-convnet3-seed0"]
    results_dir = tmp_path / "results"
    rows = evaluate_students(config, jobs, tmp_path / "cache" / "teacher.safetensors", results_dir)
    (row,) = rows
    assert set(row) == FIELDS
    assert row["workers"] == 2 and row["protocol"] == "fkd" and row["teacher"] == "convnet3"
    assert row["images"] == 20 and 0.0 <= row["top1"] <= 1.0
    assert (results_dir / "soft_labels" / "random-ipc2-seed0.safetensors").exists()
    assert not list((results_dir / "checkpoints").glob("*.pt"))  # removed once the job finished
    assert (tmp_path / "cache" / "teacher.safetensors").exists()
    assert json.loads((results_dir / f"{jobs[0]['job']}.json").read_text()) == row
