"""Displays: plain lines for pipes, a rich panel for terminals, both from stats.json."""

from __future__ import annotations

import io
from pathlib import Path

from lassfuzz.campaign.buckets import Bucket
from lassfuzz.campaign.display import LiveDisplay, PlainDisplay, progress_line
from lassfuzz.campaign.stats import Figures, Stats


def document(tmp_path: Path) -> dict[str, object]:
    stats = Stats(seed=1, policy="sdm", jobs=2)
    stats.cases = 1234
    stats.count_divergences("lass", 3, known=False)
    return stats.write(tmp_path, Figures({"lass": 1}, 5, 9), final=False)


BUCKET = Bucket("ab12", {}, "lass", "fault-vs-none [mov]", 3, 1.0, 1.0, 0, 9)


def test_plain_display_writes_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    display = PlainDisplay(stream)
    display.update(document(tmp_path))
    display.announce(BUCKET)
    display.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("cases 1234 ") and "lass 3" in lines[0] and "cells 5/9" in lines[0]
    assert lines[1] == "new lass divergence: fault-vs-none [mov]  (crashes/ab12/)"


def test_live_display_renders_the_same_figures(tmp_path: Path) -> None:
    stream = io.StringIO()
    display = LiveDisplay(stream)
    stats = document(tmp_path)
    display.update(stats)
    display.announce(BUCKET)
    display.close()
    text = stream.getvalue()
    assert "1,234" in text and "5 / 9" in text and "fault-vs-none [mov]" in text
    assert progress_line(stats).startswith("cases 1234")
