"""One run at a time writes an output.

Two runs into one output (the same command in two terminals, an overlapping cron job, a job
resubmitted while its first driver still runs) would both compute the rows not yet committed
and commit them in parts of their own: rows twice, or one run's ``--overwrite`` deleting the
parts the other is writing. So a run holds its output from before it lists its inputs (a
refusal comes at once, not after listing a million keys) until it ends.

- **A local directory:** an ``flock`` on it. The kernel drops it when the process dies, so a
  killed run leaves nothing stale.
- **An object store** has no locks. A run writes a claim, ``_run-<id>.json``, which its driver
  rewrites every :data:`RENEW` seconds, and then lists the claims there. Another claim is either
  renewed while this run watches it (a live run: refused) or is not renewed for :data:`LAPSE`
  seconds (a killed run's: deleted, and this run goes on). Ages are read from the store's own
  clock, a claim's modification time, so a skewed client clock does not matter. Each run writes
  before it lists and S3 and GCS lists are strongly consistent, so of two runs that start
  together at least one sees the other: both may be refused, both never go on.

A driver that could not renew its claim for :data:`LAPSE` seconds (suspended with its laptop,
cut off from the store) may find that another run took its output for a dead run's. Each
renewal first checks that the claim is still there, and after such a gap that no other run
claims the output: if not, the run has lost its output and stops (:meth:`OutputLock.lost`,
which the driver checks after each block), rather than write beside the other run.

Cost: a run beside a live one is refused within about :data:`RENEW` seconds. A rerun after a
killed driver goes on at once on the driver's machine (the claim names its host and pid, and
that process is gone), and elsewhere (a resubmitted job's new head pod) waits up to
:data:`LAPSE` seconds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

import pyarrow.fs as pafs

from pipeline import machine

log = logging.getLogger(__name__)

CLAIM_PREFIX = "_run-"
# A live driver rewrites its claim this often: one PUT of ~100 bytes.
RENEW = 10.0
# A claim not rewritten for this long is a dead run's: three missed renewals, so one slow PUT
# or a busy moment in the driver never hands a live run's output to another.
LAPSE = 30.0
POLL = 1.0  # how often a starting run looks at another run's claim


class OutputBusy(ValueError):
    """Another run is writing this output."""


class OutputLock:
    """What a run holds on its output; :meth:`release` when the run ends."""

    name: str | None = None  # the file in the output that stands for the lock, if any

    def lost(self) -> str | None:
        """Why this run no longer holds its output (another run may be writing it), or None."""
        return None

    def release(self) -> None:
        pass


class DirectoryLock(OutputLock):
    def __init__(self, fd: int):
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_directory(root: str, uri: str) -> OutputLock:
    """``flock`` the directory ``root`` (which exists); an OutputLock that does nothing where
    the filesystem has no ``flock``."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputBusy(f"Output '{uri}' is being written by another run on this machine: "
                         "wait for it to end, or pick another --output.") from None
    except OSError:
        os.close(fd)
        return OutputLock()
    return DirectoryLock(fd)


