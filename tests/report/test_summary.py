"""Reading a campaign directory: what is required, what is optional, what is a problem."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from lassfuzz.campaign.files import InputError
from lassfuzz.report.summary import (
    PLOT_COLUMNS,
    STALE_AFTER_S,
    PlotPoint,
    campaign_state,
    format_duration,
    load_campaign,
    since_last_new_signature,
    summary_json,
    summary_lines,
)
from tests.report.campaigns import (
    BASE_ID,
    CELLS,
    HIT_CELLS,
    HOSTILE,
    LASS_ID,
    START,
    TOOL_ID,
    stats_document,
)


def test_reads_every_part_of_a_campaign(campaign_dir: Path) -> None:
    campaign = load_campaign(campaign_dir)
    assert campaign.stats.cases == 720_000
    assert dict(campaign.stats.divergences_by_class) == {"lass": 5000, "base": 3, "tool-crash": 1}
    # 20 complete lines; the unterminated last line is a write in progress and is ignored.
    assert len(campaign.plot) == 20
    assert campaign.plot[-1].cases == 720_000
    assert campaign.coverage is not None
    assert campaign.coverage.families["mov"] == 400_000
    assert campaign.hang_files == 1
    assert campaign.problems == ()


def test_buckets_unknown_first_then_by_count(campaign_dir: Path) -> None:
    buckets = load_campaign(campaign_dir).buckets
    assert [b.id for b in buckets] == [LASS_ID, BASE_ID, TOOL_ID]
    lass, base, tool = buckets
    assert lass.example == campaign_dir / "crashes" / LASS_ID / f"crash-{LASS_ID}.json"
    # Found on disk although bucket.json says "minimized": null (minimize does not update it).
    assert lass.minimized == campaign_dir / "crashes" / LASS_ID / f"crash-{LASS_ID}.min.json"
    assert lass.further_examples == 2
    assert lass.known is None
    assert tool.known is not None
    assert tool.known.link == "https://example.org/bug/1"
    # known.toml marks the base bucket known although bucket.json does not.
    assert base.known is not None
    assert base.known.reason == HOSTILE
    assert base.minimized is None


def test_recorded_minimized_name_cannot_leave_the_bucket(campaign_dir: Path) -> None:
    path = campaign_dir / "crashes" / BASE_ID / "bucket.json"
    document = json.loads(path.read_text())
    document["minimized"] = "../../stats.json"
    path.write_text(json.dumps(document))
    base = next(b for b in load_campaign(campaign_dir).buckets if b.id == BASE_ID)
    assert base.minimized is None


def test_optional_files_may_be_missing(campaign_dir: Path) -> None:
    for name in ("plot_data.csv", "coverage.json", "known.toml"):
        (campaign_dir / name).unlink()
    for directory in ("crashes", "hangs"):
        for path in sorted((campaign_dir / directory).rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    campaign = load_campaign(campaign_dir)
    assert campaign.plot == ()
    assert campaign.coverage is None
    assert campaign.buckets == ()
    assert campaign.hang_files == 0
    assert campaign.problems == ()


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("coverage.json", "{", "coverage.json: not valid JSON"),
        ("coverage.json", '{"cells": {"x": "many"}}', "'cells' should be an object of integer"),
        ("plot_data.csv", "time,cases\n1,2\n", "plot_data.csv: unexpected header"),
        ("known.toml", "[[known]]\nsignature = 'x'\n", "'reason' must be a non-empty string"),
        (f"crashes/{LASS_ID}/bucket.json", '{"id": 1}', "bucket.json: 'id' should be a string"),
        (f"crashes/{LASS_ID}/bucket.json", '{"id": "../x"}', "id '../x' is not its directory"),
        (f"crashes/{TOOL_ID}/bucket.json", None, f"{TOOL_ID}: no bucket.json"),
    ],
)
def test_damaged_optional_files_are_problems_not_errors(
    campaign_dir: Path, name: str, content: str | None, problem: str
) -> None:
    if content is None:
        (campaign_dir / name).unlink()
    else:
        (campaign_dir / name).write_text(content)
    campaign = load_campaign(campaign_dir)
    assert len(campaign.problems) == 1
    assert problem in campaign.problems[0]


def test_plot_points_have_the_writers_columns() -> None:
    assert tuple(field.name for field in fields(PlotPoint)) == PLOT_COLUMNS


def test_malformed_plot_lines_are_skipped_and_counted(campaign_dir: Path) -> None:
    path = campaign_dir / "plot_data.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = "1,2,three\n"
    lines[5] = "nan,0,0,0,0,0,0,0,0\n"
    path.write_text("".join(lines[:-1]))  # also drop the unterminated line
    campaign = load_campaign(campaign_dir)
    assert len(campaign.plot) == 18
    assert campaign.problems == (f"{path}: skipped 2 malformed line(s), first line 4",)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such directory"),
        ("empty", "not a lassfuzz campaign directory (no stats.json)"),
        ("starting", "the campaign has not written stats.json yet"),
        ("{", "not valid JSON"),
        ('{"cases": 1}', "not a lassfuzz statistics file"),
        ('{"format": "lassfuzz-stats", "version": 2}', "unsupported statistics version 2"),
    ],
)
def test_not_a_campaign_is_one_clear_error(tmp_path: Path, setup: str, message: str) -> None:
    directory = tmp_path / "dir"
    if setup != "missing":
        directory.mkdir()
    if setup == "starting":
        (directory / "campaign.json").write_text("{}")
    elif setup not in ("missing", "empty"):
        (directory / "stats.json").write_text(setup)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_campaign(directory)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cases": True}, "'cases' should be an integer, not True"),
        ({"cases_per_sec": "fast"}, "'cases_per_sec' should be a number"),
        ({"final": 1}, "'final' should be true or false"),
        ({"divergences_by_class": {"lass": 1.5}}, "'divergences_by_class' should be an object"),
    ],
)
def test_bad_stats_fields_name_the_key(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    (tmp_path / "stats.json").write_text(json.dumps(stats_document(**change)))
    with pytest.raises(InputError, match=message):
        load_campaign(tmp_path)


def test_missing_stats_field_names_the_key(tmp_path: Path) -> None:
    document = stats_document()
    del document["hangs"]
    (tmp_path / "stats.json").write_text(json.dumps(document))
    with pytest.raises(InputError, match=r"stats.json: missing 'hangs'"):
        load_campaign(tmp_path)


def test_state_final_running_stale(tmp_path: Path) -> None:
    updated = START + 3600
    (tmp_path / "stats.json").write_text(json.dumps(stats_document(final=False)))
    stats = load_campaign(tmp_path).stats
    assert campaign_state(stats, updated + 5) == "running"
    assert campaign_state(stats, updated + STALE_AFTER_S + 1) == "stale"
    # While running, the time since the last new signature keeps growing; once stale it stops
    # at the last update (nothing ran after it).
    assert since_last_new_signature(stats, updated + 5) == 3005
    assert since_last_new_signature(stats, updated + 10_000) == 3000
    campaign = load_campaign(tmp_path)
    assert summary_lines(campaign, updated + 5)[0].value == "running (updated 5.0s ago)"
    assert summary_lines(campaign, updated + 7200)[0].value == (
        "stopped without final statistics? no update for 2h 00m (--resume continues it)"
    )
    (tmp_path / "stats.json").write_text(json.dumps(stats_document(last_new_signature=None)))
    final = load_campaign(tmp_path).stats
    assert campaign_state(final, updated + 10_000) == "final"
    assert since_last_new_signature(final, updated) is None


def test_summary_lines(campaign_dir: Path) -> None:
    lines = {
        line.label: line.value for line in summary_lines(load_campaign(campaign_dir), START + 1e6)
    }
    assert lines["State"] == "finished (final statistics)"
    assert lines["Started"] == "2025-11-24 16:00:00 UTC"
    assert lines["Run time"] == "1h 00m"
    assert lines["Divergences"] == "5,004 (lass 5,000, base 3, tool-crash 1); 4 known"
    assert lines["Decision cells covered"] == f"{len(HIT_CELLS)} / {len(CELLS)} (33%)"
    assert lines["Since last new signature"] == "50m 00s"
    assert lines["Hangs"] == "1 (1 in hangs/)"


def test_summary_json_is_plain_json(campaign_dir: Path) -> None:
    document = json.loads(json.dumps(summary_json(load_campaign(campaign_dir), START + 1e6)))
    assert document["state"] == "final"
    assert document["cases"] == 720_000
    assert document["divergences_by_class"]["lass"] == 5000
    assert [b["id"] for b in document["buckets"]] == [LASS_ID, BASE_ID, TOOL_ID]
    assert document["buckets"][1]["known"]["reason"] == HOSTILE


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "0.2s"),
        (59.9, "59.9s"),
        (61, "1m 01s"),
        (3600 * 8 + 125, "8h 02m"),
        (90000, "1d 01h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
