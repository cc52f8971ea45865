"""ImageFolder (torchvision's layout): <path>/<split>/<class folder>/<image>, images at any depth below their class
folder. Split "train" reads train/; split "test" reads val/, else validation/, else test/ (ImageNet's held-out split
is val/); the engine's "val" split is carved from train/ (engine/data/splits.py), here at listing time, since every
listed file is one row whose id is known.

Classes: <path>/classes.txt if present (engine/data/classes.py: line i is label i, as "<folder><TAB><name>",
"<WordNet synset> <name>" or a bare name that is its own folder); else the sorted folder names of train/
(torchvision's rule), shown as is. data.classes_file overrides the display names.
Images are chosen by extension (IMAGE_EXTENSIONS, any case); other files (notes, .DS_Store, macOS's `._*`
AppleDouble files) are not rows: they are listed in `listing.ignored` and never counted as skipped. Symbolic links
are followed inside data.path only (data.follow_symlinks=true: anywhere), a link seen again below itself (a loop)
never; a link not followed is a `link_not_followed` row, a dangling one `missing_image`, a name that is not
UTF-8 `bad_name` (its id shows the bytes escaped). A file over data.max_image_bytes is `too_large`, unread. An image
in a folder that is not a class, or directly in the split folder, is skipped at listing time as `missing_label`,
the detail naming the folder. A file that cannot be read at all (vanished, permission denied) becomes a row without
bytes (`missing_image`); a transient storage error is retried, then raised: an outage is not a bad image.
Ids: the path below <path> (`train/n01440764/n01440764_10026.JPEG`). Reading a chosen row back reads its file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from engine.config import DataConfig
from engine.data.classes import ClassList, display_names, read_classes_file
from engine.data.formats.base import SourceFormat, SourceListing, find_split, read_file_bytes, source_root
from engine.data.rows import SourceError, add_skip, batched_rows, is_utf8, no_skips, safe_text
from engine.data.splits import in_split, source_split
from engine.io.location import ObjectPath, filesystem_and_path, location
from engine.io.location import list_files as list_object_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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

    def visit(directory: str, prefix: str, ancestors: frozenset[str]) -> None:
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
                visit(entry.path, f"{relative}/", ancestors | {real})
            elif entry.is_file() and is_image_name(entry.name):
                walk.files.append((relative, None))
            else:
                walk.ignored.append(relative)

    visit(str(folder), "", frozenset({os.path.realpath(folder)}))
    return walk


def imagefolder_classes(root: Path | ObjectPath) -> ClassList:
    """(folder, display name) of each label: classes.txt when present, else train/'s sorted folder names."""
    listed = root / "classes.txt"
    if listed.exists():
        return read_classes_file(listed)
    folders = tuple(f for f in subfolders(root / "train") if is_utf8(f))
    if not folders:
        raise SourceError(f"{root} has no classes.txt and no class folders under train/ to name the classes")
    return folders, folders


def class_names(config: DataConfig) -> tuple[str, ...]:
    return display_names(config, *imagefolder_classes(location(config.path)))


def split_folder(root: Path | ObjectPath, split: str) -> str:
    """The folder of a source split ("train" or "test") under root."""
    return find_split(root, split, lambda name: (root / name).is_dir())


def find_split_folder(config: DataConfig, split: str) -> str:
    """check_source's look at a split: its folder is there (its files are walked when it is read)."""
    return split_folder(location(config.path), split)


def list_split_folder(root: Path | ObjectPath, split_name: str, config: DataConfig) -> SourceListing:
    """Every image file below one split folder with its class folder's label; the rest skipped or ignored."""
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


def scan(config: DataConfig, split: str) -> SourceListing:
    """The image files of a split: "train" and "val" keep the train/ files whose id's coin puts them there."""
    root = source_root(config)
    listing = list_split_folder(root, split_folder(root, source_split(split)), config)
    if split == "test":
        return listing
    keep = np.flatnonzero(in_split(listing.names, split, config.val_fraction, config.split_seed))
    return dataclasses.replace(listing, names=tuple(listing.names[i] for i in keep),
                               labels=tuple(listing.labels[i] for i in keep),
                               sizes=tuple(listing.sizes[i] for i in keep))


def count_rows(config: DataConfig, split: str) -> int:
    return len(scan(config, split).names)


def iter_image_rows(root: str, names, labels, batch_size: int = 256, max_bytes: int | None = None,
                    sizes=None) -> Iterator[dict]:
    """ImageFolder files (ids relative to root, with their labels) -> row batches of at most batch_size."""
    base = location(root)
    def rows():
        for name, label, size in zip(names, labels, sizes or [None] * len(names)):
            place = base / name
            data, skip = read_file_bytes(place, max_bytes, size)
            yield data, name, int(label), skip, filesystem_and_path(place)[1]

    yield from batched_rows(rows(), batch_size)


def iter_rows(listing: SourceListing, batch_size: int, max_bytes: int | None) -> Iterator[dict]:
    """The listed files in batches across files (a file is one row)."""
    return iter_image_rows(listing.root, listing.names, listing.labels, batch_size, max_bytes, listing.sizes)


def read_rows_by_id(config: DataConfig, source: str, ids: list[str]) -> dict:
    """The one image a source file is; the label is left for the caller (the picks carry each image's class)."""
    place = location(config.path) / source
    if len(set(ids)) != 1:
        raise ValueError(f"{place}: an image file holds one image, asked for {len(set(ids))} ids")
    images = [{"bytes": read_file_bytes(place, config.max_image_bytes)[0], "path": ids[0]}]
    return {"image": images, "label": [0] * len(ids)}


FORMAT = SourceFormat(name="imagefolder", class_names=class_names, count_rows=count_rows, scan=scan, iter_rows=iter_rows,
                      check_split=find_split_folder, read_rows_by_id=read_rows_by_id)
