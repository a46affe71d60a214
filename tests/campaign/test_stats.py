"""Statistics: next_index over out-of-order chunks, stats.json, plot_data.csv, resume."""

from __future__ import annotations

import json
from pathlib import Path

from lassfuzz.campaign.stats import PLOT_HEADER, Figures, Stats

FIGURES = Figures({"lass": 2, "base": 1}, cells_covered=7, cells_total=10)


def test_next_index_waits_for_the_lowest_unfinished_range() -> None:
    stats = Stats(seed=1, policy="sdm", jobs=2)
    stats.mark_finished(10, 20)
    assert stats.next_index == 0 and stats.is_finished(15) and not stats.is_finished(5)
    stats.mark_finished(0, 10)
    assert stats.next_index == 20 and stats.finished == {}
    stats.mark_finished(21, 22)
    assert stats.next_index == 20 and stats.is_finished(21)


def test_stats_file_and_plot_lines(tmp_path: Path) -> None:
    stats = Stats(seed=4, policy="none", jobs=2)
    stats.cases, stats.compared = 100, 90
    stats.count_divergences("lass", 5, known=False)
    stats.count_divergences("base", 2, known=True)
    document = stats.write(tmp_path, FIGURES, final=False)
    stats.cases = 150
    stats.write(tmp_path, FIGURES, final=True)
    written = json.loads((tmp_path / "stats.json").read_text())
    assert written["final"] is True and written["cases"] == 150
    assert written["divergences"] == 7 and written["known_divergences"] == 2
    assert written["divergences_by_class"] == {"lass": 5, "base": 2}
    assert written["unique_signatures"] == 3 and written["cells_total"] == 10
    assert document["final"] is False
    lines = (tmp_path / "plot_data.csv").read_text().splitlines()
    assert lines[0] == PLOT_HEADER and len(lines) == 3
    assert [line.split(",")[2] for line in lines[1:]] == ["100", "150"]
    assert all(len(line.split(",")) == len(PLOT_HEADER.split(",")) for line in lines)


def test_resume_keeps_counters_and_finished_ranges(tmp_path: Path) -> None:
    stats = Stats(seed=4, policy="none", jobs=2, started=1000.0)
    stats.cases, stats.hangs, stats.worker_restarts = 300, 2, 1
    stats.mark_finished(0, 256)
    stats.mark_finished(384, 512)
    stats.steering = {"epoch_cases": 8}
    stats.bucket_counts = {"ab": 3}
    stats.write(tmp_path, FIGURES, final=True)

    resumed = Stats.resume(tmp_path / "stats.json", jobs=1)
    assert (resumed.cases, resumed.hangs, resumed.worker_restarts) == (300, 2, 1)
    assert resumed.started == 1000.0 and resumed.next_index == 256
    assert resumed.is_finished(400) and not resumed.is_finished(300)
    assert resumed.steering == {"epoch_cases": 8} and resumed.bucket_counts == {"ab": 3}
    assert resumed.cases_per_sec() == 0.0  # this run has not run anything yet
