"""List stage: what a run reads, written once to ``_listing.arrow`` beside the output.

Inputs are a local directory (recursive), a single file, a glob, the same on any filesystem
pyarrow knows by URI (``s3://bucket/prefix``), or an *input list* (``--input-list``: a text,
CSV, Parquet or ORC list of paths, or an S3 Inventory report; read by
:mod:`pipeline.input_lists`).

The driver never holds the listing: a local directory is walked one directory at a time
(sorted names: the order is the same on every run), and each path is appended to an Arrow IPC
file in the output directory as it is found, with its size where the listing knows it (an S3
object can then be read without a HEAD request). Decode tasks read their own slice of that
file by row number; the run's manifest keeps its row count and sha256, so ``--resume`` can
tell whether the input changed. (An object-store listing comes back whole from pyarrow, so it
is held while it is sorted; list tens of millions of objects with a listing file instead.)
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import itertools
import logging
import os
import urllib.parse
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.read import filesystem, is_image_name, is_uri
from pipeline.write import LISTING, TEMPORARY, OutputError, discard

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["

# Rows per record batch of the listing file: a decode task reads the batches its slice
# spans, so a small batch wastes little; a big one writes fewer, larger pieces.
LISTING_CHUNK = 1024
SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64())])
Entry = tuple[str, "int | None"]  # (path, size in bytes where the listing knows it)


class InputError(ValueError):
    """The input cannot be listed or holds nothing to read; the message names it."""


@dataclass(frozen=True)
class Listing:
    """Paths found (in listing order) and what was left out: the in-memory form, for tests and
    small tools; runs use :class:`ListingFile`."""

    paths: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def list_images(src: str) -> Listing:
    """The image files under ``src`` (other extensions are skipped and counted)."""
    return list_files(src, is_image_name, "an image", "images")


def list_files(src: str, accept: Callable[[str], bool], a_kind: str, kinds: str) -> Listing:
    found = Walk(src, accept, a_kind, kinds)
    paths = [p for p, _ in found]
    return Listing(paths, found.skipped_or_fail())


class Walk:
    """Iterate the files under ``src`` that ``accept`` takes, as (path, size), in a stable
    order; the others are counted in :attr:`skipped` (``a_kind``/``kinds``: "an image" /
    "images", for messages). A file named explicitly is taken whatever its extension."""

    def __init__(self, src: str, accept: Callable[[str], bool], a_kind: str, kinds: str):
        self.src, self.accept, self.a_kind, self.kinds = src, accept, a_kind, kinds
        self.skipped: Counter[str] = Counter()
        self.left: Counter[str] = Counter()  # extensions of the files not taken
        self.found = 0
        self.taken = 0

    def __iter__(self) -> Iterator[Entry]:
        if is_uri(self.src):
            entries, single = _list_uri(self.src)
        else:
            entries, single = _walk_local(self.src.removeprefix("file://"), self.skipped)
        for path, size in entries:
            self.found += 1
            if single or self.accept(path):
                self.taken += 1
                yield path, size
            else:
                self.left[_extension(path)] += 1

    def skipped_or_fail(self) -> dict[str, int]:
        """What was skipped, once the walk is done; InputError when nothing was taken."""
        if self.found > self.taken:
            self.skipped[f"not {self.a_kind} extension"] += self.found - self.taken
        if not self.taken:
            if not self.found:
                raise InputError(f"Input '{self.src}' holds no {self.kinds} (no files).")
            seen = ", ".join(f"{n} {ext or 'without one'}" for ext, n in self.left.most_common(3))
            raise InputError(
                f"Input '{self.src}' holds no {self.kinds} ({self.found} files, none with "
                f"{self.a_kind} extension: {seen}). {_hint(self.kinds, self.left)}")
        return dict(self.skipped)


@dataclass(frozen=True)
class ListingFile:
    """A run's inputs on disk (see the module docstring): ``count`` rows of (path, size)."""

    uri: str  # the Arrow IPC file
    count: int
    sha256: str  # of the paths, in order
    largest: int | None  # the largest size listed (shards: what a task must hold)
    skipped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def write(cls, directory: str, entries: Iterable[Entry]) -> ListingFile:
        """Stream ``entries`` into a new temporary listing file in ``directory``, each path
        once: a path listed again (a list file may repeat one) is left out and counted in
        ``skipped``, so no input yields two rows. Nothing is created when there are none
        (``count`` 0, no file): a failed listing leaves no output directory behind."""
        hashes = array("q")  # hash(path) of every row: 8 bytes an input, to find repeats
        listing = cls._write(directory, entries, hashes.append)
        return listing._without_repeats(directory, hashes) if listing.count else listing

    @classmethod
    def _write(cls, directory: str, entries: Iterable[Entry], seen: Callable[[int], None]
               ) -> ListingFile:
        entries = iter(entries)
        first = next(entries, None)
        if first is None:
            return cls("", 0, hashlib.sha256().hexdigest(), None)
        fs, root = filesystem(directory)
        name = f"{TEMPORARY}listing-{uuid.uuid4().hex}.arrow"
        digest, count, largest = hashlib.sha256(), 0, None
        paths: list[str] = []
        sizes: list[int | None] = []
        try:
            fs.create_dir(root, recursive=True)
            with (fs.open_output_stream(f"{root}/{name}", compression=None) as sink,
                  pa.ipc.new_file(sink, SCHEMA) as w):
                for path, size in itertools.chain([first], entries):
                    digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
                    seen(hash(path))
                    paths.append(path)
                    sizes.append(size)
                    if size is not None and (largest is None or size > largest):
                        largest = size
                    if len(paths) == LISTING_CHUNK:
                        w.write_batch(pa.record_batch([paths, sizes], schema=SCHEMA))
                        count += len(paths)
                        paths, sizes = [], []
                if paths:
                    w.write_batch(pa.record_batch([paths, sizes], schema=SCHEMA))
                    count += len(paths)
        except BaseException as e:
            discard(fs, f"{root}/{name}")
            if isinstance(e, OSError):  # reading the inputs raises InputError instead
                why = " ".join(str(e).split())
                raise OutputError(f"Cannot write to output '{directory}': {why}.") from e
            raise
        return cls(f"{directory.rstrip('/')}/{name}", count, digest.hexdigest(), largest)

    def _without_repeats(self, directory: str, hashes: array) -> ListingFile:
        """This listing, or, where a path repeats, a copy with its first place only. Finding
        none is a sort of the hashes; the paths whose hash repeats are compared as strings,
        so two paths that share a hash both stay."""
        values, counts = np.unique(np.frombuffer(hashes, np.int64), return_counts=True)
        suspects = set(values[counts > 1].tolist())
        if not suspects:
            return self
        kept: set[str] = set()  # only paths whose hash repeats
        repeats = 0

        def first_places() -> Iterator[Entry]:
            nonlocal repeats
            fs, inner = filesystem(self.uri)
            with fs.open_input_file(inner) as f:
                reader = pa.ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    for path, size in zip(*(c.to_pylist() for c in batch.columns)):
                        if hash(path) in suspects:
                            if path in kept:
                                repeats += 1
                                continue
                            kept.add(path)
                        yield path, size

        try:
            unique = ListingFile._write(directory, first_places(), lambda _: None)
        finally:
            self.discard()
        if repeats:
            log.warning("%d input(s) listed more than once: each is read once", repeats)
        return unique.with_skipped({"listed more than once": repeats} if repeats else {})

    def read(self, lo: int, hi: int) -> pa.Table:
        """Rows [lo, hi) of the listing: columns path, size."""
        fs, inner = filesystem(self.uri)
        with fs.open_input_file(inner) as f:
            reader = pa.ipc.open_file(f)
            first, last = lo // LISTING_CHUNK, (hi - 1) // LISTING_CHUNK
            batches = [reader.get_batch(i) for i in range(first, last + 1)]
        table = pa.Table.from_batches(batches, schema=SCHEMA)
        return table.slice(lo - first * LISTING_CHUNK, hi - lo)

    def moved(self, directory: str) -> ListingFile:
        """This listing renamed to ``directory/_listing.arrow`` (replacing any there)."""
        fs, root = filesystem(directory)
        _, inner = filesystem(self.uri)
        fs.move(inner, f"{root}/{LISTING}")
        return ListingFile(f"{directory.rstrip('/')}/{LISTING}", self.count, self.sha256,
                           self.largest, self.skipped)

    def discard(self) -> None:
        if not self.uri:
            return
        fs, inner = filesystem(self.uri)
        try:
            fs.delete_file(inner)
        except FileNotFoundError:
            pass

    def with_skipped(self, skipped: dict[str, int]) -> ListingFile:
        """This listing with ``skipped`` counted beside what it already counts."""
        both = Counter(self.skipped)
        both.update(skipped)
        return ListingFile(self.uri, self.count, self.sha256, self.largest, dict(both))


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(".tar.gz"):
        return ".tar.gz"
    return os.path.splitext(name)[1]


