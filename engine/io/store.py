"""The run folder: layout, atomic writes, stage completion markers and per-class latents.

runs/<name>/
  config.yaml                 resolved config
  _stages/<stage>.json        completion marker: the stage's cache key and facts about its output
  latents/label=<c>/part-00000.parquet  one file per class, sorted by id:
                              {id: str, source: str (file it came from), latent: fixed_size_list<f32>}
  quantized/<key>/class-<c>.{centroids,picks,stats}.parquet  per class: centroids (latent fixed_size_list<f32>,
                              count, weight_<mode>), real-image picks (random/herding/kcenter ids), statistics
  quantization.parquet        per class and IPC: n, k, distortion, W2 for each weighting
  distilled/<method>-ipc<k>/  an ImageFolder: <label:05d>/c<label>_<index>.png + index.parquet
                              {path, label, class_name, weight, count} + metadata.jsonl (the same, for HF datasets)
  results/<job>.json          one evaluation result per trained student
  metrics.json                results rows + per-stage timings
The folder may be local or on an object store (runs_dir=s3://bucket/runs: engine/io/location.py): every file is
written whole or not at all (a local temporary name renamed, or one object PUT), so a killed run never leaves a
half-written file, and nothing is ever appended to.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.io.location import ObjectPath, filesystem_and_path, list_files, location


# What this process wrote, {path: {sha256, bytes}}, while a run's driver keeps the ledger (start_ledger): the
# manifest is merged from such records (engine/io/manifest.py), never by reading the run folder back.
_LEDGER: dict[str, dict] | None = None


def start_ledger() -> None:
    global _LEDGER
    _LEDGER = {}


def take_ledger() -> dict[str, dict]:
    """The records written since the last call (empty when no ledger is kept)."""
    global _LEDGER
    taken, _LEDGER = (_LEDGER or {}), ({} if _LEDGER is not None else None)
    return taken


def atomic_write_bytes(path: Path | ObjectPath | str, data: bytes) -> dict:
    """Write a file whole or not at all; returns its record {sha256, bytes} (hashed from the bytes in hand)."""
    path = location(path)
    record = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if _LEDGER is not None:
        _LEDGER[str(path)] = record
    if isinstance(path, ObjectPath):
        path.write_bytes(data)  # audit: one object PUT, it appears whole or not at all
        return record
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return record


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def atomic_write_json(path: Path, value) -> dict:
    return atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> dict:
    """A parquet file written whole; returns its {sha256, bytes} record."""
    return atomic_write_bytes(path, table_bytes(table))


def read_table(path: Path | ObjectPath | str, columns: list[str] | None = None) -> pa.Table:
    """A parquet file, local or remote."""
    fs, inner = filesystem_and_path(location(path))
    return pq.read_table(inner, filesystem=fs, columns=columns)


def parquet_rows(path) -> int:
    """Rows of a parquet file, local or remote, from its footer."""
    fs, inner = filesystem_and_path(location(path))
    return pq.read_metadata(inner, filesystem=fs).num_rows


def stage_marker(run_dir: Path | ObjectPath, stage: str) -> Path | ObjectPath:
    return location(run_dir) / "_stages" / f"{stage}.json"


def finished_stage(run_dir: Path, stage: str, key: str) -> dict | None:
    """The marker's contents if `stage` finished with this cache key, else None."""
    path = stage_marker(run_dir, stage)
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    return marker if marker.get("key") == key else None


def invalidate_stage(run_dir: Path | ObjectPath, stage: str) -> None:
    """Forget that `stage` finished, before its output is overwritten: a run killed half-way through rewriting
    it must not find the old marker and reuse a half-written output."""
    stage_marker(run_dir, stage).unlink(missing_ok=True)


