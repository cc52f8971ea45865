"""The run folder: layout, atomic writes, stage completion markers and per-class latents.

runs/<name>/
  config.yaml                 resolved config
  _stages/<stage>.json        completion marker: the stage's cache key and facts about its output
  latents/label=<c>/*.parquet encoded latents, Hive-partitioned by class: {id: str, latent: fixed_size_list<f32>}
  centroids.parquet           per centroid: label, ipc, index, count, weight_<mode>..., latent
  quantization.parquet        per class and IPC: n, k, distortion, W2 for each weighting
  distilled/<method>-ipc<k>/  PNGs + index.parquet {path, label, class_name, weight, count}
  results/<job>.json          one evaluation result per trained student
  metrics.json                results rows + per-stage timings
The folder may be local or on an object store (runs_dir=s3://bucket/runs: engine/location.py): every file is
written whole or not at all (a local temporary name renamed, or one object PUT), so a killed run never leaves a
half-written file, and nothing is ever appended to.
"""

from __future__ import annotations

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

from engine.location import ObjectPath, filesystem_and_path, location


def atomic_write_bytes(path: Path | ObjectPath | str, data: bytes) -> None:
    path = location(path)
    if isinstance(path, ObjectPath):
        path.write_bytes(data)  # audit: one object PUT, it appears whole or not at all
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


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


def mark_stage_finished(run_dir: Path | ObjectPath, stage: str, key: str, **facts) -> None:
    atomic_write_json(stage_marker(run_dir, stage), {"key": key, **facts})
    # One record per stage that really computed (a reused stage writes nothing): sweeps and tests count them.
    # One small file each, never an append: object stores cannot append, and no record is ever torn.
    now = time.time_ns()
    atomic_write_json(location(run_dir) / "_stages" / "history" / f"{now:020d}-{stage}.json",
                      {"stage": stage, "key": key, "time": round(now / 1e9, 3)})


def stage_history(run_dir: Path | ObjectPath) -> list[dict]:
    """Every stage computation recorded under run_dir (any depth), oldest first per folder."""
    return [json.loads(path.read_text()) for path in sorted(location(run_dir).rglob("_stages/history/*.json"))]


def latents_to_table(ids: np.ndarray, labels: np.ndarray, latents: np.ndarray) -> pa.Table:
    """(B,) ids, (B,) labels, (B, ...) float latents -> rows with a flat fixed-size latent column."""
    flat = np.ascontiguousarray(latents, dtype=np.float32).reshape(len(latents), -1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    return pa.table({"id": pa.array([str(i) for i in ids]), "label": pa.array(labels, pa.int64()), "latent": column})


def table_latents(table: pa.Table) -> np.ndarray:
    """The latent column of a table -> (n, d) float32."""
    column = table.column("latent").combine_chunks()
    dim = column.type.list_size
    return np.asarray(column.flatten(), dtype=np.float32).reshape(-1, dim)


def class_latent_dirs(latents_dir: str | Path | ObjectPath) -> dict[int, Path | ObjectPath]:
    """label -> its partition folder, local or remote (one listing, whatever the number of classes)."""
    folder = location(latents_dir)
    fs, root = filesystem_and_path(folder)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("label="):
            found[int(info.base_name.split("=", 1)[1])] = folder / info.base_name
    return dict(sorted(found.items()))


def read_class_latents(class_dir: str | Path | ObjectPath) -> tuple[np.ndarray, np.ndarray]:
    """One class's latents, local or remote, sorted by image id so results do not depend on write order:
    (ids (n,), latents (n, d) float32). Reads only this class: memory is one class, whatever the dataset."""
    fs, root = filesystem_and_path(location(class_dir))
    files = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(root))
                   if info.type == pafs.FileType.File and info.base_name.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no latent files in {class_dir}")
    table = pa.concat_tables([pq.read_table(f, columns=["id", "latent"], filesystem=fs) for f in files])
    table = table.sort_by("id")
    return np.asarray(table.column("id").to_pylist(), dtype=object), table_latents(table)


def distilled_dir(run_dir: Path | ObjectPath, method: str, ipc: int) -> Path | ObjectPath:
    return location(run_dir) / "distilled" / f"{method}-ipc{ipc}"


def image_file_name(label: int, index: int) -> str:
    return f"c{label:05d}_{index:04d}.png"


def write_png(path: Path | ObjectPath, image: np.ndarray) -> None:
    """(H, W, 3) uint8 -> PNG file, atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_set_index(folder: Path | ObjectPath, files: list[str], labels, class_names, weights, counts) -> None:
    """index.parquet of a distilled set: {path (relative), label, class_name, weight, count}."""
    table = pa.table({
        "path": pa.array(files, pa.string()),
        "label": pa.array(np.asarray(labels), pa.int64()),
        "class_name": pa.array([class_names[int(c)] for c in labels], pa.string()),
        "weight": pa.array(np.asarray(weights, dtype=np.float64)),
        "count": pa.array(np.asarray(counts), pa.int64()),
    })
    atomic_write_table(location(folder) / "index.parquet", table)


def read_image(path: Path | ObjectPath) -> np.ndarray:
    """An image file, local or remote -> (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(path.read_bytes())) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_distilled_set(folder: Path | ObjectPath | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A distilled set -> images (N, H, W, 3) uint8, labels (N,), weights (N,)."""
    folder = location(folder)
    index = read_table(folder / "index.parquet").to_pydict()
    images = []
    for name in index["path"]:
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or len(relative.parts) != 1:
            raise ValueError(f"{folder}/index.parquet points outside its folder: {name!r}")
        images.append(read_image(folder / name))
    return np.stack(images), np.asarray(index["label"], np.int64), np.asarray(index["weight"], np.float64)
