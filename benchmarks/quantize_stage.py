"""The whole quantize stage on synthetic classes written to disk: throughput, the I/O floor, memory, scaling.

    python benchmarks/quantize_stage.py [--classes 20 50 100] [--n 1300] [--shape 4 32 32] [--ipc 10]

For each class count: write that many classes (Gaussian mixtures, float32, in the run folder's latent layout),
then, with the page cache dropped before each pass where the machine allows it:
  read    the actor pool only reading every class (the I/O floor),
  stage   the real stage (quantize every IPC, every weighting, exact W2, atomic per-class writes).
Prints classes/s, stage / read time (goal <= 1.5: quantization hidden behind I/O), the peak RSS of any actor
(must not grow with the class count), and the speedup from 1 to 2 actors at the smallest class count.
Default shape is DiT's ImageNet latent (4x32x32); SD v1.5's is 4x64x64 (--shape 4 64 64, 4x the disk).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize import gaussian_mixture  # noqa: E402

from engine.config import DistillConfig, QuantizeConfig, RuntimeConfig  # noqa: E402
from engine.io import store  # noqa: E402


def drop_page_cache() -> bool:
    """Make the next read come from disk, not memory (needs root; containers may refuse)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def write_classes(root: Path, count: int, n: int, dim: int) -> dict[int, Path]:
    folders = {}
    for label in range(count):
        latents = gaussian_mixture(n, dim, seed=label, components=20)
        ids = np.array([f"{label}/{i:06d}" for i in range(n)])
        folder = root / f"label={label}"
        store.atomic_write_table(folder / "part-0.parquet", store.latents_to_table(ids, np.full(n, label), latents))
        folders[label] = folder
    return folders


def timed_pool(config: DistillConfig, folders: dict[int, Path], out_dir: Path, method: str) -> tuple[float, list]:
    """Time one pass over the classes on actors that are already up (actor start-up, ~4 s, is not the stage's
    per-class cost and would dominate small class counts)."""
    import ray

    from engine.ray.quantize import start_quantize_workers
    from engine.ray.quantize import run_class_pool

    shutil.rmtree(out_dir, ignore_errors=True)
    actors = start_quantize_workers(config, out_dir)
    first = next(iter(folders.items()))
    ray.get([actor.read.remote(first[0], str(first[1])) for actor in actors])  # imports done, actors warm
    drop_page_cache()
    start = time.perf_counter()
    summaries = run_class_pool(config, folders, out_dir, method, actors=actors)
    seconds = time.perf_counter() - start
    for actor in actors:
        ray.kill(actor)
    return seconds, summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--n", type=int, default=1300)
    parser.add_argument("--shape", type=int, nargs=3, default=[4, 32, 32])
    parser.add_argument("--ipc", type=int, nargs="+", default=[10])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to write the synthetic classes (default: a temp dir)")
    args = parser.parse_args()

    import ray

    from engine.ray.cluster import init_ray

    init_ray(RuntimeConfig(num_cpus=args.actors))
    dim = int(np.prod(args.shape))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="ddoq-stage-"))
    quantize = QuantizeConfig(ipc=tuple(args.ipc))
    config = lambda actors: DistillConfig(quantize=quantize, runtime=RuntimeConfig(quantize_actors=actors))  # noqa: E731
    print(f"classes of {args.n} x {dim} float32 ({args.n * dim * 4 / 2**20:.0f} MiB each), IPC {args.ipc}, "
          f"{args.actors} actors, under {root}")
    print(f"{'classes':>7} {'read s':>7} {'stage s':>8} {'stage/read':>10} {'classes/s':>9} {'peak RSS MiB':>12} "
          f"{'cache dropped':>13}")
    speedup = None
    try:
        for count in args.classes:
            latents = root / f"latents-{count}"
            folders = write_classes(latents, count, args.n, dim)
            dropped = drop_page_cache()
            read_s, read_summaries = timed_pool(config(args.actors), folders, root / "out", "read")
            stage_s, summaries = timed_pool(config(args.actors), folders, root / "out", "quantize")
            peak = max(s["peak_rss_mb"] for s in summaries + read_summaries)
            print(f"{count:>7} {read_s:>7.2f} {stage_s:>8.2f} {stage_s / read_s:>10.2f} {count / stage_s:>9.2f} "
                  f"{peak:>12.0f} {str(dropped):>13}")
            if speedup is None and args.actors > 1:
                one_s, _ = timed_pool(config(1), folders, root / "out", "quantize")
                speedup = (count, one_s, stage_s)
            shutil.rmtree(latents)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    if speedup:
        count, one_s, many_s = speedup
        print(f"speedup 1 -> {args.actors} actors at {count} classes: {one_s / many_s:.2f}x "
              f"({one_s:.2f}s -> {many_s:.2f}s)")


if __name__ == "__main__":
    main()
