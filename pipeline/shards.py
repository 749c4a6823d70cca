"""Input sources: image files, tar shards (webdataset layout), Parquet files of image bytes.

The driver lists *units* (image files, or shard files: names only, cheap); each decode task
takes a block of units and yields decoded rows. A file is one row. A shard is many, read in
the task and never written to disk:

- ``tar`` (``.tar``, ``.tar.gz``, ``.tgz``; webdataset / img2dataset layout): members are
  grouped into samples by key, the member name up to the first dot of its base name
  (``dir/000123.jpg`` and ``dir/000123.json`` are sample ``dir/000123``). A sample's image is
  its member whose whole extension is an image's (``jpg``, ``png``, ... but not ``seg.png``);
  the first such member in tar order if there are several. Other members are ignored. Row
  path: ``<shard>/<member name>``.
- ``parquet`` (``.parquet``): one row per table row; ``image_column`` holds the encoded image
  (binary, or a struct with a ``bytes`` field as Hugging Face datasets write it) and
  ``id_column`` a unique id. Row path: ``<file>/<id>``.

Same promise as files: anything that cannot be read is an error row, never a crash. A corrupt
member or table row is that row's error. Where a shard stops being readable (truncated, bad
header, corrupt row group) the rows that were read stay, and one error row marks the rest:
path ``<shard>`` for a tar, ``<file>/#row-group-<i>`` for Parquet. A Parquet row whose id is
null or repeats gets the path ``<file>/#row-<n>`` (its position in the file).
"""

from __future__ import annotations

import io
import itertools
import logging
import posixpath
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.decode import decode_payloads, decode_rows
from pipeline.listing import Entry, InputError, ListingFile, Walk, listed_paths
from pipeline.model import ModelSpec
from pipeline.read import IMAGE_EXTENSIONS, fetch_all, filesystem, is_image_name, load_bytes

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

Payload = bytes | BaseException  # a row's encoded image, or why there is none


class ShardError(ValueError):
    """Part of a shard cannot be read; the message says where it stopped."""

    kind = "shard"  # its rows' error_kind


