"""The image sets students train on: which sets a config asks for, and the real-image baselines' sets.

A set is keyed by SetKey(method, weights, ipc, draw) and lives in runs/<name>/distilled/<set name>-ipc<k>/ (PNGs +
index.parquet). d4m and ddoq sets hold the decoded centroids (engine/ray/decode.py); random, herding and kcenter
sets hold real training images, picked beside the k-means in the quantize stage (engine/quantize/class_task.py) and
read back by engine/ray/baselines.py. `random` has one set per draw (quantize.random_draws): the student of evaluate
seed s trains on draw s mod random_draws, so its spread over seeds includes which images were drawn, and seeds
added later (a second run with more seeds and draws) keep the draws the earlier seeds had.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from engine.config import DistillConfig
from engine.io import store

REAL_METHODS = ("random", "herding", "kcenter")


class SetKey(NamedTuple):
    method: str
    weights: str  # ddoq's weights mode; d4m "uniform"; real sets "none"
    ipc: int
    draw: int = 0  # which random subset; 0 for every other method

    @property
    def name(self) -> str:
        """The set's name without its IPC: ddoq-mass, d4m, random, random-draw1 (draw 0 keeps the plain name of
        single-draw runs, so their folders stay valid)."""
        if self.method == "ddoq":
            return f"ddoq-{self.weights}"
        return f"{self.method}-draw{self.draw}" if self.draw else self.method


def random_draw(config: DistillConfig, seed: int) -> int:
    """The random subset the student of evaluate seed `seed` trains on."""
    return seed % config.quantize.random_draws


def requested_sets(config: DistillConfig) -> list[SetKey]:
    """Every set the evaluation needs; `full` needs none. random: one per draw the seeds use."""
    sets = []
    for method in config.evaluate.methods:
        if method == "full":
            continue
        modes = config.evaluate.ddoq_weights if method == "ddoq" else ("uniform",) if method == "d4m" else ("none",)
        draws = sorted({random_draw(config, seed) for seed in config.evaluate.seeds}) if method == "random" else [0]
        sets += [SetKey(method, mode, ipc, draw) for mode in modes for ipc in config.quantize.ipc for draw in draws]
    return sets


def set_dir(run_dir: Path, key: SetKey) -> Path:
    return store.distilled_dir(run_dir, key.name, key.ipc)
