"""The pure stage modules never import ray (Ray lives only in engine/ray/ and the entry points), and no
code loads untrusted bytes in a way that can run code (pickle and its relatives, torch.load without
weights_only, yaml.load without SafeLoader, eval/exec, remote code) or writes an output non-atomically."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE = ["engine.config", "engine.data.images", "engine.encode", "engine.decode", "engine.quantize.quantizer", "engine.quantize.transport",
        "engine.io.store", "engine.evaluate.students", "engine.evaluate.train", "engine.quantize.baselines", "engine.priors",
        "engine.priors.tiny", "engine.priors.train_tiny", "engine.priors.base", "engine.priors.sd15",
        "engine.priors.dit", "engine.priors.checkpoint", "engine.report.run_report", "engine.evaluate.protocols", "engine.evaluate.augment",
        "engine.evaluate.sets", "engine.io.manifest", "engine.checks", "engine.faults", "engine.pipeline", "engine.quantize.class_task",
        "engine.io.location", "engine.data.sources", "engine.data.readback", "engine.report.stats",
        "engine.data.formats", "engine.data.classes"]
SCANNED = [p for d in ("engine", "jobs", "tune", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]


def test_pure_modules_do_not_import_ray():
    code = f"import sys\nfor m in {PURE!r}: __import__(m)\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_only_the_ray_package_imports_ray_and_tune_never_imports_jobs():
    outside = [p for p in sorted((ROOT / "engine").rglob("*.py")) if (ROOT / "engine" / "ray") not in p.parents]
    for path in outside:
        assert not {m for m in imported_modules(path) if m == "ray" or m.startswith("ray.")}, path
    for path in sorted((ROOT / "tune").rglob("*.py")):
        assert not {m for m in imported_modules(path) if m in ("distill", "jobs") or m.startswith("jobs.")}, path


# Loaders that run code from the bytes they read, whatever their arguments.
PICKLE_LIKE = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def keyword(call: ast.Call, name: str):
    """The constant value of a keyword argument, `...` when it is not a constant, None when absent."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else dotted(kw.value) or ...
    return None


