"""What every Ray stage shares: joining or starting the cluster, and Ray Data's ordering."""

from __future__ import annotations

import os

import ray
import ray.data

from engine.config import RuntimeConfig


def init_ray(runtime: RuntimeConfig) -> None:
    """Join the cluster a `ray job submit` runs in, or start a local one sized by the config."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`, or by a user pointing at a cluster
        ray.init()
    else:  # "local": never attach by surprise to a cluster some earlier `ray start` left running
        # The dashboard (on 127.0.0.1 only) serves the state API that Ray Train's controller polls.
        ray.init(address="local", num_cpus=runtime.num_cpus or None, dashboard_host="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = True


# ---------------------------------------------------------------- encode


def deterministic_order() -> None:
    """Blocks are bundled into batches in input order, so a re-run (or a retried task) sees the same batches and
    the outputs are byte-identical."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