def _hint(kinds: str, extensions: Counter) -> str:
    """What to pass to read the files a walk of ``kinds`` left out."""
    if kinds != "images" and any(is_image_name(f"x{ext}") for ext in extensions):
        return "Image files? Leave out --input-format (images is the default)."
    if kinds != "tar shards" and extensions.keys() & {".tar", ".tar.gz", ".tgz"}:
        return "Tar shards? Pass --input-format tar."
    if kinds != "Parquet files" and ".parquet" in extensions:
        return "Parquet files of images? Pass --input-format parquet."
    return "To read files whatever their names, list them in a file and pass --input-list."


# --- walking ---------------------------------------------------------------------------------


def _has_glob(src: str) -> bool:
    return any(c in src for c in _GLOB_CHARS)


def _walk_local(src: str, skipped: Counter) -> tuple[Iterator[Entry], bool]:
    if _has_glob(src) and not os.path.lexists(src):  # 'photos[2019]' may be a real name
        found = sorted(p for p in glob.glob(src, recursive=True) if not os.path.isdir(p))
        return ((_storable(p), None) for p in found), False
    if os.path.isdir(src):
        return _walk_dir(src, skipped), False
    if os.path.lexists(src):
        return iter([(_storable(src), None)]), True
    raise InputError(f"Input '{src}' does not exist.")


