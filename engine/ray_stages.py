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
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray

from engine.config import DataConfig, DecodeConfig, DistillConfig, QuantizeConfig, RuntimeConfig
from engine.data import decode_image_batch, load_split, shard_paths


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


def source_dataset(data: DataConfig) -> ray.data.Dataset:
    """Rows {id, label, image (H, W, 3) uint8} of the train split."""
    if data.source == "digits":
        images = load_split(data, "train")
        table = pa.table({
            "id": pa.array(images.ids.tolist()),
            "label": pa.array(images.labels),
            "image": ArrowTensorArray.from_numpy(images.images),
        })
        return ray.data.from_arrow(table)
    raw = ray.data.read_parquet(shard_paths(data.path, "train"), columns=["image", "label"])
    return raw.map_batches(decode_image_batch, fn_kwargs={"size": data.image_size}, batch_size=256)


class VaeEncoder:
    """Ray Data callable class: loads the prior's VAE once per actor, encodes batches of images."""

    def __init__(self, prior_folder: str, batch_size: int, device: str):
        from engine.priors.tiny import load_tiny_prior

        self.vae = load_tiny_prior(prior_folder).vae.to(device)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> pa.Table:
        from engine.encode import encode_images
        from engine.store import latents_to_table

        latents = encode_images(self.vae, batch["image"], self.batch_size)  # (B, C, h, w)
        return latents_to_table(batch["id"], batch["label"], latents)


def encode_to_parquet(config: DistillConfig, prior_folder: Path, out_dir: Path) -> int:
    """Encode the train split; latents land in out_dir/label=<c>/. Returns the number of images encoded."""
    runtime = config.runtime
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    use_gpu = runtime.gpus_per_actor > 0
    latents = source_dataset(config.data).map_batches(
        VaeEncoder,
        fn_constructor_kwargs={"prior_folder": str(prior_folder), "batch_size": config.encode.batch_size,
                               "device": "cuda" if use_gpu else "cpu"},
        batch_size=config.encode.batch_size,
        compute=ray.data.ActorPoolStrategy(size=runtime.encode_actors),
        num_gpus=runtime.gpus_per_actor,
        num_cpus=1,
    )
    latents.write_parquet(str(staging), partition_cols=["label"])
    count = sum(pq.ParquetFile(f).metadata.num_rows for f in staging.rglob("*.parquet"))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)  # the stage's output appears whole or not at all
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


def start_quantize_workers(config: DistillConfig, out_dir: Path) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
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

    def __init__(self, prior_folder: str, decode: DecodeConfig, set_dirs: dict[int, list[str]], device: str):
        from engine.priors.tiny import load_tiny_prior

        self.prior = load_tiny_prior(prior_folder)
        self.prior.vae.to(device)
        self.prior.unet.to(device)
        self.decode = decode
        self.set_dirs = set_dirs

    def __call__(self, batch: dict) -> dict:
        from engine.decode import decode_centroids
        from engine.store import image_file_name, write_png

        latents = np.stack(batch["latent"]).reshape(len(batch["label"]), *self.prior.latent_shape)
        # Noise key per centroid: unique within the run, independent of batching.
        keys = batch["ipc"] * 1_000_000 + batch["label"] * 1_000 + batch["index"]
        images = decode_centroids(self.prior, latents, batch["label"], self.decode.guidance_scale,
                                  self.decode.strength, self.decode.num_steps, self.decode.seed, keys)
        files = []
        for image, label, index, ipc in zip(images, batch["label"], batch["index"], batch["ipc"]):
            name = image_file_name(int(label), int(index))
            for folder in self.set_dirs[int(ipc)]:
                write_png(Path(folder) / name, image)
            files.append(name)
        return {"label": batch["label"], "ipc": batch["ipc"], "index": batch["index"], "path": np.array(files)}