@dataclass(frozen=True)
class Source:
    """How the input is listed and expanded into rows (``RunConfig.input_format`` and co)."""

    format: str = "images"
    image_column: str = "image"
    id_column: str = "id"
    input_list: bool = False  # the input is a file listing the units (see pipeline.listing)

    @classmethod
    def of(cls, cfg) -> Source:
        return cls(cfg.input_format, cfg.image_column, cfg.id_column, cfg.input_list)

    @property
    def sharded(self) -> bool:
        return self.format != "images"

    def describe(self) -> dict[str, str]:
        """What decides the row ids: recorded in the manifest, checked on --resume."""
        if self.format == "parquet":
            columns = {"image_column": self.image_column, "id_column": self.id_column}
            return {"format": self.format, **columns}
        return {"format": self.format}

    def list(self, src: str, into: str) -> ListingFile:
        """List the units under ``src`` (image files, or shard files of this format) into a
        temporary listing file in directory ``into``; InputError when there are none."""
        if self.input_list:
            listing = ListingFile.write(into, self._checked(listed_paths(src)))
            if not listing.count:
                raise InputError(f"Listing file '{src}' lists no inputs.")
            return listing
        accept, a_kind, kinds = {
            "images": (is_image_name, "an image", "images"),
            "tar": (_is_tar_name, "a tar shard", "tar shards"),
            "parquet": (_is_parquet_name, "a Parquet", "Parquet files"),
        }[self.format]
        walk = Walk(src, accept, a_kind, kinds)
        listing = ListingFile.write(into, self._checked(walk))
        try:
            return listing.with_skipped(walk.skipped_or_fail())
        except InputError:
            listing.discard()
            raise

    def _checked(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        entries = iter(entries)
        first = next(entries, None)
        if first is None:
            return
        if self.format == "parquet":
            self._check_columns(first[0])
        yield first
        yield from entries

    def decode(
        self, listing: pa.Table, units: np.ndarray, done: AbstractSet[str], spec: ModelSpec,
        max_pixels: int, rows_per_block: int,
    ) -> Iterator[dict]:
        """Decode one task's slice of the listing (columns path, size; ``units``: each row's
        listing index), skipping rows already ``done``: yields blocks of at most
        ``rows_per_block`` rows (``decode_payloads`` columns plus ``_unit``), each as soon as
        it is decoded."""
        paths = listing.column("path").to_pylist()
        sizes = listing.column("size").to_pylist()
        if not self.sharded:
            keep = [i for i, p in enumerate(paths) if p not in done]
            paths, sizes, units = [paths[i] for i in keep], [sizes[i] for i in keep], units[keep]
            # Reads run ahead in threads across blocks; a known size saves a HEAD request.
            fetched = (payload for _, payload in fetch_all(paths, sizes))
            for i in range(0, len(paths), rows_per_block):
                block = paths[i : i + rows_per_block]
                out = decode_payloads(block, itertools.islice(fetched, len(block)), spec,
                                      max_pixels)
                out["_unit"] = units[i : i + rows_per_block]
                yield out
            return
        for shard, size, unit in zip(paths, sizes, units):
            rows = self._expand(shard, size)
            for out in _decode_chunks(rows, done, spec, max_pixels, rows_per_block):
                out["_unit"] = np.full(len(out["path"]), unit, np.int64)
                yield out

    def _expand(self, shard: str, size: int | None) -> Iterator[tuple[str, Payload]]:
        try:
            data = load_bytes(shard, size)
        except Exception as e:  # an unreadable shard is one error row, like an unreadable file
            yield shard, ShardError(f"shard unreadable: {type(e).__name__}: {e}")
            return
        rows = tar_rows(shard, data) if self.format == "tar" else parquet_rows(
            shard, data, self.image_column, self.id_column)
        empty = True
        for row in rows:
            empty = False
            yield row
        if empty:  # every shard accounts for itself with at least one row
            yield shard, ShardError(f"{self.format} shard holds no images")

    def _check_columns(self, path: str) -> None:
        # Fail before any work on a misnamed column: one footer read, the first file only (a
        # later file without the column is an error row for that file).
        import pyarrow.parquet as pq

        fs, inner = filesystem(path)
        try:
            with fs.open_input_file(inner) as f:
                names = pq.read_schema(f).names
        except Exception as e:  # an unreadable first file is that file's error row, later
            log.warning("Cannot read the schema of '%s': %s", path, e)
            return
        missing = [c for c in (self.image_column, self.id_column) if c not in names]
        if missing:
            raise InputError(
                f"Parquet file '{path}' has no column {' or '.join(map(repr, missing))} (it has "
                f"{', '.join(names)}); name them with --image-column and --id-column."
            )


def _is_tar_name(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _is_parquet_name(path: str) -> bool:
    return path.lower().endswith(".parquet")


def _decode_chunks(
    rows: Iterator[tuple[str, Payload]], done: set[str], spec: ModelSpec, max_pixels: int,
    rows_per_block: int,
) -> Iterator[dict]:
    chunk: dict[str, Payload] = {}
    start = time.perf_counter()
    for path, payload in rows:
        if path in done or path in chunk:
            continue
        chunk[path] = payload
        if len(chunk) == rows_per_block:
            yield _decode_chunk(chunk, time.perf_counter() - start, spec, max_pixels)
            chunk, start = {}, time.perf_counter()
    if chunk:
        yield _decode_chunk(chunk, time.perf_counter() - start, spec, max_pixels)


def _decode_chunk(chunk: dict[str, Payload], read_seconds: float, spec, max_pixels) -> dict:
    def load(path: str) -> bytes:
        payload = chunk[path]
        if isinstance(payload, BaseException):
            raise payload
        return payload

    out = decode_rows(list(chunk), load, spec, max_pixels)
    out["_t_decode"] += read_seconds / len(chunk)  # reading the shard, spread over its rows
    return out


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
    import pyarrow as pa
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


def _image_values(column) -> list:
    import pyarrow as pa

    if pa.types.is_struct(column.type):  # Hugging Face datasets: {bytes, path}
        if column.type.get_field_index("bytes") < 0:
            raise ShardError(f"image column is a struct without a 'bytes' field ({column.type})")
        column = column.combine_chunks().field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ShardError(f"image column holds {column.type}, not encoded image bytes (binary)")
    return column.to_pylist()


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
    return f"{shard}/{key}", image
