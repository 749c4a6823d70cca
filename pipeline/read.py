"""Read stage: load the bytes of listed inputs (local paths or URIs), in the decode tasks.

Listing is :mod:`pipeline.listing`'s; loading happens in the decode tasks, so an unreadable or
vanished file is one error row there, never the run's failure. A decode task reads its files
with :func:`fetch_all`: several at once, so that an object store's latency per request
overlaps the decoding instead of adding to it.
"""

from __future__ import annotations

import logging
import os
import stat
import urllib.parse
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

# What Pillow reads, with pillow-heif for HEIF/HEIC (.hif: Canon's HEIF); AVIF and JPEG 2000
# are Pillow's own.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm .ico"
    " .heic .heif .hif .avif .jp2 .j2k .jpf .jpx".split()
)


def is_uri(src: str) -> bool:
    return "://" in src and not src.startswith("file://")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _local_path(path: str) -> str:
    """The file system name of a listed local path (undoes :func:`_storable`)."""
    if path.startswith("file://"):
        return os.fsdecode(urllib.parse.unquote_to_bytes(path[len("file://"):]))
    return path


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a URI or a local path; filesystems are cached per bucket."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    scheme, rest = uri.split("://", 1)
    if scheme == "s3":
        return _s3(), rest
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


# What the filesystems read from the environment (pyarrow reads the credentials itself).
STORAGE_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)


def storage_env() -> dict[str, str]:
    """This process's object-store settings, to hand to Ray tasks that load inputs: on a
    cluster they run on nodes whose environment was set when Ray started there, not by us."""
    return {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}


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
    retries = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
    return pafs.S3FileSystem(retry_strategy=retries, **kwargs)


# Attempts per S3 request. S3 answers 503 SlowDown while it scales a prefix up to a new
# request rate (3,500 writes and 5,500 reads a second per prefix): a cluster of decode tasks
# reading a fresh prefix meets it. pyarrow's default, 3 attempts, gives up within about a
# second, and each image read that way became an "unreadable" error row. 10 attempts with the
# SDK's exponential backoff wait out several seconds of it (EMRFS retries 15 times, Iceberg 32).
S3_ATTEMPTS = 10


def load_bytes(path: str, size: int | None = None) -> bytes:
    """The whole file at ``path`` (local path or URI); ``size``, if the listing knows it, may
    spare an object store a metadata request (see :func:`_open_object`)."""
    if not is_uri(path):
        return _load_local(_local_path(path))
    fs, inner = filesystem(path)
    with _open_object(fs, inner, size) as f:
        return f.read()


