"""Input lists (``--input-list``): a run's inputs named in a file instead of found by a walk.

A list is text (one path or URI per line, ``#`` comments), CSV (with a header), Parquet or
ORC, optionally compressed (``.gz``, ``.bz2``, ``.zst``, by extension), or the
``manifest.json`` of an S3 Inventory report. A table's inputs are its ``path`` column; else
``s3://{bucket}/{key}`` from ``bucket`` and ``key`` columns (an inventory data file, or a
query over one); else its first string column. Lists are streamed: tens of millions of
entries never sit in the driver at once.

**S3 Inventory.** The report's ``manifest.json`` names its data files (``files[].key`` in the
destination bucket) and their format: CSV (gzipped, no header: ``fileSchema`` names the
columns, and keys are URL-encoded), ORC or Parquet. A row is an object *version*. Reading
``s3://bucket/key`` reads the latest one, so when the report lists all versions, older versions
and delete markers are skipped and counted, and each object is listed once. A manifest on
local disk (a synced copy of the report) finds each data file by its key under the manifest's
own directory or a directory above it.
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.parse
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa

from pipeline.listing import Entry, InputError
from pipeline.read import filesystem, is_uri

_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
# Inventory columns this reads, by normalised name (lower case, no underscores): the CSV
# fileSchema says "IsLatest", ORC and Parquet say "is_latest". Not the size: it is the size
# the object had when the report was made (up to a week before), and a reader told a size
# reads that many bytes.
_INVENTORY = ("bucket", "key", "islatest", "isdeletemarker")


def _uncompressed(src: str) -> str:
    """``src`` lower-cased, without a compression suffix: the name its kind is read from."""
    name = src.lower()
    for ext in _COMPRESSED:
        name = name.removesuffix(ext)
    return name


def is_list_name(src: str) -> bool:
    """Whether ``src`` is named like a list this module reads (``.txt``, ``.csv``,
    ``.parquet``, ``.orc``, an inventory's ``.json``; compressed or not)."""
    return _uncompressed(src).endswith((".txt", ".json", ".parquet", ".orc", ".csv"))


def listed_paths(src: str, skipped: Counter | None = None) -> Iterator[Entry]:
    """The inputs a list names, as (path, size where the list knows it), in the list's order;
    entries left out (an inventory's older versions) are counted in ``skipped``."""
    skipped = Counter() if skipped is None else skipped
    name = _uncompressed(src)
    try:
        if name.endswith(".json"):
            yield from _inventory(src, skipped)
        elif name.endswith((".parquet", ".orc", ".csv")):
            kind = name.rsplit(".", 1)[1]
            yield from _table_entries(_table_batches(src, kind, header=None), False, skipped)
        else:
            yield from _text_entries(src)
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"Cannot read listing file '{src}': {e}") from e


