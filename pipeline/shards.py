"""Shards: files that hold many images, read whole in a decode task, never written to disk.

A shard is a unit of the listing (see :mod:`pipeline.source`) that yields many rows:

- ``tar`` (``.tar``, ``.tar.gz``, ``.tgz``; webdataset / img2dataset layout): members are
  grouped into samples by key, the member name up to the first dot of its base name
  (``dir/000123.jpg`` and ``dir/000123.json`` are sample ``dir/000123``). A sample's image is
  its member whose whole extension is an image's (``jpg``, ``png``, ... but not ``seg.png``);
  the first such member in tar order if there are several. Other members are ignored. Row
  path: ``<shard>/<member name>``.
- ``parquet`` (``.parquet``): one row per table row; ``image_column`` holds the encoded image
  (binary, or a struct with a ``bytes`` field as Hugging Face datasets write it) and
  ``id_column`` a unique id. Row path: ``<file>/<id>``. A Hugging Face struct without
  bytes but with a ``path`` (a dataset saved without embedding its images: ``to_parquet``
  of an ``imagefolder``, ``push_to_hub(embed_external_files=False)``) is read from that path
  (local or URI; a relative one beside the Parquet file).

Same promise as files: anything that cannot be read is an error row, never a crash. A corrupt
member or table row is that row's error. Where a shard stops being readable (truncated, bad
header, corrupt row group) the rows that were read stay, and one error row marks the rest:
path ``<shard>`` for a tar, ``<file>/#row-group-<i>`` for Parquet. A reader that raises
anything else, or kills its process, ends its shard the same way (path ``<shard>``; see
:meth:`pipeline.source.Source.decode` and :mod:`pipeline.crash_guard`). A Parquet row whose id is
null or repeats gets the path ``<file>/#row-<n>`` (its position in the file).
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Iterator

import pyarrow as pa

from pipeline.read import IMAGE_EXTENSIONS, is_uri, load_bytes

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

Payload = bytes | BaseException  # a row's encoded image, or why there is none


class ShardError(ValueError):
    """Part of a shard cannot be read; the message says where it stopped."""

    kind = "shard"  # its rows' error_kind


def is_tar_name(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def is_parquet_name(path: str) -> bool:
    return path.lower().endswith(".parquet")


# --- tar -------------------------------------------------------------------------------------


def tar_rows(shard: str, data: bytes) -> Iterator[tuple[str, Payload]]:
    """(row path, image bytes or error) for each sample of a webdataset tar, in tar order.

    Read from memory only: no member is ever extracted, so names like ``../x`` or ``/etc/x``
    are just strings (and their rows are errors, see :func:`_unsafe_name`).
    """
    keys: set[str] = set()
    members = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or not _is_image_member(name):
                    continue
                key = _key(name)
                if key in keys:  # a second image for one sample: not an input of its own
                    continue
                keys.add(key)
                members += 1
                row = f"{shard}/{name}"
                if _unsafe_name(name):
                    yield row, ShardError(
                        f"member name '{name}' is absolute or contains '..'; not read"
                    )
                    continue
                try:
                    yield row, tar.extractfile(member).read()
                except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                    yield row, ShardError(f"member '{name}' is truncated or corrupt: {e}")
            _check_end(tar)
    except (tarfile.TarError, OSError, EOFError, zlib.error, ShardError) as e:
        where = f"after {members} image members" if members else "before any image member"
        yield shard, ShardError(f"tar shard unreadable {where}: {e}")


def _is_image_member(name: str) -> bool:
    base = posixpath.basename(name)
    return "." in base and "." + base.split(".", 1)[1].lower() in IMAGE_EXTENSIONS


def _key(name: str) -> str:
    head, base = posixpath.split(name)
    return posixpath.join(head, base.split(".", 1)[0])


def _unsafe_name(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


def _check_end(tar: tarfile.TarFile) -> None:
    """tarfile ends its iteration quietly at a header it cannot parse past the first, and at a
    cut between members. A whole archive ends with zero blocks (at least two, 1024 bytes)
    after its last member; anything else means the rest of the shard is lost."""
    tar.fileobj.seek(tar.offset)
    rest = tar.fileobj.read()
    if any(rest):
        raise ShardError(f"unreadable tar header at byte {tar.offset}; the rest is lost")
    if len(rest) < 2 * tarfile.BLOCKSIZE:
        raise ShardError(
            f"archive ends at byte {tar.offset + len(rest)} without its end marker (truncated?)"
        )


# --- Parquet ---------------------------------------------------------------------------------


def parquet_rows(
    shard: str, data: bytes, image_column: str, id_column: str
) -> Iterator[tuple[str, Payload]]:
    """(row path, image bytes or error) for each row of a Parquet file, row group by row group."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        names = pf.schema_arrow.names
        missing = [c for c in (image_column, id_column) if c not in names]
        if missing:
            raise ShardError(
                f"no column {' or '.join(map(repr, missing))} (it has {', '.join(names)})"
            )
    except Exception as e:  # not Parquet, or not ours: the file is one error row
        yield shard, ShardError(f"Parquet file unreadable: {e}")
        return
    seen: dict[str, int] = {}
    position = 0
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=[id_column, image_column])
            ids = table.column(id_column).to_pylist()
            images = _image_values(table.column(image_column))
        except Exception as e:  # a corrupt row group: its rows are lost, the others are not
            yield f"{shard}/#row-group-{group}", ShardError(f"row group {group} unreadable: {e}")
            position += pf.metadata.row_group(group).num_rows
            continue
        for row_id, image in zip(ids, images):
            yield _parquet_row(shard, row_id, image, position, seen, id_column, image_column)
            position += 1


