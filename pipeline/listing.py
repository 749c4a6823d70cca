"""List stage: what a run reads, written once to ``_listing.arrow`` beside the output.

Inputs are a local directory (recursive), a single file, a glob, the same on any filesystem
pyarrow knows by URI (``s3://bucket/prefix``), all found by :mod:`pipeline.walk`, or an *input
list* (``--input-list``: a text, CSV, Parquet or ORC list of paths, or an S3 Inventory
report; read by :mod:`pipeline.input_lists`).

The driver never holds the listing: each path is appended to an Arrow IPC file in the output
directory as it is found, with its size where the listing knows it (an S3 object can then be
read without a HEAD request), and each path is kept once. Decode tasks read their own slice of
that file by row number; the run's manifest keeps its row count and sha256, so ``--resume``
can tell whether the input changed.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.read import filesystem
from pipeline.write import LISTING, TEMPORARY, OutputError, discard

log = logging.getLogger(__name__)

# Rows per record batch of the listing file: a decode task reads the batches its slice
# spans, so a small batch wastes little; a big one writes fewer, larger pieces.
LISTING_CHUNK = 1024
SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64())])
Entry = tuple[str, "int | None"]  # (path, size in bytes where the listing knows it)


class InputError(ValueError):
    """The input cannot be listed or holds nothing to read; the message names it."""


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
