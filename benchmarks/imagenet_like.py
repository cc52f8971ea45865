"""A seeded, procedural dataset of ImageNet-1K's shape, for rehearsing the whole pipeline at full scale.

    python benchmarks/imagenet_like.py [--classes 1000] [--per-class N] [--test-per-class 50] [--resolution 32]
                                       [--seed 0] [--workers 2] [--root DIR]

Contract. `generate(root, ...)` writes the engine's parquet layout (engine/data/images.py, ../shared/data/README.md):
    <root>/train-XXXXX-of-NNNNN.parquet  rows shuffled across classes (seeded), as ImageNet's shards mix classes
    <root>/test-XXXXX-of-NNNNN.parquet   test_per_class images of every class, shuffled the same way
    <root>/classes.txt                   class_0000_<shape>_<colour>, ... in label order
    <root>/generated.json                parameters and counts; written LAST, so it marks a complete dataset
Schema `image: struct<bytes: binary, path: string>` (JPEG, quality 90), `label: int64`, with the Hugging Face
features in the schema metadata; `image.path` is unique: `<split>/c<label:04d>/<index in class:06d>.jpg`.
- Counts: `class_counts(1000, None)` is ImageNet's 1,281,167 (most classes 1300, ~10 % smaller, the smallest 732);
  with `per_class` given, most classes have per_class images and ~10 % (at least one) fewer.
- Images: class c has shape c % 8, colour c % 11 and texture (stripe frequency, orientation) c % 13, so up to
  8 * 11 * 13 = 1144 classes are distinct combinations; every image draws its own position, scale, rotation,
  stripe phase, colour jitter, background (colour and gradient) and pixel noise.
- Reproducible: a shard's bytes depend only on the parameters, the seed and its index (never on `workers`).
- Resumable: each shard is written to `<name>.partial` and renamed; a re-run keeps the shards already there (their
  footer records the parameters, and a shard of other parameters stops the run) and returns at once when
  generated.json holds the same parameters. Each worker holds one shard at most.
Rehearsal data belongs in `default_root(...)` (~/.cache/ddoq/rehearsal/...), never in the repository.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

VERSION = 1  # bump when the images or the layout change: a cached dataset of another version is not reused
IMAGENET_CLASSES, IMAGENET_TRAIN, IMAGENET_MAX, IMAGENET_MIN = 1000, 1_281_167, 1300, 732
IMAGENET_TRAIN_SHARDS = 294  # Hugging Face's imagenet-1k train split
SMALL_FRACTION = 0.1  # of classes below the usual count
JPEG_QUALITY = 90
ROWS_PER_GROUP = 1000
META_KEY = b"ddoq_rehearsal"
STREAM_COUNTS, STREAM_SHUFFLE, STREAM_RENDER = 0, 1, 2  # independent random streams of one seed
SPLITS = ("train", "test")

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "crescent")
COLOURS = ("red", "orange", "yellow", "lime", "green", "teal", "sky", "blue", "violet", "magenta", "rose")
TEXTURES = 13  # stripe orientation k * pi / 13, frequency cycles 0.7 / 1.2 / 1.8 per shape radius
MAX_CLASSES = len(SHAPES) * len(COLOURS) * TEXTURES  # pairwise coprime, so c -> combo is one-to-one below this


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _spread(total: int, k: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """k random integers in [lo, hi] summing to total."""
    if not k * lo <= total <= k * hi:
        raise ValueError(f"{total} cannot be split into {k} counts in [{lo}, {hi}]")
    out, weights = np.full(k, lo, np.int64), rng.random(k) + 0.1
    while (left := total - int(out.sum())) > 0:
        room = hi - out
        p = weights * (room > 0)
        out += np.minimum(rng.multinomial(left, p / p.sum()), room)
    return out


def class_counts(classes: int = IMAGENET_CLASSES, per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Train images per class, int64 (classes,). per_class=None is ImageNet's shape: 1300 for most classes, ~10 %
    between 732 and 1299 (one exactly 732 where it fits) and a total of round(1,281,167 * classes / 1000), which
    is ImageNet's exact total at 1000 classes. With per_class given: per_class for most classes and ~10 % (at
    least one, when classes > 1) drawn in [per_class * 732 / 1300, per_class), so uneven classes are exercised."""
    if classes < 1 or (per_class is not None and per_class < 1):
        raise ValueError(f"need classes >= 1 and per_class >= 1, got {classes}, {per_class}")
    rng = _rng(seed, STREAM_COUNTS)
    full = IMAGENET_MAX if per_class is None else per_class
    small = max(1, round(SMALL_FRACTION * classes)) if per_class is None or classes > 1 and full > 1 else 0
    counts = np.full(classes, full, np.int64)
    chosen = np.sort(rng.choice(classes, small, replace=False))
    if per_class is None:
        target = round(IMAGENET_TRAIN * classes / IMAGENET_CLASSES) - IMAGENET_MAX * (classes - small)
        lo, hi = IMAGENET_MIN, IMAGENET_MAX - 1
        if small >= 2 and (small - 1) * lo <= target - lo <= (small - 1) * hi:  # one class at ImageNet's minimum
            counts[chosen] = rng.permutation(np.concatenate([[lo], _spread(target - lo, small - 1, lo, hi, rng)]))
        else:
            counts[chosen] = _spread(target, small, lo, hi, rng)
    elif small:
        lo = min(per_class - 1, max(1, math.ceil(per_class * IMAGENET_MIN / IMAGENET_MAX)))
        counts[chosen] = rng.integers(lo, per_class, small)
    return counts


