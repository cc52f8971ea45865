"""cluster.yaml: it parses, has what `ray up` needs, exposes nothing, and the engine's resource requests fit it."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from engine.config import RuntimeConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
NODES = CLUSTER["available_node_types"]

# The GPU placement a cluster run uses (docs/scale.md): one GPU per encode/decode actor
# and per student worker, CPUs for the quantize actors.
GPU_RUNTIME = ("runtime.encode_actors=16", "runtime.decode_actors=16", "runtime.gpus_per_actor=1",
               "runtime.train_workers=1", "runtime.train_use_gpu=true", "runtime.train_cpus_per_worker=4",
               "runtime.quantize_actors=32")


def test_required_keys_and_node_groups():
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in CLUSTER, key
    assert CLUSTER["provider"]["type"] == "aws"
    head = NODES[CLUSTER["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu = [n for n in NODES.values() if n["resources"].get("GPU", 0) > 0]
    assert gpu and all(n["min_workers"] == 0 for n in gpu)  # GPUs autoscale from zero
    assert sum(n.get("max_workers", 0) for name, n in NODES.items() if name != CLUSTER["head_node_type"]) \
        <= CLUSTER["max_workers"]


def test_no_credentials_and_dashboard_private():
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret|secret_access_key|ssh_private_key|BEGIN .*PRIVATE KEY",
                         text, re.IGNORECASE)
    head_start = " ".join(CLUSTER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in text


def test_every_key_has_a_comment():
    """A comment line directly above every mapping key (list items inside a key are covered by its comment)."""
    lines = (ROOT / "cluster.yaml").read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        if re.match(r"^\s*(- )?[A-Za-z_.][\w.]*:", line) and not line.lstrip().startswith("#"):
            above = lines[i - 1].strip() if i else ""
            if not above.startswith("#"):
                uncommented.append(f"{i + 1}: {line.strip()}")
    assert uncommented == []


def test_project_installed_from_the_lock_on_every_node():
    setup = " ".join(CLUSTER["setup_commands"])
    assert "requirements.lock" in setup
    assert CLUSTER["file_mounts"] == {"~/ddoq": "."}
    for command in CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"]:
        assert "ray " not in command or "~/ddoq/.venv/bin/ray" in command  # the lock's Ray, not the AMI's


def test_every_node_keeps_idle_task_workers_as_a_local_ray_does():
    from engine.ray.cluster import IDLE_WORKER_KEEP_MS

    starts = [c for c in CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert f"RAY_idle_worker_killing_time_threshold_ms={IDLE_WORKER_KEEP_MS} " in command


def stage_requests(runtime: RuntimeConfig) -> dict[str, dict[str, float]]:
    """One actor / worker of each stage, as engine/ray/ requests it."""
    return {
        "encode": {"CPU": 1, "GPU": runtime.gpus_per_actor},
        "decode": {"CPU": 1, "GPU": runtime.gpus_per_actor},
        "quantize": {"CPU": 1, "GPU": runtime.quantize_gpus_per_actor},
        "train": {"CPU": runtime.train_cpus_per_worker, "GPU": 1.0 if runtime.train_use_gpu else 0.0},
    }


def fits(request: dict, node: dict) -> bool:
    return all(node["resources"].get(name, 0) >= need for name, need in request.items() if need > 0)


@pytest.mark.parametrize("config_file", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_stage_requests_fit_a_node_type(config_file, gpu):
    config = load_config(ROOT / "configs" / config_file, GPU_RUNTIME if gpu else ())
    workers = {name: n for name, n in NODES.items() if name != CLUSTER["head_node_type"]}
    for stage, request in stage_requests(config.runtime).items():
        homes = [name for name, node in workers.items() if fits(request, node)]
        assert homes, f"{config_file}: no worker node type fits a {stage} actor {request}"
        if request["GPU"] > 0:  # GPU actors: the group must hold the whole pool at full scale
            actors = {"encode": config.runtime.encode_actors, "decode": config.runtime.decode_actors,
                      "train": config.runtime.train_workers}.get(stage, 1)
            capacity = sum(n["max_workers"] * n["resources"]["GPU"] // request["GPU"] for n in
                           (workers[h] for h in homes))
            assert capacity >= actors, f"{stage}: {actors} actors, room for {capacity}"


def test_sweep_trial_peak_fits_the_gpu_group():
    import sys

    sys.path.insert(0, str(ROOT / "tune"))
    import sweep

    config = load_config(ROOT / "configs" / "digits.yaml", GPU_RUNTIME)
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, decode_actors=1))
    full = {"CPU": sum(n["max_workers"] * n["resources"]["CPU"] for n in NODES.values() if "max_workers" in n),
            "GPU": sum(n["max_workers"] * n["resources"].get("GPU", 0) for n in NODES.values() if "max_workers" in n)}
    assert sweep.max_concurrent_trials(config, full) == 16  # one trial per GPU at full scale
