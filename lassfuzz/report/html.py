"""``lassfuzz report``: one self-contained HTML page about a campaign.

The page is meant to be mailed, archived or opened from a file server the morning after, so it
loads nothing: CSS is inline, plots are base64 PNG ``data:`` images, and there is no script.
The only links are relative ones to the campaign's own crash files (computed from where the page
is written, so they resolve when the page sits beside or inside the campaign directory) and a
known divergence's http(s) bug link. Every string that comes from a campaign file is escaped:
signature summaries and known.toml reasons are data, never markup.
"""

from __future__ import annotations

import base64
import os
import time
from html import escape
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit

from lassfuzz.report.cells import coverage_grid
from lassfuzz.report.plots import coverage_heatmap_png, time_series_png
from lassfuzz.report.summary import Bucket, Campaign, format_utc, summary_lines

_CSS: Final = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1300px; padding: 0 1em; color: #1b1b1b; }
h1 { margin-bottom: 0.2em; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
table.summary th { width: 16em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.nowrap { white-space: nowrap; }
code { font-size: 0.85em; color: #555; }
.missing { color: #8a6d00; background: #fff8db; padding: 0.5em 0.8em;
           border-left: 4px solid #e0b000; }
.problems { background: #fdecea; border-left: 4px solid #d93025; padding: 0.5em 0.8em; }
.class-lass { color: #b00020; font-weight: bold; }
.class-base { color: #0b57d0; font-weight: bold; }
.class-tool-crash { color: #6a1b9a; font-weight: bold; }
tr.known td { color: #666; }
img { max-width: 100%; display: block; margin: 0.5em 0 1em; }
"""

#: The progress plots: plot_data.csv column, title, y-axis label, and whether it is a count
#: (drawn as steps: it changes only when a line records it).
_SERIES: Final = (
    ("cases_per_sec", "Cases per second", "cases/s", False),
    ("unique_signatures", "Unique divergence signatures", "signatures", True),
    ("cells_covered", "Decision cells covered", "cells", True),
)


def _href(target: Path, base: Path) -> str:
    """A relative URL from the directory ``base`` to ``target``."""
    relative = os.path.relpath(target.resolve(), base.resolve())
    return quote(Path(relative).as_posix())


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _missing(text: str) -> str:
    return f'<p class="missing">{escape(text)}</p>'


def _summary(campaign: Campaign, now: float) -> str:
    rows = "".join(
        f"<tr><th>{escape(line.label)}</th><td>{escape(line.value)}</td></tr>"
        for line in summary_lines(campaign, now)
    )
    return f'<h2>Summary</h2>\n<table class="summary">{rows}</table>'


def _progress(campaign: Campaign) -> str:
    points = campaign.plot
    if not points:
        return "<h2>Progress</h2>\n" + _missing(
            "No plot data yet: plot_data.csv is missing or has no complete line."
        )
    if len(points) < 2:
        # One point makes an empty-looking plot with a meaningless axis; say what happened.
        return "<h2>Progress</h2>\n" + _missing(
            "Only one statistics interval recorded so far (a short run): nothing to plot yet."
        )
    images = (
        _image(
            time_series_png(
                points, value, started=campaign.stats.started, title=title, ylabel=unit, step=step
            ),
            f"{title} over time",
        )
        for value, title, unit, step in _SERIES
    )
    return "<h2>Progress</h2>\n" + "\n".join(images)


def _coverage(campaign: Campaign) -> str:
    coverage = campaign.coverage
    if coverage is None:
        return "<h2>Decision-cell coverage</h2>\n" + _missing("No coverage data: no coverage.json.")
    grid = coverage_grid(coverage.cells)
    parts = [
        "<h2>Decision-cell coverage</h2>",
        f"<p>{grid.covered} of {grid.cells} cells hit at least once.</p>",
        _image(coverage_heatmap_png(grid), "decision-cell coverage heatmap"),
    ]
    if grid.outside:
        # Can be long (a whole mode the generator reaches by accident): folded by default.
        items = "".join(
            f"<li><code>{escape(name)}</code>: {hits:,}</li>" for name, hits in grid.outside
        )
        parts.append(
            f"<details><summary>{len(grid.outside)} other cell(s) hit, outside the cells the "
            f"generator targets (not in the heatmap)</summary><ul>{items}</ul></details>"
        )
    if coverage.families:
        rows = "".join(
            f'<tr><td>{escape(name)}</td><td class="num">{hits:,}</td></tr>'
            for name, hits in sorted(coverage.families.items(), key=lambda item: -item[1])
        )
        parts.append(
            "<h3>Instruction families</h3>\n"
            f"<table><tr><th>family</th><th>hits</th></tr>{rows}</table>"
        )
    return "\n".join(parts)


def _known(bucket: Bucket) -> str:
    if bucket.known is None:
        return ""
    text = escape(bucket.known.reason)
    link = bucket.known.link
    # Only web links become anchors: a javascript: or file: URL from a file is not followed.
    if link and urlsplit(link).scheme in ("http", "https"):
        text += f' (<a href="{escape(link)}" rel="noreferrer">link</a>)'
    elif link:
        text += f" ({escape(link)})"
    return text


def _files(bucket: Bucket, base: Path) -> str:
    links = []
    if bucket.example is not None:
        links.append(f'<a href="{_href(bucket.example, base)}">first example</a>')
    else:
        links.append("first example missing")
    if bucket.minimized is not None:
        links.append(f'<a href="{_href(bucket.minimized, base)}">minimized</a>')
    if bucket.further_examples:
        links.append(f"+{bucket.further_examples} newer")
    return "<br>".join(links)


def _buckets(campaign: Campaign, base: Path) -> str:
    title = f"<h2>Divergence buckets ({len(campaign.buckets)})</h2>"
    if not campaign.buckets:
        return title + "\n" + _missing("No divergences recorded.")
    header = "".join(
        f"<th>{name}</th>"
        for name in ("signature", "class", "count", "first seen", "last seen", "known", "files")
    )
    rows = []
    for bucket in campaign.buckets:
        css_class = "known" if bucket.known is not None else ""
        rows.append(
            f'<tr class="{css_class}">'
            f"<td>{escape(bucket.summary)}<br><code>{escape(bucket.id)}</code></td>"
            f'<td class="nowrap class-{escape(bucket.cls)}">{escape(bucket.cls)}</td>'
            f'<td class="num">{bucket.count:,}</td>'
            f"<td>{escape(format_utc(bucket.first_seen))}<br>case {bucket.first_index:,}</td>"
            f"<td>{escape(format_utc(bucket.last_seen))}<br>case {bucket.last_index:,}</td>"
            f"<td>{_known(bucket)}</td>"
            f'<td class="nowrap">{_files(bucket, base)}</td></tr>'
        )
    return f"{title}\n<table><tr>{header}</tr>\n" + "\n".join(rows) + "\n</table>"


def _problems(campaign: Campaign) -> str:
    if not campaign.problems:
        return ""
    items = "".join(f"<li>{escape(problem)}</li>" for problem in campaign.problems)
    return f'<div class="problems"><p>Some files could not be used:</p><ul>{items}</ul></div>'


def render_report(campaign: Campaign, *, out_dir: Path, now: float | None = None) -> str:
    """The whole page; links are relative to ``out_dir``, where the page will be written."""
    now = time.time() if now is None else now
    name = escape(str(campaign.directory))
    body = "\n".join(
        part
        for part in (
            "<h1>lassfuzz campaign report</h1>",
            f'<p class="meta">{name} · generated {escape(format_utc(now))}</p>',
            _problems(campaign),
            _summary(campaign, now),
            _progress(campaign),
            _coverage(campaign),
            _buckets(campaign, out_dir),
        )
        if part
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>lassfuzz report: {name}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )
