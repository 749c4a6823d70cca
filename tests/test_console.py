"""What a user sees: only the tool's own lines by default, Ray's in a file named in the
output (``--verbose`` shows them), a live status line, and a report whose numbers are the
run's."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from driver import private_ray_env, stop_private_ray

from pipeline.console import Console, _RayMessagesToLog, status_text
from pipeline.digits import write_samples
from pipeline.report import fmt_rate, render_html, render_text

# Every line `batch-infer demo` may print, and nothing else (stdout and stderr together).
TOOL_LINES = [r"wrote \d+ sample digit images to \S+", r"input:  .*", r"model:  .*",
              r"actors: .*", r"output: .*", r"ray's log lines: \S+ \(--verbose shows them\)",
              r"  [\d,]+ / [\d,]+ rows \(\d+%\), [\d,]+ rows/s, [\d,]+ errors(, ETA [\d:]+)?",
              r"rows: \d+ \(\d+ ok, \d+ error\)", r"time: .*", r"ms per image: .*",
              r"model: [0-9a-f]{16}", r"output: .*", r"accuracy on the sample digits: .*",
              r"read it: .*"]


def run_cli(args: list[str], ray_tmp: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=300, env=private_ray_env(ray_tmp))


@pytest.mark.slow
def test_demo_prints_only_the_tools_lines_and_names_ray_s_log(tmp_path):
    """A wrong implementation lets Ray's lines through (the core worker's error line about
    constructor arguments, Ray Data's "Starting execution", the progress-bar warning), or
    hides them nowhere a user can find."""
    ray_tmp = tempfile.mkdtemp(prefix="bi-demo-", dir="/tmp")
    try:
        result = run_cli(["demo", "--count", "24", "--dir", str(tmp_path / "d")], ray_tmp)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr == "", result.stderr[-3000:]
        lines = result.stdout.splitlines()
        strangers = [line for line in lines
                     if not any(re.fullmatch(p, line) for p in TOOL_LINES)]
        assert not strangers, strangers
        assert lines[1].startswith("input:  24 images") and "rows: 24 (24 ok, 0 error)" in lines
        (log,) = [line.split()[3] for line in lines if line.startswith("ray's log lines:")]
        assert log.startswith(ray_tmp) and "/logs/" in log  # in Ray's session directory
        text = Path(log).read_text()
        assert "Starting execution of Dataset" in text and "core_worker" in text
    finally:
        stop_private_ray(ray_tmp)
    verbose = tempfile.mkdtemp(prefix="bi-demo-", dir="/tmp")
    try:
        loud = run_cli(["demo", "--count", "8", "--dir", str(tmp_path / "v"), "--verbose"],
                       verbose)
        assert loud.returncode == 0 and "Starting execution of Dataset" in loud.stderr
    finally:
        stop_private_ray(verbose)


def test_status_line_in_place_on_a_terminal_and_every_few_seconds_in_a_log():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    with Console(stream=term) as console:
        console.status(status_text(100, 1000, 2, 10.0))
        console.status(status_text(500, 1000, 3, 20.0))
        console.line("done")
    assert term.getvalue() == (
        "\r  100 / 1,000 rows (10%), 10 rows/s, 2 errors, ETA 1:30"
        "\r  500 / 1,000 rows (50%), 25 rows/s, 3 errors, ETA 0:20\ndone\n")
    log = io.StringIO()
    with Console(stream=log) as console:
        for rows in range(0, 1000, 100):
            console.status(status_text(rows, 1000, 0, 1.0 + rows / 100))
        console.status(status_text(1000, 1000, 0, 12.0), force=True)
    printed = log.getvalue().splitlines()
    assert len(printed) == 2  # the first, then none for 10 s, then the forced last one
    assert printed[-1] == "  1,000 / 1,000 rows (100%), 83 rows/s, 0 errors"
    assert status_text(5, None, 0, 1.0) == "  5 rows, 5 rows/s, 0 errors"  # shards: no total


def test_ray_s_error_listener_prints_into_the_log_and_everyone_else_to_stdout():
    """Ray's driver prints the raylet's messages ('A worker died…') to sys.stdout from a thread
    of its own, even without log_to_driver: those go to the log, any other print does not
    (the demo prints its accuracy after the run)."""
    real, log = io.StringIO(), io.StringIO()
    out = _RayMessagesToLog(real, log)
    ray_thread = threading.Thread(target=print, args=("(raylet) A worker died",),
                                  kwargs={"file": out}, name=_RayMessagesToLog.THREAD)
    ray_thread.start()
    ray_thread.join()
    print("accuracy on the sample digits: 16/16", file=out)
    assert log.getvalue() == "(raylet) A worker died\n"
    assert real.getvalue() == "accuracy on the sample digits: 16/16\n"


def test_ray_s_error_listener_has_the_name_the_console_knows(ray_local):
    assert _RayMessagesToLog.THREAD in {t.name for t in threading.enumerate()}


def test_the_report_of_a_run_holds_the_run_s_numbers(ray_local, tmp_path):
    """The report is made from the run's own summary: its counts, errors by kind (with the
    real paths), actors and stages are the ones the Parquet output and the run had."""
    import pipeline

    src = tmp_path / "in"
    write_samples(src, 30, seed=1)
    (src / "broken.png").write_bytes(b"not a png at all")
    (src / "empty.jpg").write_bytes(b"")
    summary = pipeline.run(str(src), str(tmp_path / "out"), progress=False)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    saved = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert saved["rows_ok"] == sum(r["status"] == "ok" for r in rows) == 30
    (kind,) = saved["errors_by_kind"]  # both files are not images: one kind
    assert kind == "not_an_image" and saved["errors_by_kind"][kind]["count"] == 2
    assert sorted(saved["errors_by_kind"][kind]["examples"]) == [
        str(src / "broken.png"), str(src / "empty.jpg")]
    assert sum(a["rows"] for a in saved["actors"]) == 32 == saved["timeline"][-1][1]
    page = (tmp_path / "out" / "_report.html").read_text()
    assert page == render_html(saved)
    text = render_text(saved)
    assert re.search(r"rows ok 30\b", text) and re.search(r"error rows 2\b", text)
    assert str(src / "broken.png") in text and "not_an_image" in text
    assert re.search(rf"images/s {re.escape(fmt_rate(summary.images_per_second))}( |$)", text,
                     re.MULTILINE)  # as the report writes it: "12.9", "1,234"
