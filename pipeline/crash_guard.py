"""Images that kill the inference process: found across restarts, written as error rows.

A model can fail on one image without raising: a segfault in a native kernel, an abort, the
out-of-memory killer. Ray restarts the actor and retries the block, which kills it again, for
ever. :meth:`Executor.run_isolating` cannot help (its process is gone), so the evidence must
outlive the process: it is kept in Ray's GCS key-value store (where Ray Serve keeps its state),
under the actor's id, which a restarted actor keeps.

Cost: nothing until an actor has been restarted. A restarted actor does not know which block
killed its predecessor, so from then on it records each block before running it: one GCS
write per block (about a thousand small images, or a few hundred photos), well under a
millisecond on a LAN. When a later incarnation receives the block its predecessor was running,
it runs that block one image at a time, recording each image first. An image that was running
when the process died twice is the culprit and becomes an error row (twice, so that one
unrelated kill, e.g. a lost node, does not condemn an innocent image). A block holding k such
images costs 2k + 2 restarts; its other images are predicted as usual.

An actor that exits because its *device* broke (see :mod:`pipeline.infer`) says so in its
record first, so its successor does not suspect the block it was running.

A call can also hang: a stuck GPU context, or a model in an endless loop on one image, never
returns and never raises, and Ray Data waits for it for ever. :class:`HangWatch` kills the
process when the device has given no result for ``--infer-timeout`` seconds, after recording
the block (and, one image at a time, the image) that hung: from there the crash's path
finds the image, with its own message. A hang of the canary batch at start is the device's,
counted as a device failure.

Decoding has the same hazard: Pillow, libheif, libavif, OpenJPEG and libtiff are native code,
and a malformed file can crash one or send it into a loop (or a huge image can bring the
out-of-memory killer). Ray Data retries a read task whose process died, for ever, and waits
for a hung one for ever, so one such file hung the run. A watchdog thread turns a hang (one
file decoding for over ``--decode-timeout`` seconds) into a death.
:class:`DecodeGuard` keeps a record per decode task (per slice of the listing): before each
block it records the block's first and last path (one GCS write per block: 0.5 ms from a
worker on this 2-core machine, against 150 ms to decode a block of 1,024 small digit JPEGs,
seconds for photos); a retry of the task that finds the record decodes that range
one file at a time, recording each file first, and a file that was being decoded at two
deaths becomes an error row (``decode_crash``) instead of being decoded a third time.

A shard (tar, Parquet) is read as it is decoded, and its reader is native code too (zlib,
pyarrow), or meets a member that inflates past the node's memory (a ``.tar.gz`` bomb). So the
guard also records, once per block, that the task is reading a shard and how many of its rows
it has read (:meth:`DecodeGuard.reading`); a retry that finds such a record reads that shard
recording each row first, and a position in a shard where the process died twice ends the
shard: the rows before it are decoded as usual and one error row (path: the shard) stands
for the rest, which cannot be read past the crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NAMESPACE = "batch-infer"
STRIKES = 2
DIED = "the inference process died while predicting this image ({n} times): the model crashes on it"
HUNG = ("the inference process was killed predicting this image ({n} times): no result for over "
        "{limit:g} s (--infer-timeout); the model hangs on it")


class CrashGuard:
    """Wraps ``run_isolating`` in an actor with a record that survives the actor's process."""

    def __init__(self, run_id: str):
        import ray

        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # it reads a deprecated property of Ray's own
            warnings.simplefilter("ignore")
            reborn = bool(ctx.was_current_actor_reconstructed)
        self.key = f"{run_id}/{ctx.get_actor_id()}"
        self.recording = reborn
        self.isolated = False  # the last block ran one image at a time
        # What runs now, for :meth:`hung`: the block's paths, and the image one at a time.
        self.current: Any = None
        self.row: int | None = None
        self.record: dict = {}  # the last record written
        # What the previous incarnation was running when it died (None: nothing recorded).
        self.last = _get(self.key) if reborn else None
        if self.last and self.last.get("device"):
            log.warning("Inference actor restarted after its device failed")
            self.last = None  # the device, not the block
        elif reborn:
            log.warning("Inference actor restarted; it died running %s",
                        (self.last or {}).get("block", "?"))

    def run(self, executor, images: np.ndarray, paths) -> tuple[dict, list[str | None]]:
        """``executor.run_isolating(images)``, surviving images that kill the process."""
        self.isolated = False
        self.current, self.row = paths, None
        if not self.recording:
            return executor.run_isolating(images)
        block = _digest(paths)
        if self.last is not None and self.last.get("block") == block:
            last, self.last = self.last, None
            self.isolated = True
            return self._one_at_a_time(executor, images, block, last)
        self._put({"block": block, "row": None, "strikes": {}})
        return executor.run_isolating(images)

    def hung(self, limit: float) -> None:
        """The device has given no result for ``limit`` seconds inside :meth:`run`, and this
        process is about to be killed for it: record what hung. Unlike a crash, a hang can
        name its block (and image) even when nothing was being recorded."""
        if self.current is None:
            return
        if self.row is None:
            record = {"block": _digest(self.current), "row": None, "strikes": {}}
        else:
            record = {**self.record, "hung": sorted({*self.record.get("hung", []), self.row})}
        self._put({**record, "limit": limit})

    def device_failed(self, reason: str) -> int:
        """Record that this process is exiting because its device broke (``reason``);
        returns how many times that has happened to this actor in this run (this time
        included)."""
        failures = self.device_failures()[0] + 1
        _put(f"{self.key}/device", {"count": failures, "reason": reason})
        self._put({"device": True})
        return failures

    def device_failures(self) -> tuple[int, str]:
        """How many times this actor's device broke in this run, and the last reason."""
        record = _get(f"{self.key}/device") or {}
        return int(record.get("count", 0)), str(record.get("reason", ""))

    def _one_at_a_time(self, executor, images: np.ndarray, block: str, last: dict):
        strikes = {int(i): n for i, n in last.get("strikes", {}).items()}
        if last.get("row") is not None:  # the image that was running when the process died
            strikes[last["row"]] = strikes.get(last["row"], 0) + 1
        hung, limit = last.get("hung", []), last.get("limit", 0)
        log.warning("This block killed an inference process; running it one image at a time")
        out = executor.zeros(len(images))
        errors: list[str | None] = [None] * len(images)
        for i in range(len(images)):
            if strikes.get(i, 0) >= STRIKES:
                text = HUNG if i in hung else DIED
                errors[i] = text.format(n=strikes[i], limit=limit)
                continue
            self.row = i
            self._put({"block": block, "row": i, "strikes": strikes, "hung": hung,
                       "limit": limit})
            row_out, (errors[i],) = executor.run_isolating(images[i : i + 1])
            for k, v in row_out.items():
                out[k][i] = v[0]
        self.row = None
        return out, errors

    def _put(self, record: dict) -> None:
        self.record = record
        _put(self.key, record)


