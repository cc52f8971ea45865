"""The evaluate stage: a teacher phase (the teacher given, cached or trained once, and its held-out top-1), then
the student jobs spread over `runtime.concurrent_trainers` Ray Train TorchTrainers running side by side.

Where the data lives: the real splits (the teacher's and `full`'s training, every held-out top-1) stream from the
source through Ray Data into the trainers (`datasets=`, uint8 on the wire, decoded by Ray Data tasks, augmented on
each worker's device): no process holds a split. A distilled set (IPC x classes images) is read by the worker that
trains on it, once per run of consecutive jobs on that set, and stays uint8. Intermediate reports (progress,
Tune's early stopping and best config) score a bounded slice of the validation split (VAL_IMAGES rows of val,
carved from train: engine/splits.py; taken once by the driver), as does each result row's `val_top1`; the test
split is read only for each row's final `top1`. Every job writes one result file; checkpoints at its reports let
a killed or restarted trainer resume mid-job, and finished jobs are never redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from engine.config import DistillConfig, EvaluateConfig
from engine.location import location, ray_storage

VAL_IMAGES = 1000  # validation images scored at each report and for each row's val_top1 (the top1 uses all of test)


def held_out_streams(config: DistillConfig) -> bool:
    """Whether the test split is streamed to the trainers (larger than VAL_IMAGES) rather than taken into memory."""
    from engine.sources import count_rows

    return count_rows(config.data, "test") > VAL_IMAGES  # footers or a listing: no test row is read here


def _loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: phase "teacher" (train or load it, score it) or "students" (each job of
    this trainer's share not finished yet)."""
    import logging

    import ray.train
    import ray.train.torch
    import torch
    from ray.train.v2._internal.execution import context as train_context

    from engine.train import Worker

    # One progress line per report is printed below; Ray Train's own log line for every report is noise.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    torch.set_num_threads(loop_config["threads"])
    context = ray.train.get_context()
    worker = Worker(context.get_world_rank(), context.get_world_size(), ray.train.torch.prepare_model,
                    ray.train.torch.get_device())
    if loop_config["phase"] == "teacher":
        _teacher_phase(loop_config, worker)
    else:
        _student_phase(loop_config, worker)


def _progress(loop_config: dict, worker, message: str) -> None:
    """One line from rank 0, straight to the process's stdout (Ray forwards it to the driver): Ray Train's patched
    print would send it through the logging handlers too, and every line would arrive twice."""
    if worker.rank == 0:
        sys.__stdout__.write(f"[evaluate {time.strftime('%H:%M:%S')} {loop_config['name']}] {message}\n")
        sys.__stdout__.flush()


def _held_out_top1(model, worker, precision: str, loop_config: dict) -> float:
    """Top-1 on the whole test split, streamed: each worker scores its shard, the counts are summed. A test split
    of at most VAL_IMAGES rows was taken into memory by the driver (the embedded digits' 360)."""
    import ray.train
    import torch

    from engine.train import count_correct

    if loop_config["test_set"] is not None:
        images, labels = loop_config["test_set"]
        return count_correct(model, [(images, labels)], precision)[0] / max(1, len(labels))

    shard = ray.train.get_dataset_shard("test")
    batches = ((b["image"], b["label"]) for b in shard.iter_torch_batches(batch_size=512))
    correct, seen = count_correct(model, batches, precision)
    if worker.world > 1:
        counts = torch.tensor([correct, seen], dtype=torch.float64, device=worker.device)
        torch.distributed.all_reduce(counts)
        correct, seen = int(counts[0]), int(counts[1])
    return correct / max(1, seen)


