"""Generative priors DDOQ pushes centroids through, behind one interface (engine.priors.base.Prior):
`tiny` (trained by the engine for a new domain, cached), `sd15` (Stable Diffusion v1.5) and `dit` (DiT-XL/2-256),
the last two loaded from a diffusers folder named by prior.path: local, or a URI (s3://bucket/models/sd15) that
each machine copies once to a local folder before loading it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.config import DataConfig, PriorConfig, config_hash
from engine.io.location import ObjectPath, local_copy, location
from engine.priors.base import Prior
from engine.priors.tiny import TinyPrior, load_tiny_prior


@dataclass(frozen=True)
class PriorSource:
    """What an encode or decode actor needs to load the prior once: its kind, its folder (local or a URI), the
    class names sd15/dit prompt with, and which weight files to read (prior.variant)."""

    kind: str
    folder: str
    class_names: tuple[str, ...] = ()
    variant: str = "auto"

    def load(self) -> Prior:
        return load_prior(self.kind, self.folder, self.class_names, self.variant)


def prior_cache_folder(prior: PriorConfig, data: DataConfig, cache_root: Path) -> Path:
    """Where the engine keeps the prior it trained for this (data, prior) config."""
    return cache_root / "priors" / f"{data.name}-{prior.kind}-{config_hash(prior, data)}"


def prior_folder(prior: PriorConfig, data: DataConfig, cache_root: Path) -> Path | ObjectPath:
    return location(prior.path) if prior.path else prior_cache_folder(prior, data, cache_root)


def load_prior(kind: str, folder: str | Path | ObjectPath, class_names: tuple[str, ...],
               variant: str = "auto") -> Prior:
    """The one loader of every kind (used by the job and by the Ray encode/decode actors). The tiny prior brings its
    own class names and the caller checks them against the data; sd15/dit take the data's names (prompts) and the
    weight files prior.variant names (engine/priors/base.py). A folder on an object store is copied to this
    machine first (once)."""
    folder = local_copy(location(folder))
    if kind == "tiny":
        return load_tiny_prior(folder)
    if kind == "sd15":
        from engine.priors.sd15 import load_sd15_prior

        return load_sd15_prior(folder, class_names, variant)
    if kind == "dit":
        from engine.priors.dit import load_dit_prior

        return load_dit_prior(folder, class_names, variant)
    raise ValueError(f"unknown prior kind {kind!r}")


def load_or_train_prior(prior: PriorConfig, data: DataConfig, cache_root: Path, log: Callable = print) -> Prior:
    """Load the configured prior folder, or train the tiny prior on the train split and cache it atomically."""
    folder = prior_folder(prior, data, cache_root)
    if prior.kind != "tiny":
        from engine.data.sources import class_names

        return load_prior(prior.kind, folder, class_names(data), prior.variant)
    if prior.path or folder.exists():
        return load_prior("tiny", folder, ())
    from engine.data.images import sample_split
    from engine.priors.train_tiny import train_tiny_prior

    log(f"training the tiny prior for {data.name} (cached at {folder})")
    train = sample_split(data, "train", prior.train_images, prior.seed)  # bounded: never the whole split
    log(f"  on {len(train)} train images" + (f" (a seeded sample of at most {prior.train_images})"
                                             if prior.train_images else ""))
    trained = train_tiny_prior(prior, train.images, train.labels, train.class_names, log=log)
    save_prior_atomically(trained, folder)
    return load_tiny_prior(folder)


def save_prior_atomically(prior: TinyPrior, folder: Path) -> None:
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    prior.save(staging)
    staging.rename(folder)  # atomic: a killed run never leaves a half-written prior behind
