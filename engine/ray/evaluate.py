"""The evaluate stage: one Ray Train TorchTrainer runs every student job (teacher cached), a result file each."""

from __future__ import annotations

import json
import time

import numpy as np

from engine.config import DistillConfig
from engine.data import load_split
from engine.location import location, ray_storage


REPORT_IMAGES = 1000  # held-out images scored at each intermediate report


def _evaluation_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the teacher (cached or given), then each student job not finished yet.
    Every job reports held-out top-1 `evaluate.reports` times (ray.train.report) and checkpoints alongside, so a
    killed or restarted run resumes mid-job; a finished job's result file is never redone."""
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import save as to_safetensors_bytes

    from functools import cache

    from engine.data import class_names
    from engine.protocols import get_protocol
    from engine.store import atomic_write_bytes, atomic_write_json, read_distilled_set
    from engine.train import (TrainSet, Worker, evaluate_top1, load_teacher, student_epochs, train_student,
                              train_teacher)

    config: DistillConfig = loop_config["config"]
    evaluate = config.evaluate
    protocol = get_protocol(evaluate.protocol)
    torch.set_num_threads(config.runtime.train_cpus_per_worker)
    context = ray.train.get_context()
    worker = Worker(context.get_world_rank(), context.get_world_size(), ray.train.torch.prepare_model)

    @cache
    def full() -> TrainSet:  # the whole train split, loaded only if a teacher or the `full` method needs it
        train = load_split(config.data, "train")
        return TrainSet(train.images, train.labels, np.ones(len(train.labels)))

    test = load_split(config.data, "test")
    num_classes = len(class_names(config.data))
    results_dir = location(loop_config["results_dir"])

    teacher, teacher_top1 = None, None
    if protocol.soft_labels:  # the hard-label protocol never builds or reads a teacher
        teacher_path = location(loop_config["teacher_path"])
        if teacher_path.exists():  # on the worker's device: a CPU teacher crashed every GPU soft-label batch
            teacher = load_teacher(teacher_path, evaluate.teacher, num_classes, config.data.image_size,
                                   evaluate.width, ray.train.torch.get_device())
        else:
            teacher = train_teacher(full(), num_classes, evaluate.teacher, evaluate, seed=0, worker=worker)
            teacher = getattr(teacher, "module", teacher)
            if worker.rank == 0:
                atomic_write_bytes(teacher_path, to_safetensors_bytes(teacher.state_dict()))
        teacher.eval()
        teacher_top1 = evaluate_top1(teacher, test.images, test.labels)

    for job in loop_config["jobs"]:
        result_path = results_dir / f"{job['job']}.json"
        if result_path.exists():  # finished in an earlier (killed) run of the same config
            continue
        start = time.perf_counter()
        if job["method"] == "full":
            data, epochs = full(), evaluate.full_epochs
        else:
            data, epochs = TrainSet(*read_distilled_set(job["set_dir"])), student_epochs(evaluate)
        soft_labels = None
        if protocol.stored_labels:
            labels_path = results_dir / "soft_labels" / f"{job['set']}-seed{job['seed']}.safetensors"
            soft_labels = _stored_soft_labels(labels_path, data, teacher, epochs, evaluate, job["seed"], worker.rank)

        def report(step: int, model, job=job):
            # Progress signal (and Tune's early-stopping metric) on a fixed slice of the held-out split: the whole
            # split at every report would cost more than training a small set. The result row uses all of it.
            top1 = evaluate_top1(model, test.images[:REPORT_IMAGES], test.labels[:REPORT_IMAGES])
            ray.train.report({"job": job["job"], "step": step, "top1": top1})

        checkpoint = results_dir / "checkpoints" / f"{job['job']}.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        student = train_student(data, teacher, num_classes, job["student"], epochs, evaluate, job["seed"], worker,
                                soft_labels=soft_labels, report=report, reports=evaluate.reports,
                                checkpoint=checkpoint)
        top1 = evaluate_top1(getattr(student, "module", student), test.images, test.labels)
        row = {**{k: job[k] for k in ("method", "weights", "ipc", "protocol", "student", "teacher", "seed")},
               "top1": top1, "teacher_top1": teacher_top1, "images": int(len(data.labels)), "epochs": epochs,
               "workers": worker.world, "seconds": round(time.perf_counter() - start, 2)}
        if worker.rank == 0:
            atomic_write_json(result_path, row)
            checkpoint.unlink(missing_ok=True)


def _stored_soft_labels(path, data, teacher, epochs: int, evaluate, seed: int, rank: int) -> dict:
    """FKD labels of one (set, seed): generated once, stored as safetensors, replayed by every student."""
    from safetensors.torch import load
    from safetensors.torch import save as to_safetensors_bytes

    from engine.store import atomic_write_bytes
    from engine.train import generate_soft_labels

    if path.exists():
        return load(path.read_bytes())
    labels = generate_soft_labels(data, teacher, epochs, evaluate, seed)  # deterministic: same on every rank
    if rank == 0:
        atomic_write_bytes(path, to_safetensors_bytes(labels))
    return labels


def evaluate_students(config: DistillConfig, jobs: list[dict], teacher_path, results_dir,
                      callbacks=()) -> list[dict]:
    """Train every job's student through one TorchTrainer run (DDP over `runtime.train_workers`); returns the
    result rows (one JSON file per job). `callbacks`: Ray Train callbacks, e.g. TuneReportCallback when a Tune
    trial runs the evaluation."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    runtime = config.runtime
    results_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _evaluation_loop,
        train_loop_config={"config": config, "jobs": jobs, "teacher_path": str(teacher_path),
                           "results_dir": str(results_dir.resolve())},
        scaling_config=ScalingConfig(num_workers=runtime.train_workers, use_gpu=runtime.train_use_gpu,
                                     resources_per_worker={"CPU": runtime.train_cpus_per_worker}),
        # A failed worker group restarts; jobs resume from their checkpoints and finished jobs are skipped.
        run_config=RunConfig(name="evaluate", **ray_storage(config.run_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=2), callbacks=list(callbacks)),
    )
    trainer.fit()
    return [json.loads((results_dir / f"{job['job']}.json").read_text()) for job in jobs]
