"""The pure stage modules never import ray: Ray lives only in engine/ray_stages.py and the entry points."""

import subprocess
import sys

PURE = ["engine.config", "engine.data", "engine.encode", "engine.decode", "engine.quantize", "engine.transport",
        "engine.store", "engine.students", "engine.train", "engine.baselines", "engine.priors",
        "engine.priors.tiny", "engine.priors.train_tiny", "engine.priors.base", "engine.priors.sd15",
        "engine.priors.dit", "engine.priors.checkpoint", "engine.report"]


def test_pure_modules_do_not_import_ray():
    code = f"import sys\nfor m in {PURE!r}: __import__(m)\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_unsafe_loads_in_the_code():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    sources = [p for d in ("engine", "jobs", "tune") for p in (root / d).rglob("*.py")]
    unsafe = re.compile(r"pickle\.load|allow_pickle\s*=\s*True|weights_only\s*=\s*False|torch\.load\((?![^)]*weights_only=True)")
    hits = [f"{p}: {line}" for p in sources for line in p.read_text().splitlines() if unsafe.search(line)]
    assert hits == []
