"""The run report: its numbers are the summary's (text and page), old and odd summaries render,
paths are escaped, the page fetches nothing, ``batch-infer report`` prints it, and headless
Chromium draws the page with its chart and numbers."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest

from pipeline.cli import main
from pipeline.report import load_summary, render_html, render_text, throughput, write_report
from pipeline.write import MANIFEST, REPORT, SUMMARY, OutputDir

EVIL = "/data/images/<script>alert('x')</script>\"onerror=x.png"

FULL = {
    "output": "/data/out", "model": "3f2a9c0d1e2b4a5c", "model_name": "digits_cnn",
    "input": "/data/images", "started_at": "2026-11-26T14:19:44Z",
    "rows_ok": 19990, "rows_error": 10, "rows_resumed": 0,
    "skipped": {"not an image extension: .mov": 2, "not an image extension: .txt": 1,
                "folder not readable": 1},
    "seconds": 12.3, "images_per_second": 1625.0, "first_result_seconds": 3.1,
    "stage_seconds": {"decode": 5.1, "transfer_in": 0.2, "compute": 3.0, "transfer_out": 0.1,
                      "write": 0.4},
    "stage_ms_per_image": {"decode": 0.255, "transfer_in": 0.01, "compute": 0.15,
                           "transfer_out": 0.005, "write": 0.02},
    "errors_by_kind": {
        "not_an_image": {"count": 6, "examples": ["/data/images/a.jpg", EVIL]},
        "corrupt": {"count": 3, "examples": ["/data/images/c.jpg"]},
        "model_failure": {"count": 1, "examples": ["/data/images/d.png"]},
    },
    "timeline": [[0.0, 0], [3.1, 1024], [4.0, 3072], [12.3, 20000]],
    "plan": {"actors": 2, "actor_cpus": 1.0, "actor_gpus": 0.0, "decode_cpus": 0.5,
             "decode_slots": 2, "rows_per_block": 1024, "device_batch_size": 32,
             "notes": ["one actor per node: no GPUs"]},
    "actors": [
        {"node_id": "ab12cd34ef", "node_ip": "127.0.0.1", "pid": 4242, "device": "cpu:0",
         "rows": 12000},
        {"node_id": "ab12cd34ef", "node_ip": "127.0.0.1", "pid": 4243, "device": "cpu:0",
         "rows": 8000},
    ],
    "nodes": [{"node_id": "ab12cd34ef", "node_ip": "127.0.0.1", "cpus": 2, "gpus": 0,
               "memory_gb": 20.1}],
    "completed": True,
}


def old_summary() -> dict:
    """What today's runner writes: no timeline, plan, actors, nodes or error kinds."""
    from pipeline.runner import Summary

    return Summary(output="/data/out", model="3f2a9c0d1e2b4a5c", rows_ok=37, rows_error=3,
                   skipped={"not an image extension": 2}, seconds=4.25, images_per_second=9.41,
                   first_result_seconds=2.5, stage_seconds={"decode": 0.1, "write": 0.02},
                   stage_ms_per_image={"decode": 2.5, "write": 0.5}, completed=True).to_json()


class _Cells(HTMLParser):
    """Each table row of a page as its cells' text; the text of every tile as label -> value."""

    def __init__(self, page: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, first: str) -> list[str]:
        return next(r for r in self.rows if r and r[0] == first)


SAFE_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "header", "h1", "h2",
             "dl", "dt", "dd", "div", "span", "b", "p", "section", "table", "tr", "th", "td",
             "i", "ul", "li", "code", "svg", "g", "line", "text", "path", "polyline", "rect"}


class _Tags(HTMLParser):
    def __init__(self, page: str):
        super().__init__()
        self.found: list[tuple[str, list]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, attrs))


def tiles(page: str) -> dict[str, str]:
    return {label: value for value, label in
            re.findall(r'<div class="tile"><b>([^<]*)</b><span>([^<]*)</span>', page)}


def test_text_numbers_are_the_summarys():
    text = render_text(FULL)
    header = dict(re.findall(r"(rows ok|error rows|images/s|wall time|first result) ([\d,.]+)",
                             text))
    assert int(header["rows ok"].replace(",", "")) == FULL["rows_ok"]
    assert int(header["error rows"]) == FULL["rows_error"]
    assert float(header["images/s"].replace(",", "")) == FULL["images_per_second"]
    assert float(header["wall time"]) == FULL["seconds"]
    assert float(header["first result"]) == FULL["first_result_seconds"]
    for stage, ms in FULL["stage_ms_per_image"].items():
        got = re.search(rf"^  {stage} +([\d.]+) +([\d.]+)", text, re.M)
        assert float(got[1]) == ms and float(got[2]) == FULL["stage_seconds"][stage]
    assert float(re.search(r"^  total +([\d.]+)", text, re.M)[1]) == pytest.approx(0.44)
    rates = re.findall(r"^  ([\d.]+)-([\d.]+) s +([\d,.]+)", text, re.M)
    assert [(float(a), float(b)) for a, b, _ in rates] == [(0.0, 3.1), (3.1, 4.0), (4.0, 12.3)]
    assert [int(r.replace(",", "")) for _, _, r in rates] == [330, 2276, 2040]  # rows / seconds
    for kind, entry in FULL["errors_by_kind"].items():
        assert int(re.search(rf"(?:DATA|SYSTEM) +{kind} +(\d+)", text)[1]) == entry["count"]
        for path in entry["examples"]:
            assert f"            {path}\n" in text
    assert "Errors: 10 rows, 9 the data's (input files), 1 the system's" in text
    assert "127.0.0.1  ab12cd34  4242  cpu:0   12,000  60.0%" in text
    assert "images per device batch   32" in text
    assert "Skipped (no row): 3 files (not an image extension: 2 .mov, 1 .txt)" in text
    assert "Skipped (no row): 1 folder (not readable)" in text


