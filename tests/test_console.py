"""The console keeps the engine's lines; Ray's and the libraries' go to the run's log file (engine/ray/console.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_library_lines_go_to_the_log_file_and_not_the_console(tmp_path, capsys):
    from engine.ray import console

    log = tmp_path / "run" / "run.log"
    try:
        console.send_library_logs_to(log)
        assert not log.parent.exists()  # nothing written before the first line: a refused job leaves no folder
        logging.getLogger("ray.data._internal.execution").warning("Progress bars disabled")
        console._print_to_log({"lines": ["WARNING: 8 PYTHON worker processes have been started"], "pid": "raylet"})
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("The given NumPy array is not writable", UserWarning, stacklevel=1)
        with console.native_stderr_to_log():
            os.write(2, b"E core_worker.cc: constructor arguments in the object store\n")
        print("[distill 12:00:00] the engine's own line")
    finally:
        console.restore_console()
    out = capsys.readouterr()
    assert out.out == "[distill 12:00:00] the engine's own line\n" and out.err == ""
    text = log.read_text()
    for line in ("Progress bars disabled", "8 PYTHON worker processes", "not writable", "core_worker.cc"):
        assert line in text
    assert console.library_log() is None and not logging.getLogger("ray").handlers  # restored


@pytest.mark.slow
def test_make_distill_prints_the_engines_progress_and_table_only(tmp_path):
    out = subprocess.run([sys.executable, "jobs/distill.py", "--smoke-test", f"runs_dir={tmp_path}",
                          f"cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == "" and "\x1b[" not in out.stdout  # no colour codes, nothing from Ray
    table = out.stdout.split("\n\n", 1)[0].splitlines()
    assert all(line.startswith("[distill ") for line in table), [x for x in table if not x.startswith("[distill")]
    assert sum("] student " in line for line in table) == 9 and any("9/9 after" in line for line in table)
    assert (tmp_path / "smoke" / "run.log").stat().st_size > 0


def test_each_student_is_announced_on_the_console_as_its_row_lands(tmp_path):
    """Workers' progress lines go to Ray's log files when the console is quiet: the driver itself says when each
    job's result file appears, in the order they land, and the rest once the trainers are done."""
    import json
    import time
    from types import SimpleNamespace

    from engine.ray.evaluate import watch_results

    def land(name: str, top1: float) -> None:  # as the engine writes a result: whole, then renamed into place
        (tmp_path / "staging.partial").write_text(json.dumps({"top1": top1}))
        (tmp_path / "staging.partial").rename(tmp_path / f"{name}.json")

    jobs = [SimpleNamespace(name=f"ddoq-mass-ipc1-convnet3-seed{s}") for s in range(3)]
    lines: list[str] = []
    (tmp_path / "ddoq-mass-ipc1-convnet3-seed0.json").write_text("")  # unreadable yet: skipped until it is
    with watch_results(tmp_path, jobs, lines.append, every_s=0.05):
        land("ddoq-mass-ipc1-convnet3-seed1", 0.6083)
        for _ in range(100):
            if lines:
                break
            time.sleep(0.05)
        assert len(lines) == 1 and "seed1: test top-1 60.8 %, 1/3 after" in lines[0]
        for s in (0, 2):
            land(f"ddoq-mass-ipc1-convnet3-seed{s}", 0.5)
    assert len(lines) == 3 and "3/3" in lines[-1]
