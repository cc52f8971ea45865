"""File sources as parquet rows: Hugging-Face parquet shards, ImageFolder trees and WebDataset tar shards.

Every file source is read as batches of rows in one row form (engine/data/rows.py: image {bytes, path = the row's
unique id}, label, skip, path), so `engine.data.images.decode_rows` (decoding, resizing, every skip reason) applies unchanged, in-process (`load_split`,
through `iter_row_batches`) and in Ray Data (`engine/ray/readers.py`, same row functions). Reading is done in two
steps: `scan_source` lists the split once (no image bytes read) into a `SourceListing` whose `skipped` records
({id, reason, detail}) are the rows already known unusable; then the rows of `listing.names` are streamed.

ImageFolder (torchvision's layout): <path>/<split>/<class folder>/<image>, images at any depth below their class
folder. Split "train" reads train/; split "test" reads val/, else validation/, else test/ (ImageNet's held-out split
is val/); the engine's "val" split is carved from train/ (engine/data/splits.py), whatever the source.
Classes: <path>/classes.txt if present (`parse_class_lines`: line i is label i, as "<folder><TAB><name>",
"<WordNet synset> <name>" or a bare name that is its own folder); else the sorted folder names of train/
(torchvision's rule), shown as is. `class_names` gives the display names (data.classes_file overrides them).
Images are chosen by extension (IMAGE_EXTENSIONS, any case); other files (notes, .DS_Store, macOS's `._*`
AppleDouble files) are not rows: they are listed in `listing.ignored` and never counted as skipped. Symbolic links
are followed inside data.path only (data.follow_symlinks=true: anywhere), a link seen again below itself (a loop)
never; a link not followed is a `link_not_followed` row, a dangling one `missing_image`, a name that is not
UTF-8 `bad_name` (its id shows the bytes escaped). A file over data.max_image_bytes is `too_large`, unread. An image
in a folder that is not a class, or directly in the split folder, is skipped at listing time as `missing_label`,
the detail naming the folder. A file that cannot be read at all (vanished, permission denied) becomes a row without
bytes (`missing_image`); a transient storage error is retried, then raised: an outage is not a bad image.
Ids: the path below <path> (`train/n01440764/n01440764_10026.JPEG`).

WebDataset (timm / OpenCLIP layout): <path>/[<prefix>-]<split>-<n>.tar ("test": val, validation, then test; so
timm's imagenet1k-train-0000.tar / imagenet1k-validation-00.tar work as they are), classes.txt beside them
(required, one name per line, as for parquet). A tar is streamed member by member (`r|*`), never held.
Members are grouped into samples by key: the member name up to the first dot of its base name (webdataset's rule;
members without a dot, directories and links are not part of any sample). A sample's image is its first member with
suffix jpg/jpeg/png/webp (any case), its label the decimal integer of `.cls` (engine.data.rows.parse_label); anything
else (.txt, .json) is ignored, as are macOS's `._*` members. No image -> a row without bytes (`missing_image`); no
.cls -> a null label, an unparsable one a skip (`missing_label`; the label is checked first, so a sample with
neither is `missing_label`); an image member over data.max_image_bytes is not read (`too_large`). Ids: `<shard name>/<key>`; a key met again later in
the same shard (webdataset requires a sample's members to be adjacent) gets `#2`, `#3`, ... so ids stay unique.
A damaged tar (truncated, a garbled or cut header, not a tar at all, bytes after the end-of-archive block): every
sample read before the damage is kept (the one being read when it is hit too, if its image and .cls members were
both read whole); the rest of the shard becomes ONE row with id `<shard>/<damaged after <last kept key | the
start>: <error>>`, label 0 and the bytes TAR_DAMAGE, which are no image, so decode_rows skips it as `corrupt`.
(Python's tarfile ends a stream silently at a cut or garbled header; `_StrictTarInfo` makes that an error.)

Parquet: `<path>/<split>-*.parquet` (`shard_paths` / `inspect_shards`), the image column HF's struct
{bytes, path} or plain binary. Ids: `<shard name>#<row>` (the `image.path` a dataset stores can repeat across
classes, so it is never the id); labels of any column type go through engine.data.rows.parse_label.

Digits: scikit-learn's embedded 8x8 digits (`read_digits`), split train/test by a seeded stratified draw; classes
"0".."9". engine/data/images.py turns them into images. This module never imports engine/data/images.py nor ray.
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
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.config import DataConfig
from engine.io.location import ObjectPath, filesystem_and_path, location
from engine.io.location import list_files as list_object_files
from engine.data.rows import (
    ROW_SCHEMA,
    SkipRecords,
    SourceError,
    add_skip,
    empty_rows,
    is_image_column,
    is_utf8,
    no_skips,
    parse_label,
    parse_labels,
    safe_text,
)
from engine.data.splits import in_split, rows_of_split, skipped_of_split, source_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# On disk, in the order tried: the engine asks for "train" and "test"; held-out sets are usually called val.
SPLIT_NAMES = {"train": ("train",), "test": ("val", "validation", "test")}
# Stands for the damaged part of a tar: not an image, so decode_rows skips its row as corrupt.
TAR_DAMAGE = b"DDOQ: damaged tar shard, see the row id\n"
FILE_SOURCES = ("parquet", "imagefolder", "webdataset")
DIGIT_NAMES = tuple(str(digit) for digit in range(10))


@dataclass(frozen=True)
class SourceListing:
    """One listing of a split: what to read, and what is already known unusable."""

    source: str
    root: str  # data.path
    names: tuple[str, ...]  # files to read, relative to root: shards, or image ids (imagefolder)
    labels: tuple[int, ...] = ()  # imagefolder: each file's label, from its class folder
    sizes: tuple[int | None, ...] = ()  # bytes when the listing gave them (object stores), else None
    skipped: SkipRecords = field(default_factory=no_skips)
    ignored: tuple[str, ...] = ()  # imagefolder: files that are not images (not rows, not counted)

    def paths(self) -> list[str]:
        base = location(self.root)
        return [str(base / name) for name in self.names]


# ---------------------------------------------------------------- listing


def find_split(root: Path | ObjectPath, split: str, exists: Callable[[str], bool]) -> str:
    """The on-disk name of a source split ("test" -> val, validation or test, the first that exists)."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"a source split is 'train' or 'test', got {split!r}")
    for name in SPLIT_NAMES[split]:
        if exists(name):
            return name
    raise SourceError(f"no {' or '.join(SPLIT_NAMES[split])} split under {root}: see docs/guide.md for the "
                      f"layout of each source")


