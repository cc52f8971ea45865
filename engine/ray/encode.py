"""The encode stage: source rows -> map_batches(VaeEncoder, actor pool) -> latents parquet by class."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import ray
import ray.data

from engine.config import DistillConfig
from engine.data import check_skipped
from engine.faults import crash_once_if_requested
from engine.location import ObjectPath, filesystem_and_path, location, remove_tree
from engine.ray.cluster import deterministic_order
from engine.ray.source import gather_skipped, source_dataset


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
