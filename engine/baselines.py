"""Real-image baselines: which training images represent each class. Returns indices into the train split."""

from __future__ import annotations

import numpy as np


def select_random(labels: np.ndarray, ipc: int, seed: int) -> np.ndarray:
    """`ipc` images drawn uniformly without replacement per class (all of a class if it has fewer), sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=min(ipc, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))
