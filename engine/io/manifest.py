"""Run manifests: the sha256 and size of every output file of a run, to prove two runs identical or find what
differs, and to detect a file changed after the run.

    manifest.json = {"files": {relative path: {"sha256": hex, "bytes": n}}}

Computed as the files are written, not by reading the run back (at ImageNet-1K that would be > 100 GB and > 366k
GETs on S3): every writer hashes the bytes it holds (`store.atomic_write_bytes` returns the record), the workers
return their records with their results, and each stage stores what it wrote as `_manifest/<stage>.json`
(`record_stage`). `write_manifest` merges those records with one listing of the run: a listed file whose record
has its size is taken from the record; only files without one (Ray Train's outputs: results, soft labels) are
read and hashed. `verify_manifest` is the one that reads everything: it is the check.

Left out: the manifest itself, hidden temporary files of atomic writes (`.<name>.<random>`), the injected-fault flags
of tests, and Ray Train's own bookkeeping folder (`ray_train/`, timestamps inside).
"""

from __future__ import annotations

import hashlib
import json

from engine.io.location import list_files, location
from engine.io.store import atomic_write_json, take_ledger

MANIFEST = "manifest.json"
RECORDS = "_manifest"  # <run>/_manifest/<stage>.json: {relative path: {sha256, bytes}} from the writers
EXCLUDED_FOLDERS = ("ray_train", "_faults", RECORDS)


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


def relative_records(run_dir, records: dict[str, dict], renames: dict[str, str] | None = None) -> dict[str, dict]:
    """Records keyed by absolute path (as writers return them) -> keyed by path relative to run_dir, staging
    prefixes renamed to the folders they became (`latents.partial/` -> `latents/`); files elsewhere dropped."""
    root = str(location(run_dir)).rstrip("/") + "/"
    out = {}
    for path, record in records.items():
        if not path.startswith(root):
            continue
        relative = path[len(root):]
        for before, after in (renames or {}).items():
            if relative.startswith(before):
                relative = after + relative[len(before):]
        out[relative] = {"sha256": record["sha256"], "bytes": int(record["bytes"])}
    return out


def record_stage(run_dir, stage: str, records: dict[str, dict] | None = None,
                 renames: dict[str, str] | None = None) -> None:
    """Store what a stage wrote, its workers' records plus this process's own writes since the last call, as
    _manifest/<stage>.json (merged with what the stage wrote in earlier runs; newer records win)."""
    merged = relative_records(run_dir, {**take_ledger(), **(records or {})}, renames)
    path = location(run_dir) / RECORDS / f"{stage}.json"
    if path.exists():
        merged = {**json.loads(path.read_text()), **merged}
    atomic_write_json(path, merged)
    take_ledger()  # the record file is not an output


def write_manifest(run_dir) -> dict[str, dict]:
    """manifest.json from the writers' records and one listing of the run (see the module docstring); returns the
    file table. `hashed_by_reading` in the manifest counts the files that had no record."""
    root = location(run_dir)
    record_stage(run_dir, "driver")  # this process's last writes (metrics.json, the report)
    records: dict[str, dict] = {}
    for path in sorted((root / RECORDS).glob("*.json")):
        records.update(json.loads(path.read_text()))
    files, read = {}, 0
    for relative, size in list_files(root).items():
        parts = relative.split("/")
        if relative == MANIFEST or parts[0] in EXCLUDED_FOLDERS or any(p.startswith(".") for p in parts):
            continue
        record = records.get(relative)
        if record is None or record["bytes"] != size:
            record, read = {"sha256": sha256_file(root / relative), "bytes": size}, read + 1
        files[relative] = record
    atomic_write_json(root / MANIFEST, {"files": files, "hashed_by_reading": read})
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