def subfolders(place: Path | ObjectPath) -> list[str]:
    """Names of the folders directly inside `place`: one listing (no per-entry request on an object store)."""
    fs, inner = filesystem_and_path(place)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


@dataclass
class Walk:
    """What a walk below a split folder found: image candidates (relative path, size or None), rows already known
    unusable (relative path, reason, detail) and files that are not rows."""

    files: list[tuple[str, int | None]] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("._")  # ._*: macOS AppleDouble


def walk_files(folder: Path | ObjectPath, inside: Path | None = None, follow_symlinks: bool = False) -> Walk:
    """Every file below `folder`, sorted. On an object store one recursive listing. Locally one scandir per folder
    and no stat per file; symbolic links are followed while they stay inside `inside` (data.path; anywhere with
    follow_symlinks), a folder already on the way down (a loop) never."""
    if isinstance(folder, ObjectPath):
        return Walk(files=list(list_object_files(folder).items()))
    walk = Walk()
    root = os.path.realpath(inside or folder)

    def scan(directory: str, prefix: str, ancestors: frozenset[str]) -> None:
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as error:  # unreadable folder: its files cannot be listed, say so once
            walk.problems.append((safe_text(prefix.rstrip("/")), "missing_image",
                                  f"folder not readable ({error.strerror}): its images are not read"))
            return
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            if not is_utf8(entry.name):
                walk.problems.append((safe_text(relative), "bad_name", "the name is not UTF-8: rename it"))
                continue
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not os.path.exists(target):
                    if entry.name.startswith("._") or not is_image_name(entry.name):
                        walk.ignored.append(relative)
                    else:
                        walk.problems.append((relative, "missing_image", "dangling symbolic link"))
                    continue
                if not follow_symlinks and os.path.commonpath([root, target]) != root:
                    walk.problems.append((relative, "link_not_followed", "symbolic link out of data.path (set "
                                          "data.follow_symlinks=true to follow it)"))
                    continue
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    walk.problems.append((relative, "link_not_followed", "symbolic link loop"))
                    continue
                scan(entry.path, f"{relative}/", ancestors | {real})
            elif entry.is_file() and is_image_name(entry.name):
                walk.files.append((relative, None))
            else:
                walk.ignored.append(relative)

    scan(str(folder), "", frozenset({os.path.realpath(folder)}))
    return walk


