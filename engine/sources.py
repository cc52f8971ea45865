"""File sources as parquet rows: Hugging-Face parquet shards, ImageFolder trees and WebDataset tar shards.

Every file source is read as batches of rows in the parquet row form
    {"image": [{"bytes": b | None, "path": id}, ...], "label": [int | None, ...], "path": [source file, ...]}
so `engine.data.decode_rows` (decoding, resizing, every skip reason) applies unchanged, in-process (`load_split`,
through `iter_row_batches`) and in Ray Data (`engine/ray/readers.py`, same row functions). Reading is done in two
steps: `scan_source` lists the split once (no image bytes read) into a `SourceListing` whose `skipped` records
({id, reason, detail}) are the rows already known unusable; then the rows of `listing.names` are streamed.

ImageFolder (torchvision's layout): <path>/<split>/<class folder>/<image>, images at any depth below their class
folder. Split "train" reads train/; split "test" reads val/, else validation/, else test/ (ImageNet's held-out split
is val/); the engine's "val" split is carved from train/ (engine/splits.py), whatever the source.
Classes: <path>/classes.txt if present, line i = the folder of label i, optionally followed by a display
name after a TAB (then the folder name may hold spaces) or after the first run of spaces
("n01440764 tench, Tinca tinca"); else the sorted folder names of train/ (torchvision's rule), shown as is.
`class_names_of` gives the display names. Images are chosen by extension (IMAGE_EXTENSIONS, any case); other
files (notes, .DS_Store) are not rows: they are listed in `listing.ignored` and never counted as skipped. An image
in a folder that is not a class, or directly in the split folder, is skipped at listing time as `missing_label`,
the detail naming the folder. A file that cannot be read at all (vanished, permission denied) becomes a row without
bytes (`missing_image`); a transient storage error is retried, then raised: an outage is not a bad image.
Ids: the path below <path> (`train/n01440764/n01440764_10026.JPEG`).

WebDataset (timm / OpenCLIP layout): <path>/[<prefix>-]<split>-<n>.tar ("test": val, validation, then test; so
timm's imagenet1k-train-0000.tar / imagenet1k-validation-00.tar work as they are), classes.txt beside them
(required, one name per line, as for parquet). A tar is streamed member by member (`r|*`), never held.
Members are grouped into samples by key: the member name up to the first dot of its base name (webdataset's rule;
members without a dot, directories and links are not part of any sample). A sample's image is its first member with
suffix jpg/jpeg/png/webp (any case), its label the ASCII integer of `.cls`; anything else (.txt, .json) is ignored.
No image -> a row without bytes (`missing_image`); no or unparsable .cls -> a null label (`missing_label`; the label
is checked first, so a sample with neither is `missing_label`). Ids: `<shard name>/<key>`; a key met again later in
the same shard (webdataset requires a sample's members to be adjacent) gets `#2`, `#3`, ... so ids stay unique.
A damaged tar (truncated, a garbled or cut header, not a tar at all, bytes after the end-of-archive block): every
sample read before the damage is kept (the one being read when it is hit too, if its image and .cls members were
both read whole); the rest of the shard becomes ONE row with id `<shard>/<damaged after <last kept key | the
start>: <error>>`, label 0 and the bytes TAR_DAMAGE, which are no image, so decode_rows skips it as `corrupt`.
(Python's tarfile ends a stream silently at a cut or garbled header; `_StrictTarInfo` makes that an error.)

Parquet: `<path>/<split>-*.parquet` as before (engine.data.shard_paths / inspect_shards).
This module never imports ray.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.config import DataConfig
from engine.location import ObjectPath, filesystem_and_path, list_files as list_object_files, location
from engine.splits import in_split, rows_of_split, skipped_of_split, source_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# On disk, in the order tried: the engine asks for "train" and "test"; held-out sets are usually called val.
SPLIT_NAMES = {"train": ("train",), "test": ("val", "validation", "test")}
# Stands for the damaged part of a tar: not an image, so decode_rows skips its row as corrupt.
TAR_DAMAGE = b"DDOQ: damaged tar shard, see the row id\n"
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ROW_SCHEMA = pa.schema([("image", IMAGE_TYPE), ("label", pa.int64()), ("path", pa.string())])
FILE_SOURCES = ("parquet", "imagefolder", "webdataset")


@dataclass(frozen=True)
class SourceListing:
    """One listing of a split: what to read, and what is already known unusable."""

    source: str
    root: str  # data.path
    names: tuple[str, ...]  # files to read, relative to root: shards, or image ids (imagefolder)
    labels: tuple[int, ...] = ()  # imagefolder: each file's label, from its class folder
    sizes: tuple[int | None, ...] = ()  # bytes when the listing gave them (object stores), else None
    skipped: dict = field(default_factory=lambda: {"id": [], "reason": [], "detail": []})
    ignored: tuple[str, ...] = ()  # imagefolder: files that are not images (not rows, not counted)

    def paths(self) -> list[str]:
        base = location(self.root)
        return [str(base / name) for name in self.names]


def empty_rows() -> dict:
    return {"image": [], "label": [], "path": []}


def rows_to_table(rows: dict) -> pa.Table:
    """A row batch as the Arrow table Ray Data carries (parquet's image struct, nullable int64 label)."""
    return pa.table({"image": pa.array(rows["image"], IMAGE_TYPE), "label": pa.array(rows["label"], pa.int64()),
                     "path": pa.array(rows["path"], pa.string())}, schema=ROW_SCHEMA)


def add_skip(skipped: dict, row_id: str, reason: str, detail: str) -> None:
    for key, value in zip(("id", "reason", "detail"), (row_id, reason, detail)):
        skipped[key].append(value)


# ---------------------------------------------------------------- listing


def find_split(root: Path | ObjectPath, split: str, exists: Callable[[str], bool]) -> str:
    """The on-disk name of a source split ("test" -> val, validation or test, the first that exists)."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"a source split is 'train' or 'test', got {split!r}")
    for name in SPLIT_NAMES[split]:
        if exists(name):
            return name
    raise FileNotFoundError(f"no {' or '.join(SPLIT_NAMES[split])} split under {root}")


def subfolders(place: Path | ObjectPath) -> list[str]:
    """Names of the folders directly inside `place`: one listing (no per-entry request on an object store)."""
    fs, inner = filesystem_and_path(place)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def walk_files(folder: Path | ObjectPath) -> list[tuple[str, int | None]]:
    """(path relative to folder, size or None) of every file below it, sorted. Locally one scandir per folder and
    no stat per file (symlinks followed, as torchvision does); on an object store one recursive listing."""
    if isinstance(folder, ObjectPath):
        return list(list_object_files(folder).items())
    found = []

    def scan(directory: str, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir():
                    scan(entry.path, f"{prefix}{entry.name}/")
                elif entry.is_file():
                    found.append((f"{prefix}{entry.name}", None))

    scan(str(folder), "")
    return sorted(found)


def parse_class_lines(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """classes.txt of an ImageFolder -> (folder of each label, display name of each label)."""
    folders, names = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        if "\t" in line:
            folder, _, name = line.partition("\t")
        else:
            folder, _, name = line.strip().partition(" ")
        folders.append(folder.strip())
        names.append(name.strip() or folder.strip())
    if not folders:
        raise ValueError("classes.txt lists no class")
    repeated = sorted({f for f in folders if folders.count(f) > 1})
    if repeated:
        raise ValueError(f"classes.txt lists these folders more than once: {repeated[:5]}")
    return tuple(folders), tuple(names)


def imagefolder_classes(root: Path | ObjectPath) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(folder, display name) of each label: classes.txt when present, else train/'s sorted folder names."""
    listed = root / "classes.txt"
    if listed.exists():
        return parse_class_lines(listed.read_text())
    folders = tuple(subfolders(root / "train"))
    if not folders:
        raise FileNotFoundError(f"{root} has no classes.txt and no class folders under train/ to name the classes")
    return folders, folders


def scan_imagefolder(config: DataConfig, split: str) -> SourceListing:
    root = location(config.path)
    split_name = find_split(root, split, lambda name: (root / name).is_dir())
    folders, _ = imagefolder_classes(root)
    label_of = {folder: label for label, folder in enumerate(folders)}
    known = "classes.txt" if (root / "classes.txt").exists() else "the class folders of train/"
    names, labels, sizes, ignored = [], [], [], []
    skipped = {"id": [], "reason": [], "detail": []}
    for relative, size in walk_files(root / split_name):
        row_id = f"{split_name}/{relative}"
        if not relative.lower().endswith(IMAGE_EXTENSIONS):
            ignored.append(row_id)
            continue
        folder, inside, _ = relative.partition("/")
        if not inside:
            add_skip(skipped, row_id, "missing_label", f"image directly in {split_name}/, not in a class folder")
        elif folder not in label_of:
            add_skip(skipped, row_id, "missing_label", f"class folder {folder!r} is not in {known}")
        else:
            names.append(row_id)
            labels.append(label_of[folder])
            sizes.append(size)
    return SourceListing("imagefolder", config.path, tuple(names), tuple(labels), tuple(sizes), skipped,
                         tuple(ignored))


def scan_webdataset(config: DataConfig, split: str) -> SourceListing:
    root = location(config.path)
    shards = {}  # split name -> its shards, from one listing of the folder
    for place in root.glob("*-*.tar"):
        # [<prefix>-]<split>-<n>.tar: train-000000.tar, or timm's imagenet1k-validation-00.tar
        shards.setdefault(place.name.rsplit("-", 1)[0].rsplit("-", 1)[-1], []).append(place.name)
    split_name = find_split(root, split, lambda name: name in shards)
    names = tuple(sorted(shards[split_name]))
    return SourceListing("webdataset", config.path, names, sizes=(None,) * len(names))


def scan_parquet(config: DataConfig, split: str) -> SourceListing:
    from engine.data import inspect_shards, shard_paths

    readable, skipped = inspect_shards(shard_paths(config.path, split))  # footers only
    names = tuple(location(path).name for path in readable)
    return SourceListing("parquet", config.path, names, sizes=(None,) * len(names), skipped=skipped)


def scan_source(config: DataConfig, split: str) -> SourceListing:
    """List a file source's split once (what `iter_row_batches` and the Ray readers then read). Split "train" or
    "val" lists the source's train split: an ImageFolder listing keeps only the split's files (its ids are known
    here); shards hold both, and their readers keep the split's rows (`rows_of_split`). Skip records of the
    listing are the split's own."""
    scanners = {"parquet": scan_parquet, "imagefolder": scan_imagefolder, "webdataset": scan_webdataset}
    if config.source not in scanners:
        raise ValueError(f"data.source={config.source!r} is not a file source ({', '.join(FILE_SOURCES)})")
    if not config.path:
        raise ValueError(f"data.source={config.source} needs data.path")
    listing = scanners[config.source](config, source_split(split))
    if split == "test":
        return listing
    coin = (split, config.val_fraction, config.split_seed)
    skipped = skipped_of_split(listing.skipped, *coin)
    if listing.source != "imagefolder":
        return dataclasses.replace(listing, skipped=skipped)
    keep = np.flatnonzero(in_split(listing.names, *coin))
    return dataclasses.replace(listing, names=tuple(listing.names[i] for i in keep),
                               labels=tuple(listing.labels[i] for i in keep),
                               sizes=tuple(listing.sizes[i] for i in keep), skipped=skipped)


def count_rows(config: DataConfig, split: str) -> int:
    """Rows of a split, read as cheaply as the layout allows (it sizes the streamed training schedules; rows that
    will not decode are still counted): digits from memory, parquet test from the footers and train / val from
    the ids alone (the `image.path` column, a few MB at ImageNet's size), an ImageFolder from its listing;
    WebDataset tars hold no index, so they are streamed once."""
    if config.source == "digits":
        from engine.data import load_split

        return len(load_split(config, split))
    listing = scan_source(config, split)
    if listing.source == "parquet":
        if split == "test":
            return sum(pq.read_metadata(path).num_rows for path in listing.paths())
        return sum(int(in_split(parquet_ids(location(path)), split, config.val_fraction, config.split_seed).sum())
                   for path in listing.paths())
    if listing.source == "imagefolder":
        return len(listing.names)
    return sum(len(rows["label"]) for rows in iter_row_batches(config, split))


def list_files(config: DataConfig, split: str) -> list[str]:
    """The files a split is read from (shards or image files), as local paths or URIs."""
    return scan_source(config, split).paths()


def class_names_of(config: DataConfig) -> tuple[str, ...]:
    """Class names in label order (ImageFolder: the display names)."""
    if config.source == "imagefolder":
        return imagefolder_classes(location(config.path))[1]
    from engine.data import read_class_names

    return read_class_names(config.path)


# ---------------------------------------------------------------- rows


def read_file_bytes(place: Path | ObjectPath, attempts: int = 3) -> bytes | None:
    """A file's bytes; None when it cannot be read at all (its row becomes missing_image). Other I/O errors are
    retried with back-off, then raised: a storage outage must not look like a set of bad images."""
    for attempt in range(attempts):
        try:
            return place.read_bytes()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2 ** attempt)
    return None


