"""What a job prints: the engine's own progress lines and results on the console; Ray's and the libraries' log lines
(Ray Data's progress, Ray Train's controller, worker output, Python warnings) in a log file.

    send_library_logs_to(log_file)    before Ray starts; jobs/distill.py and tune/sweep.py call it unless --verbose
    route_library_logs()              again once Ray is up (ray.init and Ray Data install console handlers)
    native_stderr_to_log()            around ray.init: the C++ core's start-up lines go to the file too
    library_log()                     the file, or None when everything goes to the console
    restore_console()                 when the job ends (a test runs many jobs in one process)

The file is opened on its first line, so a job refused before any stage leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# The loggers whose lines are the libraries', not the engine's (children included: ray.data, ray.train, ...).
LIBRARY_LOGGERS = ("ray", "py.warnings", "filelock", "urllib3", "PIL", "matplotlib", "fsspec", "botocore")
_HANDLER: list[logging.Handler] = []
_SAVED: dict = {}  # what send_library_logs_to replaced, for restore_console


def send_library_logs_to(log_file: Path) -> None:
    """Route the libraries' log lines to `log_file` and keep workers' output off the console (init_ray reads
    `library_log`)."""
    import ray.data  # noqa: F401 - Ray and Ray Data install their console handlers on import: replaced below

    handler = _LazyFileHandler(log_file, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _HANDLER[:] = [handler]
    logging.captureWarnings(True)
    # Ray's C++ core prints its errors to the driver's stderr (one per actor pool: "constructor arguments in the
    # object store"); its own files keep every process's full log at every level.
    if "RAY_BACKEND_LOG_LEVEL" not in os.environ:
        os.environ["RAY_BACKEND_LOG_LEVEL"] = _SAVED["backend_level"] = "fatal"
    route_library_logs()


def route_library_logs() -> None:
    """Every library logger's lines to the log file alone (no-op when the console shows everything). The driver's
    printer of messages its cluster pushes (raylet warnings such as "N PYTHON worker processes have been started")
    writes to sys.stdout whatever log_to_driver says: it is pointed at the file as well."""
    if not _HANDLER:
        return
    import ray._private.worker as ray_worker

    if getattr(ray_worker, "print_to_stdstream", None) not in (None, _print_to_log):
        _SAVED["print_to_stdstream"] = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = _print_to_log
    names = [n for n in logging.Logger.manager.loggerDict if any(n.startswith(f"{t}.") for t in LIBRARY_LOGGERS)]
    for name in {*LIBRARY_LOGGERS, *names}:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        top = name in LIBRARY_LOGGERS
        if top:
            logger.addHandler(_HANDLER[0])
        logger.propagate = not top  # children reach the file through their top logger, never the root's console


class _LazyFileHandler(logging.FileHandler):
    """Creates its folder with its file, on the first line: a job refused before any stage writes nothing."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _print_to_log(data: dict, ignore_prefix: bool = False) -> None:
    source = logging.getLogger(f"ray.pushed.{data.get('pid', 'cluster')}")
    for line in data.get("lines", ()):
        source.warning(line)


@contextmanager
def native_stderr_to_log():
    """Send what native code writes to this process's stderr (Ray's C++ core, while ray.init starts it) to the log
    file; Python's own sys.stderr is untouched once the block ends."""
    path = library_log()
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as log:  # audit: a log, appended line by line, is never an output read back
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def restore_console() -> None:
    """Undo send_library_logs_to: Ray's and the libraries' lines reach the console again."""
    if not _HANDLER:
        return
    import ray._private.worker as ray_worker

    handler = _HANDLER.pop()
    handler.close()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(False)
    if "print_to_stdstream" in _SAVED:
        ray_worker.print_to_stdstream = _SAVED.pop("print_to_stdstream")
    if _SAVED.pop("backend_level", None):
        os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


def library_log() -> Path | None:
    return Path(_HANDLER[0].baseFilename) if _HANDLER else None
