"""The encode stage: source rows -> map_batches(VaeEncoder, actor pool) -> grouped by class -> latents parquet.

Output: out_dir/label=<c>/part-00000.parquet, one file per class {id, source, latent: fixed_size_list<f32>},
sorted by id; the rows that could not be used in out_dir/../skipped.parquet {id, reason, detail}. Source shards mix
classes, so the latents are hash-shuffled by label (Ray Data groupby, on disk by default) before they are written:
one file per class, never one per (block, class), and the row counts come from the writers, not from footers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

import ray
import ray.data
from engine.config import DistillConfig
from engine.data.images import check_skipped, has_colour
from engine.data.sources import class_names as data_class_names
from engine.faults import crash_once_if_requested
from engine.io.location import ObjectPath, location, remove_tree
from engine.priors import PriorSource
from engine.ray.cluster import check_pool_fits, deterministic_order, node_id, saw_nodes, shuffle_on_disk, wait_for_pool
from engine.ray.source import gather_skipped, source_dataset


class VaeEncoder:
    """Ray Data callable class: loads the prior's VAE once per actor, encodes batches of images."""

    def __init__(self, prior: PriorSource, batch_size: int, device: str, dtype: str = "float32", threads: int = 1,
                 fault_dir: str = ""):
        import torch

        # Ray sets OMP_NUM_THREADS to the actor's CPU reservation; the config says how many cores it may use.
        torch.set_num_threads(threads)
        self.prior = prior.load().to(device, dtype)
        self.batch_size = batch_size
        self.fault_dir = fault_dir  # test-only crash injection (engine/faults.py); empty in normal runs

    def __call__(self, batch: dict) -> pa.Table:
        from engine.io.store import latents_to_table

        crash_once_if_requested(self.fault_dir, "encode")
        latents = self.prior.encode(batch["image"], self.batch_size)  # (B, C, h, w)
        table = latents_to_table(batch["id"], batch["label"], latents)
        table = table.append_column("colour", pa.array(has_colour(batch["image"])))  # counted, not written
        table = table.append_column("source", pa.array(list(map(str, batch["source"])), pa.string()))
        return table.append_column("node", pa.array([node_id()] * table.num_rows, pa.string()))  # for the record


def write_class_group(group: pa.Table, out_dir: str) -> pa.Table:
    """Ray Data map_groups body: every latent row of one class -> its file; returns the writer's record."""
    from engine.io.store import write_class_latents

    import pyarrow.compute as pc

    label = int(group.column("label")[0].as_py())
    nodes = sorted(set(group.column("node").to_pylist()) | {node_id()})  # the encoders' and this writer's
    colour = int(pc.sum(group.column("colour")).as_py() or 0)
    return pa.Table.from_pylist([{**write_class_latents(out_dir, label, group), "nodes": nodes,
                                  "colour_rows": colour}])


@dataclass(frozen=True)
class EncodedLatents:
    images: int  # rows encoded
    files: dict  # {latent file at its final path: {sha256, bytes}}
    colour_images: int  # encoded images whose channels differ somewhere (0: a grey source)


def encode_to_parquet(config: DistillConfig, prior_folder, out_dir, resolution: int | None = None,
                      class_names: tuple = ()) -> EncodedLatents:
    """Encode the train split at the prior's `resolution` into out_dir (see the module docstring). Fails, before
    anything is published, when more than `data.max_skip_fraction` of the rows read were skipped. Returns the
    images encoded, the records of the latent files and how many images were in colour. Locally the latents go to a
    staging folder renamed into place. Object stores cannot rename a folder: there they are written in place, and
    the caller's stage marker (removed before, written after) says they are whole."""
    from engine.io.store import atomic_write_table

    runtime = config.runtime
    out_dir = location(out_dir)
    in_place = isinstance(out_dir, ObjectPath)
    staging = out_dir if in_place else out_dir.with_name(out_dir.name + ".partial")
    skip_dir = out_dir.with_name(out_dir.name + ".skipped.partial")
    for folder in (staging, skip_dir):
        remove_tree(folder)
    deterministic_order()
    wait_for_pool(runtime.pool_start_timeout_s)
    shuffle_on_disk(runtime.disk_shuffle)
    check_pool_fits("encode", runtime.encode_actors, runtime.encode_cpus_per_actor, runtime.gpus_per_actor)
    use_gpu = runtime.gpus_per_actor > 0
    # On CPUs the read and the JPEG decode run inside the encoder actors (Ray Data fuses them: same CPU request, no
    # batch size), as the bare loop does: nothing is queued between them. Read in tasks of their own, the decoded
    # rows ran ahead of the VAE into the object store until its budget held the pool to one task at a time (one
    # actor of two working, the stage at ~0.7x the bare loop at 48 px). With GPUs the decode stays in CPU tasks.
    read_cpus = None if use_gpu else runtime.encode_cpus_per_actor
    latents = source_dataset(config.data, resolution, skip_dir, task_cpus=read_cpus).map_batches(
        VaeEncoder,
        fn_constructor_kwargs={"prior": PriorSource(config.prior.kind, str(prior_folder), tuple(class_names),
                                                    config.prior.variant), "batch_size": config.encode.batch_size,
                               "device": "cuda" if use_gpu else "cpu", "dtype": runtime.prior_dtype,
                               "threads": runtime.threads("encode"), "fault_dir": str(config.run_dir)},
        batch_size=None,  # each block the reader yields; the VAE runs encode.batch_size images at a time
        compute=ray.data.ActorPoolStrategy(size=runtime.encode_actors),
        num_gpus=runtime.gpus_per_actor,
        num_cpus=runtime.encode_cpus_per_actor,
    )
    classes = len(class_names) or len(data_class_names(config.data))
    written = latents.groupby("label", num_partitions=min(classes, runtime.shuffle_partitions)).map_groups(
        write_class_group, fn_kwargs={"out_dir": str(staging)}, batch_format="pyarrow")
    records = written.take_all()  # one small row per class: {label, rows, path, file, sha256, bytes, colour_rows}
    count = sum(int(r["rows"]) for r in records)
    saw_nodes("encode", (node for r in records for node in r["nodes"]))
    skipped = gather_skipped(skip_dir)
    check_skipped(count + skipped.num_rows, skipped.to_pydict(), config.data.max_skip_fraction)
    atomic_write_table(out_dir.parent / "skipped.parquet", skipped)
    if not in_place:
        remove_tree(out_dir)
        staging.rename(out_dir)  # the stage's output appears whole or not at all
    remove_tree(skip_dir)
    files = {str(out_dir / r["path"]): {"sha256": r["sha256"], "bytes": int(r["bytes"])} for r in records}
    return EncodedLatents(count, files, sum(int(r["colour_rows"]) for r in records))
