"""The evaluate stage's Ray Train worker loop: what runs on every worker of a trainer. Input: a `LoopConfig` (built
by the driver, engine/ray/evaluate.py) and the datasets the trainer was given ("train", "test": Ray Data streams of
{image: (H, W, 3) uint8, label: int64} rows, sharded over the workers). Output: files in the results folder, written
by rank 0: teacher.json and the teacher's weights (phase "teacher"), one `<job>.json` result row per student job
(phase "students"), checkpoints and validation curves while a job runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.config import DistillConfig
from engine.io.location import ObjectPath, location
from engine.ray.jobs import StudentJob


@dataclass(frozen=True)
class LoopConfig:
    """Everything a trainer's workers read besides their datasets. Frozen and typed: a misspelt field fails when
    the driver builds it, not inside a remote worker."""

    config: DistillConfig
    phase: Literal["teacher", "students"]
    name: str  # the trainer's name (Ray Train's run name; the progress lines' tag)
    threads: int  # torch threads per worker
    results_dir: str
    teacher_path: str
    train_rows: int  # rows of the train split (sizes the streamed schedules)
    num_classes: int
    val_set: tuple  # (images (N, H, W, 3) uint8, labels (N,)): the validation slice every report scores
    test_set: tuple | None  # the whole test split when it is small enough to hold, else None (streamed as "test")
    fault_dir: str  # test-only crash injection (engine/faults.py)
    jobs: tuple[StudentJob, ...] = ()  # phase "students": this trainer's share
    ray_reports: bool = False  # each report also goes through ray.train.report (a Tune trial consumes them)


def run_worker(train_loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: {"loop": LoopConfig} -> phase "teacher" (train or load it, score it) or
    "students" (each job of this trainer's share not finished yet)."""
    import logging

    import ray.train
    import ray.train.torch
    import torch
    from ray.train.v2._internal.execution import context as train_context

    from engine.evaluate.train import Worker

    loop: LoopConfig = train_loop_config["loop"]
    # One progress line per report is printed below; Ray Train's own log line for every report is noise.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    torch.set_num_threads(loop.threads)
    context = ray.train.get_context()
    worker = Worker(context.get_world_rank(), context.get_world_size(), ray.train.torch.prepare_model,
                    ray.train.torch.get_device())
    if loop.phase == "teacher":
        _teacher_phase(loop, worker)
    else:
        StudentTrainer(loop, worker).run()


def progress(loop: LoopConfig, worker, message: str) -> None:
    """One line from rank 0, straight to the process's stdout (Ray forwards it to the driver): Ray Train's patched
    print would send it through the logging handlers too, and every line would arrive twice."""
    if worker.rank == 0:
        sys.__stdout__.write(f"[evaluate {time.strftime('%H:%M:%S')} {loop.name}] {message}\n")
        sys.__stdout__.flush()


def held_out_top1(model, worker, loop: LoopConfig) -> float:
    """Top-1 on the whole test split, streamed: each worker scores its shard, the counts are summed. A small test
    split was taken into memory by the driver (the embedded digits' 360)."""
    import ray.train
    import torch

    from engine.evaluate.train import count_correct

    precision = loop.config.evaluate.precision
    if loop.test_set is not None:
        images, labels = loop.test_set
        return count_correct(model, [(images, labels)], precision)[0] / max(1, len(labels))

    shard = ray.train.get_dataset_shard("test")
    batches = ((b["image"], b["label"]) for b in shard.iter_torch_batches(batch_size=512))
    correct, seen = count_correct(model, batches, precision)
    if worker.world > 1:
        counts = torch.tensor([correct, seen], dtype=torch.float64, device=worker.device)
        torch.distributed.all_reduce(counts)
        correct, seen = int(counts[0]), int(counts[1])
    return correct / max(1, seen)


def val_top1(model, loop: LoopConfig) -> float:
    """Top-1 on the validation slice every report scores (each rank holds it; no reduction needed)."""
    from engine.evaluate.train import evaluate_top1

    return evaluate_top1(model, *loop.val_set)


