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
Every file is written to a temporary name and renamed, so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
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


def stage_marker(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "_stages" / f"{stage}.json"


def finished_stage(run_dir: Path, stage: str, key: str) -> dict | None:
    """The marker's contents if `stage` finished with this cache key, else None."""
    path = stage_marker(run_dir, stage)
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    return marker if marker.get("key") == key else None


def mark_stage_finished(run_dir: Path, stage: str, key: str, **facts) -> None:
    atomic_write_json(stage_marker(run_dir, stage), {"key": key, **facts})
    # One line per stage that really computed (a reused stage writes nothing): sweeps and tests count them.
    history_path = Path(run_dir) / "_stages" / "history.jsonl"
    with open(history_path, "a") as history:  # audit: append-only log, a torn last line is skipped on read
        history.write(json.dumps({"stage": stage, "key": key, "time": round(time.time(), 3)}) + "\n")


def stage_history(run_dir: Path) -> list[dict]:
    """Every stage computation recorded under run_dir (any depth), oldest first per folder."""
    rows = []
    for path in sorted(Path(run_dir).rglob("_stages/history.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line of a killed append: that stage did not finish
                continue
    return rows


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


def _filesystem(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """A local path or any URI pyarrow knows (s3://, gs://, hdfs://, file://) -> (filesystem, path inside it)."""
    text = str(path)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).absolute())


def class_latent_dirs(latents_dir: str | Path) -> dict[int, str | Path]:
    """label -> its partition folder (a Path for local folders, a URI string for remote ones)."""
    fs, root = _filesystem(latents_dir)
    remote = "://" in str(latents_dir)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("label="):
            child = f"{str(latents_dir).rstrip('/')}/{info.base_name}" if remote else Path(latents_dir) / info.base_name
            found[int(info.base_name.split("=", 1)[1])] = child
    return dict(sorted(found.items()))


def read_class_latents(class_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One class's latents, local or remote, sorted by image id so results do not depend on write order:
    (ids (n,), latents (n, d) float32). Reads only this class: memory is one class, whatever the dataset."""
    fs, root = _filesystem(class_dir)
    files = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(root))
                   if info.type == pafs.FileType.File and info.base_name.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no latent files in {class_dir}")
    table = pa.concat_tables([pq.read_table(f, columns=["id", "latent"], filesystem=fs) for f in files])
    table = table.sort_by("id")
    return np.asarray(table.column("id").to_pylist(), dtype=object), table_latents(table)


def distilled_dir(run_dir: Path, method: str, ipc: int) -> Path:
    return Path(run_dir) / "distilled" / f"{method}-ipc{ipc}"


def image_file_name(label: int, index: int) -> str:
    return f"c{label:05d}_{index:04d}.png"


def write_png(path: Path, image: np.ndarray) -> None:
    """(H, W, 3) uint8 -> PNG file, atomically."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_set_index(folder: Path, files: list[str], labels, class_names, weights, counts) -> None:
    """index.parquet of a distilled set: {path (relative), label, class_name, weight, count}."""
    table = pa.table({
        "path": pa.array(files, pa.string()),
        "label": pa.array(np.asarray(labels), pa.int64()),
        "class_name": pa.array([class_names[int(c)] for c in labels], pa.string()),
        "weight": pa.array(np.asarray(weights, dtype=np.float64)),
        "count": pa.array(np.asarray(counts), pa.int64()),
    })
    atomic_write_table(Path(folder) / "index.parquet", table)


def read_distilled_set(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A distilled set -> images (N, H, W, 3) uint8, labels (N,), weights (N,)."""
    from PIL import Image

    folder = Path(folder)
    index = pq.read_table(folder / "index.parquet").to_pydict()
    images = []
    for name in index["path"]:
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise ValueError(f"{folder}/index.parquet points outside its folder: {name!r}")
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return np.stack(images), np.asarray(index["label"], np.int64), np.asarray(index["weight"], np.float64)
