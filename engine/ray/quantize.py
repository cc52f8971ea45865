"""The quantize stage: an actor pool of QuantizeWorker, one task per class (every IPC of the class)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import ray

from engine.config import DistillConfig, QuantizeConfig
from engine.io.location import location
from engine.ray.cluster import saw_nodes


# Retries: a killed actor is restarted and its task re-run; a finished class is skipped by its marker file.
@ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)
class QuantizeWorker:
    """Quantizes whole classes, one task per class, writing each class's results atomically."""

    def __init__(self, config: QuantizeConfig, out_dir: str, gpus: float = 0.0):
        from engine.quantize.quantizer import quantize_device

        try:
            import faiss
        except ImportError:  # a GPU node without faiss: the torch quantizer runs (engine/quantize/lloyd_torch.py)
            faiss = None
        if faiss is not None:
            faiss.omp_set_num_threads(1)  # one CPU per actor; parallelism comes from the pool
        self.config, self.out_dir = config, out_dir
        self.device = quantize_device(gpus)  # an actor given a GPU fails rather than quantize on the CPU

    def quantize(self, label: int, class_dir: str) -> dict:
        from engine.quantize.class_task import quantize_class_folder

        summary = quantize_class_folder(label, class_dir, self.config, self.out_dir, self.device)
        return {**summary, "node": ray.get_runtime_context().get_node_id()}  # for the stage's record

    def read(self, label: int, class_dir: str) -> dict:
        """Only read the class (the I/O floor the stage is measured against in benchmarks/)."""
        from engine.io.store import read_class_latents
        from engine.quantize.class_task import peak_rss_mb

        start = time.perf_counter()
        _, latents = read_class_latents(class_dir)
        return {"label": label, "n": len(latents), "seconds": time.perf_counter() - start,
                "peak_rss_mb": peak_rss_mb()}


def start_quantize_workers(config: DistillConfig, out_dir) -> list:
    location(out_dir).mkdir(parents=True, exist_ok=True)
    gpus = config.runtime.quantize_gpus_per_actor
    return [QuantizeWorker.options(num_gpus=gpus).remote(config.quantize, str(out_dir), gpus)
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
                     log=None) -> tuple[pa.Table, dict]:
    """All classes through the actor pool into out_dir (class files: engine/quantize/class_task.py) -> (the per-class
    statistics table, the records of the files written). The centroids stay in their class files."""
    from engine.quantize.class_task import gather_class_stats

    summaries = run_class_pool(config, class_dirs, out_dir, "quantize", log)
    saw_nodes("quantize", (summary["node"] for summary in summaries))
    files = {path: record for summary in summaries for path, record in summary["files"].items()}
    return gather_class_stats(out_dir, sorted(class_dirs)), files