# A HangWatch looks this often (at most) at what it watches.
WATCH_SECONDS = 1.0


class HangWatch:
    """Kills this process when watched work (between :meth:`begin` and :meth:`end`, or in
    :meth:`watching`) shows no sign of life for ``limit`` seconds: a hang becomes a death,
    which Ray answers by replacing the process and retrying its work, and which the guards
    here then pin on its cause. ``on_hang(limit)`` runs first, to record what hung.

    Serves both stages. In an actor, a stuck call (a GPU context that never completes, a
    model caught in an endless loop) neither returns nor raises: Ray Data would wait for it,
    and the run would hang, for ever; ``last_result()`` (when the device last answered,
    ``time.monotonic()``) is its sign of life, and :class:`CrashGuard` finds the image that
    hangs, or the canary at start shows the device stuck. In a decode task, one file taking
    too long is the hang (:class:`DecodeGuard`). Starting and ending the clock are attribute
    stores, so watching costs nothing per file or call."""

    def __init__(self, on_hang: Callable[[float], None],
                 last_result: Callable[[], float] | None = None, name: str = "watchdog"):
        self._on_hang, self._last_result = on_hang, last_result
        self._since: float | None = None  # watching since (None: nothing is watched)
        self._limit = 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name=name, daemon=True).start()

    def begin(self, limit: float) -> None:
        self._limit, self._since = limit, time.monotonic()

    def end(self) -> None:
        self._since = None

    @contextlib.contextmanager
    def watching(self, limit: float) -> Iterator[None]:
        self.begin(limit)
        try:
            yield
        finally:
            self.end()

    def close(self) -> None:
        """Stop watching for good (Ray reuses a task's process for other tasks)."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(WATCH_SECONDS, self._limit / 4 or WATCH_SECONDS)):
            since, limit = self._since, self._limit
            if since is None:
                continue
            alive = max(since, self._last_result()) if self._last_result else since
            if time.monotonic() - alive <= limit:
                continue
            try:
                self._on_hang(limit)
            finally:
                os.kill(os.getpid(), signal.SIGKILL)


DECODE_DIED = ("the decode process died while decoding this file ({n} times): it crashes the "
               "image decoder, or needs more memory than the node has")
DECODE_HUNG = ("decoding this file took over {limit:g} s ({n} times; --decode-timeout): the "
               "image decoder hangs on it")
READ_HUNG = ("reading this file took over {limit:g} s ({n} times; --decode-timeout): its "
             "storage hangs on it (a stuck network or FUSE mount?)")
READ_DIED = ("the decode process died reading this shard after {at:,} of its rows ({n} times): "
             "its reader crashes on what follows, or it inflates to more memory than the node "
             "has; the rest of the shard is not read")


class DecodeCrash(Exception):
    """A file whose decoding killed the process, or hung: its row's error."""

    kind = "decode_crash"


