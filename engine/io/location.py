"""Where run files live: a local folder stays a pathlib.Path; a URI of any filesystem pyarrow knows (s3://,
gs://, hdfs://) becomes an ObjectPath with the part of Path's API the engine uses, so stage code is written once.

    location("runs/digits")                     -> PosixPath('/abs/runs/digits')
    location("s3://bucket/runs/digits")         -> ObjectPath('s3://bucket/runs/digits')
    location("s3://b/runs?endpoint_override=127.0.0.1:9000&scheme=http")   options ride along on every child path

Object stores have no rename and no append. A write is one PUT of the whole object, which readers see entirely or
not at all, so ObjectPath.write_bytes needs no temporary name; store.atomic_write_bytes picks the right way.
An ObjectPath pickles as its URI (Ray ships paths to actors) and each process opens the filesystem once.
Model folders on an object store are copied once per machine (`local_copy`): diffusers loads local folders.
"""

from __future__ import annotations

import fnmatch
import os
from functools import cache
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.fs as pafs


def location(place: str | Path | ObjectPath) -> Path | ObjectPath:
    """A local path (absolute, ~ expanded; file:// URIs included) or an ObjectPath for any other URI."""
    if isinstance(place, ObjectPath):
        return place
    text = str(place).removeprefix("file://")
    if "://" in text:
        return ObjectPath.from_uri(text)
    return Path(os.path.expanduser(text)).absolute()


