"""Arming and checking the crash injection of engine/faults.py (tests only)."""

from __future__ import annotations

from pathlib import Path

from engine.faults import crash_flag


def request_crash(run_dir: str | Path, stage: str) -> Path:
    """Arm a one-shot crash of whichever actor of `stage` next processes a batch."""
    flag = crash_flag(run_dir, stage)
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()
    return flag


def crash_fired(run_dir: str | Path, stage: str) -> bool:
    flag = crash_flag(run_dir, stage)
    return flag.with_name(flag.name + ".fired").exists()