# A WordNet synset id (ImageNet's folder and label names): "n01440764 tench" is that synset named tench.
_SYNSET = re.compile(r"n[0-9]{8}")


def parse_class_lines(text: str, file: str = "classes.txt") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """classes.txt of any source -> (key of each label, display name of each label); line i is label i. A line is
    "<key><TAB><name>", "<synset> <name>" (ImageNet's LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca"),
    or a bare name that is its own key ("Ankle boot"). ImageFolder keys are class folders; parquet and WebDataset
    use the names only. A blank line inside the list, or a key listed twice, would shift or merge labels: both are
    a SourceError naming the line."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    keys, names = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise SourceError(f"{file} line {number} is blank, which would shift every later label by one: remove "
                              f"it or name the class of label {number - 1} there")
        if "\t" in line:
            key, _, name = line.partition("\t")
        else:
            first, _, rest = line.strip().partition(" ")
            key, name = (first, rest) if _SYNSET.fullmatch(first) else (line.strip(), "")
        keys.append(key.strip())
        names.append(name.strip() or key.strip())
    if not keys:
        raise SourceError(f"{file} lists no class: write one class name per line, in label order")
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        lines_of = [i + 1 for i, k in enumerate(keys) if k == repeated[0]]
        raise SourceError(f"{file} lists {repeated[0]!r} on lines {lines_of} ({len(repeated)} class(es) repeated): "
                          f"each class must appear once, its line number giving its label")
    return tuple(keys), tuple(names)


def read_classes_file(place: Path | ObjectPath) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        text = place.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SourceError(f"{place} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    return parse_class_lines(text, str(place))


def imagefolder_classes(root: Path | ObjectPath) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(folder, display name) of each label: classes.txt when present, else train/'s sorted folder names."""
    listed = root / "classes.txt"
    if listed.exists():
        return read_classes_file(listed)
    folders = tuple(f for f in subfolders(root / "train") if is_utf8(f))
    if not folders:
        raise SourceError(f"{root} has no classes.txt and no class folders under train/ to name the classes")
    return folders, folders


def scan_imagefolder(config: DataConfig, split: str) -> SourceListing:
    root = location(config.path)
    split_name = find_split(root, split, lambda name: (root / name).is_dir())
    folders, _ = imagefolder_classes(root)
    label_of = {folder: label for label, folder in enumerate(folders)}
    known = "classes.txt" if (root / "classes.txt").exists() else "the class folders of train/"
    names, labels, sizes = [], [], []
    skipped = no_skips()
    walk = walk_files(root / split_name, root if isinstance(root, Path) else None, config.follow_symlinks)
    for relative, reason, detail in walk.problems:
        add_skip(skipped, f"{split_name}/{relative}", reason, detail)
    for relative, size in walk.files:
        row_id = f"{split_name}/{relative}"
        if not is_image_name(relative.rsplit("/", 1)[-1]):  # an object store lists every file
            walk.ignored.append(relative)
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
                         tuple(f"{split_name}/{i}" for i in walk.ignored))