def _stream_epochs(seed: int, local_batch: int):
    """epoch -> this worker's shard of the train split, reshuffled (seeded by epoch) within a local buffer."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int):
        return shard.iter_torch_batches(batch_size=local_batch, local_shuffle_buffer_size=max(4 * local_batch, 1024),
                                        local_shuffle_seed=seed * 100_003 + epoch)

    return epoch_batches


def _teacher_phase(loop_config: dict, worker) -> None:
    from safetensors.torch import save as to_safetensors_bytes

    from engine.protocols import input_norm_of, teacher_norm
    from engine.store import atomic_write_bytes, atomic_write_json
    from engine.train import (Reporting, Stream, fit_stream, load_teacher, new_model, steady_images_per_s,
                              stream_steps, teacher_loss, teacher_recipe, timed_epochs)

    config: DistillConfig = loop_config["config"]
    e = config.evaluate
    teacher_path = location(loop_config["teacher_path"])
    num_classes, size = loop_config["num_classes"], config.data.image_size
    facts = {}
    if teacher_path.exists():
        teacher = load_teacher(teacher_path, e.teacher, num_classes, size, e.width, worker.device, e)
    else:
        import torch

        torch.manual_seed(0)
        model = new_model(e.teacher, num_classes, size, e.width, worker, teacher_norm(e, size))
        rows = loop_config["train_rows"] // worker.world
        steps, local = stream_steps(rows, e.batch_size, worker.world)

        def report(step: int, net) -> None:
            _progress(loop_config, worker, f"teacher {e.teacher}: step {step}/{steps * e.teacher_epochs}")

        start, epoch_s = time.perf_counter(), []
        # Named by the teacher (its cache key is its recipe): a folder re-used with other teacher settings never
        # resumes the old teacher's run.
        checkpoint = location(loop_config["results_dir"]) / "checkpoints" / f"{teacher_path.name}.pt"
        stream = Stream(timed_epochs(_stream_epochs(0, local), epoch_s), rows, e.teacher_epochs)
        model = fit_stream(model, stream, teacher_recipe(e), teacher_loss, worker,
                           Reporting(report, min(e.reports, e.teacher_epochs), checkpoint))
        # Streamed training throughput over every worker's rows (a run resumed mid-way overstates it).
        facts["train_images_per_s"] = rows * worker.world * e.teacher_epochs / (time.perf_counter() - start)
        # Per epoch (this run's epochs only): the first also starts the stream's workers; the rest are its rate.
        facts["epoch_s"] = [round(t, 3) for t in epoch_s]
        facts["steady_images_per_s"] = steady_images_per_s(rows * worker.world, epoch_s)
        teacher = getattr(model, "module", model)
        if worker.rank == 0:
            atomic_write_bytes(teacher_path, to_safetensors_bytes(teacher.state_dict()))
    top1 = _held_out_top1(teacher, worker, e.precision, loop_config)
    val_top1 = _val_top1(teacher, loop_config)
    _progress(loop_config, worker, f"teacher {e.teacher}: validation top-1 {val_top1:.4f}, test top-1 {top1:.4f}")
    if worker.rank == 0:
        atomic_write_json(location(loop_config["results_dir"]) / "teacher.json",
                          {"teacher": teacher_path.name, "teacher_top1": top1, "teacher_val_top1": val_top1,
                           "input_norm": norm_record(input_norm_of(teacher)), **facts})


def _val_top1(model, loop_config: dict) -> float:
    """Top-1 on the validation slice every report scores (each rank holds it; no reduction needed)."""
    from engine.train import evaluate_top1

    return evaluate_top1(model, *loop_config["val_set"])


def _student_phase(loop_config: dict, worker) -> None:
    import ray.train
    import torch

    from engine.sources import class_names
    from engine.faults import crash_once_if_requested
    from engine.protocols import get_protocol, student_norm
    from engine.store import atomic_write_json, read_distilled_set
    from engine.train import (Recipe, Reporting, Stream, Targets, TrainSet, fit_stream, load_teacher, new_model,
                              stream_steps, student_epochs, student_loss, student_recipe, train_student)

    config: DistillConfig = loop_config["config"]
    e = config.evaluate
    protocol = get_protocol(e.protocol)
    num_classes = len(class_names(config.data))
    results_dir = location(loop_config["results_dir"])
    teacher, teacher_top1 = None, None
    if protocol.soft_labels:  # on the worker's device: a CPU teacher crashed every GPU soft-label batch
        teacher = load_teacher(location(loop_config["teacher_path"]), e.teacher, num_classes,
                               config.data.image_size, e.width, worker.device, e)
        teacher_top1 = json.loads((results_dir / "teacher.json").read_text())["teacher_top1"]

    jobs = loop_config["jobs"]
    loaded: tuple[str, TrainSet] | None = None  # the set of the previous job: a set's seeds run back to back
    for number, job in enumerate(jobs, 1):
        result_path = results_dir / f"{job['job']}.json"
        if result_path.exists():  # finished in an earlier (killed) run of the same config
            continue
        start = time.perf_counter()
        checkpoint = results_dir / "checkpoints" / f"{job['job']}.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        # The validation curve ({step: val top-1}) is kept beside the checkpoint, so a resumed job's row still
        # holds the reports before its kill; a replayed step reports the same figure again.
        curve_path = checkpoint.parent / f"{job['job']}.curve.json"
        curve = json.loads(curve_path.read_text()) if curve_path.exists() else {}

        def report(step: int, model, job=job, number=number, curve=curve, curve_path=curve_path):
            # Progress and Tune's metric (early stopping, the best config) on a fixed slice of the validation
            # split, never on test: every choice is made on val. The row's final top1 uses all of test.
            val_top1 = _val_top1(model, loop_config)
            curve[str(step)] = val_top1
            if worker.rank == 0:
                atomic_write_json(curve_path, curve)
            if loop_config["ray_reports"]:  # each report waits for Ray Train's 2-second poll: only when consumed
                ray.train.report({"job": job["job"], "step": step, "val_top1": val_top1})
            crash_once_if_requested(loop_config["fault_dir"], "evaluate")  # tests: a kill after a checkpoint
            _progress(loop_config, worker, f"{number}/{len(jobs)} {job['job']}: step {step}, "
                                           f"validation top-1 {val_top1:.4f}")

        torch.manual_seed(job["seed"])
        if job["method"] == "full":  # the whole train split, streamed
            epochs = e.full_epochs
            rows = loop_config["train_rows"] // worker.world
            _, local = stream_steps(rows, e.batch_size, worker.world)
            model = new_model(job["student"], num_classes, config.data.image_size, e.width, worker,
                              student_norm(e, config.data.image_size))
            # fkd's stored logits are the teacher's on each planned batch; a stream has no plan to store, so `full`
            # takes the same targets online (rded's way), the same numbers without a split's worth of logits.
            online = dataclasses.replace(protocol, stored_labels=False)
            student = fit_stream(model, Stream(_stream_epochs(job["seed"], local), rows, epochs),
                                 Recipe(protocol, e, job["seed"]), student_loss(online, teacher, e), worker,
                                 Reporting(report, e.reports, checkpoint))
            images = loop_config["train_rows"]
        else:
            if loaded is None or loaded[0] != job["set_dir"]:
                loaded = (job["set_dir"], TrainSet(*read_distilled_set(job["set_dir"])))
            data, epochs = loaded[1], student_epochs(e)
            at_ipc = dataclasses.replace(e, batch_size=e.batch_size_at(job["ipc"]))  # RDED's batch grows with IPC
            soft_labels = _soft_labels(results_dir, job, data, teacher, epochs, at_ipc, worker) \
                if protocol.stored_labels else None
            student = train_student(data, Targets(teacher, soft_labels), num_classes, job["student"], epochs,
                                    student_recipe(at_ipc, job["seed"]), worker,
                                    Reporting(report, e.reports, checkpoint))
            images = len(data.labels)
        trained = getattr(student, "module", student)
        top1, val_top1 = _held_out_top1(trained, worker, e.precision, loop_config), _val_top1(trained, loop_config)
        row = {**{k: job[k] for k in ("method", "weights", "ipc", "protocol", "student", "teacher", "seed")},
               "top1": top1, "val_top1": val_top1, "teacher_top1": teacher_top1, "images": int(images),
               "epochs": epochs, "val_curve": [[int(step), curve[step]] for step in sorted(curve, key=int)],
               "workers": worker.world, "seconds": round(time.perf_counter() - start, 2)}
        if worker.rank == 0:
            atomic_write_json(result_path, row)
            checkpoint.unlink(missing_ok=True)
            curve_path.unlink(missing_ok=True)
        _progress(loop_config, worker, f"{number}/{len(jobs)} {job['job']}: done, validation top-1 {val_top1:.4f}, "
                                       f"test top-1 {top1:.4f} ({row['seconds']:.0f} s)")


def _soft_labels(results_dir, job: dict, data, teacher, epochs: int, evaluate, worker):
    """FKD labels of one (set, seed): generated once by rank 0, stored in chunks, replayed by every student."""
    import torch

    from engine.train import SoftLabels, generate_soft_labels

    folder = results_dir / "soft_labels" / f"{job['set']}-seed{job['seed']}"
    if not SoftLabels.complete(folder) and worker.rank == 0:
        generate_soft_labels(data, teacher, epochs, evaluate, job["seed"], folder)
    if worker.world > 1:
        torch.distributed.barrier()  # the other ranks read what rank 0 wrote
    return SoftLabels(folder)


def trainer_count(config: DistillConfig, jobs: int, streams: bool) -> int:
    """How many trainers run side by side: the config's, or as many as the cluster's GPUs or CPUs hold at its
    largest (an autoscaling cluster counts the nodes it may add, not those alive when the stage starts: at zero
    GPU workers that was one trainer for 54 jobs), leaving the stream's Ray Data tasks their CPU, never more than
    the jobs. A count that cannot fit on a fixed one-node Ray is refused: the trainers would wait for each other's
    CPUs and the stream's tasks would never run."""
    import ray

    from engine.checks import RunError
    from engine.ray.cluster import cluster_capacity, stage_resources

    runtime = config.runtime
    capacity = cluster_capacity()
    stages = stage_resources(config)
    fits = stages.trainers_fitting(capacity.cpus, capacity.gpus, streams)
    count = runtime.concurrent_trainers or max(1, fits)
    one_node = not capacity.autoscaled and len([n for n in ray.nodes() if n.get("Alive")]) == 1
    if one_node and count > max(fits, 0):
        spare = stages.stream_cpus if streams else 0.0
        raise RunError(f"{count} trainer(s) x {runtime.train_workers} worker(s) x {runtime.train_cpus_per_worker:g} "
                       f"CPU (+{spare:g} for the data stream) do not fit in {capacity.cpus:g} CPUs: lower "
                       f"runtime.concurrent_trainers or runtime.train_cpus_per_worker (a fraction is fine: "
                       f"runtime.train_threads_per_worker sets the threads)")
    return max(1, min(count, jobs))


