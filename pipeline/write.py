"""Write stage: result rows -> committed Parquet part files, exactly once per input.

Parts are written beside the data, by the inference actors, never by the driver: each block of
results becomes ``part-<lo>-<hi>-<digest>.parquet``, named only by the rows it holds (``lo``
and ``hi``: the first and one past the last listing index of its inputs; ``digest``: sha256 of
its row paths). A retried block (a restarted actor, a lost node, Ray re-running lineage) holds
the same rows, so it rewrites the same file instead of adding a second copy; a resumed run
skips committed rows, so its parts hold other rows and get other names.

Commit protocol, the one place it lives:

1. a part is written under a temporary ``_tmp-*`` name, then renamed (one atomic rename on a
   filesystem; on an object store a copy of the finished object), so no reader ever sees half
   a file: pyarrow skips ``_`` names, and a temporary does not end in ``.parquet``, so
   DuckDB's ``*.parquet`` glob skips it too. A part that cannot be written (a full disk, a
   refused upload) stops the run with :class:`WriteFailure`; committed parts stay;
2. the actor returns a small record per part (name, row counts, error kinds, stage times): the
   driver never holds rows, only these, and writes ``_manifest.json`` and ``_summary.json``;
3. ``--resume``: the driver lists the part names (not their rows); each decode task reads the
   ``path`` column of the parts whose range meets its slice of the listing and skips those
   inputs, so no input is computed twice and the driver's memory does not grow with them.

Why not Ray Data's ``write_parquet`` + ``CheckpointConfig`` (read in Ray 2.60, where it is
beta): it only switches on for a plan that starts with a Ray read and ends with a Ray write;
the datasink writes each part straight to its final name and deletes the parts of uncommitted
checkpoints only when the next run restores, so after a crash readers can see partial or
orphaned files; a restore loads every finished id into memory; and it records nothing about
the model, so resuming with other weights would silently mix their rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.output_lock import OutputBusy, OutputLock, claim, lock_directory
from pipeline.read import filesystem, is_uri
from pipeline.spec import ModelSpec

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"
REPORT = "_report.html"
LISTING = "_listing.arrow"
PART_PREFIX = "part-"
TEMPORARY = "_tmp-"
# A part --resume could not read is renamed _<part>.unreadable (its rows are redone): pyarrow
# skips '_' names, DuckDB's '*.parquet' glob skips the suffix.
UNREADABLE = ".unreadable"
OURS = (MANIFEST, SUMMARY, REPORT, LISTING)
_PART = re.compile(r"part-(\d+)-(\d+)-[0-9a-f]+\.parquet$")
EXAMPLES = 5  # example paths kept per error kind


class OutputError(ValueError):
    """The output directory cannot be used as asked; the message says what to do."""


class WriteFailure(RuntimeError):
    """A file of the output could not be written (a full disk, no permission, a refused
    upload): the run stops, as every later file would fail alike, and what was committed
    stays for ``--resume``. One line (the driver rebuilds it from the actor's traceback)."""

    @classmethod
    def of(cls, what: str, where: str, error: OSError) -> WriteFailure:
        return cls(f"cannot write {what} in '{where}': {' '.join(str(error).split())}. Rows "
                   "already written are kept: fix that, then run again with --resume")


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
        pa.field("error_kind", pa.string()),
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
        elif f.name in ("error", "error_kind"):
            arr = pa.array([e if bad else None for e, bad in zip(values, null)], type=f.type)
        elif f.name in ("path", "status", "model"):
            arr = pa.array(list(values), type=f.type)
        else:
            arr = pa.array(np.asarray(values), type=f.type, mask=null)
        columns.append(arr)
    return pa.Table.from_arrays(columns, schema=schema)


def part_name(units: np.ndarray, paths) -> str:
    """The name of the part holding these rows: their listing range and a digest of paths."""
    digest = hashlib.sha256("\0".join(sorted(map(str, paths))).encode("utf-8", "surrogatepass"))
    return f"{PART_PREFIX}{int(units.min()):010d}-{int(units.max()) + 1:010d}-" \
           f"{digest.hexdigest()[:16]}.parquet"


def part_range(name: str) -> tuple[int, int] | None:
    """(lo, hi) listing range of a part from its name; None for a name not ours."""
    m = _PART.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass
class Tally:
    """Row counts by status, and error rows by kind with a few example paths."""

    ok: int = 0
    error: int = 0
    kinds: dict[str, int] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add_errors(self, kinds, paths) -> None:
        for kind, path in zip(kinds, paths):
            kind = kind or "unknown"
            self.kinds[kind] += 1
            shown = self.examples.setdefault(kind, [])
            if len(shown) < EXAMPLES:
                shown.append(path)

    def merge(self, other: Tally) -> None:
        self.ok += other.ok
        self.error += other.error
        for kind, n in other.kinds.items():
            self.kinds[kind] += n
            shown = self.examples.setdefault(kind, [])
            shown += other.examples.get(kind, [])[: EXAMPLES - len(shown)]

    def by_kind(self) -> dict[str, dict[str, Any]]:
        return {k: {"count": n, "examples": self.examples.get(k, [])}
                for k, n in sorted(self.kinds.items(), key=lambda kv: -kv[1])}


class PartWriter:
    """Commits result blocks as part files (in the actors; see the module docstring)."""

    def __init__(self, output: str, schema: pa.Schema, rows_per_file: int):
        self.out = OutputDir(output)
        self.schema = schema
        self.rows_per_file = rows_per_file

    def write(self, columns: dict[str, Any], units: np.ndarray) -> list[dict[str, Any]]:
        """Write a block's result columns (with each row's listing index in ``units``) as one
        part per ``rows_per_file`` rows; returns one record per part."""
        records = []
        n = len(units)
        for lo in range(0, n, self.rows_per_file):
            rows = slice(lo, min(n, lo + self.rows_per_file))
            part = {k: v[rows] for k, v in columns.items()}
            table = to_table(part, self.schema)
            name = part_name(units[rows], part["path"])
            self.out.commit_table(name, table)
            tally = Tally()
            status = np.asarray(part["status"])
            tally.ok = int((status == "ok").sum())
            tally.error = int((status != "ok").sum())
            bad = np.flatnonzero(status != "ok")
            tally.add_errors(np.asarray(part["error_kind"])[bad], np.asarray(part["path"])[bad])
            records.append({"part": name, "rows": len(status), "ok": tally.ok,
                            "error": tally.error, "kinds": json.dumps(tally.by_kind()),
                            "units": json.dumps(unit_ranges(units[rows]))})
        return records


def discard(fs: pafs.FileSystem, path: str) -> None:
    """Delete a temporary a failed write left, if it can: a full disk gets its space back;
    what stays is removed by the next run (:meth:`OutputDir.remove_temporaries`)."""
    try:
        fs.delete_file(path)
    except OSError:
        pass


def unit_ranges(units: np.ndarray) -> list[list[int]]:
    """Sorted listing indices as [lo, hi) runs: a block's usually one."""
    u = np.unique(units)
    if not len(u):
        return []
    breaks = np.flatnonzero(np.diff(u) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(u) - 1]])
    return [[int(u[s]), int(u[e]) + 1] for s, e in zip(starts, ends)]


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
        """Names of the committed part files, sorted (by listing range)."""
        return sorted(
            e.base_name for e in self.entries()
            if e.base_name.startswith(PART_PREFIX) and e.base_name.endswith(".parquet")
            and e.type == pafs.FileType.File
        )

    def lock(self) -> OutputLock:
        """Hold this output against other runs until ``release()`` (see
        :mod:`pipeline.output_lock`), creating the directory if need be. OutputError when
        another run holds it or the directory cannot be made."""
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as e:
            why = " ".join(str(e).split())
            raise OutputError(f"Cannot write to output '{self.uri}': {why}.") from e
        try:
            if is_uri(self.uri):
                return claim(self.fs, self.root, self.uri)
            return lock_directory(self.root, self.uri)
        except OutputBusy as e:
            raise OutputError(str(e)) from None
        except OSError as e:
            why = " ".join(str(e).split())
            raise OutputError(f"Cannot write to output '{self.uri}': {why}.") from e

    def has_results(self) -> bool:
        """Whether rows were committed here. A run that failed before its first part leaves
        its listing and manifest; a plain run may replace them."""
        return bool(self.parts())

    def clear(self) -> None:
        """Delete our own files (parts, manifest, summary, report, listing, temporaries,
        unreadable parts set aside); leave anything else."""
        for e in self.entries():
            if (e.base_name.startswith((PART_PREFIX, TEMPORARY)) or e.base_name in OURS
                    or e.base_name.startswith(f"_{PART_PREFIX}")
                    and e.base_name.endswith(UNREADABLE)):
                try:
                    self.fs.delete_file(e.path)
                except FileNotFoundError:  # gone meanwhile: what we wanted
                    pass

    def remove_temporaries(self, keep: tuple[str, ...] = ()) -> None:
        """Delete ``_tmp-*`` files: what a killed writer was writing when it died."""
        for e in self.entries():
            if e.base_name.startswith(TEMPORARY) and e.base_name not in keep:
                log.info("Removing '%s', left by an interrupted writer", e.path)
                try:
                    self.fs.delete_file(e.path)
                except FileNotFoundError:  # another writer's cleanup got there first
                    pass

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

    def paths_in(self, names: list[str]) -> set[str]:
        """The ``path`` column of these parts (a decode task's already-done inputs)."""
        done: set[str] = set()
        for name in names:
            table = pq.read_table(self._path(name), columns=["path"], filesystem=self.fs)
            done.update(table.column("path").to_pylist())
        return done

    def tally(self, names: list[str], threads: int = 16) -> tuple[Tally, list[str]]:
        """Rows by status and error kind in these parts (read in parallel, a few columns),
        and the names of those that cannot be read."""
        total, unreadable = Tally(), []

        def one(name: str) -> Tally | None:
            try:
                table = pq.read_table(self._path(name), filesystem=self.fs,
                                      columns=["path", "status", "error_kind"])
            except (OSError, pa.ArrowInvalid) as e:
                log.warning("Part '%s' cannot be read: %s", name, e)
                return None
            status = np.asarray(table.column("status").to_pylist(), dtype=object)
            t = Tally(ok=int((status == "ok").sum()), error=int((status != "ok").sum()))
            bad = np.flatnonzero(status != "ok")
            if len(bad):
                kinds = table.column("error_kind").take(pa.array(bad)).to_pylist()
                t.add_errors(kinds, table.column("path").take(pa.array(bad)).to_pylist())
            return t

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for name, t in zip(names, pool.map(one, names)):
                if t is None:
                    unreadable.append(name)
                else:
                    total.merge(t)
        return total, unreadable

    def set_aside(self, name: str) -> str:
        """Rename part ``name`` to ``_<name>.unreadable``, which readers and runs skip and
        which keeps its bytes for a look; returns the new name."""
        aside = f"_{name}{UNREADABLE}"
        self.fs.move(self._path(name), self._path(aside))
        return aside

    def _atomic_write(self, name: str, data: bytes) -> None:
        self._atomically(name, lambda f: f.write(data))

    def _atomically(self, name: str, write) -> None:
        """``write(stream)`` the file ``name``, so that it appears whole or not at all: under
        a temporary name first, then renamed. On an object store too, where the rename is a
        copy: pyarrow completes an upload that an exception cut short (apache/arrow#40502,
        seen here on pyarrow 26 for a single PUT and a multipart upload alike), so a partial
        object must never have a part's name."""
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as e:
            raise WriteFailure.of(name, self.uri, e) from e
        # Not ending in .parquet: DuckDB's 'dir/*.parquet' skips no '_' names, and would trip
        # on a half-written temporary left by a killed writer.
        tmp = self._path(f"{TEMPORARY}{name}.{uuid.uuid4().hex}")
        try:
            with self.fs.open_output_stream(tmp, compression=None) as f:
                write(f)
            self.fs.move(tmp, self._path(name))
        except BaseException as e:
            discard(self.fs, tmp)
            if isinstance(e, OSError):
                raise WriteFailure.of(name, self.uri, e) from e
            raise

    def commit_table(self, name: str, table: pa.Table) -> None:
        # Dictionary encoding only where values repeat (status, kinds, labels, the model):
        # tried on 1,024 rows of 1024-float embeddings it took 14 of the 20 ms a part cost to
        # write, and made the file 15% bigger. Written straight to the file: no copy in memory.
        repeated = [f.name for f in table.schema
                    if pa.types.is_string(f.type) and f.name != "path"]
        self._atomically(name, lambda f: pq.write_table(table, f, use_dictionary=repeated))
