"""The decode stage: centroid rows -> map_batches(CentroidDecoder, actor pool) -> PNGs of the distilled sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data

from engine.config import DecodeConfig, DistillConfig
from engine.faults import crash_once_if_requested
from engine.location import location
from engine.ray.cluster import deterministic_order


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
