"""The report's matplotlib figures, rendered off-screen to PNG bytes.

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas rather than
through ``pyplot``: no global figure registry, no backend selection, nothing that needs a display,
and nothing left behind between calls.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Final

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from lassfuzz.report.cells import CoverageGrid
from lassfuzz.report.summary import PlotPoint, format_utc

DPI: Final = 100
#: Time-axis units: the first whose span fits under its limit is used.
_UNITS: Final = (
    (120.0, 1.0, "seconds"),
    (7200.0, 60.0, "minutes"),
    (float("inf"), 3600.0, "hours"),
)
_SMAP_AC_LABELS: Final = {
    (False, False): "–",
    (False, True): "AC",
    (True, False): "SMAP",
    (True, True): "SMAP+AC",
}


def compact_count(number: int) -> str:
    """``950``, ``12k``, ``3.4M``: hit counts that fit in a heatmap square."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if number >= limit:
            value = number / limit
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return str(number)


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def time_axis(points: Sequence[PlotPoint], started: float) -> tuple[list[float], str]:
    """x values in the largest unit that keeps the run's span readable, and the axis label.

    The axis is wall-clock time from the campaign's start, not ``elapsed_s``: elapsed time
    counts running time only, so the hours a campaign was stopped before ``--resume`` would
    vanish from the picture; on the wall clock they show as the gap they were.
    """
    start = min(started, points[0].unix_time)  # the first line comes one interval in
    span = points[-1].unix_time - start
    _, scale, unit = next(u for u in _UNITS if span < u[0])
    label = f"{unit} since the start ({format_utc(start)})"
    return [(p.unix_time - start) / scale for p in points], label


def time_series_png(
    points: Sequence[PlotPoint],
    value: str,
    *,
    started: float,
    title: str,
    ylabel: str,
    step: bool = False,
) -> bytes:
    """``value`` (a :class:`PlotPoint` field) against :func:`time_axis`; two points or more."""
    x, xlabel = time_axis(points, started)
    y = [getattr(p, value) for p in points]
    figure = Figure(figsize=(9, 3.2), layout="constrained")
    axes = figure.add_subplot()
    if step:
        axes.step(x, y, where="post", color="tab:red")
    else:
        axes.plot(x, y, color="tab:blue", marker="." if len(points) < 50 else None)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    return _png(figure)


def coverage_heatmap_png(grid: CoverageGrid) -> bytes:
    """Fraction of cells hit per (CPL, kind) × (half, SMAP, AC) group, annotated with
    hit/total cells and the group's total hits (where steering has been spending cases).

    Groups with no cells (a fetch cannot wrap around 2^64) are grey and unlabelled; groups
    with no cell hit at all get a colour of their own (dark, with white text), because "none"
    and "a few" call for different actions and would otherwise share the lowest bin.
    """
    fraction = np.full((len(grid.rows), len(grid.columns)), np.nan)
    figure = Figure(figsize=(13, 1.6 + 0.55 * len(grid.rows)), layout="constrained")
    axes = figure.add_subplot()
    for r, row in enumerate(grid.rows):
        for c, column in enumerate(grid.columns):
            group = grid.group(row, column)
            if group is None:
                continue
            fraction[r, c] = group.covered / group.cells
            label = f"{group.covered}/{group.cells}\n{compact_count(group.hits)} hits"
            colour = "white" if group.covered == 0 else "black"
            axes.text(c, r, label, ha="center", va="center", fontsize=8, color=colour)
    colours = ListedColormap(
        ["#d7301f", "#fc8d59", "#fdcc8a", "#d9ef8b", "#91cf60", "#1a9850"]
    ).with_extremes(bad="#dddddd", under="#67000d")
    # vmin just above 0 sends exactly-0 groups to the "under" colour.
    image = axes.imshow(
        np.ma.masked_invalid(fraction), cmap=colours, vmin=1e-9, vmax=1, aspect="auto"
    )
    axes.set_yticks(range(len(grid.rows)), [f"CPL{cpl} {kind}" for cpl, kind in grid.rows])
    axes.set_xticks(range(len(grid.columns)), [_SMAP_AC_LABELS[(s, a)] for _, s, a in grid.columns])
    halves = list(dict.fromkeys(half for half, _, _ in grid.columns))
    per_half = len(grid.columns) // len(halves)
    for boundary in range(per_half, len(grid.columns), per_half):
        axes.axvline(boundary - 0.5, color="white", linewidth=4)
    for r in range(1, len(grid.rows)):
        if grid.rows[r][0] != grid.rows[r - 1][0]:  # a new CPL starts
            axes.axhline(r - 0.5, color="white", linewidth=4)
    top = axes.secondary_xaxis("top")
    top.set_xticks([h * per_half + (per_half - 1) / 2 for h in range(len(halves))], halves)
    top.tick_params(length=0)
    axes.set_title(
        "Decision cells hit per group (cells hit/cells, case hits; other flags aggregated)"
    )
    figure.colorbar(
        image, ax=axes, label="fraction of cells hit (below: none)", fraction=0.03, extend="min"
    )
    return _png(figure)
