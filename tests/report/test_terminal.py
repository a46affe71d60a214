"""``lassfuzz stats`` output: plain lines for pipes, rich tables for terminals, both escaped."""

from __future__ import annotations

import io
from pathlib import Path

from lassfuzz.report.summary import load_campaign
from lassfuzz.report.terminal import write_plain, write_rich
from tests.report.campaigns import BASE_ID, HOSTILE, LASS_ID, START


def test_plain_lines(campaign_dir: Path) -> None:
    out = io.StringIO()
    write_plain(load_campaign(campaign_dir), out, START + 7200)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"campaign {campaign_dir}"
    assert "Cases:                       720,000 (next index 720,000)" in lines
    assert "Worker restarts:             1" in lines
    assert "3 divergence bucket(s)" in lines
    bucket_lines = [line for line in lines if LASS_ID in line or BASE_ID in line]
    assert bucket_lines[0].split()[:2] == ["5,000", "lass"]
    assert bucket_lines[1].endswith(f"[known: {HOSTILE}]")
    assert "\x1b" not in out.getvalue()


def test_plain_lines_list_problems(campaign_dir: Path) -> None:
    (campaign_dir / "coverage.json").write_text("[")
    out = io.StringIO()
    write_plain(load_campaign(campaign_dir), out, START)
    assert out.getvalue().splitlines()[-1].startswith("problem: ")


def test_rich_tables_show_file_text_literally(campaign_dir: Path) -> None:
    out = io.StringIO()
    write_rich(load_campaign(campaign_dir), out, START + 7200)
    text = out.getvalue()
    assert "\x1b[" in text  # a terminal gets styling
    assert "720,000 (next index 720,000)" in text
    # "[bold]" in a signature is text, not rich markup, so it survives into the output.
    assert "[bold]" in text
    assert "3 divergence bucket(s)" in text