def teacher_threads(config: DistillConfig) -> int:
    """The teacher trains alone before the students: its worker takes the threads of the trainers its node would
    hold (all of a one-node Ray's, as before), never those of nodes an autoscaler may add."""
    from engine.ray.cluster import largest_node, stage_resources

    runtime = config.runtime
    node = largest_node()
    fits = max(1, stage_resources(config).trainers_fitting(node.get("CPU", 0.0), node.get("GPU", 0.0), streams=True))
    return runtime.threads("train") * min(runtime.concurrent_trainers or fits, fits)


def capacity_words() -> str:
    """Where the trainer count came from, for the log."""
    from engine.ray.cluster import cluster_capacity

    capacity = cluster_capacity()
    where = "the autoscaler's largest cluster" if capacity.autoscaled else "alive now"
    return f"{capacity.gpus:g} GPU(s), {capacity.cpus:g} CPU(s) {where}"


def job_cost(config: DistillConfig, job: dict, train_rows: int) -> int:
    """Training steps of a job (its relative cost): the set's size x epochs in batches."""
    from engine.sources import class_names
    from engine.train import epochs_to_steps, student_epochs

    e = config.evaluate
    if job["method"] == "full":
        return epochs_to_steps(train_rows, e.full_epochs, e.batch_size)
    images = job["ipc"] * len(class_names(config.data))
    return epochs_to_steps(images, student_epochs(e), e.batch_size_at(job["ipc"]))


