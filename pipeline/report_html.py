"""The report page (``_report.html``): one file, inline CSS, an inline SVG chart, no scripts.

Nothing on the page is fetched: no fonts, stylesheets, scripts or images from elsewhere, so it
renders the same offline. Every string from the summary (paths, model names, notes) is user
data and goes through :func:`html.escape`. The facts and their formats come from
:mod:`pipeline.report`, which the text report shares.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from pipeline import report as r
from pipeline.console import skipped_phrases

CHART_BINS = 60  # intervals in the throughput chart; more points are averaged into these
RATE, ROWS = "#2563eb", "#0d9488"  # the chart's two series; blue is used nowhere else

CSS = """
:root{--ink:#0f172a;--muted:#64748b;--line:#e2e8f0;--bg:#f6f7f9;--bar:#475569;
--data:#92400e;--data-bg:#fef3c7;--data-edge:#f59e0b;--sys:#991b1b;--sys-bg:#fee2e2;
--sys-edge:#dc2626;--unk:#334155;--unk-bg:#e2e8f0;--unk-edge:#64748b}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1100px;margin:0 auto;padding:28px 24px 48px}
header h1{font-size:22px;margin:0 0 6px}
dl.id{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0;color:var(--muted)}
dl.id dd{margin:0;color:var(--ink);font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:13px;word-break:break-all}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;
margin-top:18px}
.tile{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px}
.tile b{display:block;font-size:24px;font-variant-numeric:tabular-nums}
.tile span,th{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:18px 20px;
margin-top:16px}
h2{font-size:16px;margin:0 0 4px}
p.sub{color:var(--muted);margin:0 0 12px}
.cols{display:grid;grid-template-columns:3fr 2fr;gap:16px}.cols>section{margin-top:16px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line)}
th{font-weight:600}
.n{text-align:right}
tr.total td{font-weight:700;border-top:2px solid var(--ink);border-bottom:0}
.bar{background:var(--line);height:10px;border-radius:5px;min-width:90px}
.bar i{display:block;height:100%;background:var(--bar);border-radius:5px}
code{font:12.5px ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:700;
text-transform:uppercase;letter-spacing:.04em}
.ok{background:#dcfce7;color:#166534}.bad{background:#fee2e2;color:#991b1b}
.data{background:var(--data-bg);color:var(--data)}.system{background:var(--sys-bg);color:var(--sys)}
.unknown{background:var(--unk-bg);color:var(--unk)}
.split{display:flex;height:14px;border-radius:7px;overflow:hidden;margin:8px 0 14px}
.split .data{background:var(--data-edge)}.split .system{background:var(--sys-edge)}
.split .unknown{background:var(--unk-edge)}
.err{border:1px solid var(--line);border-left:5px solid var(--unk-edge);border-radius:6px;
padding:10px 14px;margin-top:10px}
.err.data{border-left-color:var(--data-edge);background:#fff}
.err.system{border-left-color:var(--sys-edge);background:#fff}
.err .count{float:right;font-size:20px;font-weight:700;font-variant-numeric:tabular-nums}
.err .kind{font-weight:700;margin:0 8px}
.err .meaning{color:var(--muted)}
.err ul{margin:6px 0 0;padding-left:20px}
.muted{color:var(--muted)}
svg text{font:11px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:#64748b;
paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
"""


def page(s: dict[str, Any]) -> str:
    """The whole page for summary ``s``."""
    title = f"batch-infer run report: {s.get('model_name') or s.get('output') or 'run'}"
    plan = _plan(s)
    middle = f'<div class="cols">{_stages(s)}{plan}</div>' if plan else _stages(s)
    body = [_header(s), _throughput(s), middle, _errors(s), _cluster(s), _skipped(s)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(b for b in body if b)
            + '\n<p class="muted">Written by batch-infer from _summary.json.</p>'
            + "\n</main></body></html>\n")


def _header(s: dict[str, Any]) -> str:
    done = r.status(s)
    badge = (f' <span class="badge {"ok" if s.get("completed") else "bad"}">{done}</span>'
             if done else "")
    ids = "".join(f"<dt>{k}</dt><dd>{escape(v)}</dd>" for k, v in r.identity(s))
    tiles = "".join(f'<div class="tile"><b>{escape(v)}</b><span>{escape(k)}</span></div>'
                    for k, v in r.key_numbers(s))
    return (f"<header><h1>Run report{badge}</h1><dl class=\"id\">{ids}</dl>"
            f'<div class="tiles">{tiles}</div></header>')


def _throughput(s: dict[str, Any]) -> str:
    rates = r.throughput(s.get("timeline"), bins=CHART_BINS)
    if not rates:
        return ("<section><h2>Throughput</h2><p class=\"muted\">No timeline in this summary "
                "(it was written before runs recorded one, or the run had no rows).</p></section>")
    return ("<section><h2>Throughput</h2><p class=\"sub\">Images per second over the run "
            f"(mean over each of {len(rates)} intervals) and rows written so far.</p>"
            + chart(rates, r.timeline_points(s.get("timeline")),
                    r.num(s.get("images_per_second")), r.num(s.get("first_result_seconds")))
            + "</section>")


def chart(rates: list[tuple[float, float, float]], points: list[tuple[float, float]],
          average: float | None, first: float | None) -> str:
    """An SVG of images/s (step area, left axis) and cumulative rows (line, right axis)."""
    t_end = max(rates[-1][1], points[-1][0] if points else 0)
    y_ticks = _ticks(max([v for _, _, v in rates] + [average or 0]))
    n_ticks = _ticks(max((n for _, n in points), default=0) or 1)

    def x(t: float) -> float:
        return LEFT + (W - LEFT - RIGHT) * t / t_end

    def y(v: float, ticks: list[float]) -> float:
        return H - BOTTOM - (H - TOP - BOTTOM) * v / ticks[-1]

    out = [f'<svg class="chart" viewBox="0 0 {W} {H}" width="100%" role="img" '
           'aria-label="throughput over time">', _axes(x, y, y_ticks, n_ticks, t_end)]
    d = [f"M{x(rates[0][0]):.1f},{y(0, y_ticks):.1f}"]
    d += [f"L{x(t0):.1f},{y(v, y_ticks):.1f}L{x(t1):.1f},{y(v, y_ticks):.1f}"
          for t0, t1, v in rates]
    d.append(f"L{x(rates[-1][1]):.1f},{y(0, y_ticks):.1f}Z")
    out.append(f'<path class="rate" d="{"".join(d)}" fill="{RATE}" fill-opacity="0.16" '
               f'stroke="{RATE}" stroke-width="1.8" stroke-linejoin="round"/>')
    line = " ".join(f"{x(t):.1f},{y(n, n_ticks):.1f}" for t, n in points)
    out.append(f'<polyline class="cumulative" points="{line}" fill="none" stroke="{ROWS}" '
               'stroke-width="2"/>')
    if average:
        ya = y(average, y_ticks)
        out.append(f'<line class="average" x1="{LEFT}" x2="{W - RIGHT}" y1="{ya:.1f}" '
                   f'y2="{ya:.1f}" stroke="{RATE}" stroke-dasharray="6 4"/>')
    if first is not None and first <= t_end:
        out.append(f'<line class="first-result" x1="{x(first):.1f}" x2="{x(first):.1f}" '
                   f'y1="{TOP}" y2="{H - BOTTOM}" stroke="#64748b" stroke-dasharray="2 3"/>'
                   f'<text x="{x(first) + 5:.1f}" y="{TOP + 10}">first result '
                   f"{first:.1f} s</text>")
    return "".join(out) + _legend(average) + "</svg>"


W, H, LEFT, RIGHT, TOP, BOTTOM = 1040, 300, 64, 70, 34, 42  # the chart's box, in SVG units


def _axes(x, y, y_ticks: list[float], n_ticks: list[float], t_end: float) -> str:
    out = []
    for v in y_ticks:
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(v, y_ticks):.1f}" '
                   f'y2="{y(v, y_ticks):.1f}" stroke="#eef1f5"/>'
                   f'<text x="{LEFT - 8}" y="{y(v, y_ticks) + 4:.1f}" text-anchor="end">'
                   f"{_tick(v)}</text>")
    for v in n_ticks:
        out.append(f'<text x="{W - RIGHT + 8}" y="{y(v, n_ticks) + 4:.1f}" '
                   f'style="fill:{ROWS}">{_tick(v)}</text>')
    for t in (t for t in _ticks(t_end, 8) if t <= t_end * 1.0001):
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{H - BOTTOM}" '
                   f'y2="{H - BOTTOM + 5}" stroke="#94a3b8"/><text x="{x(t):.1f}" '
                   f'y="{H - BOTTOM + 18}" text-anchor="middle">{_tick(t)}</text>')
    out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{H - BOTTOM}" y2="{H - BOTTOM}" '
               f'stroke="#94a3b8"/><text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" '
               'text-anchor="middle">seconds since the run started</text>'
               f'<text x="{LEFT - 8}" y="{TOP - 14}" text-anchor="end">images/s</text>'
               f'<text x="{W - RIGHT + 8}" y="{TOP - 14}" style="fill:{ROWS}">rows</text>')
    return "".join(out)


def _legend(average: float | None) -> str:
    items = [(f'<rect y="-9" width="14" height="10" fill="{RATE}" fill-opacity="0.3" '
              f'stroke="{RATE}"/>', "images/s"),
             (f'<line x2="16" y1="-4" y2="-4" stroke="{ROWS}" stroke-width="2"/>',
              "rows written")]
    if average:
        items.append((f'<line x2="20" y1="-4" y2="-4" stroke="{RATE}" stroke-dasharray="6 4"/>',
                      f"run average {r.fmt_rate(average)} images/s"))
    out, at = [], LEFT + 4
    for mark, label in items:
        out.append(f'<g transform="translate({at},{TOP - 15})">{mark}'
                   f'<text x="24">{label}</text></g>')
        at += 44 + 6 * len(label)  # ~6 SVG units per character of 11px text
    return "".join(out)


def _ticks(top: float, n: int = 5) -> list[float]:
    """0, a round step, ... up to the first multiple of the step at or above ``top``."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _tick(v: float) -> str:
    return f"{v:,.0f}" if v == int(v) else f"{v:g}"


def _stages(s: dict[str, Any]) -> str:
    rows = r.stages(s)
    if not rows:
        return ("<section><h2>Time per image by stage</h2>"
                '<p class="muted">Not in this summary.</p></section>')
    total = sum(ms for _, ms, _ in rows) or 1.0
    body = "".join(
        f"<tr><td>{escape(name)}</td><td class=\"n\">{ms:.4f}</td>"
        f"<td class=\"n\">{'' if sec is None else f'{sec:.2f}'}</td>"
        f'<td><div class="bar"><i style="width:{100 * ms / total:.1f}%"></i></div></td>'
        f'<td class="n">{100 * ms / total:.1f}%</td></tr>' for name, ms, sec in rows)
    return ("<section><h2>Time per image by stage</h2><p class=\"sub\">Milliseconds per image, "
            "and seconds summed over each stage's workers (stages overlap in time).</p>"
            "<table><tr><th>stage</th><th class=\"n\">ms / image</th><th class=\"n\">seconds"
            "</th><th>share</th><th></th></tr>" + body
            + f'<tr class="total"><td>total</td><td class="n">{sum(m for _, m, _ in rows):.4f}'
            "</td><td></td><td></td><td></td></tr></table></section>")


def _plan(s: dict[str, Any]) -> str:
    rows, notes = r.plan_rows(s)
    if not rows:
        return ""
    body = "".join(f'<tr><td>{escape(k)}</td><td class="n">{escape(v)}</td></tr>'
                   for k, v in rows)
    notes_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return (f"<section><h2>Plan</h2><table>{body}</table>"
            + (f'<ul class="muted">{notes_html}</ul>' if notes else "") + "</section>")


def _errors(s: dict[str, Any]) -> str:
    groups = r.error_groups(s)
    errors = r.num(s.get("rows_error")) or 0
    if not groups:
        text = (f"{r.fmt_count(errors)} error rows; this summary does not group them by kind "
                "(see the <code>error</code> column)." if errors else "No error rows.")
        return f"<section><h2>Errors</h2><p class=\"muted\">{text}</p></section>"
    totals = r.fault_totals(groups)
    n = sum(totals.values())
    split = "".join(f'<span class="{k}" style="width:{100 * v / n:.2f}%"></span>'
                    for k, v in totals.items())
    legend = " · ".join(f'<span class="badge {k}">{k}</span> {r.fmt_count(v)} {r.FAULTS[k]}'
                        for k, v in totals.items())
    cards = []
    for g in groups:
        more = g.count - len(g.examples)
        paths = "".join(f"<li><code>{escape(p)}</code></li>" for p in g.examples)
        if more > 0:
            paths += f'<li class="muted">and {r.fmt_count(more)} more</li>'
        cards.append(f'<div class="err {g.fault}"><span class="count">{r.fmt_count(g.count)}'
                     f'</span><span class="badge {g.fault}">{g.fault}</span><span class="kind">'
                     f'{escape(g.kind)}</span><span class="meaning">{escape(g.meaning)}</span>'
                     f"<ul>{paths}</ul></div>")
    return (f"<section><h2>Errors: {r.fmt_count(n)} rows</h2><p class=\"sub\">{legend}</p>"
            f'<div class="split">{split}</div>' + "".join(cards) + "</section>")


NUM = ' class="n"'


def _table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    def cells(tag: str, row: list[str]) -> str:
        return "".join(f"<{tag}{NUM if i in numeric else ''}>{escape(c)}</{tag}>"
                       for i, c in enumerate(row))

    return (f"<table><tr>{cells('th', headers)}</tr>"
            + "".join(f"<tr>{cells('td', row)}</tr>" for row in rows) + "</table>")


def _cluster(s: dict[str, Any]) -> str:
    actors, nodes = r.actor_rows(s), r.node_rows(s)
    if not actors and not nodes:
        return ""
    parts = ["<section><h2>Actors and nodes</h2>"]
    if actors:
        parts.append(f'<p class="sub">{_plural(len(actors), "inference actor")}</p>'
                     + _table(r.ACTOR_HEADERS, actors, {2, 4, 5}))
    if nodes:
        parts.append(f'<p class="sub" style="margin-top:16px">{_plural(len(nodes), "node")}</p>'
                     + _table(r.NODE_HEADERS, nodes, {2, 3, 4, 5}))
    return "".join(parts) + "</section>"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _skipped(s: dict[str, Any]) -> str:
    skipped = r.skipped(s)
    if not skipped:
        return ""
    items = "".join(f"<li>{escape(phrase)}</li>" for phrase in skipped_phrases(skipped))
    return ("<section><h2>Skipped</h2><p class=\"sub\">Files listed but not read (no row)."
            f"</p><ul>{items}</ul></section>")