def scan_webdataset(config: DataConfig, split: str) -> SourceListing:
    root = location(config.path)
    shards = {}  # split name -> its shards, from one listing of the folder
    for place in root.glob("*-*.tar"):
        # [<prefix>-]<split>-<n>.tar: train-000000.tar, or timm's imagenet1k-validation-00.tar
        shards.setdefault(place.name.rsplit("-", 1)[0].rsplit("-", 1)[-1], []).append(place.name)
    split_name = find_split(root, split, lambda name: name in shards)
    names = tuple(sorted(shards[split_name]))
    return SourceListing("webdataset", config.path, names, sizes=(None,) * len(names))


def shard_paths(root: str | Path, split: str) -> list[str]:
    """The split's shards under a local folder or an object-store URI (s3://bucket/imagenet-1k/data)."""
    paths = sorted(str(p) for p in location(root).glob(f"{split}-*.parquet"))
    if not paths:
        raise SourceError(f"no parquet shards matching {split}-*.parquet under {root}: point data.path at the "
                          f"folder that holds them")
    return paths


def inspect_shards(paths: list[str]) -> tuple[list[str], SkipRecords]:
    """Check each shard's schema from its footer (no data read): a shard without an `image` or `label` column
    contributes every row to the skip records (id `<shard>#<row>`) and is left out of the returned readable list.
    A file that is not parquet (a zero-byte or cut file), or an image column the engine cannot read, stops the run
    with one sentence (SourceError) naming the shard."""
    readable, skipped = [], no_skips()
    for path in paths:
        try:
            metadata = pq.read_metadata(path)
            schema = metadata.schema.to_arrow_schema()
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError variants for damaged footers
            raise SourceError(f"{path} is not a readable parquet file ({error.__class__.__name__}: {error}): "
                              f"re-export or remove it") from None
        if "image" in schema.names and not is_image_column(schema.field("image").type):
            raise SourceError(f"{path}: its image column is {schema.field('image').type}, where the engine reads "
                              f"encoded image bytes (a struct<bytes, path> as Hugging Face writes, or binary): "
                              f"store the image files' bytes in it")
        reason = "missing_image" if "image" not in schema.names else \
            "missing_label" if "label" not in schema.names else None
        if reason is None:
            readable.append(path)
            continue
        shard = location(path).name
        for row in range(metadata.num_rows):
            add_skip(skipped, parquet_row_id(shard, row), reason, f"shard has no {reason.split('_')[1]} column")
    return readable, skipped


def scan_parquet(config: DataConfig, split: str) -> SourceListing:
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


def check_source(config: DataConfig) -> None:
    """Whole-source problems as one sentence (SourceError) before any stage: the class list, and that both
    splits are there and readable as far as their listing tells (parquet footers; the tars and the folders of an
    ImageFolder are only found here, their contents checked as they are read)."""
    class_names(config)
    for split in ("train", "test"):
        if config.source == "imagefolder":
            root = location(config.path)
            find_split(root, split, lambda name: (root / name).is_dir())
        else:
            scan_source(config, split)


def count_rows(config: DataConfig, split: str) -> int:
    """Rows of a split, read as cheaply as the layout allows (it sizes the streamed training schedules; rows that
    will not decode are still counted): digits from memory, parquet from the footers (ids are `<shard>#<row>`, so
    train / val are carved without reading a column), an ImageFolder from its listing;
    WebDataset tars hold no index, so they are streamed once."""
    if config.source == "digits":
        return len(read_digits(config, split)[2])
    listing = scan_source(config, split)
    if listing.source == "parquet":
        if split == "test":
            return sum(pq.read_metadata(path).num_rows for path in listing.paths())
        return sum(int(in_split(parquet_ids(location(path)), split, config.val_fraction, config.split_seed).sum())
                   for path in listing.paths())
    if listing.source == "imagefolder":
        return len(listing.names)
    return sum(len(rows["label"]) for rows in iter_row_batches(config, split))


