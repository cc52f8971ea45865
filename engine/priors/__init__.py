"""Generative priors DDOQ pushes centroids through. Only `tiny` (trained by the engine) is built so far;
Stable Diffusion v1.5 and DiT are the generative-priors issue."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from engine.config import DataConfig, PriorConfig, config_hash
from engine.priors.tiny import TinyPrior, load_tiny_prior


def prior_cache_folder(prior: PriorConfig, data: DataConfig, cache_root: Path) -> Path:
    """Where the engine keeps the prior it trained for this (data, prior) config."""
    return cache_root / "priors" / f"{data.name}-{prior.kind}-{config_hash(prior, data)}"


def prior_folder(prior: PriorConfig, data: DataConfig, cache_root: Path) -> Path:
    return Path(prior.path) if prior.path else prior_cache_folder(prior, data, cache_root)


def load_or_train_prior(prior: PriorConfig, data: DataConfig, cache_root: Path, log: Callable = print) -> TinyPrior:
    """Load the configured prior folder, or train the tiny prior on the train split and cache it atomically."""
    folder = prior_folder(prior, data, cache_root)
    if prior.path or folder.exists():
        return load_tiny_prior(folder)
    from engine.data import load_split
    from engine.priors.train_tiny import train_tiny_prior

    log(f"training the tiny prior for {data.name} (cached at {folder})")
    train = load_split(data, "train")
    trained = train_tiny_prior(prior, train.images, train.labels, train.class_names, log=log)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    trained.save(staging)
    staging.rename(folder)  # atomic: a killed run never leaves a half-written prior behind
    return load_tiny_prior(folder)