_NOT_REGULAR = (
    (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
)


def _load_local(path: str) -> bytes:
    """Read a regular file. Anything else that carries an image extension (a FIFO would block
    the task forever, a link to /dev/zero would never end) is refused with what it is."""
    try:
        # O_NONBLOCK: opening a FIFO waits for a writer otherwise; no effect on regular files.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as e:
        if os.path.islink(path):
            target = os.readlink(path)
            raise FileNotFoundError(
                f"broken symbolic link: '{path}' points to '{target}', which does not exist"
            ) from e
        raise FileNotFoundError(
            f"'{path}' no longer exists (removed or renamed after listing)"
        ) from e
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        for test, kind in _NOT_REGULAR:
            if test(mode):
                raise OSError(f"'{path}' is a {kind}, not a regular file; not read")
        return f.read()


# --- concurrent reads ------------------------------------------------------------------------

# Reads in flight per decode task, from an object store. pyarrow's S3 client keeps at most 25
# connections (the AWS SDK's default pool: 48 threads peaked at 25 requests in flight through
# the proxy of pipeline/testing/s3_proxy.py), so more threads would only queue for one while
# holding a slot of the read-ahead window. 24 in flight at ~60 ms per object (pyarrow 26 sends
# a HEAD, then the GET: two ~30 ms round trips, see _open_object) read up to 400 objects/s:
# most of what the half core a decode task is granted decodes (~600 photo-like JPEGs/s at
# 0.81 ms, RESEARCH.md). At most 48 objects (2 x threads) wait in memory. Measured at 30 ms
# per request (`python -m pipeline.bench_fetch --threads 1 4 8 16 24 48`, one task, shared
# 2-core machine): 12.6 images/s with 1 thread, 50 with 4, 87-91 with 8 to 48, where moto
# itself was the limit (~120-135 images/s at 0 ms added).
DEFAULT_FETCH_THREADS = 24
# Local files are read in the decode loop itself. From the page cache a read takes ~16 us of
# CPU, and in a decode task (whose main thread decodes while the pool's threads want the GIL
# back) a pool of 8 cost far more than it saved: 0.07 -> 0.16-0.20 ms per tiny PNG, and
# 0.1-0.35 ms more CPU per 480x360 photo (4,096 files, warm cache, this 2-core machine). From
# the disk (pages dropped) 1,000 27 KB files read at 187 us each serially, 85 us with 8
# threads; a run over files read once pays that, a re-run does not. Network mounts (NFS, a
# FUSE view of a bucket) have an object store's latency: list them by URI where you can.
LOCAL_FETCH_THREADS = 1


def fetch_all(
    paths: Sequence[str], sizes: Sequence[int | None] | None = None, threads: int | None = None,
) -> Iterator[tuple[str, bytes | BaseException]]:
    """(path, its bytes or the exception reading it raised) for each path, in input order.

    Up to ``threads`` reads run at once in a thread pool (pyarrow and file reads release the
    GIL), and at most ``2 * threads`` objects are read ahead of the consumer: memory stays
    bounded however many paths a task has. ``threads`` defaults to DEFAULT_FETCH_THREADS when
    any path is a URI, else LOCAL_FETCH_THREADS; 1 reads serially in the calling thread.
    ``sizes`` (aligned with ``paths``, None where unknown) are the listing's object sizes.
    Each read fails on its own: one missing or unreadable object is one exception yielded.
    """
    if sizes is None:
        sizes = [None] * len(paths)
    elif len(sizes) != len(paths):
        raise ValueError(f"{len(sizes)} sizes for {len(paths)} paths")
    if threads is None:
        threads = DEFAULT_FETCH_THREADS if any(map(is_uri, paths)) else LOCAL_FETCH_THREADS
    if threads <= 1:
        for path, size in zip(paths, sizes):
            yield path, _fetch_one(path, size)
        return
    todo = iter(zip(paths, sizes))
    window: deque[tuple[str, Future]] = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="fetch")
    try:
        # 2 x threads submitted: while the consumer waits on the oldest read, the others
        # keep the pool busy instead of idling behind it.
        for path, size in todo:
            window.append((path, pool.submit(_fetch_one, path, size)))
            if len(window) == 2 * threads:
                break
        while window:
            path, future = window.popleft()
            payload = future.result()
            for path_next, size in todo:
                window.append((path_next, pool.submit(_fetch_one, path_next, size)))
                break
            yield path, payload
    finally:  # also when the consumer stops early: drop what is queued, don't wait for it
        pool.shutdown(wait=False, cancel_futures=True)


def _fetch_one(path: str, size: int | None) -> bytes | BaseException:
    try:
        return load_bytes(path, size)
    except Exception as e:  # one unreadable file is that file's error row, never the task's
        return e


def _open_object(fs: pafs.FileSystem, inner: str, size: int | None) -> pa.NativeFile:
    """An object opened for reading. pyarrow's C++ can open from a FileInfo that carries the
    size (no HEAD request, ARROW-8950), but pyarrow 26's Python ``open_input_file`` and
    ``open_input_stream`` take a path only, and a path costs a HEAD before the GET (counted
    through a proxy: tests/test_fetch.py). Use the FileInfo form when this pyarrow has it."""
    if size is not None and _opens_by_file_info():
        return fs.open_input_file(pafs.FileInfo(inner, pafs.FileType.File, size=size))
    return fs.open_input_stream(inner)


@lru_cache(maxsize=1)
def _opens_by_file_info() -> bool:
    try:
        pafs.LocalFileSystem().open_input_file(pafs.FileInfo("/nonexistent/probe")).close()
    except TypeError:  # "Path must be a string" (pyarrow 26)
        return False
    except OSError:  # took the FileInfo, then found no file
        return True
    return True