def class_names(config: DataConfig) -> tuple[str, ...]:
    """Class names in label order, of any source: "0".."9" for the digits; else from the classes.txt beside the
    data (ImageFolder: the display names, or the folder names without one); data.classes_file, when set, gives the
    display names instead (e.g. ImageNet-1K's readable names for prompts), and must list as many classes in the
    same order (same keys where it has them)."""
    if config.source == "digits":
        return DIGIT_NAMES
    root = location(config.path)
    if config.source == "imagefolder":
        keys, names = imagefolder_classes(root)
    else:
        listed = root / "classes.txt"
        if not listed.exists():
            raise SourceError(f"{listed} is missing: the dataset folder must list its class names, one per line "
                              f"in label order")
        keys, names = read_classes_file(listed)
    if not config.classes_file:
        return names
    other_keys, other_names = read_classes_file(location(config.classes_file))
    if len(other_keys) != len(keys):
        raise SourceError(f"data.classes_file={config.classes_file} lists {len(other_keys)} classes, the data "
                          f"{len(keys)}: point it at the names of these classes, in label order")
    mismatch = [i for i, (a, b) in enumerate(zip(keys, other_keys)) if _SYNSET.fullmatch(a) and a != b]
    if mismatch:
        i = mismatch[0]
        raise SourceError(f"data.classes_file={config.classes_file} line {i + 1} is {other_keys[i]!r} where the "
                          f"data's label {i} is {keys[i]!r}: the two lists must be in the same order")
    return other_names


def read_class_names(root: str | Path) -> tuple[str, ...]:
    """The display names of the classes.txt beside parquet shards, in label order (`parse_class_lines`)."""
    return class_names(DataConfig(source="parquet", path=str(root)))


def read_digits(config: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 images, 8x8, values 0..16) with a seeded stratified train/test split (sklearn);
    val is carved from train by the same per-id coin as every source's (engine/data/splits.py), so its rows keep
    their train ids. -> (pixels (N, 8, 8) uint8 scaled to 0..255, labels (N,) int64, ids (N,) str)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_index, test_index = train_test_split(
        index, test_size=config.test_fraction, stratify=labels, random_state=config.split_seed
    )
    chosen = np.sort(train_index if source_split(split) == "train" else test_index)
    ids = np.array([f"digits/{source_split(split)}/{i:06d}" for i in chosen], dtype=object)
    keep = in_split(ids, split, config.val_fraction, config.split_seed)
    chosen = chosen[keep]
    return pixels[chosen], labels[chosen], ids[keep]


# ---------------------------------------------------------------- rows


def read_file_bytes(place: Path | ObjectPath, max_bytes: int | None = None, size: int | None = None,
                    attempts: int = 3) -> tuple[bytes | None, str | None]:
    """A file's bytes, or (None, skip) when it cannot be read at all (missing_image) or holds more than max_bytes
    (too_large: refused from its size, never read whole). Other I/O errors are retried with back-off, then raised:
    a storage outage must not look like a set of bad images."""
    for attempt in range(attempts):
        try:
            if isinstance(place, ObjectPath):
                size = place.stat().st_size if size is None and max_bytes else size
                if max_bytes and size is not None and size > max_bytes:
                    return None, f"too_large: {size} bytes > data.max_image_bytes={max_bytes}"
                return place.read_bytes(), None
            with open(place, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if max_bytes and size > max_bytes:
                    return None, f"too_large: {size} bytes > data.max_image_bytes={max_bytes}"
                return f.read(), None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as error:
            return None, f"missing_image: file not readable ({error.__class__.__name__})"
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2 ** attempt)
    return None, None


