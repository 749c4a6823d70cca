"""Write stage: result rows -> committed Parquet part files, exactly once per input.

The driver is the single writer. Rows stream in from the actors, are buffered, and each full
buffer becomes ``part-NNNNN-<run>.parquet``: written under a temporary ``_tmp-*`` name and then
renamed, so a half-written file is never visible as a result (pyarrow skips ``_`` names, and
the temporary does not end in ``.parquet``, so ``*.parquet`` globs skip it too).
``_manifest.json`` records the input listing and model fingerprint; ``--resume`` reads
the ``path`` column of the committed parts and skips those inputs.

Why not Ray Data's ``write_parquet`` + ``CheckpointConfig`` (read in Ray 2.60, where it is
beta): it only switches on for a plan that starts with a Ray read and ends with a Ray write
(otherwise it warns and does nothing); the datasink writes each part straight to its final name
and deletes the parts of uncommitted checkpoints only when the next run restores, so after a
crash readers of the output can see partial or orphaned files; a restore loads every finished
id into memory and still reads every input file, filtering after the read; and it records
nothing about the model, so resuming with other weights would silently mix their rows. One
writer in the driver makes the commit point a single rename, and the manifest refuses a
different model; the rows are small (a prediction, not an image), so this is not a bottleneck.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.model import ModelSpec
from pipeline.read import filesystem, is_uri

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"
REPORT = "_report.html"
PART_PREFIX = "part-"


class OutputError(ValueError):
    """The output directory cannot be used as asked; the message says what to do."""


def output_schema(spec: ModelSpec, logits: bool = False) -> pa.Schema:
    """The Parquet schema of one result row for a model with this spec.

    Embeddings are a fixed-size list: pyarrow reads it back as ``fixed_size_list<float>[D]``,
    DuckDB as ``FLOAT[]`` (``list_cosine_similarity`` works on it as is). ``logits`` adds the
    raw classification scores.
    """
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
    if spec.output == "embedding":
        fields.append(pa.field("embedding", pa.list_(pa.float32(), spec.output_dim)))
    else:
        fields += [
            pa.field("label", pa.int32()),
            pa.field("label_name", pa.string()),
            pa.field("score", pa.float32()),
            pa.field("topk_labels", pa.list_(pa.int32())),
            pa.field("topk_scores", pa.list_(pa.float32())),
        ]
        if logits:
            fields.append(pa.field("logits", pa.list_(pa.float32())))
    fields.append(pa.field("model", pa.string(), nullable=False))
    return pa.schema(fields)


def to_table(batch: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """Numpy result columns -> an Arrow table of ``schema``; error rows get nulls."""
    ok = np.asarray(batch["status"]) == "ok"
    null = ~ok
    columns = []
    for f in schema:
        values = batch[f.name]
        if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type):
            matrix = np.asarray(values)  # (n, k)
            flat = pa.array(matrix.reshape(-1), type=f.type.value_type)
            k = matrix.shape[1]
            if pa.types.is_fixed_size_list(f.type):
                arr = pa.FixedSizeListArray.from_arrays(flat, k, mask=pa.array(null))
            else:
                offsets = pa.array(np.arange(0, len(matrix) * k + 1, k, dtype=np.int32))
                arr = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(null))
        elif f.name == "error":
            arr = pa.array([e if bad else None for e, bad in zip(values, null)], type=f.type)
        elif f.name in ("path", "status", "model"):
            arr = pa.array(list(values), type=f.type)
        else:
            arr = pa.array(np.asarray(values), type=f.type, mask=null)
        columns.append(arr)
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass
class OutputDir:
    """The output directory: its files, its manifest, and what is already committed."""

    uri: str
    fs: pafs.FileSystem = field(init=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        self.fs, self.root = filesystem(self.uri)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def entries(self) -> list[pafs.FileInfo]:
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type == pafs.FileType.File:
            raise OutputError(f"Output '{self.uri}' is a file; give a directory.")
        return self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))

    def parts(self) -> list[str]:
        return sorted(
            e.path for e in self.entries()
            if e.base_name.startswith(PART_PREFIX) and e.base_name.endswith(".parquet")
        )

    def has_results(self) -> bool:
        return any(
            e.base_name.startswith(PART_PREFIX) or e.base_name in (MANIFEST, SUMMARY)
            for e in self.entries()
        )

    def clear(self) -> None:
        """Delete our own files (parts, manifest, summary, report, temporaries); leave the rest."""
        for e in self.entries():
            if e.base_name.startswith((PART_PREFIX, "_tmp-")) or e.base_name in (
                MANIFEST, SUMMARY, REPORT
            ):
                self.fs.delete_file(e.path)

    def remove_temporaries(self) -> None:
        """Delete ``_tmp-*`` files: what a killed run was writing when it died."""
        for e in self.entries():
            if e.base_name.startswith("_tmp-"):
                log.info("Removing '%s', left by an interrupted run", e.path)
                self.fs.delete_file(e.path)

    def read_json(self, name: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self._path(name)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, name: str, data: dict) -> None:
        self._atomic_write(name, (json.dumps(data, indent=2, default=str) + "\n").encode())

    def write_text(self, name: str, text: str) -> None:
        self._atomic_write(name, text.encode())

    def committed_status(self) -> dict[str, str]:
        """Path -> status ("ok" or "error") of every row in the committed part files."""
        done: dict[str, str] = {}
        for part in self.parts():
            table = pq.read_table(part, columns=["path", "status"], filesystem=self.fs)
            done.update(zip(table.column("path").to_pylist(), table.column("status").to_pylist()))
        return done

    def _atomic_write(self, name: str, data: bytes) -> None:
        self.fs.create_dir(self.root, recursive=True)
        if is_uri(self.uri):  # an object store PUT is already all-or-nothing
            with self.fs.open_output_stream(self._path(name)) as f:
                f.write(data)
            return
        # Not ending in .parquet: DuckDB's 'dir/*.parquet' skips no '_' names, and would trip
        # on a half-written temporary left by a killed run.
        tmp = self._path(f"_tmp-{name}.{uuid.uuid4().hex}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self._path(name))

    def commit_table(self, name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self._atomic_write(name, sink.getvalue().to_pybytes())


class ResultWriter:
    """Buffers result batches and commits them as part files; drops rows already written."""

    def __init__(
        self, out: OutputDir, schema: pa.Schema, rows_per_file: int, done: set[str],
        flush_seconds: float = 30.0,
    ):
        self.out = out
        self.schema = schema
        self.rows_per_file = rows_per_file
        # Commit at least this often, so a killed driver loses little work to --resume.
        self.flush_seconds = flush_seconds
        self.last_flush = time.monotonic()
        self.written = done  # paths committed by this or an earlier run
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.run_id = uuid.uuid4().hex[:8]
        out.remove_temporaries()  # one writer per output: any temporary is a dead run's
        self.seq = len(out.parts())
        self.counts = {"ok": 0, "error": 0, "duplicate_dropped": 0}
        self.seconds = 0.0

    def add(self, batch: dict[str, Any]) -> None:
        start = time.perf_counter()
        paths = list(batch["path"])
        keep = np.array([p not in self.written for p in paths], dtype=bool)
        if len(set(paths)) != len(paths):  # a path twice in one batch: keep its first row
            seen: set[str] = set()
            keep &= np.array([not (p in seen or seen.add(p)) for p in paths], dtype=bool)
        if not keep.all():
            self.counts["duplicate_dropped"] += int((~keep).sum())
            log.warning("Dropped %d rows whose path was already written", int((~keep).sum()))
            batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
        table = to_table(batch, self.schema)
        self.written.update(table.column("path").to_pylist())
        statuses = np.asarray(batch["status"])
        self.counts["ok"] += int((statuses == "ok").sum())
        self.counts["error"] += int((statuses != "ok").sum())
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.rows_per_file:
            self._commit(self.rows_per_file)
        if time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()
        self.seconds += time.perf_counter() - start

    def flush(self) -> None:
        """Commit everything buffered."""
        if self.buffered:
            self._commit(self.buffered)

    def _commit(self, rows: int) -> None:
        table = pa.concat_tables(self.buffer)
        self.out.commit_table(f"{PART_PREFIX}{self.seq:05d}-{self.run_id}.parquet", table.slice(0, rows))
        self.seq += 1
        rest = table.slice(rows)
        self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
        self.last_flush = time.monotonic()
