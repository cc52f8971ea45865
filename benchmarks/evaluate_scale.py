"""The evaluation at scale, measured side by side: (a) streamed training vs a bare loop over the same data in memory,
(b) peak RSS of the Ray Train workers at N/4 and N images, (c) student jobs/hour with 1 vs 2 trainers at once.

    python benchmarks/evaluate_scale.py [--classes 100] [--per-class 260] [--resolution 32] [--epochs 3]

(a), (b): the rehearsal dataset (benchmarks/imagenet_like.py: procedural JPEGs in HF parquet shards, cached in
~/.cache/ddoq/), `--classes` classes at N and a quarter of them at N/4. Each size trains the teacher
(ConvNet-3) for `--epochs` epochs in a child process (jobs-free evaluate stage: engine.pipeline.prepare_teacher),
the train split streamed from parquet through Ray Data into one Ray Train worker; every process it starts is
sampled from /proc for its peak RSS (as benchmarks/scale.py does). The bare loop: the N split decoded into
this process first, then the same model, batch, threads and epochs through the same loop (engine.evaluate.train.fit_stream)
over in-memory batches. (a) is read per epoch: the first (which also starts the stream's read and decode workers)
apart from the steady state of the rest; `stream_vs_memory` is the steady-state ratio, the overall one beside it.
(c): the student jobs of `make distill` itself (configs/digits.yaml: 6 sets x IPC 1 and 10 x 3 seeds, and `full` x 3
seeds: 39 jobs, rded, the teacher cached), on one trainer of 2 threads vs on 2 trainers of 1 thread each, on this
machine's 2 cores. The sets come from one `--until baselines` run of the default config (cached in the same folder).
Last line: stream_vs_memory=.. rss_ratio_worker=.. concurrent_speedup=..
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import imagenet_like  # noqa: E402
import scale  # noqa: E402

WORK = Path(os.path.expanduser(os.environ.get("DDOQ_EVALUATE_RUNS", "~/.cache/ddoq/evaluate-scale")))
THREADS = 2  # the one training worker of (a)/(b) gets both cores, as the bare loop does


def teacher_overrides(data_root: Path, name: str, resolution: int, epochs: int) -> list[str]:
    return [f"name={name}", f"runs_dir={WORK}", f"cache_dir={WORK / name / 'cache'}", "data.source=parquet",
            f"data.path={data_root}", f"data.name={name}", f"data.image_size={resolution}",
            f"evaluate.teacher_epochs={epochs}", "evaluate.width=32", "evaluate.batch_size=256",
            "evaluate.reports=1", "runtime.num_cpus=2", "runtime.train_cpus_per_worker=1",
            f"runtime.train_threads_per_worker={THREADS}", "runtime.concurrent_trainers=1",
            "runtime.object_store_mb=1024"]


def child_teacher(argv: list[str]) -> None:
    """In the child process: train and score the teacher of a config; print its teacher.json."""
    from engine import pipeline
    from engine.config import load_config

    config = load_config(None, argv)
    results = config.run_dir / "teacher"
    pipeline.prepare_teacher(config, results)
    print("TEACHER", json.dumps(json.loads((results / "teacher.json").read_text())), flush=True)


def streamed_teacher(classes: int, per_class: int, resolution: int, epochs: int) -> dict:
    data_root = imagenet_like.default_root(classes, per_class, resolution)
    imagenet_like.generate(data_root, classes, per_class, resolution=resolution, log=lambda m: None)
    name = f"evaluate-{classes}x{per_class}-r{resolution}-e{epochs}"
    figures_path = WORK / name / "figures.json"
    if figures_path.exists():  # resumable: a finished size is kept
        return json.loads(figures_path.read_text())
    shutil.rmtree(WORK / name, ignore_errors=True)  # an unfinished earlier try: the teacher must train here
    (WORK / name).mkdir(parents=True)
    command = [sys.executable, __file__, "--child", *teacher_overrides(data_root, name, resolution, epochs)]
    rss, private = scale.run_with_rss(command, WORK / f"{name}.log")
    lines = [line for line in (WORK / f"{name}.log").read_text().splitlines() if line.startswith("TEACHER ")]
    figures = {"classes": classes, "images": int(imagenet_like.class_counts(classes, per_class).sum()),
               "teacher": json.loads(lines[-1][len("TEACHER "):]), "rss_mb": rss, "private_mb": private}
    figures_path.write_text(json.dumps(figures, indent=2))  # audit: a benchmark's figures, written once finished
    return figures


def bare_loop_images_per_s(classes: int, per_class: int, resolution: int, epochs: int) -> tuple[float, float]:
    """The same split decoded into memory first, then the same model/batch/threads/epochs through fit_stream
    -> (images/s over every epoch, images/s after the first)."""
    import numpy as np
    import torch

    from engine.config import load_config
    from engine.data.images import load_split
    from engine.evaluate.train import (Stream, Worker, fit_stream, new_model, steady_images_per_s, stream_steps, teacher_loss,
                              teacher_recipe, timed_epochs)

    torch.set_num_threads(THREADS)
    data_root = imagenet_like.default_root(classes, per_class, resolution)
    config = load_config(None, teacher_overrides(data_root, "bare", resolution, epochs))
    train = load_split(config.data, "train")
    e = config.evaluate
    _, local = stream_steps(len(train), e.batch_size, 1)

    def epoch_batches(epoch: int):
        order = np.random.default_rng(epoch).permutation(len(train))
        for start in range(0, len(order), local):
            rows = order[start : start + local]
            yield {"image": torch.from_numpy(train.images[rows]), "label": torch.from_numpy(train.labels[rows])}

    torch.manual_seed(0)
    model = new_model(e.teacher, classes, resolution, e.width, Worker())
    start, seconds = time.perf_counter(), []
    fit_stream(model, Stream(timed_epochs(epoch_batches, seconds), len(train), epochs), teacher_recipe(e),
               teacher_loss)
    return len(train) * epochs / (time.perf_counter() - start), steady_images_per_s(len(train), seconds)


def students_per_hour(trainers: int) -> tuple[float, float, int]:
    """`make distill`'s student jobs on `trainers` trainers at once -> (jobs/hour, jobs/hour once the trainers
    have started, jobs)."""
    command = [sys.executable, __file__, "--child-students", str(trainers)]
    log = WORK / f"students-{trainers}.log"
    with open(log, "w") as out:  # audit: a log of this benchmark
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"})
    line = [x for x in log.read_text().splitlines() if x.startswith("STUDENTS ")][-1].split()
    return float(line[1]), float(line[3]), int(line[2])


def child_students(trainers: int) -> None:
    from engine import pipeline
    from engine.config import load_config
    from engine.data.sources import count_rows
    from engine.evaluate.sets import requested_sets, set_dir
    from engine.ray.cluster import init_ray
    from engine.ray.evaluate import evaluate_students

    shared = [f"runs_dir={WORK}", f"cache_dir={WORK / 'cache'}"]  # one prior and one teacher for both runs
    sets_run = load_config(None, [*shared, "name=students-sets"])
    set_dirs = {key: set_dir(sets_run.run_dir, key) for key in requested_sets(sets_run)}
    if not all((folder / "index.parquet").exists() for folder in set_dirs.values()):
        pipeline.run(sets_run, until="baselines")  # not timed: the sets every run of (c) trains on
    threads = 2 // trainers
    cpus = 1.5 if trainers == 1 else 0.75
    config = load_config(None, [*shared, f"name=students-{trainers}", f"runtime.concurrent_trainers={trainers}",
                                f"runtime.train_cpus_per_worker={cpus}", f"runtime.train_threads_per_worker={threads}"])
    init_ray(config.runtime)
    train_rows = count_rows(config.data, "train")
    results = config.run_dir / "results"
    shutil.rmtree(results, ignore_errors=True)  # every job trains here, none is skipped as done
    pipeline.prepare_teacher(config, results)  # not timed: the same cached teacher for both runs
    jobs = pipeline.student_jobs(config, set_dirs)
    start = time.perf_counter()
    evaluate_students(config, jobs, pipeline.teacher_cache_path(config), results, train_rows=train_rows)
    wall = time.perf_counter() - start
    # From the first job's start to the last one's end (each result file is written as its job ends, and names
    # the job's seconds): the same jobs without the trainers' start-up.
    ends = [(results / f"{job.name}.json").stat().st_mtime for job in jobs]
    starts = [end - json.loads((results / f"{job.name}.json").read_text())["seconds"] for end, job in zip(ends, jobs)]
    print(f"STUDENTS {len(jobs) / wall * 3600:.1f} {len(jobs)} {len(jobs) / (max(ends) - min(starts)) * 3600:.1f}",
          flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_teacher(argv[1:])
    if argv and argv[0] == "--child-students":
        return child_students(int(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=260)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="at least 2: (a) reads the epochs after the first")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: (a) compares the epochs after the first")
    WORK.mkdir(parents=True, exist_ok=True)
    quarter = streamed_teacher(max(1, args.classes // 4), args.per_class, args.resolution, args.epochs)
    full = streamed_teacher(args.classes, args.per_class, args.resolution, args.epochs)
    bare, bare_steady = bare_loop_images_per_s(args.classes, args.per_class, args.resolution, args.epochs)
    teacher = full["teacher"]
    stream, steady = teacher["train_images_per_s"], teacher["steady_images_per_s"]
    print(f"(a) streamed teacher training, N = {full['images']:,} images, {args.epochs} epochs of "
          f"{', '.join(f'{t:.1f}' for t in teacher['epoch_s'])} s: after the first epoch {steady:,.0f} images/s "
          f"through Ray Data + Ray Train vs {bare_steady:,.0f} in memory ({steady / bare_steady:.2f}); over every "
          f"epoch, the stream's start included, {stream:,.0f} vs {bare:,.0f} ({stream / bare:.2f}) (same model, "
          f"batch, {THREADS} threads)")
    print(f"(b) {'peak RSS (MiB)':<22} {'N/4':>8} {'N':>8} {'ratio':>6}   largest process at N "
          f"(N = {full['images']:,} images)")
    for kind in ("driver", "worker"):
        a, b = quarter["rss_mb"][kind][0], full["rss_mb"][kind][0]
        print(f"    {kind:<22} {a:>8.0f} {b:>8.0f} {b / a:>6.2f}   {full['rss_mb'][kind][1]}")
    one, one_running, jobs = students_per_hour(1)
    two, two_running, _ = students_per_hour(2)
    print(f"(c) make distill's {jobs} student jobs (rded): {one:,.0f} jobs/hour on 1 trainer x 2 threads, {two:,.0f} "
          f"on 2 trainers x 1 thread ({two / one:.2f}); from the first job's start to the last one's end (without "
          f"the trainers' start-up) {one_running:,.0f} vs {two_running:,.0f} ({two_running / one_running:.2f})")
    rss_ratio = full["rss_mb"]["worker"][0] / quarter["rss_mb"]["worker"][0]
    print(f"stream_vs_memory={steady / bare_steady:.2f} rss_ratio_worker={rss_ratio:.2f} "
          f"concurrent_speedup={two / one:.2f}")


if __name__ == "__main__":
    main()