def stream_epochs(seed: int, local_batch: int):
    """epoch -> this worker's shard of the train split, reshuffled (seeded by epoch) within a local buffer."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int):
        return shard.iter_torch_batches(batch_size=local_batch, local_shuffle_buffer_size=max(4 * local_batch, 1024),
                                        local_shuffle_seed=seed * 100_003 + epoch)

    return epoch_batches


def norm_record(norm) -> dict:
    """An InputNorm as teacher.json keeps it."""
    return {"mean": [float(m) for m in norm.mean], "std": [float(s) for s in norm.std]}


def _teacher_phase(loop: LoopConfig, worker) -> None:
    from engine.evaluate.protocols import input_norm_of
    from engine.evaluate.train import load_teacher
    from engine.io.store import atomic_write_json

    e = loop.config.evaluate
    teacher_path = location(loop.teacher_path)
    facts = {}
    if teacher_path.exists():
        teacher = load_teacher(teacher_path, e.teacher, loop.num_classes, loop.config.data.image_size, e.width,
                               worker.device, e)
    else:
        teacher, facts = _train_teacher(loop, worker, teacher_path)
    top1 = held_out_top1(teacher, worker, loop)
    val = val_top1(teacher, loop)
    progress(loop, worker, f"teacher {e.teacher}: validation top-1 {val:.4f}, test top-1 {top1:.4f}")
    if worker.rank == 0:
        atomic_write_json(location(loop.results_dir) / "teacher.json",
                          {"teacher": teacher_path.name, "teacher_top1": top1, "teacher_val_top1": val,
                           "input_norm": norm_record(input_norm_of(teacher)), **facts})


def _train_teacher(loop: LoopConfig, worker, teacher_path) -> tuple:
    """The teacher trained on the streamed train split and saved to `teacher_path` -> (it, its throughput facts)."""
    import torch
    from safetensors.torch import save as to_safetensors_bytes

    from engine.evaluate.protocols import teacher_norm
    from engine.io.store import atomic_write_bytes
    from engine.evaluate.train import (Reporting, Stream, fit_stream, new_model, steady_images_per_s, stream_steps,
                              teacher_loss, teacher_recipe, timed_epochs)

    e, size = loop.config.evaluate, loop.config.data.image_size
    torch.manual_seed(0)
    model = new_model(e.teacher, loop.num_classes, size, e.width, worker, teacher_norm(e, size))
    rows = loop.train_rows // worker.world
    steps, local = stream_steps(rows, e.batch_size, worker.world)

    def report(step: int, net) -> None:
        progress(loop, worker, f"teacher {e.teacher}: step {step}/{steps * e.teacher_epochs}")

    # Named by the teacher (its cache key is its recipe): a folder re-used with other teacher settings never
    # resumes the old teacher's run.
    checkpoint = location(loop.results_dir) / "checkpoints" / f"{teacher_path.name}.pt"
    start, epoch_s = time.perf_counter(), []
    stream = Stream(timed_epochs(stream_epochs(0, local), epoch_s), rows, e.teacher_epochs)
    model = fit_stream(model, stream, teacher_recipe(e), teacher_loss, worker,
                       Reporting(report, min(e.reports, e.teacher_epochs), checkpoint))
    facts = {  # streamed training throughput over every worker's rows (a run resumed mid-way overstates it)
        "train_images_per_s": rows * worker.world * e.teacher_epochs / (time.perf_counter() - start),
        # Per epoch (this run's epochs only): the first also starts the stream's workers; the rest are its rate.
        "epoch_s": [round(t, 3) for t in epoch_s],
        "steady_images_per_s": steady_images_per_s(rows * worker.world, epoch_s)}
    teacher = getattr(model, "module", model)
    if worker.rank == 0:
        atomic_write_bytes(teacher_path, to_safetensors_bytes(teacher.state_dict()))
    return teacher, facts


@dataclass(frozen=True)
class JobFiles:
    """Where a job's files live in the results folder: its result row, and while it runs its checkpoint and its
    validation curve ({step: val top-1}, kept beside the checkpoint so a resumed job's row still holds the reports
    before its kill; a replayed step reports the same figure again)."""

    result: Path | ObjectPath
    checkpoint: Path | ObjectPath
    curve: Path | ObjectPath
    best: Path | ObjectPath  # the weights at the best validation report so far (evaluate.select=best_val)

    @staticmethod
    def of(results_dir, job: StudentJob) -> JobFiles:
        checkpoints = results_dir / "checkpoints"
        return JobFiles(results_dir / f"{job.name}.json", checkpoints / f"{job.name}.pt",
                        checkpoints / f"{job.name}.curve.json", checkpoints / f"{job.name}.best.pt")

    def remove_temporary(self) -> None:
        for place in (self.checkpoint, self.curve, self.best):
            place.unlink(missing_ok=True)


class BestOnValidation:
    """A student's weights at its best validation report: kept in memory by every rank (each scores the same
    validation slice, so all agree on the step), and written by rank 0 so a job resumed after a kill still has
    them. Chosen on validation alone; test is read once, for the chosen weights."""

    def __init__(self, place, rank: int):
        self.place, self.rank = place, rank
        self.step, self.weights = None, None

    def keep(self, step: int, model) -> None:
        import io

        import torch

        from engine.io.store import atomic_write_bytes

        self.step, self.weights = step, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.rank == 0:
            buffer = io.BytesIO()
            torch.save({"step": step, "weights": self.weights}, buffer)
            atomic_write_bytes(self.place, buffer.getvalue())

    def state(self, step: int) -> dict:
        """The weights of report `step`: this run's, or those saved before a kill."""
        import io

        import torch

        if self.step == step:
            return self.weights
        saved = torch.load(io.BytesIO(self.place.read_bytes()), weights_only=True)
        if saved["step"] != step:
            raise RuntimeError(f"{self.place} holds step {saved['step']}, the curve's best is step {step}")
        return saved["weights"]