def class_spec(label: int) -> tuple[str, str, int]:
    """(shape, colour, texture index) of a class."""
    return SHAPES[label % len(SHAPES)], COLOURS[label % len(COLOURS)], label % TEXTURES


def class_names(classes: int) -> list[str]:
    return [f"class_{c:04d}_{class_spec(c)[0]}_{class_spec(c)[1]}" for c in range(classes)]


def default_root(classes: int = IMAGENET_CLASSES, per_class: int | None = None, resolution: int = 32,
                 seed: int = 0) -> Path:
    """The cache folder for one dataset: $XDG_CACHE_HOME (default ~/.cache)/ddoq/rehearsal/<name>."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ddoq" / "rehearsal" / f"{classes}x{per_class or 'imagenet'}-r{resolution}-s{seed}"


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV (hue in turns) -> RGB in [0, 1], (..., 3)."""
    k = (np.array([5.0, 3.0, 1.0], np.float32) + 6 * h[..., None]) % 6
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the shape's edge in shape radii (negative inside); u right, v down."""
    rho = np.hypot(u, v)
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return rho - 1
    if shape == "square":
        return np.maximum(au, av) - 0.8
    if shape == "triangle":  # apex up, inscribed in the unit circle
        return np.maximum(v - 0.5, (np.sqrt(3) * au - v - 1) / 2)
    if shape == "cross":
        return np.minimum(np.maximum(au - 0.3, av - 0.95), np.maximum(av - 0.3, au - 0.95))
    if shape == "ring":
        return np.abs(rho - 0.75) - 0.25
    if shape == "diamond":
        return (au + av - 1) / np.sqrt(2)
    if shape == "star":
        return rho - (0.6 + 0.35 * np.cos(5 * np.arctan2(v, u)))
    return np.maximum(rho - 1, 0.75 - np.hypot(u - 0.45, v))  # crescent