def iter_image_rows(root: str, names, labels, batch_size: int = 256) -> Iterator[dict]:
    """ImageFolder files (ids relative to root, with their labels) -> row batches of at most batch_size."""
    base = location(root)
    rows = empty_rows()
    for name, label in zip(names, labels):
        place = base / name
        rows["image"].append({"bytes": read_file_bytes(place), "path": name})
        rows["label"].append(int(label))
        rows["path"].append(filesystem_and_path(place)[1])
        if len(rows["label"]) == batch_size:
            yield rows
            rows = empty_rows()
    if rows["label"]:
        yield rows


class _TarDamage(Exception):
    """A tar shard that breaks off or holds garbage: the rest of the shard becomes one skipped row."""


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile, in stream mode, takes a cut, empty or garbled header after the first for the end of the archive and
    stops without a word; only the end-of-archive zero block may end it here."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as error:
            raise _TarDamage(f"{error.__class__.__name__}: {error}") from None


# webdataset's base_plus_ext: key = everything up to the first dot of the base name, suffix = the rest.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member_name(name: str) -> tuple[str | None, str]:
    match = _MEMBER_NAME.match(name.removeprefix("./"))
    return (match.group(1), match.group(2)) if match else (None, "")


def parse_label(data: bytes | None) -> int | None:
    try:
        return int(data.decode("ascii").strip()) if data is not None else None
    except (UnicodeDecodeError, ValueError):
        return None


