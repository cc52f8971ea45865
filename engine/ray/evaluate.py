"""The evaluate stage: a teacher phase (the teacher given, cached or trained once, and its held-out top-1), then
the student jobs spread over `runtime.concurrent_trainers` Ray Train TorchTrainers running side by side.

Where the data lives: the real splits (the teacher's and `full`'s training, every held-out top-1) stream from the
source through Ray Data into the trainers (`datasets=`, uint8 on the wire, decoded by Ray Data tasks, augmented on
each worker's device): no process holds a split. A distilled set (IPC x classes images) is read by the worker that
trains on it, once per run of consecutive jobs on that set, and stays uint8. Intermediate reports (progress,
Tune's early stopping and best config) score a bounded slice of the validation split (VAL_IMAGES rows of val,
carved from train: engine/data/splits.py; taken once by the driver), as does each result row's `val_top1`; the test
split is read only for each row's final `top1`. Every job writes one result file; checkpoints at its reports let
a killed or restarted trainer resume mid-job, and finished jobs are never redone.

This module is the driver's side: the teacher phase's and the students' entry points, the inputs every trainer of
a results folder shares, the trainers launched. The worker loop is engine/ray/train_loop.py, the jobs and their
split over trainers engine/ray/jobs.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from engine.config import DistillConfig, EvaluateConfig
from engine.io.location import location, ray_storage
from engine.ray.jobs import StudentJob
from engine.ray.train_loop import LoopConfig, norm_record

VAL_IMAGES = 1000  # validation images scored at each report and for each row's val_top1 (the top1 uses all of test)


def held_out_streams(config: DistillConfig) -> bool:
    """Whether the test split is streamed to the trainers (larger than VAL_IMAGES) rather than taken into memory."""
    from engine.data.sources import count_rows

    return count_rows(config.data, "test") > VAL_IMAGES  # footers or a listing: no test row is read here


def _fit(loop: LoopConfig, datasets: dict, callbacks=()) -> None:
    """One trainer (Ray Train TorchTrainer) running the worker loop over `datasets` to its end."""
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.ray.train_loop import run_worker

    config, runtime = loop.config, loop.config.runtime
    # The streams' blocks in the source's order, whatever order their read tasks finish in: with the seeded local
    # shuffle on top, a seed fixes every batch a one-worker trainer reads, so a job resumed after a kill reads what
    # the unbroken job read. Ray Train replaces each dataset's own options with these; left to its default it
    # copied the driver's, ordered only if an encode or decode stage had run in this process first (a resumed
    # `full` job once came out 0.3 points off its unbroken twin on a busy machine).
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    TorchTrainer(
        run_worker,
        train_loop_config={"loop": loop},
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
        scaling_config=ScalingConfig(num_workers=runtime.train_workers, use_gpu=runtime.train_use_gpu,
                                     resources_per_worker={"CPU": runtime.train_cpus_per_worker}),
        # A failed worker group restarts; jobs resume from their checkpoints and finished jobs are skipped.
        run_config=RunConfig(name=loop.name, **ray_storage(config.run_dir / "ray_train"),
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


def stream_skip_dir(results_dir):
    """Where the streams record rows they could not decode (the encode stage counted them)."""
    return location(results_dir) / "stream-skipped"


def _stream_inputs(config: DistillConfig, results_dir, teacher_path, train_rows: int) -> tuple[LoopConfig, dict]:
    """What every trainer of a results folder shares: (its loop config, for the students' phase until a caller
    replaces fields; {"test": the test stream} or {} when the whole test split is no larger than VAL_IMAGES: then it
    is taken into memory, for the final rows only). The validation slice is the first VAL_IMAGES rows of val in the
    source's order: the same rows every time."""
    from engine.data.sources import class_names

    skip_dir = stream_skip_dir(results_dir)
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
    base = LoopConfig(config=config, phase="students", name="evaluate", threads=config.runtime.threads("train"),
                      results_dir=str(results_dir), teacher_path=str(teacher_path), train_rows=int(train_rows),
                      num_classes=len(class_names(config.data)), val_set=(val["image"], val["label"]),
                      test_set=test_set, fault_dir=str(config.run_dir))
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
    from engine.evaluate.protocols import teacher_norm
    from engine.io.store import atomic_write_bytes
    from engine.ray.jobs import teacher_threads

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
        loop = dataclasses.replace(base, phase="teacher", name="evaluate-teacher", threads=teacher_threads(config))
        _fit(loop, held_out if given else
             {**held_out, "train": split_stream(config, "train", stream_skip_dir(results_dir))})
        if cached:
            atomic_write_bytes(beside, scored.read_bytes())
    record = json.loads(scored.read_text())
    check_teacher(config.evaluate, record, log)
    return record["teacher_top1"]


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
    from engine.config import RunError

    val_top1, scale = record["teacher_val_top1"], record.get("input_norm", {})
    log(f"teacher {evaluate.teacher} ({record['teacher']}): validation top-1 {val_top1:.4f}, test top-1 "
        f"{record['teacher_top1']:.4f}, input mean {scale.get('mean')} std {scale.get('std')}")
    if val_top1 < evaluate.min_teacher_top1:
        raise RunError(f"the teacher {record['teacher']} scores {val_top1:.1%} validation top-1, below "
                       f"evaluate.min_teacher_top1 = {evaluate.min_teacher_top1:.1%}, so no student is trained on "
                       f"its labels: check evaluate.teacher_path and its input scale (mean {scale.get('mean')}, std "
                       f"{scale.get('std')}; evaluate.teacher_mean / teacher_std set it).")


