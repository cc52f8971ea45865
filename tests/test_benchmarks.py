"""The benchmarks run (at toy sizes) and print what docs/benchmarks.md quotes, so they cannot silently rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_quantizer_benchmark_prints_the_ratio_line():
    lines = run("benchmarks/quantize.py", "--n", "120", "--dim", "32", "--ks", "10", "--seeds", "0", "1").splitlines()
    assert lines[-1].startswith("distortion_vs_d4m=") and "distortion_vs_best=" in lines[-1]
    ratio = float(lines[-1].split()[0].split("=")[1])
    assert 0 < ratio <= 1.0  # the engine never loses to D4M's single pass on these mixtures


@pytest.mark.slow
def test_inversion_flops_are_counted_on_the_real_architectures():
    """Meta tensors, so the real SD v1.5 and DiT-XL/2 sizes in seconds: DiT-XL/2's pass is its published 118.6
    GMACs (237 GFLOPs), and the inversion at 35 passes costs 35 of them."""
    lines = run("benchmarks/invert_flops.py").splitlines()
    sd15, dit = (line.split() for line in lines[1:3])
    assert sd15[0] == "sd15" and dit[0] == "dit"
    assert 230 <= float(dit[2]) <= 245 and float(dit[3]) == pytest.approx(35 * float(dit[2]), rel=0.01)
    assert float(sd15[5]) > 10  # inverting costs far more than encoding


@pytest.mark.ray  # it starts a Ray instance of its own
def test_stage_benchmark_runs():
    out = run("benchmarks/quantize_stage.py", "--classes", "3", "--n", "100", "--shape", "4", "4", "4")
    assert "speedup 1 -> 2 actors" in out


@pytest.mark.slow
def test_the_rehearsal_runs_at_a_toy_size(tmp_path):
    """benchmarks/scale.py end to end on 8 classes (N/4: 2): both runs, the table and the ratio line."""
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "DDOQ_REHEARSAL_RUNS": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, "benchmarks/scale.py", "--classes", "8", "--per-class", "60"], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1].split()
    assert [item.split("=")[0] for item in last] == ["rss_ratio_driver", "rss_ratio_worker", "time_ratio_max",
                                                      "files_per_class_max", "decode_actors_busy", "encode_vs_bare"]
    assert dict(item.split("=") for item in last)["files_per_class_max"] == "1"
