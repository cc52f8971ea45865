"""The decode stage: per-class centroid files -> map_batches(CentroidDecoder, actor pool) -> images ->
map_batches(write_images, tasks) -> PNGs of the distilled sets.

Input rows are class files, not centroids: one small row per group of classes (`classes_per_batch`: enough
classes for their centroids to fill whole denoiser batches), one block each, so every actor of the pool gets work,
the denoiser sees full batches of decode.batch_size, and no process ever holds more than a group's centroids. The
decoder only decodes; PNG encoding and writing run in separate Ray Data tasks, off the GPU actor's critical path.
Each image is written once, into the first set that uses it, and shared with the others (every ddoq weighting holds
the same images with different weights) by `store.share_file`. A class file holds two quantizers' centroids, the
engine's ("ddoq") and D4M's ("d4m"); only the (IPC, quantizer) pairs some set asks for are decoded.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa

import ray
import ray.data
from engine.config import DecodeConfig, DistillConfig
from engine.faults import crash_once_if_requested
from engine.io.location import location
from engine.priors import PriorSource
from engine.ray.cluster import WRITE_TASK_CPUS, check_pool_fits, deterministic_order, wait_for_pool

META_COLUMNS = ("label", "ipc", "quantizer", "index", "count", "weight_uniform", "weight_mass", "weight_sqrt")


class CentroidDecoder:
    """Ray Data callable class: loads the prior once; decodes every requested centroid of a batch of classes."""

    def __init__(self, prior: PriorSource, decode: DecodeConfig, wanted: tuple[tuple[int, str], ...], device: str,
                 image_size: int | None = None, dtype: str = "float32", threads: int = 1, fault_dir: str = "",
                 space: str = "latent"):
        import torch

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the CPU reservation; the config decides
        self.prior = prior.load().to(device, dtype)
        self.decode, self.wanted = decode, frozenset(wanted)  # (ipc, quantizer) pairs to decode
        self.image_size = image_size  # the evaluation resolution images are resized to
        self.space = space  # quantize.space: centroids are latents (img2img) or diffusion states (engine/invert.py)
        self.fault_dir = fault_dir  # test-only crash injection (engine/faults.py); empty in normal runs
        self.actor = ray.get_runtime_context().get_actor_id() or "driver"
        self.node = ray.get_runtime_context().get_node_id()  # into the stage's record: which nodes did the work

    def __call__(self, batch: dict) -> dict:
        import pyarrow.compute as pc

        from engine.checks import check_finite_centroids
        from engine.decode import decode_by_ipc
        from engine.io.store import read_table, table_latents

        crash_once_if_requested(self.fault_dir, "decode")
        tables = [read_table(file) for files in batch["files"] for file in files]
        rows = pa.concat_tables(tables)
        pairs = pc.binary_join_element_wise(pc.cast(rows["ipc"], pa.string()), rows["quantizer"], "/")
        rows = rows.filter(pc.is_in(pairs, pa.array([f"{ipc}/{q}" for ipc, q in sorted(self.wanted)], pa.string())))
        check_finite_centroids(rows)  # NaN/Inf never reaches the decoder, named by (class, IPC)
        latents = table_latents(rows).reshape(rows.num_rows, *self.prior.latent_shape)  # (N, C, h, w)
        meta = rows.select(list(META_COLUMNS)).to_pydict()
        labels, ipcs, indices = (np.asarray(meta[k], np.int64) for k in ("label", "ipc", "index"))
        # Noise key per centroid: unique within an (IPC, quantizer), independent of batching; the two quantizers'
        # centroids of the same index share their noise, so their images differ by the centroid alone.
        keys = ipcs * 1_000_000 + labels * 1_000 + indices
        decoded = decode_by_ipc(self.prior, latents, labels, ipcs, keys, self.decode, self.image_size, self.space)
        return {**{k: np.asarray(v) for k, v in meta.items()}, "image": decoded.images,
                "denoiser_batch": decoded.batch_size_of_rows(),
                "actor": np.array([self.actor] * len(labels), dtype=object),
                "node": np.array([self.node] * len(labels), dtype=object)}


def write_images(batch: dict, set_dirs: dict[tuple[int, str], list[str]], grey: bool = False) -> dict:
    """Ray Data task: each decoded image -> one PNG in the first set folder of its (IPC, quantizer), shared with the
    others; `grey`: as a one-channel PNG of its luma (a grey source's sets carry no colour)."""
    from PIL import Image

    from engine.io.store import image_file_name, share_file, write_png

    paths, files, digests, sizes = [], [], [], []
    for image, label, index, ipc, quantizer in zip(batch["image"], batch["label"], batch["index"], batch["ipc"],
                                                   batch["quantizer"]):
        name = image_file_name(int(label), int(index))
        targets = [location(folder) / name for folder in set_dirs[int(ipc), str(quantizer)]]
        pixels = np.asarray(image)
        if grey:
            pixels = np.asarray(Image.fromarray(pixels).convert("L"))  # ITU-R 601 luma
        record = write_png(targets[0], pixels)
        for target in targets[1:]:
            share_file(targets[0], target)
        paths.append(name)
        files.append([str(t) for t in targets])
        digests.append(record["sha256"])
        sizes.append(record["bytes"])
    kept = {k: batch[k] for k in META_COLUMNS + ("actor", "node", "denoiser_batch")}
    return {**kept, "path": np.array(paths, dtype=object), "files": files,
            "sha256": np.array(digests, dtype=object), "bytes": np.array(sizes, dtype=np.int64)}


def classes_per_batch(decode: DecodeConfig, ipcs: list[int], classes: int, actors: int) -> int:
    """Classes per actor call: the fewest whose centroids fill whole batches of decode.batch_size at every
    strength (the IPCs decoded at one strength share batches), so only the last call of the run decodes a partial
    batch per strength; fewer when that many would leave actors of the pool without work. `ipcs`: the IPC of each
    decoded centroid set of a class (an IPC twice when both quantizers' centroids are decoded)."""
    per_class: Counter = Counter()
    for ipc in ipcs:
        per_class[decode.strength_at(ipc)] += ipc  # centroids of one class at each strength
    unit = 1
    for count in per_class.values():
        unit = math.lcm(unit, decode.batch_size // math.gcd(decode.batch_size, count))
    return max(1, min(unit, math.ceil(classes / max(1, actors))))


def denoiser_histogram(sizes) -> dict[int, int]:
    """{batch size: batches} the denoiser ran, from each image's `denoiser_batch` (the size of its batch)."""
    images = Counter(int(size) for size in sizes)
    return {size: images[size] // size for size in sorted(images, reverse=True)}


def decode_centroids_to_sets(config: DistillConfig, prior_folder, class_files: dict[int, str],
                             set_dirs: dict[tuple[int, str], list[str]], class_names: tuple = (),
                             grey: bool = False) -> pa.Table:
    """Decode every centroid of `set_dirs`' (IPC, quantizer) pairs from the class files {label: centroids file};
    returns one row per image {label, ipc, quantizer, index, count, weight_<mode>..., actor, path, files (every
    set's copy), sha256, bytes} (no pixels, no latents). `grey`: the images are written as one-channel PNGs."""
    runtime = config.runtime
    use_gpu = runtime.gpus_per_actor > 0
    check_pool_fits("decode", runtime.decode_actors, runtime.decode_cpus_per_actor, runtime.gpus_per_actor,
                    WRITE_TASK_CPUS)
    deterministic_order()
    wait_for_pool(runtime.pool_start_timeout_s)
    wanted = tuple(sorted(set_dirs))
    files = [str(file) for _, file in sorted(class_files.items())]
    group = classes_per_batch(config.decode, [ipc for ipc, _ in wanted], len(files), runtime.decode_actors)
    # One row, and one block, per group: Ray Data would otherwise re-bundle blocks into batches of its own sizes.
    items = [{"files": files[start:start + group]} for start in range(0, len(files), group)]
    decoded = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        CentroidDecoder,
        fn_constructor_kwargs={"prior": PriorSource(config.prior.kind, str(prior_folder), tuple(class_names),
                                                    config.prior.variant), "decode": config.decode, "wanted": wanted,
                               "device": "cuda" if use_gpu else "cpu", "image_size": config.data.image_size,
                               "dtype": runtime.prior_dtype, "threads": runtime.threads("decode"),
                               "fault_dir": str(config.run_dir), "space": config.quantize.space},
        batch_size=1,
        # One batch of classes in flight per actor, and the whole pool up before the first batch: otherwise the
        # first actor to load its prior takes every batch while the others are still starting.
        compute=ray.data.ActorPoolStrategy(size=runtime.decode_actors, max_tasks_in_flight_per_actor=1),
        num_gpus=runtime.gpus_per_actor,
        num_cpus=runtime.decode_cpus_per_actor,
    ).map_batches(write_images, fn_kwargs={"set_dirs": set_dirs, "grey": grey}, batch_size=None,
                  num_cpus=WRITE_TASK_CPUS)
    # One small row per decoded image (classes x IPC; the pixels stayed in the write tasks).
    rows = pa.Table.from_pylist(decoded.take_all()).sort_by([("quantizer", "descending"), ("ipc", "ascending"),
                                                             ("label", "ascending"), ("index", "ascending")])
    return rows
