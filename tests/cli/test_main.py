"""The command line end to end: exit codes, files written, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lassfuzz.cli.main import main, parse_duration

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lassfuzz`` as a user would (separate process, real exit code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lassfuzz", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
        check=False,
    )


def test_parse_duration_units() -> None:
    assert parse_duration("600") == 600
    assert parse_duration("10m") == 600
    assert parse_duration("8h") == 8 * 3600
    assert parse_duration("1.5s") == 1.5


def test_bad_duration_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["fuzz", "--duration", "eight hours"])
    assert exited.value.code == 2
    assert "invalid duration" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{broken", "not valid JSON"),
        ('{"version": 99, "code": {"bytes": "90"}}', "unsupported case format version 99"),
    ],
)
def test_bad_files_exit_2_with_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    for command in ("repro", "show", "minimize"):
        result = run_cli(command, str(path))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("repro", str(tmp_path / "nope.json"))
    assert result.returncode == 2 and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_policy_exits_2(tmp_path: Path) -> None:
    result = run_cli("fuzz", "--cases", "1", "--out", str(tmp_path), "--policy", "no.such:thing")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no.such" in result.stderr


def test_unwritable_output_directory_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("fuzz", "--cases", "5", "--out", str(blocker / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_policy_none_campaign_finds_repro_minimizes_and_shows(tmp_path: Path) -> None:
    """The issue's acceptance path: fuzz → repro (both policies) → minimize → show."""
    out = tmp_path / "run"
    fuzz = run_cli(
        "fuzz",
        "--policy",
        "none",
        "--stop-on-first",
        "--duration",
        "60",
        "--out",
        str(out),
        "--seed",
        "7",
    )
    assert fuzz.returncode == 1, fuzz.stdout + fuzz.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["divergences"] >= 1 and stats["unique_signatures"] == 1
    (crash,) = sorted((out / "crashes").glob("crash-*.json"))
    document = json.loads(crash.read_text())
    assert document["class"] == "lass"
    assert document["versions"]["policy"] == "none"
    assert crash.name == f"crash-{document['signature']['id']}.json"

    assert run_cli("repro", str(crash), "--policy", "none").returncode == 1
    assert run_cli("repro", str(crash)).returncode == 0

    minimized = run_cli("minimize", str(crash), "--policy", "none")
    assert minimized.returncode == 1, minimized.stderr
    (small,) = sorted((out / "crashes").glob("crash-*.min.json"))
    small_doc = json.loads(small.read_text())
    assert small_doc["signature"] == document["signature"]
    from lassfuzz.campaign.files import load_file
    from lassfuzz.cli.show import disassemble

    instructions = disassemble(load_file(small).case)[:-1]  # last line marks the end of code
    assert 1 <= len(instructions) <= 2, instructions
    assert run_cli("repro", str(small), "--policy", "none").returncode == 1

    shown = run_cli("show", str(small))
    assert shown.returncode == 0
    assert "FIRST DIVERGENCE" in shown.stdout and "reference" in shown.stdout
    assert not list(out.rglob("*.tmp"))


def test_default_policy_short_campaign_writes_stats(tmp_path: Path) -> None:
    result = run_cli("fuzz", "--cases", "300", "--out", str(tmp_path), "--seed", "3")
    assert result.returncode in (0, 1), result.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["cases"] == 300 and stats["final"] is True
    assert stats["compared"] > 150, stats
    assert stats["divergences_by_class"].get("lass", 0) == 0, stats["signatures"]
    assert "cases/s" in result.stdout


def test_trace_mode_is_recorded_and_replayed(tmp_path: Path) -> None:
    out = tmp_path / "traced"
    fuzz = run_cli(
        "fuzz",
        "--policy",
        "none",
        "--trace",
        "--stop-on-first",
        "--duration",
        "60",
        "--out",
        str(out),
        "--seed",
        "7",
    )
    assert fuzz.returncode == 1, fuzz.stderr
    (crash,) = sorted((out / "crashes").glob("crash-*.json"))
    document = json.loads(crash.read_text())
    assert document["trace"] is True
    assert document["reference"]["trace"] is not None and document["emulator"]["trace"] is not None
    assert run_cli("repro", str(crash), "--policy", "none").returncode == 1