def mark_stage_finished(run_dir: Path | ObjectPath, stage: str, key: str, node_ids: tuple[str, ...] = (),
                        **facts) -> None:
    """`node_ids`: the Ray nodes whose actors or tasks did the stage's work (on a cluster, proof that each did)."""
    nodes = {"node_ids": list(node_ids)} if node_ids else {}  # only where the stage's workers reported them
    atomic_write_json(stage_marker(run_dir, stage), {"key": key, **facts, **nodes})
    # One record per stage that really computed (a reused stage writes nothing): sweeps and tests count them.
    # One small file each, never an append: object stores cannot append, and no record is ever torn.
    now = time.time_ns()
    atomic_write_json(location(run_dir) / "_stages" / "history" / f"{now:020d}-{stage}.json",
                      {"stage": stage, "key": key, "time": round(now / 1e9, 3), **nodes})


def stage_history(run_dir: Path | ObjectPath) -> list[dict]:
    """Every stage computation recorded under run_dir (any depth), oldest first per folder."""
    return [json.loads(path.read_text()) for path in sorted(location(run_dir).rglob("_stages/history/*.json"))]


def latents_to_table(ids: np.ndarray, labels: np.ndarray, latents: np.ndarray) -> pa.Table:
    """(B,) ids, (B,) labels, (B, ...) float latents -> rows with a flat fixed-size latent column."""
    column = float32_rows(np.asarray(latents).reshape(len(latents), -1))
    return pa.table({"id": pa.array([str(i) for i in ids]), "label": pa.array(labels, pa.int64()), "latent": column})


def float32_rows(rows: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) floats -> a fixed_size_list<float32, d> column: compact, and read back without a Python list."""
    flat = np.ascontiguousarray(rows, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def table_latents(table: pa.Table) -> np.ndarray:
    """The latent column of a table -> (n, d) float32."""
    column = table.column("latent").combine_chunks()
    dim = column.type.list_size
    return np.asarray(column.flatten(), dtype=np.float32).reshape(-1, dim)


def write_class_latents(out_dir, label: int, table: pa.Table) -> dict:
    """Every latent row of one class, in any order -> out_dir/label=<c>/part-00000.parquet {id, source, latent},
    sorted by id (so a re-run is byte-identical). Returns {label, rows, path (relative), sha256, bytes}."""
    table = table.select([c for c in ("id", "source", "latent") if c in table.column_names]).sort_by("id")
    relative = f"label={label}/part-00000.parquet"
    file = location(out_dir) / relative
    return {"label": label, "rows": table.num_rows, "path": relative, "file": str(file),
            **atomic_write_table(file, table)}


def class_latent_dirs(latents_dir: str | Path | ObjectPath) -> dict[int, Path | ObjectPath]:
    """label -> its partition folder, local or remote (one listing, whatever the number of classes)."""
    folder = location(latents_dir)
    fs, root = filesystem_and_path(folder)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("label="):
            found[int(info.base_name.split("=", 1)[1])] = folder / info.base_name
    return dict(sorted(found.items()))


def quantized_labels(quantized_dir) -> list[int]:
    """Labels of the classes a quantize stage finished (their stats files, the completion markers), one listing."""
    names = list_files(location(quantized_dir))
    return sorted(int(n[len("class-"):-len(".stats.parquet")]) for n in names if n.endswith(".stats.parquet"))


def read_class_table(class_dir: str | Path | ObjectPath, columns: tuple[str, ...] = ("id", "latent")) -> pa.Table:
    """One class's latent rows, local or remote, sorted by image id so results do not depend on write order.
    Reads only this class: memory is one class, whatever the dataset. Latents written before the `source` column
    existed read back with an empty one."""
    fs, root = filesystem_and_path(location(class_dir))
    files = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(root))
                   if info.type == pafs.FileType.File and info.base_name.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no latent files in {class_dir}")
    parts = []
    for file in files:
        present = set(pq.read_schema(file, filesystem=fs).names)
        part = pq.read_table(file, columns=[c for c in columns if c in present], filesystem=fs)
        for missing in (c for c in columns if c not in present and c == "source"):
            part = part.append_column(missing, pa.array([""] * part.num_rows, pa.string()))
        parts.append(part.select(list(columns)))
    return pa.concat_tables(parts).sort_by("id")


def read_class_latents(class_dir: str | Path | ObjectPath) -> tuple[np.ndarray, np.ndarray]:
    """One class's latents: (ids (n,), latents (n, d) float32), sorted by id (see read_class_table)."""
    table = read_class_table(class_dir)
    return np.asarray(table.column("id").to_pylist(), dtype=object), table_latents(table)


