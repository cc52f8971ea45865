"""`ray job submit` against a real local head (`ray start --head`), as a user runs it: free ports, a short temp
dir, and the head stopped afterwards. Used by the job-submission tests of jobs/distill.py and tune/sweep.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_to_local_head(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Start a head, submit `command` with `--working-dir` the repository, return the finished submission."""
    import ray

    ray.shutdown()  # two Ray instances on one node contend for the agents' fixed ports
    ray_bin = Path(sys.executable).parent / "ray"
    # The job's `python` must be this venv's, as it is for a user who activated it.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": "",
           "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # unix socket paths are limited to ~107 characters
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={ray_temp}",
         f"--dashboard-agent-listen-port={free_port()}"],  # its default (52365) is taken by any other local Ray
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        for _ in range(60):
            if subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                              capture_output=True).returncode == 0:
                break
            time.sleep(1)
        return subprocess.run([str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                               "--", *command], env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its own cluster on SIGTERM
        head.wait(timeout=60)
        shutil.rmtree(ray_temp, ignore_errors=True)
