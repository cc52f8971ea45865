"""The Ray layer: the only module of engine/ that imports ray. It places the pure stages on a cluster.

encode     Ray Data: read source -> map_batches(VaeEncoder, actor pool) -> parquet partitioned by class
quantize   an actor pool of QuantizeWorker, one task per class (all IPCs of the class in one task)
decode     Ray Data: centroid rows -> map_batches(CentroidDecoder, actor pool) -> PNGs in the run folder
evaluate   Ray Train TorchTrainer running every student job (teacher cached), results written per job
Device placement comes from RuntimeConfig, never from code.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray

from engine.config import DataConfig, DecodeConfig, DistillConfig, QuantizeConfig, RuntimeConfig
from engine.data import check_skipped, class_names, decode_rows, inspect_shards, load_split, shard_paths
from engine.faults import crash_once_if_requested
from engine.location import ObjectPath, filesystem_and_path, location, ray_storage, remove_tree


def init_ray(runtime: RuntimeConfig) -> None:
    """Join the cluster a `ray job submit` runs in, or start a local one sized by the config."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`, or by a user pointing at a cluster
        ray.init()
    else:  # "local": never attach by surprise to a cluster some earlier `ray start` left running
        # The dashboard (on 127.0.0.1 only) serves the state API that Ray Train's controller polls.
        ray.init(address="local", num_cpus=runtime.num_cpus or None, dashboard_host="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = True


# ---------------------------------------------------------------- encode


def deterministic_order() -> None:
    """Blocks are bundled into batches in input order, so a re-run (or a retried task) sees the same batches and
    the outputs are byte-identical."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True


SKIPPED_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def write_skipped(skip_dir: str | Path, skipped: dict, tag: str) -> None:
    """One small parquet file of skipped rows, named by its content: a retried task rewrites the same file, so
    rows are never counted twice, and no driver-side re-read of the data is needed to count them."""
    import hashlib

    from engine.store import atomic_write_table

    if not skipped["id"]:
        return
    table = pa.table({k: pa.array(skipped[k], pa.string()) for k in SKIPPED_SCHEMA.names}, schema=SKIPPED_SCHEMA)
    digest = hashlib.sha256("\0".join([tag, *skipped["id"], *skipped["reason"]]).encode()).hexdigest()[:24]
    atomic_write_table(location(skip_dir) / f"{digest}.parquet", table)


def decode_and_record_skips(batch: dict, size: int, num_classes: int, max_pixels: int, skip_dir: str) -> dict:
    """Ray Data map over raw shard rows: decoded rows go on to the encoder, skipped rows to `skip_dir`."""
    decoded, skipped = decode_rows(batch, size, num_classes, max_pixels)
    tag = "\0".join(sorted(set(map(str, batch.get("path", ()))))) + "\0" + "\0".join(map(str, decoded["id"]))
    write_skipped(skip_dir, skipped, tag)
    return decoded


def source_dataset(data: DataConfig, size: int | None = None, skip_dir=None) -> ray.data.Dataset:
    """Rows {id, label, image (H, W, 3) uint8} of the train split, decoded straight to `size` (the prior's
    resolution, e.g. 512 for sd15; default the data's). Rows that cannot be used are recorded as
    {id, reason, detail} files under `skip_dir` (parquet sources only: the digits are known good)."""
    if data.source == "digits":
        images = load_split(data, "train")
        table = pa.table({
            "id": pa.array(images.ids.tolist()),
            "label": pa.array(images.labels),
            "image": ArrowTensorArray.from_numpy(images.images),
        })
        return ray.data.from_arrow(table)
    if skip_dir is None:
        raise ValueError("a parquet source needs a folder for the records of skipped rows")
    readable, shard_skips = inspect_shards(shard_paths(data.path, "train"))  # footers only
    write_skipped(skip_dir, shard_skips, "shards")
    if not readable:
        raise ValueError(f"no shard under {data.path} has both an image and a label column")
    raw = ray.data.read_parquet(readable, columns=["image", "label"], include_paths=True)
    return raw.map_batches(decode_and_record_skips, batch_size=256, fn_kwargs={
        "size": size or data.image_size, "num_classes": len(class_names(data)),
        "max_pixels": data.max_image_pixels, "skip_dir": str(skip_dir)})


def gather_skipped(skip_dir) -> pa.Table:
    """Every skipped-row record of a stage, sorted by id (order-independent, so re-runs compare equal)."""
    from engine.store import read_table

    files = sorted(location(skip_dir).glob("*.parquet"))  # none when the folder does not exist
    if not files:
        return SKIPPED_SCHEMA.empty_table()
    return pa.concat_tables([read_table(f) for f in files]).sort_by([("id", "ascending"), ("reason", "ascending")])


class VaeEncoder:
    """Ray Data callable class: loads the prior's VAE once per actor, encodes batches of images."""

    def __init__(self, prior_kind: str, prior_folder: str, class_names: tuple, batch_size: int, device: str,
                 dtype: str = "float32", fault_dir: str = ""):
        from engine.priors import load_prior

        self.prior = load_prior(prior_kind, prior_folder, class_names).to(device, dtype)
        self.batch_size = batch_size
        self.fault_dir = fault_dir  # test-only crash injection (engine/faults.py); empty in normal runs

    def __call__(self, batch: dict) -> pa.Table:
        from engine.store import latents_to_table

        crash_once_if_requested(self.fault_dir, "encode")

        latents = self.prior.encode(batch["image"], self.batch_size)  # (B, C, h, w)
        return latents_to_table(batch["id"], batch["label"], latents)


def encode_to_parquet(config: DistillConfig, prior_folder: Path, out_dir, resolution: int | None = None,
                      class_names: tuple = ()) -> int:
    """Encode the train split at the prior's `resolution`; latents land in out_dir/label=<c>/, the rows that could
    not be used in out_dir/../skipped.parquet {id, reason, detail}. Fails, before anything is published, when more
    than `data.max_skip_fraction` of the rows read were skipped. Returns the number of images encoded.
    Locally the latents go to a staging folder renamed into place. Object stores cannot rename a folder: there
    they are written in place, and the caller's stage marker (removed before, written after) says they are whole."""
    from engine.store import atomic_write_table, parquet_rows

    runtime = config.runtime
    out_dir = location(out_dir)
    in_place = isinstance(out_dir, ObjectPath)
    staging = out_dir if in_place else out_dir.with_name(out_dir.name + ".partial")
    skip_dir = out_dir.with_name(out_dir.name + ".skipped.partial")
    for folder in (staging, skip_dir):
        remove_tree(folder)
    deterministic_order()
    use_gpu = runtime.gpus_per_actor > 0
    latents = source_dataset(config.data, resolution, skip_dir).map_batches(
        VaeEncoder,
        fn_constructor_kwargs={"prior_kind": config.prior.kind, "prior_folder": str(prior_folder),
                               "class_names": tuple(class_names), "batch_size": config.encode.batch_size,
                               "device": "cuda" if use_gpu else "cpu", "dtype": runtime.prior_dtype,
                               "fault_dir": str(config.run_dir)},
        batch_size=config.encode.batch_size,
        compute=ray.data.ActorPoolStrategy(size=runtime.encode_actors),
        num_gpus=runtime.gpus_per_actor,
        num_cpus=1,
    )
    filesystem, inner = filesystem_and_path(staging)
    latents.write_parquet(inner, filesystem=filesystem, partition_cols=["label"])
    count = sum(parquet_rows(f) for f in staging.rglob("*.parquet"))
    skipped = gather_skipped(skip_dir)
    check_skipped(count + skipped.num_rows, skipped.to_pydict(), config.data.max_skip_fraction)
    atomic_write_table(out_dir.parent / "skipped.parquet", skipped)
    if not in_place:
        remove_tree(out_dir)
        staging.rename(out_dir)  # the stage's output appears whole or not at all
    remove_tree(skip_dir)
    return count


# ---------------------------------------------------------------- quantize


# Retries: a killed actor is restarted and its task re-run; a finished class is skipped by its marker file.
@ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)
class QuantizeWorker:
    """Quantizes whole classes, one task per class, writing each class's results atomically."""

    def __init__(self, config: QuantizeConfig, out_dir: str):
        import faiss

        faiss.omp_set_num_threads(1)  # one CPU per actor; parallelism comes from the pool
        self.config, self.out_dir = config, out_dir

    def quantize(self, label: int, class_dir: str) -> dict:
        from engine.quantize_stage import quantize_class_folder

        return quantize_class_folder(label, class_dir, self.config, self.out_dir)

    def read(self, label: int, class_dir: str) -> dict:
        """Only read the class (the I/O floor the stage is measured against in benchmarks/)."""
        from engine.quantize_stage import peak_rss_mb
        from engine.store import read_class_latents

        start = time.perf_counter()
        _, latents = read_class_latents(class_dir)
        return {"label": label, "n": len(latents), "seconds": time.perf_counter() - start,
                "peak_rss_mb": peak_rss_mb()}


def start_quantize_workers(config: DistillConfig, out_dir) -> list:
    location(out_dir).mkdir(parents=True, exist_ok=True)
    gpus = config.runtime.quantize_gpus_per_actor
    return [QuantizeWorker.options(num_gpus=gpus).remote(config.quantize, str(out_dir))
            for _ in range(max(1, config.runtime.quantize_actors))]


def run_class_pool(config: DistillConfig, class_dirs: dict[int, Path], out_dir: Path, method: str = "quantize",
                   log=None, actors: list | None = None) -> list[dict]:
    """One task per class on `runtime.quantize_actors` actors (or the given, already started ones, which are then
    left running); returns the tasks' summaries in completion order."""
    from ray.util import ActorPool

    owned = actors is None
    actors = start_quantize_workers(config, out_dir) if owned else actors
    summaries = []
    try:
        pool = ActorPool(actors)
        tasks = list(class_dirs.items())
        for done in pool.map_unordered(lambda a, task: getattr(a, method).remote(task[0], str(task[1])), tasks):
            summaries.append(done)
            if log and (len(summaries) % max(1, len(tasks) // 10) == 0 or len(summaries) == len(tasks)):
                log(f"  {method}: {len(summaries)}/{len(tasks)} classes")
    finally:
        for actor in actors if owned else []:
            ray.kill(actor)
    return summaries


def quantize_classes(config: DistillConfig, class_dirs: dict[int, Path], out_dir: Path,
                     log=None) -> tuple[pa.Table, pa.Table]:
    """All classes through the actor pool -> (centroids table, per-class statistics table)."""
    from engine.quantize_stage import gather_class_results

    run_class_pool(config, class_dirs, out_dir, "quantize", log)
    return gather_class_results(out_dir, sorted(class_dirs))


# ---------------------------------------------------------------- decode


class CentroidDecoder:
    """Ray Data callable class: loads the prior once, decodes centroid rows, writes each image as a PNG into the
    folder of every method that uses it (d4m and ddoq share centroids, differ only in weights)."""

    def __init__(self, prior_kind: str, prior_folder: str, class_names: tuple, decode: DecodeConfig,
                 set_dirs: dict[int, list[str]], device: str, image_size: int | None = None, dtype: str = "float32",
                 fault_dir: str = ""):
        from engine.priors import load_prior

        self.prior = load_prior(prior_kind, prior_folder, class_names).to(device, dtype)
        self.decode = decode
        self.set_dirs = set_dirs
        self.image_size = image_size  # the evaluation resolution images are resized to
        self.fault_dir = fault_dir  # test-only crash injection (engine/faults.py); empty in normal runs

    def __call__(self, batch: dict) -> dict:
        from engine.decode import decode_latents
        from engine.store import image_file_name, write_png

        crash_once_if_requested(self.fault_dir, "decode")

        latents = np.stack(batch["latent"]).reshape(len(batch["label"]), *self.prior.latent_shape)
        # Noise key per centroid: unique within the run, independent of batching.
        keys = batch["ipc"] * 1_000_000 + batch["label"] * 1_000 + batch["index"]
        images = decode_latents(self.prior, latents, batch["label"], self.decode, keys, self.image_size)
        files = []
        for image, label, index, ipc in zip(images, batch["label"], batch["index"], batch["ipc"]):
            name = image_file_name(int(label), int(index))
            for folder in self.set_dirs[int(ipc)]:
                write_png(location(folder) / name, image)
            files.append(name)
        return {"label": batch["label"], "ipc": batch["ipc"], "index": batch["index"], "path": np.array(files)}


def decode_centroids_to_sets(config: DistillConfig, prior_folder: Path, centroids: pa.Table,
                             set_dirs: dict[int, list[str]], class_names: tuple = ()) -> pa.Table:
    """Decode every centroid; returns rows {label, ipc, index, path}."""
    runtime = config.runtime
    use_gpu = runtime.gpus_per_actor > 0
    rows = centroids.select(["label", "ipc", "index", "latent"])
    deterministic_order()
    decoded = ray.data.from_arrow(rows).map_batches(
        CentroidDecoder,
        fn_constructor_kwargs={"prior_kind": config.prior.kind, "prior_folder": str(prior_folder),
                               "class_names": tuple(class_names), "decode": config.decode, "set_dirs": set_dirs,
                               "device": "cuda" if use_gpu else "cpu", "image_size": config.data.image_size,
                               "dtype": runtime.prior_dtype, "fault_dir": str(config.run_dir)},
        batch_size=config.decode.batch_size,
        compute=ray.data.ActorPoolStrategy(size=runtime.decode_actors),
        num_gpus=runtime.gpus_per_actor,
        num_cpus=1,
    )
    return pa.Table.from_pylist(decoded.take_all())


# ---------------------------------------------------------------- evaluate


REPORT_IMAGES = 1000  # held-out images scored at each intermediate report


def _evaluation_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the teacher (cached or given), then each student job not finished yet.
    Every job reports held-out top-1 `evaluate.reports` times (ray.train.report) and checkpoints alongside, so a
    killed or restarted run resumes mid-job; a finished job's result file is never redone."""
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load
    from safetensors.torch import save as to_safetensors_bytes

    from functools import cache

    from engine.data import class_names
    from engine.protocols import get_protocol
    from engine.store import atomic_write_bytes, atomic_write_json, read_distilled_set
    from engine.students import create_student
    from engine.train import (TrainSet, Worker, evaluate_top1, student_epochs,
                              train_student, train_teacher)

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
        if teacher_path.exists():
            teacher = create_student(evaluate.teacher, num_classes, config.data.image_size, evaluate.width)
            teacher.load_state_dict(load(teacher_path.read_bytes()))
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
            soft_labels = _stored_soft_labels(results_dir / "soft_labels" / f"{job['set']}-seed{job['seed']}.safetensors",
                                              data, teacher, epochs, evaluate, job["seed"], worker.rank)

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