def distilled_dir(run_dir: Path | ObjectPath, method: str, ipc: int) -> Path | ObjectPath:
    return location(run_dir) / "distilled" / f"{method}-ipc{ipc}"


def image_file_name(label: int, index: int) -> str:
    """An image's path inside its set folder: one subfolder per class, so every set is an ImageFolder tree.
    Zero-padded labels sort as the labels do, which is how torchvision's ImageFolder numbers its classes."""
    return f"{label:05d}/c{label:05d}_{index:04d}.png"


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def share_file(source: Path | ObjectPath, target: Path | ObjectPath) -> None:
    """Make `target` hold the same bytes as `source` without writing them again: a hard link on a local disk
    (renamed into place, so it appears whole), a server-side copy on an object store. Several sets (d4m and each
    ddoq weighting, nested herding picks) share one image this way."""
    source, target = location(source), location(target)
    if isinstance(target, ObjectPath):
        target.fs.copy_file(filesystem_and_path(source)[1], filesystem_and_path(target)[1])
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.link")
    staging.unlink(missing_ok=True)
    try:
        os.link(source, staging)
    except OSError:  # another filesystem, or one without hard links: a copy, still renamed into place
        import shutil

        shutil.copyfile(source, staging)
    os.replace(staging, target)


def write_png(path: Path | ObjectPath, image: np.ndarray) -> dict:
    """(H, W, 3) uint8 -> PNG file, atomically; returns its {sha256, bytes} record."""
    return atomic_write_bytes(path, png_bytes(image))


def write_set_index(folder: Path | ObjectPath, files: list[str], labels, class_names, weights, counts) -> None:
    """The two indexes of a distilled set: index.parquet {path (relative), label, class_name, weight, count}, and
    the same rows as metadata.jsonl with `file_name`, the file Hugging Face datasets' `imagefolder` builder reads
    (torchvision's ImageFolder needs neither: the class subfolders are the labels)."""
    table = pa.table({
        "path": pa.array(files, pa.string()),
        "label": pa.array(np.asarray(labels), pa.int64()),
        "class_name": pa.array([class_names[int(c)] for c in labels], pa.string()),
        "weight": pa.array(np.asarray(weights, dtype=np.float64)),
        "count": pa.array(np.asarray(counts), pa.int64()),
    })
    folder = location(folder)
    atomic_write_table(folder / "index.parquet", table)
    lines = [json.dumps({"file_name": row.pop("path"), **row}) for row in table.to_pylist()]
    atomic_write_bytes(folder / "metadata.jsonl", ("\n".join(lines) + "\n").encode() if lines else b"")


def read_image(path: Path | ObjectPath) -> np.ndarray:
    """An image file, local or remote -> (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(path.read_bytes())) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_distilled_set(folder: Path | ObjectPath | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A distilled set -> images (N, H, W, 3) uint8, labels (N,), weights (N,)."""
    parts = list(iter_distilled_set(folder, chunk=1 << 62))
    return tuple(np.concatenate(column) for column in zip(*parts))


def iter_distilled_set(folder: Path | ObjectPath | str, chunk: int = 500):
    """A distilled set in chunks of at most `chunk` rows: (images uint8, labels int64, weights float64)."""
    folder = location(folder)
    index = read_table(folder / "index.parquet").to_pydict()
    for name in index["path"]:  # every path checked before any image is read
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not 1 <= len(relative.parts) <= 2:
            raise ValueError(f"{folder}/index.parquet points outside its folder: {name!r}")
    for start in range(0, len(index["path"]), chunk):
        stop = start + chunk
        images = np.stack([read_image(folder / name) for name in index["path"][start:stop]])
        yield (images, np.asarray(index["label"][start:stop], np.int64),
               np.asarray(index["weight"][start:stop], np.float64))
