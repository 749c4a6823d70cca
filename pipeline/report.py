"""The run report: a run's ``_summary.json`` as one page (``_report.html``) and as text.

``batch-infer report OUT`` prints the text; :func:`write_report` puts the page beside a run's
parts. Both render the same facts with the same number formats (the helpers below), so page
and terminal never disagree. Any field may be missing (a summary written before the field
existed): each section renders what is there and says what is not, and nothing raises. The
page is built in :mod:`pipeline.report_html`: one file, inline CSS and SVG, no scripts, no
URLs, so it opens the same from a laptop, an object-store download or an air-gapped cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.console import skipped_phrases
from pipeline.write import MANIFEST, REPORT, SUMMARY, OutputDir, OutputError

# kind -> (whose fault, what it means). "data": the input file itself, the user fixes the file;
# "system": the model or the pipeline, the user fixes the model or reports a bug. Telling the
# two apart at a glance is the point of grouping errors by kind.
ERROR_KINDS = {
    "unreadable": ("data", "could not be read: missing, no permission, or not a regular file"),
    "not_an_image": ("data", "not an image"),
    "corrupt": ("data", "truncated or corrupt image data"),
    "too_large": ("data", "more pixels than --max-pixels"),
    "shard": ("data", "a shard, or part of one, is unreadable, or a row id is bad"),
    "decode_crash": ("data", ("reading or decoding the file (or reading its shard) killed "
                              "or hung the process (a decoder bug it triggers, more memory "
                              "than the node has, a stuck mount)")),
    "model_failure": ("system", "the model raised, or returned NaN/Inf, for this image"),
    "model_crash": ("system", "the model's process died, or hung, on this image"),
    "no_result": ("system", "lost by the pipeline (never expected: please report it)"),
}
FAULTS = {"data": "the data's (input files)", "system": "the system's (model or pipeline)",
          "unknown": "of unknown kinds"}
EXAMPLES = 5  # example paths shown per error kind
PLAN_LABELS = {
    "actors": "inference actors", "actor_cpus": "CPUs per actor", "actor_gpus": "GPUs per actor",
    "decode_cpus": "CPUs per decode task", "decode_slots": "decode tasks at once",
    "rows_per_block": "rows per block", "device_batch_size": "images per device batch",
}


@dataclass(frozen=True)
class ErrorGroup:
    kind: str
    fault: str  # a key of FAULTS
    meaning: str
    count: int
    examples: list[str]


# ---------------------------------------------------------------- reading and writing


def load_summary(output: str) -> dict[str, Any]:
    """The summary dict of the run in ``output`` (local or ``s3://``); OutputError if none."""
    where = f"{output.rstrip('/')}/{SUMMARY}"
    try:
        summary = OutputDir(output).read_json(SUMMARY)
    except NotADirectoryError:
        summary = None
    except ValueError as e:  # JSONDecodeError
        raise OutputError(f"'{where}' is not valid JSON: {e}.") from e
    if summary is None:
        raise OutputError(_unfinished(output) or f"No run summary at '{where}': not a "
                          "batch-infer output directory.")
    if not isinstance(summary, dict):
        raise OutputError(f"'{where}' holds {type(summary).__name__}, not a run summary.")
    return summary


def _unfinished(output: str) -> str | None:
    """What a run that has a manifest but no summary got done (it failed, was stopped, or is
    still running), from its part files' footers; None when there is no manifest."""
    out = OutputDir(output)
    try:
        manifest = out.read_json(MANIFEST)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    parts = out.parts()
    rows = sum(pq.read_metadata(f"{out.root}/{p}", filesystem=out.fs).num_rows for p in parts)
    files = f"{len(parts):,} part file" + "s" * (len(parts) != 1)
    done = f"{rows:,} rows committed in {files}, of {manifest.get('inputs', 0):,} inputs listed"
    try:
        out.lock().release()
    except OutputError:  # a run on this machine holds it
        return f"The run in '{output}' is still running: {done} so far."
    return (f"The run in '{output}' has not finished (it failed or was stopped, or runs on "
            f"another machine): {done}. Finish it with the same command and --resume.")


def write_report(output: str, summary: dict[str, Any] | None = None) -> str:
    """Write ``_report.html`` beside the run's parts in ``output``; returns where.

    ``summary``: the run's summary dict (default: read ``_summary.json`` there)."""
    page = render_html(load_summary(output) if summary is None else summary)
    OutputDir(output).write_text(REPORT, page)
    return f"{output.rstrip('/')}/{REPORT}"


def render_html(summary: dict[str, Any]) -> str:
    """The self-contained report page for a summary dict."""
    from pipeline.report_html import page  # the page's template and chart live there

    return page(summary if isinstance(summary, dict) else {})


# ---------------------------------------------------------------- the facts, formatted


def num(value: Any) -> float | None:
    """A finite number, or None for anything else (missing, null, a string, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fmt_count(n: float) -> str:
    return f"{n:,.0f}"


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def fmt_value(v: Any) -> str:
    """A plan or node value: ints with thousands separators, other numbers short."""
    if num(v) is None:
        return "" if v is None else str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def identity(s: dict[str, Any]) -> list[tuple[str, str]]:
    """What ran on what: (label, value) for the fields the summary has."""
    model = " · ".join(str(s[k]) for k in ("model_name", "model") if s.get(k))
    pairs = [("model", model), ("input", s.get("input")), ("output", s.get("output")),
             ("started", s.get("started_at"))]
    return [(k, str(v)) for k, v in pairs if v]


def status(s: dict[str, Any]) -> str | None:
    if "completed" not in s:
        return None
    return "completed" if s["completed"] else "did not complete"


def key_numbers(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The header's numbers: (label, formatted value), only those the summary has."""
    pairs = []
    for label, key in (("rows ok", "rows_ok"), ("error rows", "rows_error"),
                       ("rows from an earlier run", "rows_resumed")):
        v = num(s.get(key))
        if v is not None and (v or key != "rows_resumed"):
            pairs.append((label, fmt_count(v)))
    if (v := num(s.get("images_per_second"))) is not None:
        pairs.append(("images/s", fmt_rate(v)))
    if (v := num(s.get("seconds"))) is not None:
        pairs.append(("wall time", f"{v:.1f} s"))
    if (v := num(s.get("first_result_seconds"))) is not None:
        pairs.append(("first result", f"{v:.1f} s"))
    return pairs


def stages(s: dict[str, Any]) -> list[tuple[str, float, float | None]]:
    """(stage, ms per image, seconds summed over the stage's workers) in the runner's order."""
    ms, secs = _dict(s.get("stage_ms_per_image")), _dict(s.get("stage_seconds"))
    return [(str(k), num(v), num(secs.get(k))) for k, v in ms.items() if num(v) is not None]


def timeline_points(timeline: Any) -> list[tuple[float, float]]:
    """The valid (seconds, cumulative rows) pairs of a summary's ``timeline``, in time order."""
    pairs = [p for p in _list(timeline) if isinstance(p, (list, tuple)) and len(p) == 2]
    return sorted((num(t), num(n)) for t, n in pairs if num(t) is not None and num(n) is not None)


def throughput(timeline: Any, bins: int) -> list[tuple[float, float, float]]:
    """(start s, end s, images/s) from ``timeline`` (pairs of seconds, cumulative rows): one
    interval per pair of points, or ``bins`` equal ones when there are more points than that
    (cumulative rows interpolated linearly, so each bin's rate is the mean over it). Points
    closer than a quarter of a bin to the one before are merged into the next interval: parts
    that land within milliseconds of each other are one step, not an interval "23.2-23.2 s"
    at a rate no device reached."""
    points = timeline_points(timeline)
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return []
    if len(points) - 1 > bins:
        ts, rows = np.array(points).T
        edges = np.linspace(ts[0], ts[-1], bins + 1)
        points = list(zip(edges.tolist(), np.interp(edges, ts, rows).tolist()))
    gap = (points[-1][0] - points[0][0]) / bins / 4
    kept = [points[0]]
    for point in points[1:-1]:
        if point[0] - kept[-1][0] >= gap:
            kept.append(point)
    if len(kept) > 1 and points[-1][0] - kept[-1][0] < gap:
        kept[-1] = points[-1]  # the end replaces a point too close to it
    else:
        kept.append(points[-1])
    points = kept
    return [(t0, t1, (n1 - n0) / (t1 - t0))
            for (t0, n0), (t1, n1) in zip(points, points[1:]) if t1 > t0]


def error_groups(s: dict[str, Any]) -> list[ErrorGroup]:
    """Errors by kind, the data's first, then the system's, then unknown kinds; most first."""
    groups = []
    for kind, entry in _dict(s.get("errors_by_kind")).items():
        entry = entry if isinstance(entry, dict) else {"count": entry}
        fault, meaning = ERROR_KINDS.get(kind, ("unknown", ""))
        examples = [str(p) for p in _list(entry.get("examples"))][:EXAMPLES]
        groups.append(ErrorGroup(str(kind), fault, meaning, int(num(entry.get("count")) or 0),
                                 examples))
    order = list(FAULTS)
    return sorted(groups, key=lambda g: (order.index(g.fault), -g.count, g.kind))


def fault_totals(groups: list[ErrorGroup]) -> dict[str, int]:
    totals = dict.fromkeys(FAULTS, 0)
    for g in groups:
        totals[g.fault] += g.count
    return {k: v for k, v in totals.items() if v}


def plan_rows(s: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """The resource plan as (label, value) rows, and its notes."""
    plan = _dict(s.get("plan"))
    rows = [(PLAN_LABELS.get(k, k.replace("_", " ")), fmt_value(v))
            for k, v in plan.items() if k != "notes"]
    return rows, [str(n) for n in _list(plan.get("notes"))]


def actor_rows(s: dict[str, Any]) -> list[list[str]]:
    """node, node id, pid, device, rows, share of this run's rows: one row per actor."""
    actors = [a for a in _list(s.get("actors")) if isinstance(a, dict)]
    total = sum(num(a.get("rows")) or 0 for a in actors)
    return [[str(a.get("node_ip", "")), _short_id(a.get("node_id")), str(a.get("pid", "")),
             str(a.get("device", "")), fmt_value(a.get("rows")),
             f"{100 * (num(a.get('rows')) or 0) / total:.1f}%" if total else ""]
            for a in actors]


ACTOR_HEADERS = ["node", "node id", "pid", "device", "rows", "share"]
NODE_HEADERS = ["node", "node id", "CPUs", "GPUs", "memory GB", "actors"]


def node_rows(s: dict[str, Any]) -> list[list[str]]:
    nodes = [n for n in _list(s.get("nodes")) if isinstance(n, dict)]
    actors = [a for a in _list(s.get("actors")) if isinstance(a, dict)]
    return [[str(n.get("node_ip", "")), _short_id(n.get("node_id")), fmt_value(n.get("cpus")),
             fmt_value(n.get("gpus")), fmt_value(n.get("memory_gb")),
             str(sum(a.get("node_id") == n.get("node_id") for a in actors))]
            for n in nodes]


def skipped(s: dict[str, Any]) -> dict[str, Any]:
    """Reason -> files listed but not read (no row for them)."""
    return _dict(s.get("skipped"))


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, (list, tuple)) else []


def _short_id(node_id: Any) -> str:
    return str(node_id or "")[:8]


# ---------------------------------------------------------------- text


def render_text(summary: dict[str, Any]) -> str:
    """The report as plain text (what ``batch-infer report OUT`` prints)."""
    s = summary if isinstance(summary, dict) else {}
    done = status(s)
    lines = ["batch-infer run report" + (f" ({done})" if done else "")]
    lines += [f"  {k:<9}{v}" for k, v in identity(s)]
    if numbers := key_numbers(s):
        lines.append("  " + " · ".join(f"{k} {v}" for k, v in numbers))
    lines.append("")
    rates = throughput(s.get("timeline"), bins=12)
    if rates:
        top = max(r for _, _, r in rates) or 1.0
        lines.append("Throughput (images/s)")
        lines += [f"  {f'{t0:.1f}-{t1:.1f} s':<14}{fmt_rate(r):>9}  {'█' * round(40 * r / top)}"
                  for t0, t1, r in rates]
        lines.append("")
    if rows := stages(s):
        lines.append("Time per image by stage (ms; seconds summed over each stage's workers)")
        total = sum(ms for _, ms, _ in rows) or 1.0
        lines.append(f"  {'stage':<14}{'ms/image':>9}{'seconds':>10}  share")
        for name, ms, sec in rows:
            share = ms / total
            lines.append(f"  {name:<14}{ms:>9.4f}{'' if sec is None else f'{sec:.2f}':>10}  "
                         f"{'█' * round(20 * share):<20} {100 * share:5.1f}%")
        lines += [f"  {'total':<14}{sum(ms for _, ms, _ in rows):>9.4f}", ""]
    plan, notes = plan_rows(s)
    if plan:
        lines.append("Plan")
        lines += [f"  {k:<26}{v}" for k, v in plan] + [f"  note: {n}" for n in notes] + [""]
    for title, headers, rows in (("Actors", ACTOR_HEADERS, actor_rows(s)),
                                 ("Nodes", NODE_HEADERS, node_rows(s))):
        if rows:
            lines += [f"{title} ({len(rows)})", *_text_table(headers, rows), ""]
    lines += _text_errors(s)
    lines += [f"Skipped (no row): {phrase}" for phrase in skipped_phrases(skipped(s))]
    return "\n".join(lines).rstrip() + "\n"


def _text_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
            for r in [headers, *rows]]


def _text_errors(s: dict[str, Any]) -> list[str]:
    groups = error_groups(s)
    errors = num(s.get("rows_error"))
    if not groups:
        return [f"Errors: {fmt_count(errors)} rows (by kind: not in this summary)", ""] \
            if errors else []
    totals = ", ".join(f"{fmt_count(n)} {FAULTS[k]}" for k, n in fault_totals(groups).items())
    lines = [f"Errors: {fmt_count(sum(g.count for g in groups))} rows, {totals}"]
    for g in groups:
        lines.append(f"  {g.fault.upper():<8}{g.kind:<15}{fmt_count(g.count):>7}  {g.meaning}")
        lines += [f"{'':<12}{p}" for p in g.examples]
        if g.count > len(g.examples):
            lines.append(f"{'':<12}... {fmt_count(g.count - len(g.examples))} more")
    return lines + [""]