def render(labels: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Images of the given classes, uint8 (B, resolution, resolution, 3); every random draw comes from rng."""
    n = len(labels)
    draw = {name: rng.uniform(lo, hi, n).astype(np.float32)[:, None, None] for name, lo, hi in (
        ("cx", 0.3, 0.7), ("cy", 0.3, 0.7), ("radius", 0.2, 0.32), ("angle", -np.pi / 12, np.pi / 12),
        ("phase", 0, 2 * np.pi), ("hue", -0.025, 0.025), ("value", 0.75, 1.0), ("bg_hue", 0, 1),
        ("bg_sat", 0, 0.5), ("bg_value", 0.1, 0.55), ("slope", -0.3, 0.3), ("bg_angle", 0, 2 * np.pi))}
    noise = rng.uniform(-0.07, 0.07, (n, resolution, resolution, 3)).astype(np.float32)
    grid = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    dx, dy = grid[None, None, :] - draw["cx"], grid[None, :, None] - draw["cy"]
    cos, sin = np.cos(draw["angle"]), np.sin(draw["angle"])
    u, v = (dx * cos + dy * sin) / draw["radius"], (dy * cos - dx * sin) / draw["radius"]

    shape, colour, texture = labels % len(SHAPES), labels % len(COLOURS), labels % TEXTURES
    distance = np.empty_like(u)
    for index, name in enumerate(SHAPES):
        rows = np.flatnonzero(shape == index)
        distance[rows] = _distance(name, u[rows], v[rows])
    mask = np.clip(0.5 - distance * draw["radius"] * resolution, 0, 1)[..., None]  # ~1 pixel of anti-aliasing

    theta = (texture * np.pi / TEXTURES).astype(np.float32)[:, None, None]
    frequency = np.array([0.7, 1.2, 1.8], np.float32)[texture % 3][:, None, None]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (u * np.cos(theta) + v * np.sin(theta)) + draw["phase"])
    hue = (colour / len(COLOURS)).astype(np.float32)[:, None, None] + draw["hue"]
    bright = _hsv(hue, np.full_like(hue, 0.85), draw["value"])
    foreground = bright * (0.35 + 0.65 * stripes[..., None])
    gradient = draw["slope"] * (dx * np.cos(draw["bg_angle"]) + dy * np.sin(draw["bg_angle"]))
    background = _hsv(draw["bg_hue"], draw["bg_sat"], draw["bg_value"]) * (1 + gradient[..., None])
    pixels = background + mask * (foreground - background) + noise
    return np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def shard_name(split: str, shard: int, shards: int) -> str:
    return f"{split}-{shard:05d}-of-{shards:05d}.parquet"


def split_rows(counts: np.ndarray, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(label, index within its class) of every row of a split, in the split's seeded shuffled order."""
    labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    index = np.arange(len(labels), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    order = _rng(seed, STREAM_SHUFFLE, SPLITS.index(split)).permutation(len(labels))
    return labels[order], index[order]


def _schema(params: dict) -> pa.Schema:
    features = {"image": {"_type": "Image"}, "label": {"names": class_names(params["classes"]), "_type": "ClassLabel"}}
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([("image", image), ("label", pa.int64())], metadata={
        b"huggingface": json.dumps({"info": {"features": features}}).encode(), META_KEY: json.dumps(params).encode()})


def write_shard(task: tuple) -> int:
    """Render, encode and write one shard (atomically); returns its row count. Pool task."""
    root, split, shard, labels, index, params = task
    rng, resolution = _rng(params["seed"], STREAM_RENDER, SPLITS.index(split), shard), params["resolution"]
    batch = max(1, 2**20 // resolution**2)
    images = []
    for start in range(0, len(labels), batch):
        images += [jpeg(image) for image in render(labels[start:start + batch], resolution, rng)]
    paths = [f"{split}/c{label:04d}/{i:06d}.jpg" for label, i in zip(labels.tolist(), index.tolist(), strict=True)]
    column = pa.StructArray.from_arrays([pa.array(images, pa.binary()), pa.array(paths)], ["bytes", "path"])
    table = pa.Table.from_arrays([column, pa.array(labels, pa.int64())], schema=_schema(params))
    path = Path(root) / shard_name(split, shard, params[f"{split}_shards"])
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial, row_group_size=ROWS_PER_GROUP, compression="none", use_dictionary=False,
                   write_statistics=["label"])
    os.replace(partial, path)
    return len(labels)


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def generate(root: str | Path, classes: int = IMAGENET_CLASSES, per_class: int | None = None,
             test_per_class: int = 50, resolution: int = 32, train_shards: int | None = None, seed: int = 0,
             workers: int = 2, log: Callable[[str], object] = print) -> dict:
    """Write (or finish writing) the dataset under root and return generated.json's content plus `root`,
    `seconds` and `written` (shards written by this call)."""
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be in [1, {MAX_CLASSES}] (distinct shape/colour/texture), got {classes}")
    root, started = Path(root), time.perf_counter()
    counts = class_counts(classes, per_class, seed)
    test_counts = np.full(classes, test_per_class, np.int64)
    rows_per_shard = IMAGENET_TRAIN / IMAGENET_TRAIN_SHARDS
    params = {"version": VERSION, "classes": classes, "per_class": per_class, "test_per_class": test_per_class,
              "resolution": resolution, "seed": seed, "jpeg_quality": JPEG_QUALITY,
              "train_shards": train_shards or max(1, round(counts.sum() / rows_per_shard)),
              "test_shards": max(1, round(test_counts.sum() / rows_per_shard))}
    summary = {**params, "train_images": int(counts.sum()), "test_images": int(test_counts.sum()),
               "class_counts": counts.tolist()}
    marker = root / "generated.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if {key: done.get(key) for key in params} != params:
            raise FileExistsError(f"{root} holds a dataset of other parameters: {done}")
        return {**done, "root": str(root), "seconds": time.perf_counter() - started, "written": 0}

    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / "classes.txt", "".join(f"{name}\n" for name in class_names(classes)))
    tasks, total = [], params["train_shards"] + params["test_shards"]
    for split, split_counts in zip(SPLITS, (counts, test_counts), strict=True):
        labels, index = split_rows(split_counts, seed, split)
        shards = params[f"{split}_shards"]
        bounds = len(labels) * np.arange(shards + 1) // shards
        for shard in range(shards):
            path = root / shard_name(split, shard, shards)
            if path.exists():
                if json.loads(pq.read_schema(path).metadata.get(META_KEY, b"{}")) != params:
                    raise FileExistsError(f"{path} was written with other parameters; use another root")
                continue
            rows = slice(bounds[shard], bounds[shard + 1])
            tasks.append((str(root), split, shard, labels[rows], index[rows], params))
    log(f"{root}: {total - len(tasks)} of {total} shards already there, writing {len(tasks)} "
        f"({summary['train_images']:,} train + {summary['test_images']:,} test images in all) on {workers} workers")

    todo, images, began = sum(len(task[3]) for task in tasks), 0, time.perf_counter()
    last_log = began
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _InProcess() as pool:
        for done, rows in enumerate(pool.imap_unordered(write_shard, tasks), 1):
            images, now = images + rows, time.perf_counter()
            if done == len(tasks) or now - last_log >= 10:
                rate = images / (now - began)
                left = f", about {(todo - images) / rate:,.0f} s to go" if done < len(tasks) else ""
                log(f"shards {total - len(tasks) + done}/{total}, {images:,} images at {rate:,.0f} images/s{left}")
                last_log = now
    _atomic_write(marker, json.dumps(summary, indent=1) + "\n")
    return {**summary, "root": str(root), "seconds": time.perf_counter() - started, "written": len(tasks)}


class _InProcess:
    """The Pool interface generate() uses, without processes (workers <= 1)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap_unordered(self, function: Callable, tasks: list):
        return map(function, tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="output folder (default: default_root(...) in ~/.cache)")
    parser.add_argument("--classes", type=int, default=IMAGENET_CLASSES)
    parser.add_argument("--per-class", type=int, help="train images per class (default: ImageNet's counts)")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train-shards", type=int, help="default: ImageNet's 294, scaled to the image count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = args.root or default_root(args.classes, args.per_class, args.resolution, args.seed)
    result = generate(root, args.classes, args.per_class, args.test_per_class, args.resolution, args.train_shards,
                      args.seed, args.workers)
    print(f"{result['root']}: {result['train_images']:,} train images in {result['train_shards']} shards, "
          f"{result['test_images']:,} test in {result['test_shards']}; {result['seconds']:.1f} s "
          f"({result['written']} shards written)")


if __name__ == "__main__":
    main()