def _text_entries(src: str) -> Iterator[Entry]:
    fs, inner = filesystem(src)
    with fs.open_input_stream(inner) as f:  # decompresses by extension
        rest = f.read(3)
        rest = rest.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark (Windows Notepad's)
        while chunk := f.read(1 << 20):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from _lines(lines)
        yield from _lines([rest])


def _lines(lines: list[bytes]) -> Iterator[Entry]:
    for line in lines:
        text = line.decode("utf-8").strip()
        if text and not text.startswith("#"):
            yield text, None


def _table_batches(src: str, kind: str, header: list[str] | None
                   ) -> Iterator[pa.RecordBatch]:
    """The record batches of a ``kind`` ("csv", "parquet", "orc") file, with only the columns
    :func:`_columns` wants where the format can skip the others; ``header``: a CSV's column
    names where the file has none (an inventory's), read as text bar the version flags."""
    fs, inner = filesystem(src)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(inner) as f:
            data = pq.ParquetFile(f)
            columns = _columns(data.schema_arrow)
            yield from data.iter_batches(batch_size=65536, columns=columns)
    elif kind == "orc":
        from pyarrow import orc

        with fs.open_input_file(inner) as f:
            data = orc.ORCFile(f)
            columns = _columns(data.schema)
            for i in range(data.nstripes):
                yield data.read_stripe(i, columns=columns)
    else:
        import pyarrow.csv as pcsv

        read, convert = pcsv.ReadOptions(block_size=1 << 22), pcsv.ConvertOptions()
        if header:
            read.column_names = header
            flags = {"islatest", "isdeletemarker"}
            convert.column_types = {c: pa.bool_() if _normal(c) in flags else pa.string()
                                    for c in header}
        with fs.open_input_stream(inner) as f:  # decompresses by extension
            yield from pcsv.open_csv(f, read_options=read, convert_options=convert)


def _columns(schema: pa.Schema) -> list[str]:
    """The columns that name the inputs: ``path``; else an inventory's bucket, key and
    version flags; else the first string column."""
    if "path" in schema.names:
        return ["path"]
    inventory = [n for n in schema.names if _normal(n) in _INVENTORY]
    if {"bucket", "key"} <= {_normal(n) for n in inventory}:
        return inventory
    for f in schema:
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            return [f.name]
    raise InputError(f"Listing file has no string column of paths (columns: {schema.names}).")


def _table_entries(batches: Iterator[pa.RecordBatch], url_encoded: bool,
                   skipped: Counter) -> Iterator[Entry]:
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return
    columns = _columns(first.schema)
    for batch in itertools.chain([first], batches):
        if len(columns) == 1:
            yield from ((p, None) for p in batch.column(columns[0]).to_pylist() if p)
        else:
            yield from _objects(batch, {_normal(c): c for c in columns}, url_encoded, skipped)


def _objects(batch: pa.RecordBatch, columns: dict[str, str], url_encoded: bool,
             skipped: Counter) -> Iterator[Entry]:
    """``s3://bucket/key`` for each row that is an object's latest version."""
    n = batch.num_rows
    got = {c: batch.column(columns[c]).to_pylist() if c in columns else [None] * n
           for c in _INVENTORY}
    for bucket, key, latest, deleted in zip(*(got[c] for c in _INVENTORY)):
        if deleted:
            skipped["S3 Inventory: delete marker"] += 1
        elif latest is False:
            skipped["S3 Inventory: not the latest version"] += 1
        elif bucket and key:
            # Inventory CSV keys are form-encoded: a space is "+", a "+" is "%2B"
            # (cloud-custodian/cloud-custodian#1997).
            key = urllib.parse.unquote_plus(key) if url_encoded else key
            yield f"s3://{bucket}/{key}", None


def _normal(column: str) -> str:
    return column.strip().lower().replace("_", "")


# --- S3 Inventory ----------------------------------------------------------------------------


def _inventory(src: str, skipped: Counter) -> Iterator[Entry]:
    fs, inner = filesystem(src)
    with fs.open_input_stream(inner) as f:
        manifest = json.loads(f.read())
    try:
        fmt = manifest["fileFormat"].lower()
        files = [entry["key"] for entry in manifest["files"]]
        destination = manifest["destinationBucket"].rsplit(":", 1)[-1]  # arn:aws:s3:::name
    except (KeyError, TypeError, AttributeError) as e:
        raise InputError(f"'{src}' is not an S3 Inventory manifest.json (no {e}).") from e
    if fmt not in ("csv", "orc", "parquet"):
        raise InputError(f"S3 Inventory '{src}': unknown fileFormat '{manifest['fileFormat']}'.")
    header = None
    if fmt == "csv":
        header = [c.strip() for c in manifest.get("fileSchema", "").split(",")]
        if not {"bucket", "key"} <= {_normal(c) for c in header}:
            raise InputError(f"S3 Inventory '{src}': fileSchema names no Bucket and Key columns.")
    for key in files:
        data = _data_file(src, destination, key)
        yield from _table_entries(_table_batches(data, fmt, header), fmt == "csv", skipped)


def _data_file(manifest: str, destination: str, key: str) -> str:
    """Where a manifest's data file is: in the destination bucket, or, for a manifest on local
    disk, at its key (or the key's tail) under the manifest's directory or one above it
    (the nearest wins)."""
    if is_uri(manifest):
        return f"{manifest.split('://', 1)[0]}://{destination}/{key}"
    parts = key.split("/")
    here = os.path.dirname(os.path.abspath(manifest.removeprefix("file://")))
    while True:
        for i in range(len(parts)):
            candidate = os.path.join(here, *parts[i:])
            if os.path.isfile(candidate):
                return candidate
        if os.path.dirname(here) == here:
            raise InputError(f"S3 Inventory '{manifest}': data file '{key}' is not on this disk "
                             "under the manifest's directory or one above it.")
        here = os.path.dirname(here)
