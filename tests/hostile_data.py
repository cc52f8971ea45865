"""A seeded generator of hostile datasets in the three file layouts, each input with the outcome it must have.

    build_rows(root, layout) -> {row id: Outcome}     one dataset of row-level hostile inputs, for parquet,
                                                       imagefolder or webdataset, written under root
    SOURCE_CASES[layout] = {case: (build, message)}    whole-source problems: each must be refused with one
                                                       sentence that contains `message`

An Outcome is ("encoded", label) or ("skipped", reason). Inputs that are not rows (notes, macOS `._*` files)
have no outcome: they must appear nowhere.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SIZE = 8
CLASSES = ("cat", "dog", "a$b")  # a name matplotlib would read as mathtext
MAX_BYTES = 4000  # data.max_image_bytes of the suite: BIG is over it


class Outcome(NamedTuple):
    kind: str  # "encoded" or "skipped"
    value: int | str  # the label, or the skip reason


def encoded(label: int) -> Outcome:
    return Outcome("encoded", label)


def skipped(reason: str) -> Outcome:
    return Outcome("skipped", reason)


def png(seed: int, size: int = SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


BIG = png(99, size=64)  # random pixels do not compress: > MAX_BYTES
assert len(BIG) > MAX_BYTES


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def classes_file(root: Path, lines: list[str] | None = None) -> None:
    write(root / "classes.txt", ("\n".join(lines or CLASSES) + "\n").encode())


# ---------------------------------------------------------------- parquet


def parquet_shard(path: Path, images: list, labels: list, image_type=None, label_type=None) -> None:
    image_type = image_type or pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {"image": pa.array(images, image_type)}
    if labels is not None:
        columns["label"] = pa.array(labels, label_type)
    pq.write_table(pa.table(columns), path)


def build_parquet(root: Path) -> dict[str, Outcome]:
    root.mkdir(parents=True, exist_ok=True)
    classes_file(root)
    expect = {}

    def shard(name: str, rows: list[tuple[dict | bytes | None, object, Outcome]], **types) -> None:
        parquet_shard(root / name, [r[0] for r in rows], [r[1] for r in rows], **types)
        expect.update({f"{name}#{i}": r[2] for i, r in enumerate(rows)})

    # The same stored path in every class (re-exported folders): ids must not collide.
    shard("train-00000-of-00005.parquet", [
        ({"bytes": png(1), "path": "img_0.png"}, 0, encoded(0)),
        ({"bytes": png(2), "path": "img_0.png"}, 1, encoded(1)),
        ({"bytes": png(3), "path": "img_0.png"}, 2, encoded(2)),
        ({"bytes": png(4), "path": None}, 0, encoded(0)),  # no path
        ({"bytes": png(5), "path": ""}, 1, encoded(1)),  # empty path
        ({"bytes": png(6), "path": "../../etc/passwd"}, 2, encoded(2)),  # a traversal name is only an id
        ({"bytes": png(7), "path": "x"}, 7, skipped("label_out_of_range")),
        ({"bytes": png(8), "path": "x"}, -1, skipped("label_out_of_range")),
        ({"bytes": png(9), "path": "x"}, None, skipped("missing_label")),
        ({"bytes": None, "path": "x"}, 0, skipped("missing_image")),
        ({"bytes": b"", "path": "x"}, 0, skipped("empty")),
        ({"bytes": b"<html>404</html>", "path": "x"}, 0, skipped("corrupt")),
        ({"bytes": jpeg(10)[:200], "path": "x"}, 0, skipped("truncated")),
        ({"bytes": BIG, "path": "x"}, 0, skipped("too_large")),
        (None, 1, skipped("missing_image")),  # a null image struct
    ])
    # Float labels (pandas writes an int column holding a null as float).
    shard("train-00001-of-00005.parquet", [
        ({"bytes": png(11), "path": "f"}, 2.0, encoded(2)),
        ({"bytes": png(12), "path": "f"}, 2.7, skipped("missing_label")),
        ({"bytes": png(13), "path": "f"}, float("nan"), skipped("missing_label")),
        ({"bytes": png(14), "path": "f"}, None, skipped("missing_label")),
    ], label_type=pa.float64())
    # String labels.
    shard("train-00002-of-00005.parquet", [
        ({"bytes": png(15), "path": "s"}, "1", encoded(1)),
        ({"bytes": png(16), "path": "s"}, " 2 ", encoded(2)),
        ({"bytes": png(17), "path": "s"}, "cat", skipped("missing_label")),
        ({"bytes": png(18), "path": "s"}, "0_3", skipped("missing_label")),
        ({"bytes": png(19), "path": "s"}, "99999999999999999999999", skipped("label_out_of_range")),
    ], label_type=pa.string())
    # The image column as plain binary (no struct): accepted as bytes.
    rows = [(png(20), 0, encoded(0)), (png(21), 1, encoded(1)), (b"junk", 1, skipped("corrupt"))]
    parquet_shard(root / "train-00003-of-00005.parquet", [r[0] for r in rows], [r[1] for r in rows],
                  image_type=pa.binary())
    expect.update({f"train-00003-of-00005.parquet#{i}": r[2] for i, r in enumerate(rows)})
    # No label column at all: every row is known unusable from the footer.
    parquet_shard(root / "train-00004-of-00005.parquet", [{"bytes": png(22), "path": "n"}] * 2, None)
    expect.update({f"train-00004-of-00005.parquet#{i}": skipped("missing_label") for i in range(2)})
    parquet_shard(root / "test-00000-of-00001.parquet", [{"bytes": png(30 + c), "path": "t"} for c in range(3)],
                  [0, 1, 2])
    return expect


# ---------------------------------------------------------------- ImageFolder


def build_imagefolder(root: Path) -> dict[str, Outcome]:
    root.mkdir(parents=True, exist_ok=True)
    classes_file(root, [f"{c}\t{c.upper()}" for c in CLASSES])
    expect = {}

    def image(relative: str, data: bytes, outcome: Outcome | None) -> None:
        write(root / relative, data)
        if outcome is not None:
            expect[relative] = outcome

    image("train/cat/a.png", png(1), encoded(0))
    image("train/dog/b.PNG", png(2), encoded(1))
    image("train/a$b/c.png", png(3), encoded(2))
    image("train/a$b/deep/down/d.png", png(4), encoded(2))
    image("train/loose.png", png(5), skipped("missing_label"))
    image("train/zebra/e.png", png(6), skipped("missing_label"))  # a folder classes.txt does not list
    image("train/cat/empty.png", b"", skipped("empty"))
    image("train/cat/trunc.jpg", jpeg(7)[:300], skipped("truncated"))
    image("train/dog/big.png", BIG, skipped("too_large"))
    image("train/dog/notes.txt", b"not a row", None)
    image("train/dog/._b.PNG", b"\0\5\26\7AppleDouble", None)  # macOS resource fork: not a row
    image("train/dog/.DS_Store", b"\0\1", None)
    os.symlink(root / "train/cat/a.png", root / "train/dog/linked.png")  # a link inside data.path: followed
    expect["train/dog/linked.png"] = encoded(1)
    os.symlink(root / "train/cat/nowhere.png", root / "train/cat/dangling.png")
    expect["train/cat/dangling.png"] = skipped("missing_image")
    os.symlink(root / "train", root / "train/cat/loop")  # a loop: never walked twice
    expect["train/cat/loop"] = skipped("link_not_followed")
    os.symlink("/", root / "train/dog/root")  # would walk the whole filesystem
    expect["train/dog/root"] = skipped("link_not_followed")
    bad_name = os.fsdecode(b"train/cat/caf\xe9.png")  # Latin-1, not UTF-8
    write(root / bad_name, png(8))
    expect["train/cat/caf\\xe9.png"] = skipped("bad_name")
    for c, folder in enumerate(CLASSES):
        image(f"val/{folder}/v.png", png(40 + c), None)
    return expect


# ---------------------------------------------------------------- WebDataset


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build_webdataset(root: Path) -> dict[str, Outcome]:
    root.mkdir(parents=True, exist_ok=True)
    classes_file(root)
    expect = {}
    members = [
        ("s0.png", png(1)), ("s0.cls", b"0"),
        ("s1.png", png(2)), ("s1.cls", b" 2\n"),
        ("s2.png", png(3)), ("s2.cls", b"12345678901234567890"),  # overflows int64
        ("s3.png", png(4)), ("s3.cls", b"0_3"),
        ("s4.png", png(5)), ("s4.cls", b"two"),
        ("s5.png", png(6)),  # no label
        ("s6.txt", b"caption only"), ("s6.cls", b"1"),  # no image
        ("s7.png", BIG), ("s7.cls", b"1"),
        ("._s8.png", b"\0\5\26\7"),  # macOS resource fork of s8: not a member of it
        ("s8.png", png(7)), ("s8.cls", b"1"),
        ("../../evil.png", png(9)), ("../../evil.cls", b"2"),  # a traversal name is only an id
        (os.fsdecode(b"caf\xe9.png"), png(10)), (os.fsdecode(b"caf\xe9.cls"), b"0"),  # not UTF-8
        ("s0.jpg", jpeg(11)), ("s0.cls", b"1"),  # a key met again: its own row
    ]
    outcomes = [("s0", encoded(0)), ("s1", encoded(2)), ("s2", skipped("label_out_of_range")),
                ("s3", skipped("missing_label")), ("s4", skipped("missing_label")), ("s5", skipped("missing_label")),
                ("s6", skipped("missing_image")), ("s7", skipped("too_large")), ("s8", encoded(1)),
                ("../../evil", encoded(2)), ("caf\\xe9", encoded(0)), ("s0#2", encoded(1))]
    write(root / "train-000000.tar", tar_bytes(members))
    expect.update({f"train-000000.tar/{key}": outcome for key, outcome in outcomes})
    # Cut in the middle of a member: what was read whole is kept, the rest is one corrupt row.
    whole = tar_bytes([("t0.png", png(12)), ("t0.cls", b"0"), ("t1.png", png(13)), ("t1.cls", b"1")])
    write(root / "train-000001.tar", whole[: 512 * 5 + 100])  # inside t1.png's data (each member < 512 bytes)
    expect["train-000001.tar/t0"] = encoded(0)
    expect["train-000001.tar/<damaged>"] = skipped("corrupt")
    write(root / "val-000000.tar", tar_bytes([(f"v{c}.png", png(50 + c)) for c in range(3)] +
                                             [(f"v{c}.cls", str(c).encode()) for c in range(3)]))
    return expect


ROW_BUILDERS: dict[str, Callable[[Path], dict[str, Outcome]]] = {
    "parquet": build_parquet, "imagefolder": build_imagefolder, "webdataset": build_webdataset}


# ---------------------------------------------------------------- whole-source problems


def _good(layout: str, root: Path) -> None:
    ROW_BUILDERS[layout](root)


def _with(layout: str, change: Callable[[Path], None]) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        _good(layout, root)
        change(root)
    return build


def _classes(lines: list[str]) -> Callable[[Path], None]:
    return lambda root: classes_file(root, lines)


SOURCE_CASES: dict[str, dict[str, tuple[Callable[[Path], None], str]]] = {
    "parquet": {
        "zero-byte shard": (_with("parquet", lambda r: write(r / "train-00009-of-00010.parquet", b"")),
                            "train-00009-of-00010.parquet is not a readable parquet file"),
        "image column of strings": (_with("parquet", lambda r: pq.write_table(
            pa.table({"image": ["a.png"], "label": [0]}), r / "train-00009-of-00010.parquet")),
            "its image column is string"),
        "duplicate class line": (_with("parquet", _classes(["cat", "dog", "cat"])), "lists 'cat' on lines [1, 3]"),
        "blank class line": (_with("parquet", _classes(["cat", "", "dog"])), "line 2 is blank"),
        "classes.txt missing": (_with("parquet", lambda r: (r / "classes.txt").unlink()), "classes.txt is missing"),
        "classes.txt not UTF-8": (_with("parquet", lambda r: write(r / "classes.txt", b"caf\xe9\n")),
                                  "is not UTF-8 text"),
        "no shards": (lambda r: classes_file(r), "no parquet shards matching train-*.parquet"),
    },
    "imagefolder": {
        "duplicate class line": (_with("imagefolder", _classes(["cat", "dog", "dog"])),
                                 "lists 'dog' on lines [2, 3]"),
        "blank class line": (_with("imagefolder", _classes(["cat", "", "dog"])), "line 2 is blank"),
        "no held-out split": (lambda r: write(r / "train/cat/a.png", png(1)), "no val or validation or test split"),
    },
    "webdataset": {
        "classes.txt missing": (_with("webdataset", lambda r: (r / "classes.txt").unlink()),
                                "classes.txt is missing"),
        "no shards": (lambda r: classes_file(r), "no train split"),
    },
}
