"""WebDataset (timm / OpenCLIP layout): <path>/[<prefix>-]<split>-<n>.tar ("test": val, validation, then test; so
timm's imagenet1k-train-0000.tar / imagenet1k-validation-00.tar work as they are), classes.txt beside them
(required, one name per line, as for parquet). A tar is streamed member by member (`r|*`), never held. A tar holds
train and val rows both: its readers keep the split's rows (engine/data/splits.py), and counting them means
streaming the tars once (they hold no index).
Members are grouped into samples by key: the member name up to the first dot of its base name (webdataset's rule;
members without a dot, directories and links are not part of any sample). A sample's image is its first member with
suffix jpg/jpeg/png/webp (any case), its label the decimal integer of `.cls` (engine.data.rows.parse_label); anything
else (.txt, .json) is ignored, as are macOS's `._*` members. No image -> a row without bytes (`missing_image`); no
.cls -> a null label, an unparsable one a skip (`missing_label`; the label is checked first, so a sample with
neither is `missing_label`); an image member over data.max_image_bytes is not read (`too_large`). Ids:
`<shard name>/<key>`; a key met again later in the same shard (webdataset requires a sample's members to be
adjacent) gets `#2`, `#3`, ... so ids stay unique. Reading chosen rows back streams their shard once.
A damaged tar (truncated, a garbled or cut header, not a tar at all, bytes after the end-of-archive block): every
sample read before the damage is kept (the one being read when it is hit too, if its image and .cls members were
both read whole); the rest of the shard becomes ONE row with id `<shard>/<damaged after <last kept key | the
start>: <error>>`, label 0 and the bytes TAR_DAMAGE, which are no image, so decode_rows skips it as `corrupt`.
(Python's tarfile ends a stream silently at a cut or garbled header; `_StrictTarInfo` makes that an error.)
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from engine.config import DataConfig
from engine.data.classes import listed_class_names
from engine.data.formats.base import SourceFormat, SourceListing, find_split, source_root
from engine.data.rows import batched_rows, parse_label, safe_text
from engine.data.splits import source_split
from engine.io.location import filesystem_and_path, location

TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# Stands for the damaged part of a tar: not an image, so decode_rows skips its row as corrupt.
TAR_DAMAGE = b"DDOQ: damaged tar shard, see the row id\n"


def scan(config: DataConfig, split: str) -> SourceListing:
    """The shards of the source split that holds `split`'s rows, from one listing of the folder."""
    root, wanted = source_root(config), source_split(split)
    shards = {}  # split name -> its shards
    for place in root.glob("*-*.tar"):
        # [<prefix>-]<split>-<n>.tar: train-000000.tar, or timm's imagenet1k-validation-00.tar
        shards.setdefault(place.name.rsplit("-", 1)[0].rsplit("-", 1)[-1], []).append(place.name)
    split_name = find_split(root, wanted, lambda name: name in shards)
    names = tuple(sorted(shards[split_name]))
    return SourceListing("webdataset", config.path, names, sizes=(None,) * len(names))


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
    samples = iter_tar_samples(stream, shard, max_bytes)
    yield from batched_rows(((s.image, s.id, s.label, s.skip, path) for s in samples), batch_size)


def iter_rows(listing: SourceListing, batch_size: int, max_bytes: int | None) -> Iterator[dict]:
    """Every row of the listed tars, each streamed (and kept open) until its last row."""
    base = location(listing.root)
    for name in listing.names:
        place = base / name
        with place.open("rb") as stream:
            yield from iter_tar_rows(stream, place.name, filesystem_and_path(place)[1], batch_size, max_bytes)


def read_rows_by_id(config: DataConfig, source: str, ids: list[str]) -> dict:
    """The chosen samples of one shard, streamed once; the label is left for the caller (the picks carry each
    image's class)."""
    place = location(config.path) / source
    wanted, found = set(ids), {}
    with place.open("rb") as stream:
        for sample in iter_tar_samples(stream, source, config.max_image_bytes):
            if sample.id in wanted:
                found[sample.id] = sample.image
    missing = [i for i in ids if i not in found]
    if missing:
        raise KeyError(f"{place}: {len(missing)} chosen sample(s) no longer in the shard, e.g. {missing[:3]}")
    return {"image": [{"bytes": found[i], "path": i} for i in ids], "label": [0] * len(ids)}


FORMAT = SourceFormat(name="webdataset", class_names=listed_class_names, scan=scan, iter_rows=iter_rows,
                      read_rows_by_id=read_rows_by_id)
