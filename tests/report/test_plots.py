"""The figures are real PNGs of the expected size, and the time axis picks a readable unit."""

from __future__ import annotations

import struct

import pytest

from lassfuzz.campaign.coverage import REACHABLE_CELLS
from lassfuzz.report.cells import coverage_grid
from lassfuzz.report.plots import compact_count, coverage_heatmap_png, time_axis, time_series_png
from lassfuzz.report.summary import PlotPoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_MAGIC)
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk comes first
    return width, height


def points(times: list[float]) -> list[PlotPoint]:
    return [
        PlotPoint(t, t - times[0], 10.0 * i, 5.0, 0, min(i, 2), i, 0, 0)
        for i, t in enumerate(times)
    ]


@pytest.mark.parametrize(
    ("started", "times", "xs", "unit"),
    [
        # The first plot line comes one interval after the start: the axis starts at the start.
        (1000.0, [1002.0, 1030.0, 1090.0], [2.0, 30.0, 90.0], "seconds"),
        (0.0, [0.0, 600.0, 3600.0], [0.0, 10.0, 60.0], "minutes"),
        # A resumed run: the stopped hours stay a gap on the wall-clock axis.
        (0.0, [0.0, 3600.0, 36000.0], [0.0, 1.0, 10.0], "hours"),
    ],
)
def test_time_axis(started: float, times: list[float], xs: list[float], unit: str) -> None:
    values, label = time_axis(points(times), started)
    assert values == xs
    clock = f"00:{int(started) // 60:02d}:{int(started) % 60:02d}"
    assert label == f"{unit} since the start (1970-01-01 {clock} UTC)"


@pytest.mark.parametrize("step", [False, True])
def test_time_series_is_a_png(step: bool) -> None:
    png = time_series_png(
        points([0.0, 2.0, 4.0]), "unique_signatures", started=0.0, title="t", ylabel="y", step=step
    )
    assert png_size(png) == (900, 320)


def test_heatmap_is_a_png() -> None:
    grid = coverage_grid(dict.fromkeys(sorted(REACHABLE_CELLS)[::2], 1))
    width, height = png_size(coverage_heatmap_png(grid))
    assert width == 1300
    assert height == int(100 * (1.6 + 0.55 * len(grid.rows)))


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1.0k"),
        (12_345, "12k"),
        (3_400_000, "3.4M"),
        (20 * 10**9, "20G"),
    ],
)
def test_compact_hit_counts(number: int, text: str) -> None:
    assert compact_count(number) == text