def iter_tar_samples(stream, shard: str) -> Iterator[tuple[str, bytes | None, int | None]]:
    """(id, image bytes or None, label or None) of each sample of one tar stream, in archive order; see the module
    docstring for grouping and damage. Transient I/O errors of the stream (OSError) are left to the caller."""
    seen: dict[str, int] = {}
    key, members, last = None, {}, None

    def sample() -> tuple[str, bytes | None, int | None]:
        seen[key] = seen.get(key, 0) + 1
        image = next((data for suffix, data in members.items() if suffix in TAR_IMAGE_SUFFIXES), None)
        suffix = "" if seen[key] == 1 else f"#{seen[key]}"
        return f"{shard}/{key}{suffix}", image, parse_label(members.get("cls"))

    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                tar.members = []  # stream mode keeps every header read otherwise
                member_key, suffix = split_member_name(member.name)
                if not member.isreg() or member_key is None:
                    continue
                suffix = suffix.lower()
                # Only images and labels are read into memory; tarfile reads past the rest (and notices a cut).
                wanted = suffix in TAR_IMAGE_SUFFIXES or suffix == "cls"
                data = tar.extractfile(member).read() if wanted else None
                if member_key != key:
                    if key is not None:
                        yield sample()
                        last = key
                    key, members = member_key, {}
                members.setdefault(suffix, data)
            if key is not None:  # the end-of-archive block was read: the last sample is whole
                yield sample()
                last, key = key, None
            while chunk := tar.fileobj.read(1 << 20):
                if chunk.strip(b"\0"):
                    raise _TarDamage("data after the end-of-archive block")
    except (tarfile.TarError, _TarDamage, EOFError, zlib.error) as error:
        # Members are added only once read whole: a sample with its image and .cls is as good as any other.
        if key is not None and "cls" in members and any(s in members for s in TAR_IMAGE_SUFFIXES):
            yield sample()
            last = key
        yield f"{shard}/<damaged after {last or 'the start'}: {error}>", TAR_DAMAGE, 0


