"""How realistic each distilled set is (engine/evaluate/quality.py's figures), judged by the evaluation's teacher against a
bounded sample of real validation images: one Ray task per results folder, on a GPU when the trainers have one,
cached in results_dir/set_quality.json. Never on test."""

from __future__ import annotations

import json

import numpy as np
import ray

from engine.config import DistillConfig
from engine.io.location import location

REFERENCE_IMAGES = 5000  # real validation images the sets are compared with (a seeded stratified sample)


def _measure(config: DistillConfig, folders: dict[str, str], teacher_path: str) -> dict:
    import torch

    from engine.data.images import sample_split
    from engine.data.sources import class_names
    from engine.evaluate.quality import quality_of_features, teacher_outputs
    from engine.evaluate.train import load_teacher
    from engine.io.store import iter_distilled_set

    e = config.evaluate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, config.runtime.threads("train")))
    teacher = load_teacher(location(teacher_path), e.teacher, len(class_names(config.data)), config.data.image_size,
                           e.width, device, e)
    # Reference images to measure against: rows that do not decode are left out; judging the split's share of bad
    # rows is the encode stage's (a val split of a few rows would otherwise stop a finished run on one of them).
    reference = sample_split(config.data, "val", REFERENCE_IMAGES, seed=0, enforce_skip_limit=False)
    features, predicted = teacher_outputs(teacher, reference.images)
    quality = {"reference": {"images": len(reference), "class_agreement": float((predicted == reference.labels).mean())}}
    for name, folder in folders.items():  # a set's images a chunk at a time; only its features are kept
        outputs = [(*teacher_outputs(teacher, images), labels) for images, labels, _ in iter_distilled_set(folder)]
        quality[name] = quality_of_features(*(np.concatenate(column) for column in zip(*outputs)), features)
    return quality


def measure_sets(config: DistillConfig, set_dirs: dict, teacher_path, results_dir) -> dict:
    """{set folder's name (`ddoq-mass-ipc10`): {images, class_agreement, frechet_distance, precision, recall},
    "reference": ...} of every set in `set_dirs` ({(method, weights, ipc): folder}); once per results folder."""
    from engine.io.store import atomic_write_json

    out = location(results_dir) / "set_quality.json"
    if out.exists():
        return json.loads(out.read_text())
    folders = {location(folder).name: str(folder) for _, folder in sorted(set_dirs.items())}
    gpus = 1 if config.runtime.train_use_gpu else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_measure)
    quality = ray.get(task.remote(config, folders, str(teacher_path)))
    atomic_write_json(out, quality)
    return quality
