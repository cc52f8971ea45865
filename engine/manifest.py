"""Run manifests: the sha256 and size of every output file of a run, to prove two runs identical or find what
differs, and to detect a file changed after the run.

    manifest.json = {"files": {relative path: {"sha256": hex, "bytes": n}}}

Left out: the manifest itself, hidden temporary files of atomic writes (`.<name>.<random>`), the injected-fault flags
of tests, and Ray Train's own bookkeeping folder (`ray_train/`, timestamps inside).
"""

from __future__ import annotations

import hashlib
import json

from engine.location import list_files, location
from engine.store import atomic_write_json

MANIFEST = "manifest.json"
EXCLUDED_FOLDERS = ("ray_train", "_faults")


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(root) -> dict[str, dict]:
    """{relative posix path: {sha256, bytes}} for every regular file under `root` (local or on an object store),
    sorted by path."""
    root = location(root)
    files = {}
    for relative, size in list_files(root).items():
        parts = relative.split("/")
        if relative == MANIFEST or parts[0] in EXCLUDED_FOLDERS or any(p.startswith(".") for p in parts):
            continue
        files[relative] = {"sha256": sha256_file(root / relative), "bytes": size}
    return files


def write_manifest(run_dir) -> dict[str, dict]:
    """Hash every output file of the run into run_dir/manifest.json (atomically); returns the file table."""
    files = build_manifest(run_dir)
    atomic_write_json(location(run_dir) / MANIFEST, {"files": files})
    return files


def read_manifest(run_dir) -> dict[str, dict]:
    return json.loads((location(run_dir) / MANIFEST).read_text())["files"]


def diff_manifests(a: dict[str, dict], b: dict[str, dict], prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """Paths under any of `prefixes` that are missing from one side or differ in content, sorted."""
    def chosen(files):
        return {p: f["sha256"] for p, f in files.items() if any(p.startswith(x) for x in prefixes)}

    left, right = chosen(a), chosen(b)
    return sorted(p for p in left.keys() | right.keys() if left.get(p) != right.get(p))


def verify_manifest(run_dir) -> list[str]:
    """Files of the run that no longer match its manifest (changed, missing or added)."""
    return diff_manifests(read_manifest(run_dir), build_manifest(run_dir))