class Claim(OutputLock):
    """This run's claim on an object-store output, rewritten every ``renew`` seconds by a
    daemon thread until :meth:`release` deletes it; lost when another run may have taken it
    for a dead run's (not renewed for ``lapse`` seconds)."""

    def __init__(self, fs: pafs.FileSystem, root: str, renew: float, lapse: float):
        self.fs, self.root, self.renew, self.lapse = fs, root.rstrip("/"), renew, lapse
        self.name = f"{CLAIM_PREFIX}{uuid.uuid4().hex}.json"
        self.path = f"{self.root}/{self.name}"
        self.body = json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "pids": machine.identity("pid"),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "renewed_every_seconds": renew,
        }).encode()
        self._stop = threading.Event()
        self._why_lost: str | None = None
        self._write()  # the first write fails loudly: the output cannot be written at all
        self._renewed = time.time()  # wall time: a suspended machine's monotonic clock stops
        self._thread = threading.Thread(target=self._renew, name="output-claim", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        with self.fs.open_output_stream(self.path, compression=None) as f:
            f.write(self.body)

    def _renew(self) -> None:
        while not self._stop.wait(self.renew):
            try:
                self._why_lost = self._taken()
                if self._why_lost:
                    log.error("This run lost its output: %s", self._why_lost)
                    return  # never write it again: the other run holds the output now
                self._write()
                self._renewed = time.time()
            except OSError as e:  # the next try may get through; three misses lose the claim
                log.warning("Could not renew this run's claim on its output (%s): %s",
                            self.path, " ".join(str(e).split()))

    def _taken(self) -> str | None:
        """Why another run may hold the output now, or None."""
        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return (f"its claim {self.name} was deleted, as another run does with a claim "
                    f"not renewed for {self.lapse:g} s")
        quiet = time.time() - self._renewed
        if quiet > self.lapse:
            others = self.others()
            if others:
                return (f"its claim was not renewed for {quiet:.0f} s, and another run has "
                        f"claimed the output since ({others[0].base_name})")
        return None

    def lost(self) -> str | None:
        return self._why_lost

    def others(self) -> list[pafs.FileInfo]:
        return [e for e in self.fs.get_file_info(pafs.FileSelector(self.root))
                if e.base_name.startswith(CLAIM_PREFIX) and e.base_name != self.name]

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:  # deleted with the (empty) output
            pass
        except OSError as e:  # it lapses by itself
            log.warning("Could not delete this run's claim %s: %s", self.path, e)


def claim(fs: pafs.FileSystem, root: str, uri: str) -> OutputLock:
    """Claim the object-store output ``root`` for this run (see the module's docstring):
    OutputBusy when another run holds it; waits up to :data:`LAPSE` seconds for a claim that
    may be a dead run's."""
    renew, lapse = RENEW, LAPSE  # read here, so that a test can shorten them
    mine = Claim(fs, root, renew, lapse)
    try:
        now = fs.get_file_info(mine.path).mtime  # the store's clock
        if now is None:  # a store that keeps no times: claims cannot be aged, so none is held
            mine.release()
            return OutputLock()
        seen: dict[str, tuple[datetime, float, dict]] = {}  # claim -> (mtime, first seen, body)
        said = False
        while True:
            waiting = False
            for e in mine.others():
                if e.path not in seen:
                    seen[e.path] = (e.mtime, time.monotonic(), _read(fs, e.path))
                first_mtime, since, body = seen[e.path]
                if e.mtime != first_mtime:
                    raise OutputBusy(
                        f"Output '{uri}' is being written by another run ({_who(body)}; its "
                        f"claim {e.base_name} is renewed every {renew:g} s): wait for it to "
                        "end, or pick another --output.")
                quiet = (now - first_mtime).total_seconds() + time.monotonic() - since
                if quiet < lapse and not _gone(body):
                    waiting = True
                    if not said:
                        log.warning("Output '%s' holds another run's claim (%s, %s): waiting up "
                                    "to %.0f s to see whether that run is still writing it",
                                    uri, e.base_name, _who(body), lapse - quiet)
                        said = True
                else:
                    log.warning("Removing %s, the claim of a run that stopped without "
                                "releasing it (%s)", e.path, _who(body))
                    try:
                        fs.delete_file(e.path)
                    except OSError as why:  # gone meanwhile, or no right to delete: it is dead
                        log.info("Could not remove %s: %s", e.path, why)
            if not waiting:
                return mine
            time.sleep(POLL)
    except BaseException:
        mine.release()
        raise


def _read(fs: pafs.FileSystem, path: str) -> dict:
    """A claim's body; {"error": why} if it cannot be read."""
    try:
        with fs.open_input_stream(path) as f:
            body = json.loads(f.read())
        return body if isinstance(body, dict) else {"error": "not a JSON object"}
    except (OSError, ValueError) as e:
        return {"error": " ".join(str(e).split())}


def _who(body: dict) -> str:
    if "error" in body:
        return f"unreadable claim: {body['error']}"
    return (f"host {body.get('host', '?')}, pid {body.get('pid', '?')}, started "
            f"{body.get('started', '?')}")


def _gone(body: dict) -> bool:
    """Whether the claim is a process of this machine (and pid namespace) that no longer
    exists: a rerun after a killed driver then need not wait for the claim to lapse."""
    pid = body.get("pid")
    if body.get("pids") != machine.identity("pid") or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: it exists
        return False
    return False

