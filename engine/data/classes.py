"""Class lists: the classes.txt grammar every source shares, and data.classes_file's display names.

Line i of a classes.txt is label i, written "<key><TAB><name>", "<WordNet synset> <name>" (ImageNet's
LOC_synset_mapping.txt) or a bare name that is its own key. An ImageFolder's keys are its class folders; parquet and
WebDataset use the names only. data.classes_file, when set, gives the display names instead (e.g. ImageNet-1K's
readable names for prompts). This module never imports ray.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.config import DataConfig
from engine.data.rows import SourceError
from engine.io.location import ObjectPath, location

# (key of each label, display name of each label), in label order.
ClassList = tuple[tuple[str, ...], tuple[str, ...]]
# A WordNet synset id (ImageNet's folder and label names): "n01440764 tench" is that synset named tench.
_SYNSET = re.compile(r"n[0-9]{8}")


def parse_class_lines(text: str, file: str = "classes.txt") -> ClassList:
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


def read_classes_file(place: Path | ObjectPath) -> ClassList:
    try:
        text = place.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SourceError(f"{place} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    return parse_class_lines(text, str(place))


def listed_classes(root: Path | ObjectPath) -> ClassList:
    """The classes.txt in `root`, which parquet shards and WebDataset tars must have beside them."""
    listed = root / "classes.txt"
    if not listed.exists():
        raise SourceError(f"{listed} is missing: the dataset folder must list its class names, one per line "
                          f"in label order")
    return read_classes_file(listed)


def read_class_names(root: str | Path) -> tuple[str, ...]:
    """The display names of the classes.txt beside parquet shards, in label order (`parse_class_lines`)."""
    return listed_classes(location(root))[1]


def display_names(config: DataConfig, keys: tuple[str, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    """The data's class names, or data.classes_file's when it is set; that file must list as many classes in the
    same order (the same keys where both have synsets)."""
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


def listed_class_names(config: DataConfig) -> tuple[str, ...]:
    """Display names of a source whose classes.txt lists its classes (parquet, WebDataset)."""
    return display_names(config, *listed_classes(location(config.path)))
