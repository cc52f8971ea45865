"""Real-image baselines: which training images represent a class. Pure numpy.

random   `ipc` images per class, uniformly without replacement (seeded per class and draw: select_random_in_class).
herding  Welling (2009), as in iCaRL / the DC benchmark: greedily add the image that brings the running mean of
         the chosen latents closest to the class's mean latent.
kcenter  greedy k-center (Sener & Savarese 2018): start from the image nearest the class mean, then repeatedly
         add the image farthest from everything chosen so far.
herding and kcenter work on one class's latents (the prior's VAE space, where the quantizer also works) and
return row positions into them; a class with fewer than `ipc` images gives all of them.
"""

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


def select_random_in_class(n: int, ipc: int, seed: int, label: int, draw: int = 0) -> np.ndarray:
    """`ipc` of a class's `n` rows, uniformly without replacement (all if it has fewer), sorted. Each class and
    draw has its own generator, seeded by (seed, label[, draw]), so classes are chosen in parallel and independently
    of which other classes exist (select_random's one generator for all classes cannot be split that way). Draw 0
    keeps the (seed, label) seeding of single-draw runs, so their random sets stay the same images."""
    rng = np.random.default_rng([seed, label] if draw == 0 else [seed, label, draw])
    return np.sort(rng.choice(n, size=min(ipc, n), replace=False))


def _as_rows(latents: np.ndarray) -> np.ndarray:
    x = np.asarray(latents, dtype=np.float64).reshape(len(latents), -1)
    if not np.isfinite(x).all():
        raise ValueError("baseline selection got NaN or Inf latents")
    return x


def select_herding(latents: np.ndarray, ipc: int) -> np.ndarray:
    """Row positions, in the order herding picks them."""
    x = _as_rows(latents)
    k = min(ipc, len(x))
    target = x.mean(axis=0)
    chosen: list[int] = []
    running = np.zeros_like(target)
    available = np.ones(len(x), dtype=bool)
    for step in range(1, k + 1):
        # Mean after adding candidate i: (running * (step - 1) + x_i) / step; pick the one closest to the target.
        candidate_means = (running * (step - 1) + x) / step
        distance = ((candidate_means - target) ** 2).sum(axis=1)
        distance[~available] = np.inf
        best = int(np.argmin(distance))
        chosen.append(best)
        available[best] = False
        running = candidate_means[best]
    return np.array(chosen, dtype=np.int64)


def select_kcenter(latents: np.ndarray, ipc: int) -> np.ndarray:
    """Row positions, in the order greedy k-center picks them."""
    x = _as_rows(latents)
    k = min(ipc, len(x))
    first = int(np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(axis=1)  # squared distance to the closest chosen point
    nearest[first] = -np.inf  # never re-pick a chosen row, even among duplicates
    for _ in range(k - 1):
        best = int(np.argmax(nearest))
        chosen.append(best)
        nearest = np.minimum(nearest, ((x - x[best]) ** 2).sum(axis=1))
        nearest[best] = -np.inf
    return np.array(chosen, dtype=np.int64)
