"""Read stage: find the input images and load their bytes.

Inputs are a local directory (recursive), a single file, a glob, or the same on any
filesystem pyarrow knows by URI (``s3://bucket/prefix``). Listing happens once, in the driver;
loading happens in the decode tasks, so an unreadable or vanished file is one error row there.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm .ico".split()
)
_GLOB_CHARS = "*?["


class InputError(ValueError):
    """The input cannot be listed or holds no images; the message names it."""


@dataclass(frozen=True)
class Listing:
    """Image paths to process (sorted, unique) and what was left out."""

    paths: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def is_uri(src: str) -> bool:
    return "://" in src and not src.startswith("file://")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(src: str) -> Listing:
    """List image files under ``src``; files with other extensions are skipped and counted."""
    found, single_file = _list_uri(src) if is_uri(src) else _list_local(src.removeprefix("file://"))
    if single_file:  # a file named explicitly is taken whatever its extension
        return Listing(found)
    images = sorted({p for p in found if is_image_name(p)})
    skipped = {}
    if len(found) != len(images):
        skipped["not an image extension"] = len(found) - len(images)
    if not images:
        what = f"{len(found)} files, none with an image extension" if found else "no files"
        raise InputError(f"Input '{src}' holds no images ({what}).")
    return Listing(images, skipped)


def _has_glob(src: str) -> bool:
    return any(c in src for c in _GLOB_CHARS)


def _list_local(src: str) -> tuple[list[str], bool]:
    if _has_glob(src):
        return [p for p in glob.glob(src, recursive=True) if not os.path.isdir(p)], False
    if os.path.isdir(src):
        out = []
        for root, dirs, files in os.walk(src, onerror=_warn_unlistable, followlinks=True):
            dirs.sort()
            out.extend(os.path.join(root, f) for f in files)
        return out, False
    if os.path.lexists(src):
        return [src], True
    raise InputError(f"Input '{src}' does not exist.")


def _warn_unlistable(err: OSError) -> None:
    log.warning("Cannot list directory '%s': %s", err.filename, err.strerror)


def _list_uri(src: str) -> tuple[list[str], bool]:
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
            return [base], True
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise InputError(f"Cannot list input '{src}': {e}") from e
    paths = [f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File]
    if pattern:
        paths = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
    return paths, False


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a URI or a local path; filesystems are cached per bucket."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    scheme, rest = uri.split("://", 1)
    if scheme == "s3":
        return _s3(), rest
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


@lru_cache(maxsize=1)
def _s3() -> pafs.S3FileSystem:
    # pyarrow reads AWS_* credentials itself; it does not read AWS_ENDPOINT_URL, which
    # S3-compatible stores (MinIO, moto, R2) need, so pass that through.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kwargs = {"endpoint_override": host or endpoint, "scheme": scheme or "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def load_bytes(path: str) -> bytes:
    """The whole file at ``path`` (local path or URI)."""
    if not is_uri(path):
        with open(path.removeprefix("file://"), "rb") as f:
            return f.read()
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()