class StudentTrainer:
    """This worker's part of a trainer's share of student jobs: the teacher loaded once (soft-label protocols), a
    distilled set read once per run of its jobs (a set's seeds run back to back), one result row per job."""

    def __init__(self, loop: LoopConfig, worker):
        from engine.evaluate.protocols import dataset_norm, get_protocol
        from engine.evaluate.train import load_teacher

        self.loop, self.worker = loop, worker
        self.evaluate = loop.config.evaluate
        self.protocol = get_protocol(self.evaluate.protocol)
        self.data_norm = dataset_norm(loop.val_set[0])  # the data's mean/std, from real validation images
        self.results_dir = location(loop.results_dir)
        self.teacher, self.teacher_top1 = None, None
        if self.protocol.soft_labels:  # on the worker's device: a CPU teacher crashed every GPU soft-label batch
            self.teacher = load_teacher(location(loop.teacher_path), self.evaluate.teacher, loop.num_classes,
                                        loop.config.data.image_size, self.evaluate.width, worker.device,
                                        self.evaluate)
            self.teacher_top1 = json.loads((self.results_dir / "teacher.json").read_text())["teacher_top1"]
        self._loaded = None  # (set folder, TrainSet) of the previous job

    def run(self) -> None:
        """Every job of the share not finished in an earlier (killed) run of the same config."""
        from engine.io.store import atomic_write_json

        for job in self.loop.jobs:
            files = JobFiles.of(self.results_dir, job)
            if files.result.exists():
                continue
            row = self.train_job(job)
            if self.worker.rank == 0:
                atomic_write_json(files.result, row)
                files.remove_temporary()
            self._progress(job, f"done, validation top-1 {row['val_top1']:.4f}, test top-1 {row['top1']:.4f} "
                                f"({row['seconds']:.0f} s)")

    def train_job(self, job: StudentJob) -> dict:
        """Train one job's student (resuming from its checkpoint) and score it -> its result row."""
        import torch

        start = time.perf_counter()
        files = JobFiles.of(self.results_dir, job)
        files.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        curve = json.loads(files.curve.read_text()) if files.curve.exists() else {}
        torch.manual_seed(job.seed)
        train = self._train_full if job.method == "full" else self._train_on_set
        best = BestOnValidation(files.best, self.worker.rank)
        student, images, epochs = train(job, self._reporting(job, files, curve, best))
        trained = getattr(student, "module", student)
        top1, val = held_out_top1(trained, self.worker, self.loop), val_top1(trained, self.loop)
        steps = sorted(curve, key=int)
        best_step = max(steps, key=lambda s: curve[s]) if steps else None  # the first of equal maxima
        top1_best = top1
        if best_step is not None and best_step != steps[-1]:
            trained.load_state_dict(best.state(int(best_step)))
            top1_best = held_out_top1(trained, self.worker, self.loop)
        chosen = top1_best if self.evaluate.select == "best_val" else top1
        return {**job.identity(), "top1": chosen, "select": self.evaluate.select, "top1_last": top1,
                "top1_best_val": top1_best, "best_val_step": int(best_step) if best_step else None,
                "val_top1": val, "teacher_top1": self.teacher_top1, "images": int(images), "epochs": epochs,
                "val_curve": [[int(step), curve[step]] for step in steps],
                "workers": self.worker.world, "seconds": round(time.perf_counter() - start, 2)}

    def _reporting(self, job: StudentJob, files: JobFiles, curve: dict, best: BestOnValidation):
        """Each report: progress and Tune's metric (early stopping, the best config) on a fixed slice of the
        validation split, never on test: every choice is made on val. The row's final top1 uses all of test."""
        import ray.train

        from engine.evaluate.train import Reporting
        from engine.faults import crash_once_if_requested
        from engine.io.store import atomic_write_json

        def report(step: int, model) -> None:
            val = val_top1(model, self.loop)
            if not curve or val > max(curve.values()):
                best.keep(step, model)  # before the curve names it: a resumed job finds the weights it names
            curve[str(step)] = val
            if self.worker.rank == 0:
                atomic_write_json(files.curve, curve)
            if self.loop.ray_reports:  # each report waits for Ray Train's 2-second poll: only when consumed
                ray.train.report({"job": job.name, "step": step, "val_top1": val})
            crash_once_if_requested(self.loop.fault_dir, "evaluate")  # tests: a kill after a checkpoint
            self._progress(job, f"step {step}, validation top-1 {val:.4f}")

        return Reporting(report, self.evaluate.reports, files.checkpoint)

    def _train_full(self, job: StudentJob, reporting) -> tuple:
        """`full`: the whole train split, streamed -> (student, images, epochs)."""
        from engine.evaluate.protocols import student_norm
        from engine.evaluate.train import Recipe, Stream, fit_stream, new_model, stream_steps, student_loss

        e, size = self.evaluate, self.loop.config.data.image_size
        rows = self.loop.train_rows // self.worker.world
        _, local = stream_steps(rows, e.batch_size, self.worker.world)
        model = new_model(job.student, self.loop.num_classes, size, e.width, self.worker,
                          student_norm(e, size, self.data_norm))
        # fkd's stored logits are the teacher's on each planned batch; a stream has no plan to store, so `full`
        # takes the same targets online (rded's way), the same numbers without a split's worth of logits.
        protocol = self._protocol_of(job)
        online = dataclasses.replace(protocol, stored_labels=False)
        student = fit_stream(model, Stream(stream_epochs(job.seed, local), rows, e.full_epochs),
                             Recipe(protocol, e, job.seed, self.data_norm), student_loss(online, self.teacher, e),
                             self.worker,
                             reporting)
        return student, self.loop.train_rows, e.full_epochs

    def _train_on_set(self, job: StudentJob, reporting) -> tuple:
        """A distilled set, read once per run of its jobs -> (student, images, epochs)."""
        from engine.evaluate.protocols import student_batch_size
        from engine.evaluate.train import Recipe, Targets, TrainSet, student_epochs, train_student
        from engine.io.store import read_distilled_set

        if self._loaded is None or self._loaded[0] != job.set_dir:
            self._loaded = (job.set_dir, TrainSet(*read_distilled_set(job.set_dir)))
        data, epochs = self._loaded[1], student_epochs(self.evaluate)
        batch = student_batch_size(self.evaluate, job.ipc, self.loop.num_classes)
        at_ipc = dataclasses.replace(self.evaluate, batch_size=batch)
        soft_labels = self._soft_labels(job, data, epochs, at_ipc) if self.protocol.stored_labels else None
        student = train_student(data, Targets(self.teacher, soft_labels), self.loop.num_classes, job.student, epochs,
                                Recipe(self._protocol_of(job), at_ipc, job.seed, self.data_norm), self.worker,
                                reporting)
        return student, len(data.labels), epochs

    def _protocol_of(self, job: StudentJob):
        """The protocol at the job's learning rate (evaluate.learning_rates; the protocol's own otherwise)."""
        return dataclasses.replace(self.protocol, learning_rate=job.protocol_rate())

    def _soft_labels(self, job: StudentJob, data, epochs: int, evaluate):
        """FKD labels of one (set, seed): generated once by rank 0, stored in chunks, replayed by every student."""
        import torch

        from engine.evaluate.train import SoftLabels, generate_soft_labels

        folder = self.results_dir / "soft_labels" / f"{job.set_name}-seed{job.seed}"
        if not SoftLabels.complete(folder) and self.worker.rank == 0:
            generate_soft_labels(data, self.teacher, epochs, evaluate, job.seed, folder)
        if self.worker.world > 1:
            torch.distributed.barrier()  # the other ranks read what rank 0 wrote
        return SoftLabels(folder)

    def _progress(self, job: StudentJob, message: str) -> None:
        number = self.loop.jobs.index(job) + 1
        progress(self.loop, self.worker, f"{number}/{len(self.loop.jobs)} {job.name}: {message}")
