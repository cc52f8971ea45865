"""The image sets students train on: which sets a config asks for, and the real-image baselines' sets.

A set is keyed by (method, weights, ipc) and lives in runs/<name>/distilled/<set name>-ipc<k>/ (PNGs +
index.parquet). d4m and ddoq sets hold the decoded centroids (written by the decode stage); random, herding and
kcenter sets hold real training images, chosen here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine import store
from engine.baselines import select_herding, select_kcenter, select_random
from engine.config import DistillConfig
from engine.data import ImageSet

REAL_METHODS = ("random", "herding", "kcenter")
LATENT_SELECTORS = {"herding": select_herding, "kcenter": select_kcenter}


def set_name(method: str, weights: str) -> str:
    return f"ddoq-{weights}" if method == "ddoq" else method


def requested_sets(config: DistillConfig) -> list[tuple[str, str, int]]:
    """(method, weights, ipc) of every set the evaluation needs; `full` needs none."""
    sets = []
    for method in config.evaluate.methods:
        if method == "full":
            continue
        modes = config.evaluate.ddoq_weights if method == "ddoq" else ("uniform",) if method == "d4m" else ("none",)
        sets += [(method, mode, ipc) for mode in modes for ipc in config.quantize.ipc]
    return sets


def set_dir(run_dir: Path, method: str, weights: str, ipc: int) -> Path:
    return store.distilled_dir(run_dir, set_name(method, weights), ipc)


def write_real_sets(config: DistillConfig, train: ImageSet, latents_dir: Path) -> dict[tuple[str, str, int], Path]:
    """random / herding / kcenter sets of real training images (weights 1) for every requested IPC.
    herding and kcenter read one class's latents at a time from the encode stage's output."""
    wanted = [(m, w, k) for m, w, k in requested_sets(config) if m in REAL_METHODS]
    ipcs = sorted({k for _, _, k in wanted})
    chosen: dict[tuple[str, int], np.ndarray] = {}
    for ipc in ipcs:
        if any(m == "random" for m, _, k in wanted if k == ipc):
            chosen[("random", ipc)] = select_random(train.labels, ipc, seed=config.quantize.seed)
    latent_methods = sorted({m for m, _, _ in wanted if m in LATENT_SELECTORS})
    if latent_methods:
        position = {str(image_id): i for i, image_id in enumerate(train.ids)}
        picks: dict[tuple[str, int], list[np.ndarray]] = {}
        for _, class_dir in sorted(store.class_latent_dirs(latents_dir).items()):
            ids, latents = store.read_class_latents(class_dir)
            for method in latent_methods:
                order = LATENT_SELECTORS[method](latents, max(ipcs))  # greedy: IPC k = the first k picks
                for ipc in ipcs:
                    picks.setdefault((method, ipc), []).append(
                        np.array([position[str(ids[r])] for r in order[:ipc]], dtype=np.int64))
        chosen.update({key: np.concatenate(parts) for key, parts in picks.items()})

    folders = {}
    for method, weights, ipc in wanted:
        folder = set_dir(config.run_dir, method, weights, ipc)
        indices = chosen[(method, ipc)]
        files = []
        for rank, i in enumerate(indices):
            files.append(store.image_file_name(int(train.labels[i]), rank))
            store.write_png(folder / files[-1], train.images[i])
        ones = np.ones(len(indices))
        store.write_set_index(folder, files, train.labels[indices], train.class_names, ones, ones.astype(int))
        folders[(method, weights, ipc)] = folder
    return folders