def share_jobs(config: DistillConfig, jobs: list[dict], trainers: int, train_rows: int) -> list[list[dict]]:
    """Longest job first onto the least loaded trainer (balanced finish times); within a trainer, jobs of one
    set back to back (the set is read once)."""
    shares: list[list[dict]] = [[] for _ in range(trainers)]
    loads = [0] * trainers
    for job in sorted(jobs, key=lambda j: -job_cost(config, j, train_rows)):
        least = loads.index(min(loads))
        shares[least].append(job)
        loads[least] += job_cost(config, job, train_rows)
    order = {job["job"]: i for i, job in enumerate(jobs)}
    return [sorted(share, key=lambda j: (j["set"], order[j["job"]])) for share in shares if share]


def _fit(config: DistillConfig, name: str, loop_config: dict, datasets: dict, callbacks=()) -> None:
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    runtime = config.runtime
    # The streams' blocks in the source's order, whatever order their read tasks finish in: with the seeded local
    # shuffle on top, a seed fixes every batch a one-worker trainer reads, so a job resumed after a kill reads what
    # the unbroken job read. Ray Train replaces each dataset's own options with these; left to its default it
    # copied the driver's, ordered only if an encode or decode stage had run in this process first (a resumed
    # `full` job once came out 0.3 points off its unbroken twin on a busy machine).
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    TorchTrainer(
        _loop,
        train_loop_config={**loop_config, "config": config, "name": name, "threads": loop_config.get(
            "threads", runtime.threads("train"))},
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
        scaling_config=ScalingConfig(num_workers=runtime.train_workers, use_gpu=runtime.train_use_gpu,
                                     resources_per_worker={"CPU": runtime.train_cpus_per_worker}),
        # A failed worker group restarts; jobs resume from their checkpoints and finished jobs are skipped.
        run_config=RunConfig(name=name, **ray_storage(config.run_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=2), callbacks=list(callbacks)),
    ).fit()