def decode_centroids_to_sets(config: DistillConfig, prior_folder: Path, centroids: pa.Table,
                             set_dirs: dict[int, list[str]]) -> pa.Table:
    """Decode every centroid; returns rows {label, ipc, index, path}."""
    runtime = config.runtime
    use_gpu = runtime.gpus_per_actor > 0
    rows = centroids.select(["label", "ipc", "index", "latent"])
    decoded = ray.data.from_arrow(rows).map_batches(
        CentroidDecoder,
        fn_constructor_kwargs={"prior_folder": str(prior_folder), "decode": config.decode, "set_dirs": set_dirs,
                               "device": "cuda" if use_gpu else "cpu"},
        batch_size=config.decode.batch_size,
        compute=ray.data.ActorPoolStrategy(size=runtime.decode_actors),
        num_gpus=runtime.gpus_per_actor,
        num_cpus=1,
    )
    return pa.Table.from_pylist(decoded.take_all())


# ---------------------------------------------------------------- evaluate


def _evaluation_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: teacher (cached), then each student job not finished yet."""
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load_file, save_file

    from engine.store import atomic_write_json, read_distilled_set
    from engine.train import TrainSet, evaluate_top1, epochs_to_steps, train_student, train_teacher

    config: DistillConfig = loop_config["config"]
    torch.set_num_threads(config.runtime.train_cpus_per_worker)
    evaluate = config.evaluate
    rank = ray.train.get_context().get_world_rank()
    wrap = ray.train.torch.prepare_model  # moves to the worker's device; DDP when there are several workers
    train = load_split(config.data, "train")
    test = load_split(config.data, "test")
    num_classes = len(train.class_names)
    full = TrainSet(train.images, train.labels, np.ones(len(train.labels)))

    teacher_path = Path(loop_config["teacher_path"])
    if teacher_path.exists():
        from engine.students import create_student

        teacher = create_student(evaluate.student, num_classes, train.images.shape[1], evaluate.width)
        teacher.load_state_dict(load_file(teacher_path))
    else:
        teacher = train_teacher(full, num_classes, evaluate, seed=0, wrap_model=wrap)
        teacher = getattr(teacher, "module", teacher)
        if rank == 0:
            teacher_path.parent.mkdir(parents=True, exist_ok=True)
            save_file(teacher.state_dict(), str(teacher_path) + ".partial")
            os.replace(str(teacher_path) + ".partial", teacher_path)
    teacher.eval()
    teacher_top1 = evaluate_top1(teacher, test.images, test.labels)

    results_dir = Path(loop_config["results_dir"])
    for job in loop_config["jobs"]:
        result_path = results_dir / f"{job['job']}.json"
        if result_path.exists():  # finished in an earlier (killed) run of the same config
            continue
        start = time.perf_counter()
        if job["method"] == "full":
            data = full
            steps = epochs_to_steps(len(full.labels), evaluate.full_epochs, evaluate.batch_size)
        else:
            images, labels, weights = read_distilled_set(Path(job["set_dir"]))
            data, steps = TrainSet(images, labels, weights), evaluate.student_steps
        student = train_student(data, teacher, num_classes, steps, evaluate, job["seed"], wrap_model=wrap)
        top1 = evaluate_top1(getattr(student, "module", student), test.images, test.labels)
        row = {**{k: job[k] for k in ("method", "ipc", "seed", "weights")}, "top1": top1,
               "teacher_top1": teacher_top1, "images": int(len(data.labels)), "steps": steps,
               "seconds": round(time.perf_counter() - start, 2)}
        if rank == 0:
            atomic_write_json(result_path, row)
        ray.train.report({"job": job["job"], **row})


def evaluate_students(config: DistillConfig, jobs: list[dict], teacher_path: Path, results_dir: Path,
                      callbacks=()) -> list[dict]:
    """Train every job's student through one TorchTrainer run; returns the result rows (one JSON per job).
    `callbacks`: Ray Train callbacks, e.g. TuneReportCallback when a Tune trial runs the evaluation."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    runtime = config.runtime
    results_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _evaluation_loop,
        train_loop_config={"config": config, "jobs": jobs, "teacher_path": str(teacher_path),
                           "results_dir": str(results_dir.resolve())},
        scaling_config=ScalingConfig(num_workers=runtime.train_workers, use_gpu=runtime.train_use_gpu,
                                     resources_per_worker={"CPU": runtime.train_cpus_per_worker}),
        run_config=RunConfig(name="evaluate", storage_path=str((config.run_dir / "ray_train").resolve()),
                             callbacks=list(callbacks)),
    )
    trainer.fit()
    return [json.loads((results_dir / f"{job['job']}.json").read_text()) for job in jobs]
