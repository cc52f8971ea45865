"""Crash injection, the hook the encode, decode and training actors call once per batch: lets a test kill one Ray
actor mid-stage, once, to check that Ray retries the work and that nothing is lost. Inert in normal runs: it fires
only when a test has created the flag file `<run folder>/_faults/crash-<stage>` (tests/faults.py arms it); costs
one failed rename per batch otherwise."""

from __future__ import annotations

import os
from pathlib import Path

FAULTS_FOLDER = "_faults"


def crash_flag(run_dir: str | Path, stage: str) -> Path:
    """The file whose presence arms a one-shot crash of `stage`'s next batch; renamed to `<flag>.fired` by the
    actor that fires it."""
    return Path(run_dir) / FAULTS_FOLDER / f"crash-{stage}"


def crash_once_if_requested(run_dir: str | None, stage: str) -> None:
    """Exit this process abruptly (as a preempted node or an OOM kill would) if a crash of `stage` is armed.
    The rename is atomic, so exactly one actor fires per armed flag, however many race for it. Local run folders
    only: an object store has no atomic rename to claim the flag with."""
    if not run_dir or "://" in str(run_dir):
        return
    flag = crash_flag(run_dir, stage)
    try:
        os.rename(flag, flag.with_name(flag.name + ".fired"))
    except FileNotFoundError:
        return
    os._exit(17)