@contextlib.contextmanager
def quiet_streams(ordered: bool = False):
    """The evaluation's datasets are iterated once per job and epoch: without this, every pass prints Ray Data's
    progress bars and plan. The per-job progress lines say what is happening instead. `ordered`: rows come in the
    source's order, not in the order its tasks finish (the validation slice must be the same rows in every run
    and every sweep trial, or trials would be ranked on different images)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    options = context.execution_options
    saved = context.enable_progress_bars, context.print_on_execution_start, options.preserve_order
    context.enable_progress_bars, context.print_on_execution_start = False, False
    options.preserve_order = ordered or options.preserve_order
    try:
        yield  # datasets made here keep a copy of the quiet context
    finally:
        context.enable_progress_bars, context.print_on_execution_start, options.preserve_order = saved


def _stream_inputs(config: DistillConfig, results_dir, teacher_path, train_rows: int) -> tuple[dict, dict]:
    """What every trainer of a results folder shares: (loop config base, {"test": the test stream} or {} when
    the whole test split is no larger than VAL_IMAGES: then it is taken into memory, for the final rows only).
    The validation slice is the first VAL_IMAGES rows of val in the source's order: the same rows every time."""
    skip_dir = results_dir / "stream-skipped"  # rows the stream could not decode (the encode stage counted them)
    val = split_stream(config, "val", skip_dir, ordered=True).limit(VAL_IMAGES).take_batch(VAL_IMAGES,
                                                                                       batch_format="numpy")
    if len(val["label"]) == 0:
        raise ValueError(f"the validation split of {config.data.name} is empty: raise data.val_fraction "
                         f"(now {config.data.val_fraction})")
    test = split_stream(config, "test", skip_dir)
    small = not held_out_streams(config)
    test_set = None
    if small:
        rows = test.take_batch(VAL_IMAGES, batch_format="numpy")
        test_set = (rows["image"], rows["label"])
    base = {"results_dir": str(results_dir), "teacher_path": str(teacher_path), "train_rows": int(train_rows),
            "val_set": (val["image"], val["label"]), "test_set": test_set, "skip_dir": str(skip_dir),
            "fault_dir": str(config.run_dir)}  # test-only crash injection (engine/faults.py)
    return base, ({} if small else {"test": test})