def test_page_numbers_are_the_summarys():
    page = render_html(FULL)
    cells = _Cells(page)
    assert tiles(page) == {"rows ok": "19,990", "error rows": "10", "images/s": "1,625",
                           "wall time": "12.3 s", "first result": "3.1 s"}
    for stage, ms in FULL["stage_ms_per_image"].items():
        name, got_ms, got_s, _, share = cells.row(stage)
        assert float(got_ms) == ms and float(got_s) == FULL["stage_seconds"][stage]
        assert float(share.rstrip("%")) == pytest.approx(100 * ms / 0.44, abs=0.05)
    assert cells.row("total")[1] == "0.4400"
    assert cells.row("rows per block") == ["rows per block", "1,024"]
    assert ["127.0.0.1", "ab12cd34", "4243", "cpu:0", "8,000", "40.0%"] in cells.rows
    assert ["127.0.0.1", "ab12cd34", "2", "0", "20.1", "2"] in cells.rows
    counts = re.findall(r'<div class="err (\w+)"><span class="count">(\d+)</span>'
                        r'<span class="badge \w+">\w+</span><span class="kind">(\w+)<', page)
    assert counts == [("data", "6", "not_an_image"), ("data", "3", "corrupt"),
                      ("system", "1", "model_failure")]
    assert "run average 1,625 images/s" in page and "first result 3.1 s" in page
    assert "<li>3 files (not an image extension: 2 .mov, 1 .txt)</li>" in page


def test_old_summary_renders_what_it_has():
    summary = old_summary()
    text, page = render_text(summary), render_html(summary)
    numbers = "rows ok 37 · error rows 3 · images/s 9.4 · wall time 4.2 s · first result 2.5 s"
    assert numbers in text
    assert re.search(r"^  decode +2\.5000 +0\.10", text, re.M)
    assert "Errors: 3 rows (by kind: not in this summary)" in text
    assert "Throughput" not in text and "Actors" not in text
    assert tiles(page)["rows ok"] == "37" and tiles(page)["wall time"] == "4.2 s"
    assert _Cells(page).row("decode")[:3] == ["decode", "2.5000", "0.10"]
    assert "No timeline in this summary" in page and "<svg" not in page
    assert "3 error rows; this summary does not group them by kind" in page


@pytest.mark.parametrize("summary", [
    {},
    {"timeline": [[1.0], "x", [None, 2], [2.0, 5], [2.0, 9]], "plan": None, "actors": ["x", {}],
     "errors_by_kind": {"weird": 4, "corrupt": {"count": None}}, "stage_ms_per_image": {"a": None},
     "seconds": float("nan"), "rows_ok": "many", "nodes": [{"cpus": 1.5}], "completed": False},
    {"timeline": {"0": 1}, "plan": [1], "actors": "x", "nodes": 3, "errors_by_kind": ["x"],
     "stage_ms_per_image": [1], "stage_seconds": "x", "skipped": ["x"], "model_name": 7},
])
def test_odd_summaries_do_not_crash(summary):
    text, page = render_text(summary), render_html(summary)
    assert text.startswith("batch-infer run report") and page.startswith("<!DOCTYPE html>")
    if "weird" in str(summary):
        assert "UNKNOWN weird" in text and '<div class="err unknown">' in page
        assert "did not complete" in page


def test_user_strings_are_escaped_and_the_page_fetches_nothing():
    summary = copy.deepcopy(FULL)
    summary["model_name"] = "<b>model</b>"
    summary["plan"]["notes"] = ["<img src=//evil.example/x.png>"]
    summary["skipped"] = {"<i>odd</i>": 1}
    page = render_html(summary)
    assert "<script" not in page.lower() and "<img" not in page and "<i>odd" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;onerror=x.png" in page
    assert "&lt;b&gt;model&lt;/b&gt;" in page
    tags = _Tags(page)
    assert {t for t, _ in tags.found} <= SAFE_TAGS, "a tag that can load or run something"
    for tag, attrs in tags.found:
        for name, value in attrs:
            assert name not in ("src", "href", "xlink:href", "srcset", "action"), (tag, name)
            assert "//" not in (value or "") and "url(" not in (value or ""), (tag, value)
    css = page.split("<style>")[1].split("</style>")[0]
    assert "url(" not in css and "@import" not in css
    assert not re.search(r"https?:|//", render_html(FULL).replace("</", "")), "a URL in the page"


