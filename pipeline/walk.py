"""Walk an input: the files under a local directory (recursive), a single file, a glob, or the
same on any filesystem pyarrow knows by URI (``s3://bucket/prefix``), in a stable order.

Hidden names below the input (``._IMG_0001.jpg``, the metadata a Mac writes beside each file on
a share or a USB disk; ``.thumbnails/``, ``.Trash-1000/``, ``.git/``) are left out and counted,
as ``ls``, Python's ``glob`` and Hugging Face's ``imagefolder`` leave them out: a Mac's ``._``
file has an image's extension but is not an image, so each would be an error row beside its
photo. Hidden folders are not walked at all. A file named explicitly, a glob whose pattern
names the dot, or an input list is read whatever its name.

A local directory is walked one directory at a time (sorted names: the order is the same on
every run), so memory is the largest directory's, not the tree's. An object-store listing
comes back whole from pyarrow, so it is held while it is sorted; list tens of millions of
objects with an input list (:mod:`pipeline.input_lists`) instead. Files the format does not
take (by extension) are counted, and an input with none says what it holds instead.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from pipeline.console import skipped_phrases
from pipeline.listing import Entry, InputError
from pipeline.read import filesystem, is_image_name, is_uri

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["

# Skip reasons (``Walk.skipped`` keys, shown in the summary). One that counts folders, not
# files, starts with "folder " (see :func:`pipeline.console.skipped_phrases`).
HIDDEN_FILE = "hidden, a name starting with '.'"
HIDDEN_FOLDER = "folder hidden, a name starting with '.'; not walked"
UNREADABLE_FOLDER = "folder not readable"


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
            entries, single = _list_uri(self.src, self.skipped)
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
        # Named by extension, so a skip that matters (.heic photos on an old install, .dng raw
        # files) is told apart from one that does not (.txt, .json sidecars).
        named = sorted(self.left.items(), key=lambda e: (-e[1], e[0]))[:_NAMED_EXTENSIONS]
        for ext, n in named:
            self.skipped[f"not {self.a_kind} extension: {ext or 'no extension'}"] += n
        rest = self.left.total() - sum(n for _, n in named)
        if rest:
            self.skipped[f"not {self.a_kind} extension: others"] += rest
        if not self.taken:
            if not self.found:
                hidden = {k: self.skipped[k] for k in (HIDDEN_FOLDER, HIDDEN_FILE)
                          if self.skipped[k]}
                if hidden:
                    raise InputError(
                        f"Input '{self.src}' holds no {self.kinds}, only hidden names "
                        f"({'; '.join(skipped_phrases(hidden))}). To read them anyway, name them in a file "
                        "and pass --input-list.")
                raise InputError(f"Input '{self.src}' holds no {self.kinds} (no files).")
            seen = ", ".join(f"{n} {ext or 'without one'}" for ext, n in self.left.most_common(3))
            raise InputError(
                f"Input '{self.src}' holds no {self.kinds} ({self.found} files, none with "
                f"{self.a_kind} extension: {seen}). {_hint(self.kinds, self.left)}")
        return dict(self.skipped)


# How many extensions of the files a walk leaves out are counted each under its own name.
_NAMED_EXTENSIONS = 5


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
        skipped[UNREADABLE_FOLDER] += 1

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
        shown = sorted(d for d in dirs if not d.startswith("."))
        if len(shown) < len(dirs):
            skipped[HIDDEN_FOLDER] += len(dirs) - len(shown)
        dirs[:] = shown
        for name in sorted(files):
            if name.startswith("."):
                skipped[HIDDEN_FILE] += 1
                continue
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


def _list_uri(src: str, skipped: Counter) -> tuple[list[Entry], bool]:
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
    if not (pattern and "/." in pattern):  # an object store has no folders to leave unwalked
        below = len(scheme) + 3 + len(root)  # the part of a path under the input
        shown = [e for e in entries if "/." not in "/" + e[0][below:]]
        if len(shown) < len(entries):
            skipped[HIDDEN_FILE] += len(entries) - len(shown)
        entries = shown
    return entries, False
