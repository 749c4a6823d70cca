"""What ``batch-infer run`` and the Ray Job print: the tool's own lines, and nothing else.

By default the command prints what will run, a live status line and the summary. Everything
else that would reach the terminal (Ray's own log lines, Python's and its C++ core worker's,
which write straight to file descriptor 2) goes to a file in Ray's session directory, named
in the output; ``--verbose`` leaves them on the terminal. Warnings that matter to the user (an
actor restarted, a node left, blocks retried) are said here in the tool's own words.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import threading
import time
from typing import IO, Any

log = logging.getLogger(__name__)

# How often the status line is printed when the output is a log, not a terminal.
LOG_EVERY_SECONDS = 10.0
DRIVER_LOG = "batch-infer-driver.log"


class Console:
    """The terminal (or log) of one command: quiet mode, status line, events, summary."""

    def __init__(self, verbose: bool = False, stream: IO[str] | None = None):
        self.verbose = verbose
        self.out = stream or sys.stdout
        self.tty = self.out.isatty()
        self._last_status = 0.0
        self._status_width = 0
        self.log_path: str | None = None
        self._saved_fd: int | None = None

    # -- quiet mode ---------------------------------------------------------------------

    def __enter__(self) -> Console:
        return self

    def ray_starting(self) -> None:
        """Ray is about to start: from now on its lines go to the log file (unless verbose)."""
        if not self.verbose and self._saved_fd is None:
            self._hide_stderr()

    def __exit__(self, *exc) -> None:
        self.end_status()
        if self._saved_fd is not None:
            sys.stderr.flush()
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._saved_fd = None
            ours = logging.getLogger("pipeline")
            ours.removeHandler(self._handler)
            ours.propagate = True
            self._handler.stream.close()

    def _hide_stderr(self) -> None:
        """Send file descriptor 2 to a log file; keep the real stderr for our own lines (and
        our own warnings: the ``pipeline`` loggers write there). What Ray's error-listener
        thread prints to ``sys.stdout`` goes there too (see :class:`_RayMessagesToLog`)."""
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        # Where Ray keeps its sessions (RAY_TMPDIR, else the system's temp directory): the
        # file moves into this run's session directory once Ray has made it.
        root = os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray")
        os.makedirs(root, exist_ok=True)
        fd, self.log_path = tempfile.mkstemp(prefix="batch-infer-", suffix=".log", dir=root)
        os.dup2(fd, 2)
        os.close(fd)
        handler = logging.StreamHandler(_text_stream(self._saved_fd))
        handler.setFormatter(logging.Formatter("batch-infer: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
        ours = logging.getLogger("pipeline")
        ours.addHandler(handler)
        ours.propagate = False
        self._handler = handler
        if not isinstance(sys.stdout, _RayMessagesToLog):
            # For the rest of the process: Ray prints the last of them (repeats it held
            # back) when it shuts down, at exit. Only that thread's writes are redirected.
            # Its own descriptor of the log: the same file after a move, and after fd 2 is
            # given back to the terminal.
            sys.stdout = _RayMessagesToLog(sys.stdout, _text_stream(2))

    def move_log_into(self, session_dir: str | None) -> None:
        """Move the log file into Ray's session directory once Ray has one (same file, still
        written to)."""
        if self.log_path is None or not session_dir:
            return
        target = os.path.join(session_dir, "logs", DRIVER_LOG)
        try:
            os.replace(self.log_path, target)
            self.log_path = target
        except OSError:  # another filesystem: the temporary file stays where it is
            pass

    # -- lines --------------------------------------------------------------------------

    def line(self, text: str = "") -> None:
        self.end_status()
        print(text, file=self.out, flush=True)

    def status(self, text: str, force: bool = False) -> None:
        """The live status line: in place on a terminal, every LOG_EVERY_SECONDS in a log."""
        now = time.monotonic()
        if self.tty:
            pad = max(0, self._status_width - len(text))
            self.out.write("\r" + text + " " * pad)
            self.out.flush()
            self._status_width = len(text)
        elif force or now - self._last_status >= LOG_EVERY_SECONDS:
            print(text, file=self.out, flush=True)
            self._last_status = now

    def end_status(self) -> None:
        if self.tty and self._status_width:
            self.out.write("\n")
            self.out.flush()
            self._status_width = 0


def _text_stream(fd: int) -> IO[str]:
    """An unbuffered text stream on a descriptor of its own for what ``fd`` is now."""
    return io.TextIOWrapper(os.fdopen(os.dup(fd), "wb", 0), write_through=True)


class _RayMessagesToLog(io.TextIOBase):
    """``sys.stdout``, except for what Ray's error-listener thread writes, which goes to the
    log file: the raylet's messages (a worker died, a task will be retried), which Ray prints
    even without ``log_to_driver``. The thread is told by its name (Ray 2.x's); under another
    name its lines reach the terminal, as before."""

    THREAD = "ray_listen_error_messages"

    def __init__(self, real: IO[str], log: IO[str]):
        self.real, self.log = real, log

    def write(self, text: str) -> int:
        if threading.current_thread().name != self.THREAD:
            return self.real.write(text)
        return self.log.write(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self):
        return self.real.encoding


def status_text(rows: int, expected: int | None, errors: int, seconds: float) -> str:
    rate = rows / seconds if seconds > 0 else 0.0
    done = f"{rows:,}" + (f" / {expected:,} rows" if expected else " rows")
    if expected:
        done += f" ({100 * rows / expected:.0f}%)"
    eta = ""
    if expected and rate > 0 and rows < expected:
        eta = f", ETA {_clock((expected - rows) / rate)}"
    return f"  {done}, {rate:,.0f} rows/s, {errors:,} errors{eta}"


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plan_lines(info: dict[str, Any]) -> list[str]:
    """What will run, from the runner's start-up information."""
    plan = info["plan"]
    inputs = f"{info['inputs']:,} {info['format']}" + f" under {info['input']}"
    if info.get("resumed"):
        inputs += f" ({info['resumed']:,} rows already done)"
    skipped = "; ".join(skipped_phrases(info.get("skipped", {})))
    where = "GPU" if plan["actor_gpus"] else "CPU"
    actors = (f"{plan['actors']} {where} actor{'s' * (plan['actors'] != 1)} on "
              f"{plan['platform']}, {plan['decode_slots']} decode task"
              f"{'s' * (plan['decode_slots'] != 1)} at a time; blocks of "
              f"{plan['rows_per_block']} rows, device batch {plan['device_batch_size']}")
    lines = [f"input:  {inputs}" + (f"; skipped: {skipped}" if skipped else ""),
             f"model:  {info['model_name']} {info['model']} ({info['model_shape']})",
             f"actors: {actors}",
             f"output: {info['output']}"]
    return lines


def skipped_phrases(skipped: dict[str, int]) -> list[str]:
    """Reason -> count, as phrases: "3 files (not an image extension: 2 .mov, 1 .dng)". A
    reason "what: detail" (the walk counts left-out files by extension) is grouped by what; one
    that starts with "folder " counts folders ("2 folders (hidden, ...)")."""
    groups: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for reason, n in skipped.items():
        unit = "folder" if reason.startswith("folder ") else "file"
        reason = reason.removeprefix("folder ")
        what, _, detail = str(reason).partition(": ")
        groups.setdefault((unit, what), []).append((detail, int(n)))
    phrases = []
    for (unit, what), parts in groups.items():
        total = sum(n for _, n in parts)
        details = ", ".join(f"{n:,} {detail}" for detail, n in parts if detail)
        phrases.append(f"{total:,} {unit}{'s' * (total != 1)} ({what}"
                       + (f": {details})" if details else ")"))
    return phrases


def summary_lines(summary) -> list[str]:
    total = summary.rows_ok + summary.rows_error
    lines = [f"rows: {total} ({summary.rows_ok} ok, {summary.rows_error} error"
             + (f", {summary.rows_resumed} from an earlier run" if summary.rows_resumed else "")
             + ")"]
    for kind, info in (summary.errors_by_kind or {}).items():
        lines.append(f"errors: {info['count']} {kind}"
                     + (f" (e.g. {info['examples'][0]})" if info.get("examples") else ""))
    lines += [f"skipped: {phrase}" for phrase in skipped_phrases(summary.skipped)]
    rate = summary.images_per_second
    lines.append(f"time: {summary.seconds:.1f}s, {rate:.1f} images/s" if rate < 10 else
                 f"time: {summary.seconds:.1f}s, {rate:.0f} images/s")
    if summary.first_result_seconds is not None:
        lines[-1] += f", first result after {summary.first_result_seconds:.1f}s"
    if summary.stage_ms_per_image:
        stages = ", ".join(f"{k} {v:.3f}" for k, v in summary.stage_ms_per_image.items())
        lines.append(f"ms per image: {stages}")
    lines.append(f"model: {summary.model}")
    lines.append(f"output: {summary.output} (report: _report.html; batch-infer report "
                 f"{summary.output})")
    return lines


class Printer:
    """The runner's observer for a command: prints what will run, the status, events."""

    def __init__(self, console: Console, status: bool = True):
        self.console = console
        self.quiet = not console.verbose
        self.show_status = status
        self.last = None

    def ray_starting(self) -> None:
        self.console.ray_starting()

    def started(self, info: dict[str, Any]) -> None:
        self.console.move_log_into(info.get("session_dir"))
        for text in plan_lines(info):
            self.console.line(text)
        if self.console.log_path:
            self.console.line(f"ray's log lines: {self.console.log_path} (--verbose shows them)")

    def progress(self, progress) -> None:
        self.last = progress
        if self.show_status:
            self.console.status(status_text(progress.rows, progress.expected, progress.errors,
                                        progress.seconds))

    def event(self, message: str) -> None:
        self.console.line(f"note: {message}")


def run(cfg, verbose: bool = False, stream: IO[str] | None = None):
    """``pipeline.run`` for a command: quiet unless ``verbose``, a status line, the summary
    printed at the end; returns the summary."""
    from pipeline.runner import run_config

    with Console(verbose, stream) as console:
        printer = Printer(console, status=cfg.progress is not False)
        summary = run_config(cfg, printer)
        if printer.last is not None and printer.show_status:
            p = printer.last
            console.status(status_text(p.rows, p.expected, p.errors, p.seconds), force=True)
        for text in summary_lines(summary):
            console.line(text)
    return summary