def test_throughput_bins_keep_the_rows():
    timeline = [[0.1 * i, 50 * i + (i % 7) * 3] for i in range(501)]
    rates = throughput(timeline, bins=60)
    assert len(rates) == 60 and rates[0][0] == 0.0 and rates[-1][1] == pytest.approx(50.0)
    rows = sum(rate * (t1 - t0) for t0, t1, rate in rates)
    assert rows == pytest.approx(timeline[-1][1])
    assert throughput([[0, 0]], bins=60) == [] and throughput(None, bins=60) == []
    # Parts landing milliseconds apart are one step, not a 1 ms interval at 1,000,000/s.
    burst = [[0, 0], [10, 1000], [20, 2000], [20.001, 3000], [30, 3000]]
    assert throughput(burst, bins=12) == [(0, 10, 100), (10, 20, 100), (20, 30, 100)]


def test_write_report_and_cli(tmp_path, capsys):
    out = tmp_path / "out"
    OutputDir(str(out)).write_json(SUMMARY, FULL)
    assert load_summary(str(out)) == FULL
    assert write_report(str(out)) == f"{out}/{REPORT}"
    assert (out / REPORT).read_text() == render_html(FULL)

    assert main(["report", str(out), "--html", str(tmp_path / "page.html")]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(render_text(FULL)) and (tmp_path / "page.html").exists()

    OutputDir(str(out)).clear()
    assert not (out / REPORT).exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SUMMARY).write_text("{not json")
    for where in (out, tmp_path / "bad", tmp_path / "missing"):
        assert main(["report", str(where)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert captured.err.startswith("batch-infer: error: ") and SUMMARY in captured.err
    # A run with a manifest and parts but no summary: stopped, failed, or still running.
    unfinished = OutputDir(str(tmp_path / "unfinished"))
    unfinished.write_json(MANIFEST, {"inputs": 2500})
    for name, rows in (("part-0000000000-0000001024-aa.parquet", 1024),
                       ("part-0000002048-0000002050-bb.parquet", 2)):
        unfinished.commit_table(name, pa.table({"path": [f"/img/{i}.png" for i in range(rows)]}))
    assert main(["report", unfinished.uri]) == 2
    assert capsys.readouterr().err == (
        f"batch-infer: error: The run in '{unfinished.uri}' has not finished (it failed or was "
        "stopped, or runs on another machine): 1,026 rows committed in 2 part files, of 2,500 "
        "inputs listed. Finish it with the same command and --resume.\n")
    running = unfinished.lock()  # as a run on this machine holds its output
    assert main(["report", unfinished.uri]) == 2
    assert capsys.readouterr().err == (
        f"batch-infer: error: The run in '{unfinished.uri}' is still running: 1,026 rows "
        "committed in 2 part files, of 2,500 inputs listed so far.\n")
    running.release()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("/usr/bin/chromium")
    if not found:
        if os.environ.get("BATCH_INFER_REQUIRE_CHROMIUM"):
            pytest.fail("BATCH_INFER_REQUIRE_CHROMIUM is set but chromium is not installed "
                        "(apt-get install chromium)")
        pytest.skip("needs Debian's chromium (CI installs it, and sets "
                    "BATCH_INFER_REQUIRE_CHROMIUM so this cannot skip there)")
    return found


def test_chromium_renders_the_chart_and_numbers(tmp_path):
    from PIL import Image

    chromium = _chromium()
    page = tmp_path / "report.html"
    page.write_text(render_html(FULL))
    png = tmp_path / "shot.png"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-crash-reporter", f"--user-data-dir={tmp_path / 'ud'}"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'<svg class="chart"[^>]*>', dom.stdout)
    assert re.search(r'<path class="rate" d="M[\d.,LZ]{40,}"', dom.stdout)
    assert re.search(r'<polyline class="cumulative" points="[\d., ]{20,}"', dom.stdout)
    for number in ("19,990", "1,625", "12.3 s", "0.2550", "run average 1,625 images/s",
                   "&lt;script&gt;alert"):
        assert number in dom.stdout
    shot = subprocess.run([*flags, f"--screenshot={png}", "--window-size=1200,2000",
                           page.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)  # (H, W, 3)
    assert (rgb != 255).any(axis=2).mean() > 0.3, "a blank page"
    assert (rgb.sum(axis=2) < 300).sum() > 5000, "no text drawn"
    r, b = rgb[..., 0], rgb[..., 2]
    _, columns = np.nonzero((b > 200) & (b - r > 120))  # the chart's blue, used nowhere else
    assert len(columns) > 1000 and np.ptp(columns) > 600, "no chart drawn (its blue series)"

    def near(colour: tuple[int, int, int]) -> int:
        return int((np.abs(rgb - colour).sum(axis=2) < 30).sum())

    assert near((245, 158, 11)) > 200 and near((220, 38, 38)) > 200, (
        "data and system errors are not coloured apart")