def _walk_dir(src: str, skipped: Counter) -> Iterator[Entry]:
    """Files under ``src``, one directory at a time: its files (sorted), then its
    subdirectories (sorted). Memory: the largest directory, not the tree."""
    seen: set[tuple[int, int]] = set()

    def unlistable(err: OSError) -> None:
        log.warning("Cannot list directory '%s': %s", err.filename, err.strerror)
        skipped["directory not readable"] += 1

    for root, dirs, files in os.walk(src, onerror=unlistable, followlinks=True):
        # Symlinks are followed, so a link to an ancestor would list the same files again
        # under ever longer paths; each real directory is listed once.
        try:
            st = os.stat(root)
        except OSError as e:
            unlistable(e)
            dirs.clear()
            continue
        if (st.st_dev, st.st_ino) in seen:
            log.warning("Not listing '%s' again: a symbolic link leads back to it", root)
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(files):
            yield _storable(os.path.join(root, name)), None


def _storable(path: str) -> str:
    """``path`` as valid UTF-8 for the ``path`` column. A POSIX file name is bytes; one that is
    not UTF-8 (an old Latin-1 archive) cannot be stored as a string, so it becomes the file's
    percent-encoded ``file://`` URI (RFC 8089), which :func:`pipeline.read.load_bytes` reads."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # os.listdir hands such bytes over as lone surrogates
        return "file://" + urllib.parse.quote(os.fsencode(os.path.abspath(path)))


def _list_uri(src: str) -> tuple[list[Entry], bool]:
    scheme = src.split("://", 1)[0]
    pattern = src if _has_glob(src) else None
    base = src
    if pattern:
        cut = min(i for i, c in enumerate(src) if c in _GLOB_CHARS)
        base = src[: src.rfind("/", 0, cut)]
    fs, root = filesystem(base)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"Input '{src}' does not exist.")
        if info.type == pafs.FileType.File:
            return [(base, info.size)], True
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise InputError(f"Cannot list input '{src}': {e}") from e
    entries = sorted(
        (f"{scheme}://{i.path}", i.size) for i in infos if i.type == pafs.FileType.File
    )
    if pattern:
        entries = [e for e in entries if fnmatch.fnmatchcase(e[0], pattern)]
    return entries, False
