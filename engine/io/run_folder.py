"""A run folder holds its own run and nothing else.

    check_run_folder(config, overwrite)   before anything is written: refuse (one sentence) a folder that holds
                                          another configuration's run or files the engine did not write, or, with
                                          --overwrite, clear them
    save_config(config, path)             the run's config.yaml, written atomically
    prune_run_folder(run_dir, keep)       after the stages: drop the engine's own outputs of earlier configurations
                                          (sets, quantizations, results this run did not ask for)

The same configuration re-run in its folder (a killed run, or one asked again) always passes: its finished stages
and students are reused. A different configuration (runtime settings aside: they change how fast, not what) needs
another `name=` or `--overwrite`; stages whose inputs did not change are still reused then (the latents, say).
So the sets a user loads with torchvision's ImageFolder, and the files manifest.json lists, are this run's alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.config import RunError
from engine.config import DistillConfig, config_to_dict
from engine.io.location import list_files, location, remove_tree
from engine.io.store import atomic_write_bytes

# Everything the engine writes at the top of a run folder (files and folders).
LAYOUT = frozenset({
    "config.yaml", "metrics.json", "report.html", "manifest.json", "skipped.parquet", "centroids.parquet",
    "quantization.parquet", "run.log", "latents", "latents.partial", "latents.skipped.partial", "inverted", "quantized",
    "distilled", "results", "report", "ray_train", "_stages", "_manifest", "_faults", "_cache",
})
RUN_LOG = "run.log"
# What does not change the outputs: where they go and how fast they are made.
NOT_IDENTITY = ("runtime", "runs_dir", "cache_dir")


def save_config(config: DistillConfig, path) -> None:
    atomic_write_bytes(path, yaml.safe_dump(config_to_dict(config), sort_keys=False).encode())


@dataclass(frozen=True)
class Keep:
    """The engine outputs of this run, by folder: set folder names under distilled/, the quantization key under
    quantized/, the evaluation key under results/, the inversion key under inverted/ (None: keep what is there)."""

    sets: frozenset[str]
    quantize_key: str | None = None
    evaluate_key: str | None = None
    invert_key: str | None = None


def run_log_path(config: DistillConfig) -> Path:
    """Where a job writes Ray's and the libraries' log lines: run.log in a local run folder; beside the cache
    when the run folder is on an object store (a log is appended line by line, which objects are not)."""
    run_dir = config.run_dir
    return run_dir / RUN_LOG if isinstance(run_dir, Path) else config.cache_path / "logs" / f"{config.name}.log"


def run_identity(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in NOT_IDENTITY}


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, with both values, sorted."""
    out = []
    for key in sorted(saved.keys() | current.keys()):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def foreign_files(run_dir, files: dict[str, int]) -> list[str]:
    """Files of the folder the engine's layout has no place for, and files in a set folder its index does not
    list (a torchvision ImageFolder would load them as part of the set)."""
    from engine.io.store import read_table

    # Hidden files are an interrupted atomic write's staging copies (or a desktop's .DS_Store): never part of a set.
    foreign = sorted(f for f in files if f.split("/", 1)[0] not in LAYOUT and not f.startswith("."))
    set_files: dict[str, set[str]] = {}
    for relative in files:
        parts = relative.split("/")
        if parts[0] == "distilled" and len(parts) > 2:
            set_files.setdefault(parts[1], set()).add("/".join(parts[2:]))
    for name, inside in sorted(set_files.items()):
        if "index.parquet" not in inside:
            continue  # a set still being written: its stage rewrites it
        index = location(run_dir) / "distilled" / name / "index.parquet"
        listed = set(read_table(index, ["path"]).column(0).to_pylist()) | {"index.parquet", "metadata.jsonl"}
        foreign += [f"distilled/{name}/{f}" for f in sorted(inside - listed)
                    if not f.split("/")[-1].startswith(".")]
    return foreign


def check_run_folder(config: DistillConfig, overwrite: bool = False) -> None:
    """Refuse, before any stage, a run folder holding another run or foreign files; with `overwrite`, delete
    what is not this configuration's (engine outputs of another configuration are pruned after the stages)."""
    run_dir = config.run_dir
    files = list_files(run_dir) if run_dir.exists() else {}
    files.pop(RUN_LOG, None)  # this job's own log, opened before the check when it joined a cluster
    if not files:
        return
    saved_config = location(run_dir) / "config.yaml"
    if "config.yaml" not in files:
        if not overwrite:
            raise RunError(f"{run_dir} already holds {len(files)} file(s) no run of the engine wrote (e.g. "
                           f"{', '.join(sorted(files)[:3])}): choose another name=, or pass --overwrite to delete "
                           f"them")
        remove_tree(run_dir)
        return
    saved = yaml.safe_load(saved_config.read_text()) or {}
    differences = config_differences(run_identity(saved), run_identity(config_to_dict(config)))
    if differences and not overwrite:
        raise RunError(f"{run_dir} holds the run of another configuration ({'; '.join(differences[:3])}"
                       f"{'; ...' if len(differences) > 3 else ''}): choose another name=, or pass --overwrite to "
                       f"replace it (stages whose inputs did not change are reused)")
    foreign = foreign_files(run_dir, files)
    if foreign and not overwrite:
        raise RunError(f"{run_dir} holds {len(foreign)} file(s) this run did not write (e.g. "
                       f"{', '.join(foreign[:3])}): move them out, or pass --overwrite to delete them")
    for relative in foreign:
        delete_file(location(run_dir), relative)


def delete_file(root, relative: str) -> None:
    """Delete a file and the folders it leaves empty (an empty class folder would still be a class to
    torchvision's ImageFolder); an object store has no folders to leave."""
    place = root / relative
    place.unlink()
    if isinstance(place, Path):
        parent = place.parent
        while parent != root and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def prune_run_folder(run_dir, keep: Keep) -> list[str]:
    """Delete the engine's outputs of other configurations from the run folder -> what was deleted."""
    root = location(run_dir)
    removed = []
    for folder, kept in (("distilled", keep.sets), ("quantized", {keep.quantize_key}),
                         ("results", {keep.evaluate_key}), ("inverted", {keep.invert_key})):
        if None in kept or not (root / folder).exists():
            continue
        for name in sorted({relative.split("/", 1)[0] for relative in list_files(root / folder)}):
            if name not in kept:
                remove_tree(root / folder / name)
                removed.append(f"{folder}/{name}")
    return removed