@cache
def _filesystem(base: str, query: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem per (scheme + authority, options) and process: an S3 client is costly to build.
    pyarrow's own filesystems first (s3, gs, hdfs, abfs); any other fsspec protocol through pyarrow's wrapper."""
    uri = base + (f"?{query}" if query else "")
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as error:
        if "nrecognized filesystem" not in str(error):
            raise
    import fsspec

    filesystem, inner = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), inner


class ObjectPath:
    """A file or folder inside an object store or other pyarrow filesystem, addressed by URI."""

    def __init__(self, root: str, prefix: str, inner: str, query: str = ""):
        # root: scheme://authority (opens the filesystem); prefix + inner: the URI; inner: the path pyarrow takes.
        self.root, self.prefix, self.inner, self.query = root, prefix, inner.rstrip("/"), query

    @classmethod
    def from_uri(cls, uri: str) -> ObjectPath:
        base, _, query = uri.partition("?")
        scheme, _, rest = base.partition("://")
        authority, _, tail = rest.strip("/").partition("/")
        root = f"{scheme}://{authority}"
        _, root_inner = _filesystem(root, query)  # s3://bucket -> "bucket"; hdfs://host:port -> "" or "/"
        root_inner = root_inner.rstrip("/")
        prefix = root[: len(root) - len(root_inner)] if root_inner and root.endswith(root_inner) else root
        return cls(root, prefix, f"{root_inner}/{tail}" if tail else root_inner, query)

    # -- names
    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.root, self.query)[0]

    @property
    def uri(self) -> str:
        """The URI without its options (what logs and the report show)."""
        return self.prefix + self.inner

    def __str__(self) -> str:
        return self.uri + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __reduce__(self):
        return ObjectPath.from_uri, (str(self),)

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part) -> ObjectPath:
        part = str(part).strip("/")
        if not part or ".." in part.split("/"):
            raise ValueError(f"{self}: bad child path {part!r}")
        return ObjectPath(self.root, self.prefix, f"{self.inner}/{part}", self.query)

    @property
    def name(self) -> str:
        return self.inner.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.root, self.prefix, self.inner.rsplit("/", 1)[0], self.query)

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def resolve(self) -> ObjectPath:
        return self

    absolute = expanduser = resolve

    def relative_to(self, root: ObjectPath) -> PurePosixPath:
        if not self.inner.startswith(root.inner + "/"):
            raise ValueError(f"{self} is not under {root}")
        return PurePosixPath(self.inner[len(root.inner) + 1:])

    # -- queries
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.inner)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=self._info().size)

    def _walk(self, recursive: bool) -> list[tuple[ObjectPath, pafs.FileInfo]]:
        selector = pafs.FileSelector(self.inner, allow_not_found=True, recursive=recursive)
        infos = self.fs.get_file_info(selector)
        return [(ObjectPath(self.root, self.prefix, info.path, self.query), info) for info in infos]

    def iterdir(self):
        return iter(sorted(path for path, _ in self._walk(recursive=False)))

    def glob(self, pattern: str) -> list[ObjectPath]:
        """Children whose path below this folder matches `pattern` segment by segment (`*` within one)."""
        wanted = pattern.strip("/").split("/")
        return sorted(path for path, _ in self._walk(recursive=True)
                      if _matches(path.relative_to(self).parts, wanted))

    def rglob(self, pattern: str) -> list[ObjectPath]:
        """Like glob("**/" + pattern): the last segments match, at any depth."""
        wanted = pattern.strip("/").split("/")
        return sorted(path for path, _ in self._walk(recursive=True)
                      if _matches(path.relative_to(self).parts[-len(wanted):], wanted))

    # -- reads and writes
    def open(self, mode: str = "rb"):
        if mode == "rb":
            return self.fs.open_input_stream(self.inner)
        if mode == "wb":
            return self.fs.open_output_stream(self.inner)
        raise ValueError(f"{self}: mode {mode!r} (object stores open 'rb' or 'wb' only)")

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        with self.open("wb") as f:  # one object, published whole when the stream closes
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.fs.create_dir(self.inner, recursive=True)  # object stores have no folders: a marker at most

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.inner)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self) -> None:
        if self.is_dir():
            self.fs.delete_dir(self.inner)


def _matches(parts: tuple[str, ...], wanted: list[str]) -> bool:
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def list_files(root: Path | ObjectPath) -> dict[str, int]:
    """{relative posix path: size in bytes} of every regular file under `root` (symlinks left out), sorted;
    one listing on an object store, however many files."""
    if isinstance(root, ObjectPath):
        found = {str(path.relative_to(root)): info.size for path, info in root._walk(recursive=True)
                 if info.type == pafs.FileType.File}
    else:
        found = {path.relative_to(root).as_posix(): path.stat().st_size for path in root.rglob("*")
                 if path.is_file() and not path.is_symlink()}
    return dict(sorted(found.items()))


PUBLISHED = "_published"  # written last into a folder uploaded by publish_folder: the upload is whole


def local_copy(place: Path | ObjectPath, cache_root: Path | None = None) -> Path:
    """A local folder with `place`'s files: `place` itself when local; for a URI, a copy under
    cache_root/<hash of the URI> made once per machine (downloaded to a staging name and renamed, so the actors of
    one node racing for it never load half a copy). Keyed by the URI alone: a folder changed in place needs a new
    URI (or the copy deleted)."""
    import hashlib
    import shutil
    import tempfile

    if not isinstance(place, ObjectPath):
        return place
    root = Path(os.path.expanduser(str(cache_root or os.environ.get("DDOQ_REMOTE_CACHE", "~/.cache/ddoq/remote"))))
    target = root / hashlib.sha256(place.uri.encode()).hexdigest()[:16]
    if target.is_dir():
        return target
    if not place.is_dir():
        raise FileNotFoundError(f"{place} is not a folder on its object store")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        pafs.copy_files(place.inner, str(staging / "copy"), source_filesystem=place.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        (staging / "copy" / "SOURCE").write_text(place.uri + "\n")  # audit: inside the staging folder
        os.rename(staging / "copy", target)
    except OSError:
        if not target.is_dir():  # not a lost race with another actor: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def publish_folder(folder: Path, place: Path | ObjectPath) -> Path | ObjectPath:
    """Copy a local folder to `place` once, on an object store or a shared mount (the marker `_published`,
    written last, says it is whole)."""
    if not (place / PUBLISHED).exists():
        fs, inner = filesystem_and_path(place)
        pafs.copy_files(str(folder), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        (place / PUBLISHED).write_text(str(folder) + "\n")
    return place


def is_shared_place(place: str, shared_paths: tuple[str, ...] = ()) -> bool:
    """Whether every node of a cluster reaches `place` under the same name: a URI (object store, HDFS, ...), or a
    local path inside one of the mount points `shared_paths` that every node mounts (runtime.shared_paths).
    The path is normalised first, so /mnt/efs/../home is not inside /mnt/efs."""
    if "://" in place and not place.startswith("file://"):
        return True
    path = PurePosixPath(os.path.normpath(str(location(place))))
    return any(path == PurePosixPath(os.path.normpath(m)) or PurePosixPath(os.path.normpath(m)) in path.parents
               for m in shared_paths)


def remove_tree(place: Path | ObjectPath) -> None:
    """Delete a folder and everything in it, if it exists."""
    import shutil

    if isinstance(place, ObjectPath):
        place.remove_tree()
    else:
        shutil.rmtree(place, ignore_errors=True)


def filesystem_and_path(place: Path | ObjectPath) -> tuple[pafs.FileSystem, str]:
    """For pyarrow / Ray Data / Ray Train calls that take (filesystem, path inside it)."""
    if isinstance(place, ObjectPath):
        return place.fs, place.inner
    return pafs.LocalFileSystem(), str(place)


def ray_storage(place: Path | ObjectPath) -> dict:
    """RunConfig(**ray_storage(folder)) for Ray Train and Tune: a local path, or the object store's filesystem
    (with its options) and the path inside it, as Ray asks for a custom filesystem."""
    if isinstance(place, ObjectPath):
        return {"storage_path": place.inner, "storage_filesystem": place.fs}
    return {"storage_path": str(place)}
