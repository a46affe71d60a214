"""The reader against the real writer: a short ``lassfuzz fuzz`` run, then ``stats`` and ``report``.

The hand-built fixture follows docs/campaign.md; this checks that what ``fuzz`` actually writes
reads the same way (every bucket shown, every link to an existing file, counters agreeing).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from lassfuzz.cli.main import EXIT_ERROR, EXIT_FOUND, EXIT_OK
from tests.cli.test_main import run_cli
from tests.report.test_html import Page, bucket_rows


@pytest.mark.slow
def test_report_on_a_real_campaign(tmp_path: Path) -> None:
    out = tmp_path / "campaign"
    fuzz = run_cli("fuzz", "--policy", "none", "--cases", "200", "--jobs", "1", "--out", str(out))
    # The `none` policy enforces nothing, so 200 cases find LASS divergences.
    assert fuzz.returncode == EXIT_FOUND, fuzz.stderr
    stats = run_cli("stats", str(out), "--json")
    assert stats.returncode == EXIT_OK, stats.stderr
    summary = json.loads(stats.stdout)
    assert summary["state"] == "final"
    assert summary["cases"] == 200
    buckets = sorted(path.parent.name for path in (out / "crashes").glob("*/bucket.json"))
    assert buckets
    assert sorted(bucket["id"] for bucket in summary["buckets"]) == buckets
    assert summary["problems"] == []

    target = tmp_path / "report.html"
    report = run_cli("report", str(out), "-o", str(target))
    assert report.returncode == EXIT_OK, report.stderr
    page = Page(target.read_text(encoding="utf-8"))
    assert len(bucket_rows(page)) == len(buckets)
    assert page.images  # at least the coverage heatmap
    relative = [link for link in page.links if not urlsplit(link).scheme]
    assert len(relative) >= len(buckets)
    assert all((tmp_path / unquote(link)).is_file() for link in relative)

    assert run_cli("stats", str(tmp_path)).returncode == EXIT_ERROR