def unsafe_loads(source: str) -> list[str]:
    """Every unsafe load in a Python source, as 'line N: why'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_LIKE:
            if any(a.name in PICKLE_CALLS for a in node.names):
                found.append(f"line {node.lineno}: imports a pickle-family loader from {node.module}")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        parts = name.split(".")
        why = None
        if len(parts) >= 2 and parts[-2] in PICKLE_LIKE and parts[-1] in PICKLE_CALLS or parts[-1] == "read_pickle":
            why = f"{name}() unpickles"
        elif name == "torch.load" and keyword(node, "weights_only") is not True:
            why = "torch.load() without weights_only=True"
        elif parts[-1] == "load" and parts[0] in ("np", "numpy") and keyword(node, "allow_pickle") not in (None, False):
            why = "numpy.load() with allow_pickle"
        elif parts[0] == "yaml" and parts[-1] in ("unsafe_load", "full_load", "unsafe_load_all", "full_load_all"):
            why = f"{name}() can build arbitrary objects"
        elif parts[0] == "yaml" and parts[-1] in ("load", "load_all"):
            loader = keyword(node, "Loader")
            loader = loader if loader is not None or len(node.args) < 2 else dotted(node.args[1])
            if str(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                why = f"{name}() without SafeLoader"
        elif name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            why = f"{name}() runs code"
        for flag, bad in (("trust_remote_code", True), ("allow_pickle", True), ("weights_only", False),
                          ("use_safetensors", False)):
            if why is None and keyword(node, flag) is bad:
                why = f"{name}({flag}={bad})"
        if why:
            found.append(f"line {node.lineno}: {why}")
    return found


@pytest.mark.parametrize("line", [
    "import pickle\npickle.load(f)", "pickle.loads(b)", "from pickle import loads", "import dill\ndill.load(f)",
    "joblib.load('m.joblib')", "pd.read_pickle(p)", "torch.load(p)", "torch.load(p, weights_only=False)",
    "torch.load(\n  p,\n  map_location='cpu')", "np.load(p, allow_pickle=True)", "numpy.load(p, allow_pickle=flag)",
    "yaml.load(text)", "yaml.load(text, Loader=yaml.Loader)", "yaml.load(text, yaml.FullLoader)",
    "yaml.unsafe_load(text)", "yaml.full_load(text)", "eval(row['expr'])", "exec(code)",
    "AutoModel.from_pretrained(p, trust_remote_code=True)", "Pipe.from_pretrained(p, use_safetensors=False)",
    "marshal.loads(b)", "shelve.open(p)",
])
def test_the_scanner_catches_unsafe_loads(line):
    assert unsafe_loads(line), line


@pytest.mark.parametrize("line", [
    "torch.load(p, weights_only=True)", "torch.load(\n  p,\n  weights_only=True,\n)", "np.load(p)",
    "np.load(p, allow_pickle=False)", "yaml.safe_load(text)", "yaml.load(text, Loader=yaml.SafeLoader)",
    "model.eval()", "teacher.eval()", "safetensors.torch.load_file(p)", "pq.read_table(p)", "json.loads(s)",
])
def test_the_scanner_passes_safe_loads(line):
    assert unsafe_loads(line) == []


def test_no_unsafe_loads_in_the_code():
    assert len(SCANNED) > 10
    hits = [f"{p.relative_to(ROOT)} {hit}" for p in SCANNED for hit in unsafe_loads(p.read_text())]
    assert hits == []


# Calls that write a file; each must target a temporary name that is then renamed (or an in-memory buffer).
WRITERS = {"write_text", "write_bytes", "save_file", "save", "write_table", "to_parquet", "to_csv", "savez",
           "save_pretrained", "dump"}
# Where a writer's destination is a temporary or staging name renamed into place by the same function/caller.
ATOMIC_MARKERS = ("partial", "staging", "buffer", "sink")
# Known sites that write into a folder the caller stages and renames (reason given).
ATOMIC_BY_CALLER = {
    "engine/priors/tiny.py": "TinyPrior.save writes a folder that load_or_train_prior stages and renames",
    "engine/priors/sd15.py": "StableDiffusionPrior.save: same contract as TinyPrior.save (tests build folders with it)",
    "engine/priors/dit.py": "DiTPrior.save: same contract as TinyPrior.save (tests build folders with it)",
    "engine/priors/checkpoint.py": "a checkpoint folder counts only once its state pointer is os.replace'd after it",
    "engine/priors/train_tiny.py": "calls PriorCheckpoint.save (engine/priors/checkpoint.py), atomic by its pointer",
    "engine/io/location.py": "ObjectPath writes one object store PUT, published whole when the stream closes",
}


def non_atomic_writes(source: str) -> list[str]:
    """Writes in a Python source whose destination is not visibly a temporary/staging name or a buffer."""
    offenders, lines = [], source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        line = lines[node.lineno - 1]
        if "# audit:" in line:  # a write that is safe by design, with the reason on the line
            continue
        if name.split(".")[-1] in WRITERS and not any(marker in line.lower() for marker in ATOMIC_MARKERS):
            offenders.append(f"{node.lineno}: {line.strip()}")
        if name == "open" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
            if any(c in str(node.args[1].value) for c in "wax") and "partial" not in line:
                offenders.append(f"{node.lineno}: {line.strip()}")
    return offenders


def test_the_write_audit_catches_direct_writes():
    assert non_atomic_writes("path.write_text(text)") and non_atomic_writes("open(path, 'wb')")
    assert non_atomic_writes("save_file(state, str(path))")
    assert non_atomic_writes("partial.write_text(text)\nsave_file(s, str(p) + '.partial')") == []


def test_every_write_is_atomic():
    """Audit of half-written files: every write of an output goes to a temp/staging name first."""
    offenders = [f"{p.relative_to(ROOT)}:{hit}" for p in SCANNED
                 if str(p.relative_to(ROOT)) not in ATOMIC_BY_CALLER and "benchmarks" not in p.parts
                 for hit in non_atomic_writes(p.read_text())]
    assert offenders == []