class StorageHung(RuntimeError):
    """Reads hung on several files of one decode task: the input's storage is not answering
    (a dead mount), not the files bad. The run stops rather than write off every file."""


# Files whose read hung in one decode task before the run stops: one may be a file its
# storage cannot serve (an error row); a second, in the same slice, is the storage itself.
# With a dead mount that is three kills, 15 minutes at the default --decode-timeout.
READ_HANGS_TO_STOP = 2


class DecodeGuard:
    """Finds the files that kill a decode task's process, or hang its decoder, across Ray's
    retries of the task.

    :func:`pipeline.decode.decode_payloads` calls :meth:`block` before each block, and
    :meth:`row`, :meth:`read` and :meth:`decoded` around each file; ``key`` names the task
    (the run and its slice). A watchdog thread kills the process when one file has been read
    and decoded for more than ``timeout`` seconds (a read from a stuck mount never returns, as
    a decoder in a loop does not): a hang becomes a death, which the retries then pin on the
    file. The clock is set and cleared by attribute stores, so it costs nothing per file; a
    file that hung twice is not read again (:meth:`deadly`).
    :meth:`reading` does the same for a shard's reader."""

    def __init__(self, key: str, timeout: float):
        self.key, self.timeout = key, timeout
        last = _get(key) or {}  # empty: the first attempt (or every earlier one finished)
        self.strikes: dict[str, int] = dict(last.get("strikes", {}))
        # File -> what hung on it: "reading" or "decoding".
        self.hung: dict[str, str] = dict(last.get("hung", {}))
        stuck = [path for path, stage in self.hung.items() if stage == "reading"]
        if len(stuck) >= READ_HANGS_TO_STOP:
            raise StorageHung(
                f"reading {len(stuck)} input files hung for over {timeout:g} s each "
                f"(--decode-timeout) in one decode task ({', '.join(stuck)}): their storage "
                "is not answering (a stuck NFS or FUSE mount?), so the run stops. Rows already "
                "written are kept: once it answers, run again with --resume")
        # Shard -> {rows read before a death: deaths there}; JSON keys are strings.
        self.read_strikes: dict[str, dict[str, int]] = {
            shard: dict(at) for shard, at in last.get("read_strikes", {}).items()}
        if last.get("row") is not None:  # the file being decoded when it died
            self.strikes[last["row"]] = self.strikes.get(last["row"], 0) + 1
        # The range the last attempt was decoding when it died, in listing order.
        self.suspect = (last["from"], last["to"]) if "from" in last else None
        self.careful = False  # recording file by file, through the suspect range
        self.passed = False  # the suspect range's last file has gone by
        # The shard the last attempt was reading when it died: read it row by row.
        self.careful_shard: str | None = last.get("reading")
        if last.get("exact"):  # its record names the row it was reading
            at = self.read_strikes.setdefault(last["reading"], {})
            at[str(last["at"])] = at.get(str(last["at"]), 0) + 1
        self.record: dict = {}
        self.decoding: str | None = None  # the file the watchdog watches
        self.stage = "reading"  # what it is doing with that file
        if self.suspect:
            log.warning("A decode task's process died; decoding %s .. %s one file at a time",
                        *self.suspect)
        elif self.careful_shard:
            log.warning("A decode task's process died reading shard %s; reading it again row "
                        "by row", self.careful_shard)
        self.watch = HangWatch(self._hung, name="decode-watchdog")

    def block(self, paths) -> None:
        """Before a block of ``paths`` is decoded."""
        if self.careful and self.passed:  # the suspect range is done with
            self.careful, self.suspect = False, None
        if not self.careful and not (self.suspect and self.suspect[0] in paths):
            self._put({"from": paths[0], "to": paths[-1], "row": None})

    def row(self, path: str) -> DecodeCrash | None:
        """Before ``path`` is read and decoded: the error to record instead, for a file that
        has killed the process twice (in this retry's suspect range or, the task having
        started over after a later death, before it); None to read and decode it."""
        if self.suspect and path == self.suspect[0]:
            self.careful = True
        if self.careful:
            self.passed = self.passed or path == self.suspect[1]
        n = self.strikes.get(path, 0)
        if n >= STRIKES:
            if path in self.hung:
                text = READ_HUNG if self.hung[path] == "reading" else DECODE_HUNG
                return DecodeCrash(text.format(limit=self.timeout, n=n))
            return DecodeCrash(DECODE_DIED.format(n=n))
        if self.careful:
            self._put({"from": self.suspect[0], "to": self.suspect[1], "row": path})
        self.decoding, self.stage = path, "reading"
        self.watch.begin(self.timeout)
        return None

    def read(self) -> None:
        """The file :meth:`row` let through is read; decoding it starts."""
        self.stage = "decoding"

    def deadly(self) -> set[str]:
        """The files that killed or hung this task's process twice: not to be read again (a
        read that hung would hang again), their rows are :meth:`row`'s errors."""
        return {path for path, n in self.strikes.items() if n >= STRIKES}

    def reading(self, shard: str, rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """``rows``, the (path, payload) pairs that ``shard``'s reader yields, with the reading
        recorded: once per block (before its first row is read), or before every row where
        the last attempt died reading this shard. At a position where the process died twice,
        one error row for the shard ends it instead."""
        careful = shard == self.careful_shard
        deadly = [int(at) for at, n in self.read_strikes.get(shard, {}).items() if n >= STRIKES]
        stop = min(deadly, default=None)
        for n in itertools.count():
            if n == stop:
                deaths = self.read_strikes[shard][str(n)]
                yield shard, DecodeCrash(READ_DIED.format(at=n, n=deaths))
                return
            if careful or self.record.get("reading") != shard:
                self._put({"reading": shard, "at": n, "exact": careful})
            row = next(rows, None)
            if row is None:
                return
            yield row

    def decoded(self) -> None:
        """The file :meth:`row` let through is decoded (or failed to be)."""
        self.watch.end()

    def finished(self) -> None:
        """The task decoded its whole slice: a later run of it (Ray rebuilding a lost block)
        starts afresh."""
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self.key, namespace=NAMESPACE)

    def close(self) -> None:
        """Stop the watchdog (Ray reuses the process for other tasks); the task's last call,
        whether it finished or not."""
        self.watch.close()

    def _put(self, record: dict) -> None:
        self.record = {**record, "strikes": self.strikes, "hung": self.hung,
                       "read_strikes": self.read_strikes}
        _put(self.key, self.record)

    def _hung(self, limit: float) -> None:
        path, stage = self.decoding, self.stage
        log.warning("%s '%s' has taken over %g s: killing this decode process so that Ray "
                    "retries its task", stage.capitalize(), path, limit)
        self.hung[path] = stage
        # Unlike a crash, a hang names its file: record it even in a normal block (whose
        # range the last record may not hold: it may be a shard's reading).
        self._put({"from": self.record.get("from", path), "to": self.record.get("to", path),
                   "row": path})


def forget_run(run_id: str) -> None:
    """Drop what the guards of run ``run_id`` recorded (the driver calls this at the end)."""
    from ray.experimental import internal_kv

    try:
        internal_kv._internal_kv_del(f"{run_id}/", del_by_prefix=True, namespace=NAMESPACE)
    except Exception as e:  # the run's own outcome matters more; the records die with Ray
        log.warning("Could not drop the crash-guard records of run %s: %s", run_id, e)


def _digest(paths) -> str:
    joined = "\0".join(map(str, paths)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(joined).hexdigest()[:32]


def _get(key: str) -> dict | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
    return json.loads(value) if value else None


def _put(key: str, state: dict) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, json.dumps(state), namespace=NAMESPACE)
