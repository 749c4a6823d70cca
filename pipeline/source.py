"""Input sources: what the units of a run are (image files, tar shards, Parquet files of
image bytes), how they are listed, and how a decode task turns its slice of the listing into
decoded blocks. The shard formats themselves are read by :mod:`pipeline.shards`."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.config import absolute_path
from pipeline.crash_guard import DecodeCrash, DecodeGuard
from pipeline.decode import decode_payloads, decode_rows
from pipeline.input_lists import is_list_name, listed_paths
from pipeline.listing import Entry, InputError, ListingFile
from pipeline.read import fetch_all, filesystem, is_image_name, is_uri, load_bytes
from pipeline.shards import (
    Payload,
    ShardError,
    is_parquet_name,
    is_tar_name,
    parquet_rows,
    tar_rows,
)
from pipeline.spec import ModelSpec
from pipeline.visible import Witnesses
from pipeline.walk import Walk

log = logging.getLogger(__name__)


def _is_a_list(src: str) -> bool:
    """Whether ``src`` names one file of a kind --input-list reads (plain or compressed)."""
    if not is_list_name(src.rstrip("/")) or any(c in src for c in "*?["):
        return False
    return is_uri(src) or os.path.isfile(src.removeprefix("file://"))


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
            skipped: Counter[str] = Counter()
            listed = ((absolute_path(p), size) for p, size in listed_paths(src, skipped))
            listing = ListingFile.write(into, self._checked(listed))
            if not listing.count:
                left_out = "".join(f"; {n:,} {why}" for why, n in skipped.items())
                raise InputError(f"Listing file '{src}' lists no inputs{left_out}.")
            return listing.with_skipped(dict(skipped))
        if self.format == "images" and _is_a_list(src):
            raise InputError(
                f"Input '{src}' is a list, not an image: to read the inputs it names, pass "
                "--input-list" + (" (or --input-format parquet, for Parquet files holding "
                                  "images)" if ".parquet" in src.lower() else "") + ".")
        accept, a_kind, kinds = {
            "images": (is_image_name, "an image", "images"),
            "tar": (is_tar_name, "a tar shard", "tar shards"),
            "parquet": (is_parquet_name, "a Parquet", "Parquet files"),
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
        max_pixels: int, rows_per_block: int, guard: DecodeGuard | None = None,
        witnesses: Witnesses | None = None,
    ) -> Iterator[dict]:
        """Decode one task's slice of the listing (columns path, size; ``units``: each row's
        listing index), skipping rows already ``done``: yields blocks of at most
        ``rows_per_block`` rows (``decode_payloads`` columns plus ``_unit``), each as soon as
        it is decoded. ``guard``: see :func:`pipeline.decode.decode_payloads`. ``witnesses``:
        at the first input that is not there, this node checks that it sees the input at all
        (:mod:`pipeline.visible`) before taking it for a removed file."""
        missing = _MissingCheck(witnesses)
        paths = listing.column("path").to_pylist()
        sizes = listing.column("size").to_pylist()
        if not self.sharded:
            keep = [i for i, p in enumerate(paths) if p not in done]
            paths, sizes, units = [paths[i] for i in keep], [sizes[i] for i in keep], units[keep]
            # Reads run ahead in threads across blocks; a known size saves a HEAD request.
            skip = guard.deadly() if guard is not None else set()
            fetched = (missing(payload) for payload in _fetch(paths, sizes, skip))
            for i in range(0, len(paths), rows_per_block):
                block = paths[i : i + rows_per_block]
                out = decode_payloads(block, itertools.islice(fetched, len(block)), spec,
                                      max_pixels, guard)
                out["_unit"] = units[i : i + rows_per_block]
                yield out
            return
        for shard, size, unit in zip(paths, sizes, units):
            rows = self._expand(shard, size, missing, guard)
            if guard is not None:  # a shard whose reading kills the process: see crash_guard
                rows = guard.reading(shard, rows)
            for out in _decode_chunks(rows, done, spec, max_pixels, rows_per_block, guard):
                out["_unit"] = np.full(len(out["path"]), unit, np.int64)
                yield out

    def _expand(self, shard: str, size: int | None, missing: _MissingCheck | None = None,
                guard: DecodeGuard | None = None) -> Iterator[tuple[str, Payload]]:
        # The shard is read whole under the guard's watch, as a file is: a read that never
        # returns (a stuck mount) kills the process, and a second time makes the shard one row.
        crash = guard.row(shard) if guard is not None else None
        if crash is not None:
            yield shard, crash
            return
        try:
            data = load_bytes(shard, size)
        except Exception as e:  # an unreadable shard is one error row, like an unreadable file
            if missing is not None:
                missing(e)
            yield shard, ShardError(f"shard unreadable: {type(e).__name__}: {e}")
            return
        finally:
            if guard is not None:
                guard.decoded()  # the read is over: stop its clock
        rows = tar_rows(shard, data) if self.format == "tar" else parquet_rows(
            shard, data, self.image_column, self.id_column)
        count = 0
        try:
            for row in rows:
                count += 1
                yield row
        except Exception as e:  # a reader's surprise (a member too big for memory, say)
            # ends the shard like a cut: the rows read stay, one error row marks the rest
            yield shard, ShardError(f"{self.format} shard unreadable after {count:,} rows: "
                                    f"{type(e).__name__}: {e}")
            return
        if not count:  # every shard accounts for itself with at least one row
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



class _MissingCheck:
    """Passes payloads through; at the first input that is not there, checks (once) that
    this node sees the input at all, raising :class:`pipeline.plan.PlanError` if not."""

    def __init__(self, witnesses: Witnesses | None):
        self.witnesses, self.checked = witnesses, witnesses is None

    def __call__(self, payload):
        if not self.checked and isinstance(payload, FileNotFoundError):
            self.checked = True
            self.witnesses.check()
        return payload


def _fetch(paths: list[str], sizes: list, skip: AbstractSet[str]) -> Iterator[Payload]:
    """Each path's bytes (or why not) in order, except that the paths in ``skip`` are not
    read (a file whose read hung twice would hang a third time): their rows are the guard's."""
    keep = [i for i, p in enumerate(paths) if p not in skip]
    reads = fetch_all([paths[i] for i in keep], [sizes[i] for i in keep])
    for path in paths:
        yield DecodeCrash("not read") if path in skip else next(reads)[1]


def _decode_chunks(
    rows: Iterator[tuple[str, Payload]], done: AbstractSet[str], spec: ModelSpec,
    max_pixels: int, rows_per_block: int, guard: DecodeGuard | None,
) -> Iterator[dict]:
    chunk: dict[str, Payload] = {}
    start = time.perf_counter()
    for path, payload in rows:
        if path in done or path in chunk:
            continue
        chunk[path] = payload
        if len(chunk) == rows_per_block:
            yield _decode_chunk(chunk, time.perf_counter() - start, spec, max_pixels, guard)
            chunk, start = {}, time.perf_counter()
    if chunk:
        yield _decode_chunk(chunk, time.perf_counter() - start, spec, max_pixels, guard)


def _decode_chunk(chunk: dict[str, Payload], read_seconds: float, spec, max_pixels,
                  guard: DecodeGuard | None) -> dict:
    def load(path: str) -> bytes:
        payload = chunk[path]
        if isinstance(payload, BaseException):
            raise payload
        return payload

    out = decode_rows(list(chunk), load, spec, max_pixels, guard)
    out["_t_decode"] += read_seconds / len(chunk)  # reading the shard, spread over its rows
    return out