def iter_image_rows(root: str, names, labels, batch_size: int = 256, max_bytes: int | None = None,
                    sizes=None) -> Iterator[dict]:
    """ImageFolder files (ids relative to root, with their labels) -> row batches of at most batch_size."""
    base = location(root)
    rows = empty_rows()
    for name, label, size in zip(names, labels, sizes or [None] * len(names)):
        place = base / name
        data, skip = read_file_bytes(place, max_bytes, size)
        rows["image"].append({"bytes": data, "path": name})
        rows["label"].append(int(label))
        rows["skip"].append(skip)
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


@dataclass(frozen=True)
class TarSample:
    id: str
    image: bytes | None
    label: int | None
    skip: str | None = None  # "reason: detail" of a sample known unusable (bad .cls, image over the byte cap)


class _Oversized(int):
    """An image member not read because it holds more than data.max_image_bytes: its size."""


def iter_tar_samples(stream, shard: str, max_bytes: int | None = None) -> Iterator[TarSample]:
    """Each sample of one tar stream, in archive order; see the module docstring for grouping and damage.
    Transient I/O errors of the stream (OSError) are left to the caller."""
    seen: dict[str, int] = {}
    key, members, last = None, {}, None

    def sample() -> TarSample:
        seen[key] = seen.get(key, 0) + 1
        image = next((data for suffix, data in members.items() if suffix in TAR_IMAGE_SUFFIXES), None)
        suffix = "" if seen[key] == 1 else f"#{seen[key]}"
        label, skip = parse_label(members.get("cls"))
        if skip is None and isinstance(image, _Oversized):
            skip = f"too_large: {int(image)} bytes > data.max_image_bytes={max_bytes}"
        image = None if isinstance(image, _Oversized) else image
        return TarSample(f"{shard}/{safe_text(key)}{suffix}", image, label, skip)

    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                tar.members = []  # stream mode keeps every header read otherwise
                member_key, suffix = split_member_name(member.name)
                if not member.isreg() or member_key is None or member.name.rsplit("/", 1)[-1].startswith("._"):
                    continue
                suffix = suffix.lower()
                # Only images and labels are read into memory; tarfile reads past the rest (and notices a cut).
                wanted = suffix in TAR_IMAGE_SUFFIXES or suffix == "cls"
                if wanted and max_bytes and member.size > max_bytes:
                    data = _Oversized(member.size)
                else:
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
        where = safe_text(last) if last else "the start"
        yield TarSample(f"{shard}/<damaged after {where}: {error}>", TAR_DAMAGE, 0)


def iter_tar_rows(stream, shard: str, path: str, batch_size: int = 256,
                  max_bytes: int | None = None) -> Iterator[dict]:
    """One tar stream -> row batches of at most batch_size (shard: its name, for ids; path: the `path` column)."""
    rows = empty_rows()
    for sample in iter_tar_samples(stream, shard, max_bytes):
        rows["image"].append({"bytes": sample.image, "path": sample.id})
        rows["label"].append(sample.label)
        rows["skip"].append(sample.skip)
        rows["path"].append(path)
        if len(rows["label"]) == batch_size:
            yield rows
            rows = empty_rows()
    if rows["label"]:
        yield rows


def parquet_row_id(shard: str, row: int) -> str:
    """A parquet row's id: its shard's name and its row number there (the stored `image.path` can repeat)."""
    return f"{shard}#{row}"


def parquet_ids(place: Path | ObjectPath) -> list[str]:
    """The row ids of a parquet shard, from its footer alone."""
    fs, inner = filesystem_and_path(place)
    with fs.open_input_file(inner) as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    return [parquet_row_id(place.name, row) for row in range(rows)]