@contextlib.contextmanager
def watch_results(results_dir, jobs: list[StudentJob], log, every_s: float = 10.0):
    """A line on the console for each job as its result file lands (`student <name>: test top-1 ..., n/N after m
    min`), from the driver: the workers' own progress lines reach only Ray's log files unless --verbose, and a
    student set can train for hours."""
    pending, started, stop = list(jobs), time.monotonic(), threading.Event()

    def sweep() -> None:
        for job in list(pending):
            path = results_dir / f"{job.name}.json"
            if not path.exists():
                continue
            try:  # the engine writes it atomically; a file that cannot be read yet is read on the next sweep
                row = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pending.remove(job)
            log(f"student {job.name}: test top-1 {100 * row['top1']:.1f} %, {len(jobs) - len(pending)}/"
                f"{len(jobs)} after {(time.monotonic() - started) / 60:.1f} min")

    def watch() -> None:
        while pending and not stop.wait(every_s):
            sweep()

    watcher = threading.Thread(target=watch, name="watch-results", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        sweep()  # the last ones, once every trainer is done


def evaluate_students(config: DistillConfig, jobs: list[StudentJob], teacher_path, results_dir, train_rows: int,
                      callbacks=(), log=print) -> list[dict]:
    """Train every job's student -> the result rows (one JSON file per job). `train_rows`: rows of the train split
    (the encode stage's count; it sizes the streamed schedules). `callbacks`: Ray Train callbacks, e.g.
    TuneReportCallback when a Tune trial runs the evaluation: then every report also goes through
    `ray.train.report` (one trainer, so Tune sees one stream of reports). Without a consumer the reports are
    progress lines only: a `ray.train.report` blocks until the controller's next poll (2 s), which made every
    digits student take 10 s whatever its size."""
    from engine.evaluate.protocols import get_protocol
    from engine.ray.jobs import capacity_words, share_jobs, trainer_count

    results_dir = location(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not (results_dir / f"{job.name}.json").exists()]
    if todo and get_protocol(config.evaluate.protocol).soft_labels:
        prepare_teacher(config, teacher_path, results_dir, train_rows, log)
    if todo:
        base, held_out = _stream_inputs(config, results_dir, teacher_path, train_rows)
        # The train split streams for `full`, the test split for every job's final top-1 when it is not in memory.
        streams = bool(held_out) or any(job.method == "full" for job in todo)
        trainers = 1 if callbacks else trainer_count(config, len(todo), streams=streams)
        shares = share_jobs(config, todo, trainers, train_rows)
        log(f"{len(todo)} student jobs on {len(shares)} trainer(s) side by side "
            f"({config.runtime.train_workers} worker(s) each; {capacity_words()})")
        errors: list[Exception] = []
        lock = threading.Lock()

        def run_share(index: int, share: list[StudentJob]) -> None:
            datasets = dict(held_out)
            if any(job.method == "full" for job in share):
                datasets["train"] = split_stream(config, "train", stream_skip_dir(results_dir))
            loop = dataclasses.replace(base, name=f"evaluate-{index}", jobs=tuple(share),
                                       ray_reports=bool(callbacks))
            try:
                _fit(loop, datasets, callbacks)
            except Exception as error:  # every trainer finishes its share; the first failure is raised after
                with lock:
                    errors.append(error)

        with watch_results(results_dir, todo, log), ThreadPoolExecutor(max_workers=len(shares)) as pool:
            list(pool.map(run_share, range(len(shares)), shares))
        if errors:
            raise errors[0]
    return [json.loads((results_dir / f"{job.name}.json").read_text()) for job in jobs]
