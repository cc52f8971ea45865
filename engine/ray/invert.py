"""The invert stage (quantize.space=noise): class latent folders -> map_batches(ClassInverter, actor pool) -> each
class's DDIM-inverted states (engine/invert.py) in out_dir/label=<c>/part-00000.parquet {id, source, latent}, the
layout of the encode stage's latents, which the quantize stage then reads in their place.

Input rows are class folders, one row and one block each, so every actor of the pool gets classes and no process
holds more than one class. A class already inverted (its file exists: writes are atomic) is skipped, so a killed
actor's retry, or a re-run, redoes only what is missing; the rows of the records are -1 for those. Cost per
image: round(decode.num_steps × strength) denoiser passes (one batch row each at inversion guidance 1, two
otherwise), against the encode stage's one VAE encoder pass.
"""

from __future__ import annotations

import time

import numpy as np

import ray
import ray.data
from engine.config import DecodeConfig, DistillConfig
from engine.faults import crash_once_if_requested
from engine.io.location import location
from engine.priors import PriorSource
from engine.ray.cluster import check_pool_fits, deterministic_order, node_id, wait_for_pool


class ClassInverter:
    """Ray Data callable class: loads the prior once; inverts whole classes, decode.batch_size latents at a time."""

    def __init__(self, prior: PriorSource, decode: DecodeConfig, out_dir: str, device: str, dtype: str = "float32",
                 threads: int = 1, fault_dir: str = ""):
        import torch

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the CPU reservation; the config decides
        self.prior = prior.load().to(device, dtype)
        self.decode, self.out_dir, self.fault_dir = decode, out_dir, fault_dir

    def __call__(self, batch: dict) -> dict:
        from engine.invert import invert_latents
        from engine.io.manifest import sha256_file
        from engine.io.store import float32_rows, read_class_table, table_latents, write_class_latents

        crash_once_if_requested(self.fault_dir, "invert")
        records = []
        for label, class_dir in zip(batch["label"], batch["class_dir"]):
            done = location(self.out_dir) / f"label={int(label)}" / "part-00000.parquet"
            if done.exists():  # inverted by an earlier attempt: recorded again for the manifest, not redone
                records.append({"label": int(label), "rows": -1, "file": str(done), "sha256": sha256_file(done),
                                "bytes": done.stat().st_size})
                continue
            table = read_class_table(str(class_dir), ("id", "source", "latent"))
            latents = table_latents(table).reshape(table.num_rows, *self.prior.latent_shape)
            labels = np.full(len(latents), int(label))
            size = self.decode.batch_size
            states = np.concatenate([invert_latents(self.prior, latents[s:s + size], labels[s:s + size], self.decode)
                                     for s in range(0, len(latents), size)])
            table = table.set_column(table.column_names.index("latent"), "latent",
                                     float32_rows(states.reshape(len(states), -1)))
            records.append(write_class_latents(self.out_dir, int(label), table))
        return {"label": np.array([r["label"] for r in records]), "rows": np.array([r["rows"] for r in records]),
                "file": np.array([r["file"] for r in records], dtype=object),
                "sha256": np.array([r["sha256"] for r in records], dtype=object),
                "bytes": np.array([r["bytes"] for r in records]),
                "node": np.array([node_id()] * len(records), dtype=object)}


def invert_classes(config: DistillConfig, prior_folder, class_dirs: dict, out_dir, class_names: tuple = (),
                   log=None) -> list:
    """Every class of `class_dirs` {label: latent folder} inverted into out_dir on the decode actors' pool (the
    same prior, device and resources); returns one record per class {label, rows (-1: done before), file, sha256,
    bytes, node}. `log` gets a line as each class lands: a class takes minutes."""
    runtime = config.runtime
    check_pool_fits("invert", runtime.decode_actors, runtime.decode_cpus_per_actor, runtime.gpus_per_actor, 0.0)
    deterministic_order()
    wait_for_pool(runtime.pool_start_timeout_s)
    location(out_dir).mkdir(parents=True, exist_ok=True)
    items = [{"label": label, "class_dir": str(folder)} for label, folder in sorted(class_dirs.items())]
    done = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        ClassInverter,
        fn_constructor_kwargs={"prior": PriorSource(config.prior.kind, str(prior_folder), tuple(class_names),
                                                    config.prior.variant),
                               "decode": config.decode, "out_dir": str(out_dir),
                               "device": "cuda" if runtime.gpus_per_actor > 0 else "cpu",
                               "dtype": runtime.prior_dtype, "threads": runtime.threads("decode"),
                               "fault_dir": str(config.run_dir)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=runtime.decode_actors, max_tasks_in_flight_per_actor=1),
        num_gpus=runtime.gpus_per_actor,
        num_cpus=runtime.decode_cpus_per_actor,
    )
    records, started = [], time.monotonic()
    for record in done.iter_rows():  # one small row per class, never a latent
        records.append(record)
        if log:
            what = "inverted before" if record["rows"] < 0 else f"{record['rows']} latents"
            log(f"invert: class {record['label']} ({what}), {len(records)}/{len(items)} classes after "
                f"{(time.monotonic() - started) / 60:.1f} min")
    return sorted(records, key=lambda r: r["label"])