def parquet_table(batch: pa.RecordBatch, shard: str, first_row: int, path: str,
                  max_bytes: int | None = None) -> pa.Table:
    """A batch of a parquet shard (rows first_row.. of `shard`) in the row form: ids `<shard>#<row>`, the image
    from HF's struct or plain binary bytes, labels of any type through parse_label, images over max_bytes
    dropped as too_large. A missing column gives null cells, which decode_rows skips with their reason. The
    image bytes are not copied through Python."""
    n, names = batch.num_rows, batch.schema.names
    ids = pa.array([parquet_row_id(shard, first_row + i) for i in range(n)], pa.string())
    image = batch.column("image") if "image" in names else pa.nulls(n, pa.binary())
    data = pc.struct_field(image, "bytes") if pa.types.is_struct(image.type) else image
    data = data.cast(pa.binary()) if not pa.types.is_null(data.type) else pa.nulls(n, pa.binary())
    if "label" not in names:
        labels, skips = pa.nulls(n, pa.int64()), [None] * n
    elif pa.types.is_signed_integer(batch.column("label").type):
        labels, skips = batch.column("label").cast(pa.int64()), [None] * n
    else:
        parsed, skips = parse_labels(batch.column("label").to_pylist())
        labels = pa.array(parsed, pa.int64())
    if max_bytes:
        sizes = pc.binary_length(data).to_pylist()
        over = [size is not None and size > max_bytes for size in sizes]
        if any(over):
            skips = [skip or (f"too_large: {size} bytes > data.max_image_bytes={max_bytes}" if big else None)
                     for skip, size, big in zip(skips, sizes, over)]
            data = pc.if_else(pa.array(over), pa.nulls(n, pa.binary()), data)
    struct = pa.StructArray.from_arrays([data, ids], fields=list(ROW_SCHEMA.field("image").type))
    return pa.table({"image": struct, "label": labels, "skip": pa.array(skips, pa.string()),
                     "path": pa.array([path] * n, pa.string())}, schema=ROW_SCHEMA)


def iter_parquet_rows(place: Path | ObjectPath, batch_size: int = 256, max_bytes: int | None = None) -> Iterator[dict]:
    fs, inner = filesystem_and_path(place)
    with fs.open_input_file(inner) as f:
        shard = pq.ParquetFile(f)
        columns = [c for c in ("image", "label") if c in shard.schema_arrow.names]
        first = 0
        for batch in shard.iter_batches(batch_size=batch_size, columns=columns):
            yield parquet_table(batch, place.name, first, inner, max_bytes).to_pydict()
            first += batch.num_rows


def iter_row_batches(config: DataConfig, split: str, batch_size: int = 256,
                     listing: SourceListing | None = None) -> Iterator[dict]:
    """Every row of the split's readable files, in listing order, in batches of at most batch_size (fewer where
    val's rows are taken out of a train batch, or train's out of a val one), read in this process (small splits
    and tests; Ray Data reads big ones). listing.skipped holds the rows that are not here."""
    listing = listing or scan_source(config, split)
    base = location(listing.root)
    if listing.source == "imagefolder":  # the listing holds the split's files only
        yield from iter_image_rows(listing.root, listing.names, listing.labels, batch_size, config.max_image_bytes,
                                   listing.sizes)
        return
    for name in listing.names:
        for rows in iter_file_rows(base / name, listing.source, batch_size, config.max_image_bytes):
            rows = rows_of_split(rows, split, config.val_fraction, config.split_seed)
            if rows["label"]:
                yield rows


def iter_file_rows(place: Path | ObjectPath, source: str, batch_size: int,
                   max_bytes: int | None = None) -> Iterator[dict]:
    """Every row of one parquet shard or tar, streamed (the tar stays open until its last row)."""
    if source == "parquet":
        yield from iter_parquet_rows(place, batch_size, max_bytes)
        return
    with place.open("rb") as stream:
        yield from iter_tar_rows(stream, place.name, filesystem_and_path(place)[1], batch_size, max_bytes)