class _Elsewhere(str):
    """A Hugging Face image struct's ``path``, where it holds no bytes: the image to read."""


def _image_values(column) -> list:
    """A column's encoded images: bytes, None, or, for a Hugging Face struct without bytes,
    the path it names (:class:`_Elsewhere`)."""
    paths = None
    if pa.types.is_struct(column.type):  # Hugging Face datasets: {bytes, path}
        if column.type.get_field_index("bytes") < 0:
            raise ShardError(f"image column is a struct without a 'bytes' field ({column.type})")
        column = column.combine_chunks()
        if column.type.get_field_index("path") >= 0:
            paths = column.field("path").to_pylist()
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ShardError(f"image column holds {column.type}, not encoded image bytes (binary)")
    images = column.to_pylist()
    if paths:
        images = [_Elsewhere(p) if b is None and p else b for b, p in zip(images, paths)]
    return images


def _parquet_row(
    shard, row_id, image, position, seen, id_column, image_column
) -> tuple[str, Payload]:
    if row_id is None:
        return f"{shard}/#row-{position}", ShardError(f"'{id_column}' is null in row {position}")
    key = str(row_id)
    if key in seen:
        return f"{shard}/#row-{position}", ShardError(
            f"'{id_column}' {key!r} repeats (first in row {seen[key]}); ids must be unique"
        )
    seen[key] = position
    if image is None:
        return f"{shard}/{key}", ShardError(f"'{image_column}' is null")
    if isinstance(image, _Elsewhere):
        return f"{shard}/{key}", _read_elsewhere(shard, image, image_column)
    return f"{shard}/{key}", image


def _read_elsewhere(shard: str, path: str, image_column: str) -> Payload:
    if not (is_uri(path) or path.startswith(("/", "file://"))):
        path = posixpath.join(posixpath.dirname(shard), path)
    try:
        return load_bytes(path)
    except Exception as e:  # that row's error, like an unreadable file
        why = (f"'{path}' does not exist" if isinstance(e, FileNotFoundError)
               else f"{type(e).__name__}: {e}")
        error = ShardError(f"'{image_column}' holds no bytes, only a path, and it cannot be "
                           f"read: {why}")
        error.kind = "unreadable"
        return error
