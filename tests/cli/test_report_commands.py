"""``lassfuzz stats`` and ``lassfuzz report`` end to end: output, files written, exit codes."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lassfuzz.cli.main import EXIT_ERROR, EXIT_OK, cmd_stats, main
from tests.cli.test_main import ROOT, run_cli
from tests.report.campaigns import LASS_ID, build_campaign


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def campaign_dir(tmp_path: Path) -> Path:
    return build_campaign(tmp_path / "campaign")


def test_stats_plain_when_piped(campaign_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", str(campaign_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Cases/s:" in out
    assert LASS_ID in out
    assert "\x1b" not in out


def test_stats_rich_on_a_terminal(campaign_dir: Path) -> None:
    out = Terminal()
    args = argparse.Namespace(dir=campaign_dir, json=False)
    assert cmd_stats(args, out, io.StringIO()) == EXIT_OK
    assert "\x1b[" in out.getvalue()
    assert "Cases/s" in out.getvalue()


def test_stats_into_a_closed_pipe_is_quiet(campaign_dir: Path) -> None:
    """``lassfuzz stats DIR | head -1``: the reader leaving early is not an error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lassfuzz", "stats", str(campaign_dir)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command writes anything
    assert process.wait(timeout=120) == EXIT_OK
    assert process.stderr.read() == ""


def test_stats_json(campaign_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", str(campaign_dir), "--json"]) == EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert document["state"] == "final"
    assert document["unique_signatures"] == 3
    assert len(document["buckets"]) == 3


def test_report_writes_one_page(campaign_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.html"
    result = run_cli("report", str(campaign_dir), "-o", str(target))
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout == f"report: {target}\n"
    page = target.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "crashes/" + LASS_ID in page
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]  # no temporaries


@pytest.mark.parametrize("command", ["stats", "report"])
def test_not_a_campaign_exits_2_with_one_line(tmp_path: Path, command: str) -> None:
    result = run_cli(command, str(tmp_path), cwd=tmp_path)
    assert result.returncode == EXIT_ERROR
    assert result.stderr == (
        f"lassfuzz {command}: {tmp_path}: not a lassfuzz campaign directory (no stats.json)\n"
    )
    assert not (tmp_path / "report.html").exists()


def test_report_to_an_unwritable_place_exits_2(
    campaign_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["report", str(campaign_dir), "-o", str(blocker / "report.html")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("lassfuzz report: ")
    assert "cannot write" in err
    assert len(err.splitlines()) == 1