def iter_tar_rows(stream, shard: str, path: str, batch_size: int = 256) -> Iterator[dict]:
    """One tar stream -> row batches of at most batch_size (shard: its name, for ids; path: the `path` column)."""
    rows = empty_rows()
    for row_id, image, label in iter_tar_samples(stream, shard):
        rows["image"].append({"bytes": image, "path": row_id})
        rows["label"].append(label)
        rows["path"].append(path)
        if len(rows["label"]) == batch_size:
            yield rows
            rows = empty_rows()
    if rows["label"]:
        yield rows


def parquet_ids(place: Path | ObjectPath) -> list:
    """The row ids of a parquet shard (`image.path`), read without the image bytes."""
    fs, inner = filesystem_and_path(place)
    with fs.open_input_file(inner) as f:
        return pq.read_table(f, columns=["image.path"]).column(0).to_pylist()  # the leaf alone: `path`


def iter_parquet_rows(place: Path | ObjectPath, batch_size: int = 256) -> Iterator[dict]:
    fs, inner = filesystem_and_path(place)
    with fs.open_input_file(inner) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["image", "label"]):
            rows = batch.to_pydict()
            yield {**rows, "path": [inner] * batch.num_rows}


def iter_row_batches(config: DataConfig, split: str, batch_size: int = 256,
                     listing: SourceListing | None = None) -> Iterator[dict]:
    """Every row of the split's readable files, in listing order, in batches of at most batch_size (fewer where
    val's rows are taken out of a train batch, or train's out of a val one), read in this process (small splits
    and tests; Ray Data reads big ones). listing.skipped holds the rows that are not here."""
    listing = listing or scan_source(config, split)
    base = location(listing.root)
    if listing.source == "imagefolder":  # the listing holds the split's files only
        yield from iter_image_rows(listing.root, listing.names, listing.labels, batch_size)
        return
    for name in listing.names:
        for rows in iter_file_rows(base / name, listing.source, batch_size):
            rows = rows_of_split(rows, split, config.val_fraction, config.split_seed)
            if rows["label"]:
                yield rows


def iter_file_rows(place: Path | ObjectPath, source: str, batch_size: int) -> Iterator[dict]:
    """Every row of one parquet shard or tar, streamed (the tar stays open until its last row)."""
    if source == "parquet":
        yield from iter_parquet_rows(place, batch_size)
        return
    with place.open("rb") as stream:
        yield from iter_tar_rows(stream, place.name, filesystem_and_path(place)[1], batch_size)
