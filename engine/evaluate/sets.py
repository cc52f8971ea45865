"""The image sets students train on: which sets a config asks for, and the real-image baselines' sets.

A set is keyed by (method, weights, ipc) and lives in runs/<name>/distilled/<set name>-ipc<k>/ (PNGs +
index.parquet). d4m and ddoq sets hold the decoded centroids (engine/ray/decode.py); random, herding and kcenter
sets hold real training images, picked beside the k-means in the quantize stage (engine/quantize/class_task.py) and read
back by engine/ray/baselines.py.
"""

from __future__ import annotations

from pathlib import Path

from engine.config import DistillConfig
from engine.io import store

REAL_METHODS = ("random", "herding", "kcenter")


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