def split_stream(config: DistillConfig, split: str, skip_dir, ordered: bool = False):
    """A split as a quiet stream of {image, label} rows (decode tasks of STREAM_TASK_CPUS); `ordered`: in the
    source's row order (quiet_streams)."""
    from engine.ray.cluster import STREAM_TASK_CPUS
    from engine.ray.source import source_dataset

    with quiet_streams(ordered):
        return source_dataset(config.data, skip_dir=skip_dir, split=split, task_cpus=STREAM_TASK_CPUS,
                              columns=("image", "label"))


def prepare_teacher(config: DistillConfig, teacher_path, results_dir, train_rows: int, log=print) -> float:
    """The teacher phase, once per results folder: load `teacher_path` or train it there on the streamed train
    split (alone on the cluster, so its workers take the threads the student trainers will share), then score it
    on the held-out split -> its top-1 (also in results_dir/teacher.json). A teacher this engine trained keeps its
    score beside it (`<teacher>.json`: its cache key fixes the data, so the held-out split too), so a later run or
    a sweep's trial copies it instead of starting a trainer to score it again. A figure scored at another input
    scale (evaluate.teacher_mean/std changed) is scored again. Stops the run when the validation top-1 is below
    evaluate.min_teacher_top1 (`check_teacher`)."""
    from engine.sources import class_names
    from engine.protocols import teacher_norm
    from engine.store import atomic_write_bytes

    results_dir = location(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    scored = results_dir / "teacher.json"
    beside = location(teacher_path).with_name(location(teacher_path).name + ".json")
    cached = not config.evaluate.teacher_path  # the engine's own cache, not a user's file
    norm = teacher_norm(config.evaluate, config.data.image_size)
    if not scores(scored, teacher_path, norm) and cached and scores(beside, teacher_path, norm) \
            and location(teacher_path).exists():
        atomic_write_bytes(scored, beside.read_bytes())
    if not scores(scored, teacher_path, norm):
        base, held_out = _stream_inputs(config, results_dir, teacher_path, train_rows)
        given = location(teacher_path).exists()
        log(f"teacher {config.evaluate.teacher}: {'loaded' if given else 'training on the streamed train split'}")
        threads = teacher_threads(config)
        loop = {**base, "phase": "teacher", "num_classes": len(class_names(config.data)), "threads": threads}
        _fit(config, "evaluate-teacher", loop, held_out if given else
             {**held_out, "train": split_stream(config, "train", location(base["skip_dir"]))})
        if cached:
            atomic_write_bytes(beside, scored.read_bytes())
    record = json.loads(scored.read_text())
    check_teacher(config.evaluate, record, log)
    return record["teacher_top1"]


def norm_record(norm) -> dict:
    """An InputNorm as teacher.json keeps it."""
    return {"mean": [float(m) for m in norm.mean], "std": [float(s) for s in norm.std]}


def scores(record, teacher_path, norm=None) -> bool:
    """Whether a teacher.json holds this teacher's figures (at input scale `norm`, when given): a folder re-used
    with other teacher settings (another cache key) scores the new teacher instead of reporting the old one's
    top-1, and a teacher given another mean/std is scored again at it."""
    record = location(record)
    if not record.exists():
        return False
    figures = json.loads(record.read_text())
    same_scale = norm is None or figures.get("input_norm") == norm_record(norm)
    return figures.get("teacher") == location(teacher_path).name and same_scale


def check_teacher(evaluate: EvaluateConfig, record: dict, log=print) -> None:
    """Log the teacher's validation top-1 before any student learns from it, and stop the run when it is below
    evaluate.min_teacher_top1: a teacher fed inputs at the wrong scale labels every batch badly without an error."""
    from engine.checks import RunError

    val_top1, scale = record["teacher_val_top1"], record.get("input_norm", {})
    log(f"teacher {evaluate.teacher} ({record['teacher']}): validation top-1 {val_top1:.4f}, test top-1 "
        f"{record['teacher_top1']:.4f}, input mean {scale.get('mean')} std {scale.get('std')}")
    if val_top1 < evaluate.min_teacher_top1:
        raise RunError(f"the teacher {record['teacher']} scores {val_top1:.1%} validation top-1, below "
                       f"evaluate.min_teacher_top1 = {evaluate.min_teacher_top1:.1%}, so no student is trained on "
                       f"its labels: check evaluate.teacher_path and its input scale (mean {scale.get('mean')}, std "
                       f"{scale.get('std')}; evaluate.teacher_mean / teacher_std set it).")


def evaluate_students(config: DistillConfig, jobs: list[dict], teacher_path, results_dir, train_rows: int,
                      callbacks=(), log=print) -> list[dict]:
    """Train every job's student -> the result rows (one JSON file per job). `train_rows`: rows of the train split
    (the encode stage's count; it sizes the streamed schedules). `callbacks`: Ray Train callbacks, e.g.
    TuneReportCallback when a Tune trial runs the evaluation: then every report also goes through
    `ray.train.report` (one trainer, so Tune sees one stream of reports). Without a consumer the reports are
    progress lines only: a `ray.train.report` blocks until the controller's next poll (2 s), which made every
    digits student take 10 s whatever its size."""
    from engine.protocols import get_protocol

    results_dir = location(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not (results_dir / f"{job['job']}.json").exists()]
    if todo and get_protocol(config.evaluate.protocol).soft_labels:
        prepare_teacher(config, teacher_path, results_dir, train_rows, log)
    if todo:
        base, held_out = _stream_inputs(config, results_dir, teacher_path, train_rows)
        # The train split streams for `full`, the test split for every job's final top-1 when it is not in memory.
        streams = bool(held_out) or any(job["method"] == "full" for job in todo)
        trainers = 1 if callbacks else trainer_count(config, len(todo), streams=streams)
        shares = share_jobs(config, todo, trainers, train_rows)
        log(f"{len(todo)} student jobs on {len(shares)} trainer(s) side by side "
            f"({config.runtime.train_workers} worker(s) each; {capacity_words()})")
        errors: list[Exception] = []
        lock = threading.Lock()

        def run_share(index: int, share: list[dict]) -> None:
            datasets = dict(held_out)
            if any(job["method"] == "full" for job in share):
                datasets["train"] = split_stream(config, "train", location(base["skip_dir"]))
            try:
                _fit(config, f"evaluate-{index}", {**base, "phase": "students", "jobs": share,
                                                   "ray_reports": bool(callbacks)}, datasets, callbacks)
            except Exception as error:  # every trainer finishes its share; the first failure is raised after
                with lock:
                    errors.append(error)

        with ThreadPoolExecutor(max_workers=len(shares)) as pool:
            list(pool.map(run_share, range(len(shares)), shares))
        if errors:
            raise errors[0]
    return [json.loads((results_dir / f"{job['job']}.json").read_text()) for job in jobs]
