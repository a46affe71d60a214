"""The command line end to end: exit codes, files written, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lassfuzz.cli.main import main, parse_duration

ROOT = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lassfuzz`` as a user would (separate process, real exit code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lassfuzz", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
        check=False,
    )


def first_example(out: Path) -> Path:
    """The first example of the campaign's only bucket."""
    (bucket,) = (out / "crashes").iterdir()
    return bucket / f"crash-{bucket.name}.json"


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


def test_output_into_a_closed_pipe_is_quiet() -> None:
    """``lassfuzz matrix | head -1``: the reader leaving early is no error and no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lassfuzz", "matrix", "--reference-only"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().startswith("cpl0 ")
    process.stdout.close()  # long before the matrix's thousands of lines are written
    assert process.wait(timeout=120) == 0
    assert process.stderr.read() == ""


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
    crash = first_example(out)
    document = json.loads(crash.read_text())
    assert document["class"] == "lass"
    assert document["versions"]["policy"] == "none"
    assert crash.parent.name == document["signature"]["id"]

    assert run_cli("repro", str(crash), "--policy", "none").returncode == 1
    assert run_cli("repro", str(crash)).returncode == 0

    without_policy = run_cli("minimize", str(crash))  # the default policy finds nothing
    assert without_policy.returncode == 2
    assert "(found with --policy none)" in without_policy.stderr
    minimized = run_cli("minimize", str(crash), "--policy", "none")
    assert minimized.returncode == 1, minimized.stderr
    (small,) = sorted((out / "crashes").glob("*/crash-*.min.json"))
    assert small.parent == crash.parent
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
    assert stats["divergences_by_class"].get("lass", 0) == 0, stats
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
    crash = first_example(out)
    document = json.loads(crash.read_text())
    assert document["trace"] is True
    assert document["reference"]["trace"] is not None and document["emulator"]["trace"] is not None
    assert run_cli("repro", str(crash), "--policy", "none").returncode == 1


def read_stats(out: Path) -> dict[str, object]:
    document: dict[str, object] = json.loads((out / "stats.json").read_text())
    return document


@pytest.mark.slow
def test_fuzz_survives_a_native_crash_and_a_hang(tmp_path: Path) -> None:
    """Issue 5 acceptance: os.abort() in one case and an endless case; the campaign goes on."""
    from tests.campaign.faulty_policies import MISBEHAVE, consulted

    found = consulted(seed=1, count=600)
    abort_at, hang_at = found[len(found) // 4], found[-10]
    out = tmp_path / "run"
    result = run_cli(
        "fuzz", "--jobs", "2", "--cases", str(hang_at + 400), "--timeout", "2",
        "--policy", MISBEHAVE, "--out", str(out),
        env={"LASSFUZZ_TEST_ABORT_AT": str(abort_at), "LASSFUZZ_TEST_HANG_AT": str(hang_at)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # a tool crash is a finding
    stats = read_stats(out)
    assert stats["cases"] == stats["next_index"] == hang_at + 400
    assert stats["divergences_by_class"]["tool-crash"] == 1  # type: ignore[index]
    assert stats["hangs"] == 1 and stats["worker_restarts"] == 2 and stats["final"] is True
    (bucket,) = [
        json.loads(path.read_text())
        for path in (out / "crashes").glob("*/bucket.json")
        if json.loads(path.read_text())["class"] == "tool-crash"
    ]
    assert bucket["first_index"] == abort_at and "SIGABRT" in bucket["summary"]
    assert (out / "hangs" / f"hang-{hang_at}.json").exists()
    assert "tool-crash divergences: 1 (1 unique)" in result.stdout


@pytest.mark.slow
def test_sigint_stops_quickly_and_resume_continues(tmp_path: Path) -> None:
    """Issue 5 acceptance: SIGINT mid-campaign exits within 5 s with final statistics and no
    temporary files; --resume continues from next_index and counts every case once."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lassfuzz", "fuzz", "--jobs", "2", "--duration", "300"]
    process = subprocess.Popen(
        [*command, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "stats.json").exists() and read_stats(out)["cases"]:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the campaign wrote no statistics within 120 s")
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        process.wait(timeout=30)
        assert time.monotonic() - sent < 5
    finally:
        process.kill()
        process.communicate()
    stats = read_stats(out)
    assert stats["final"] is True and stats["cases"]
    assert not list(out.rglob("*.tmp"))
    target = int(stats["next_index"]) + 300  # type: ignore[call-overload]
    resumed = run_cli("fuzz", "--resume", "--cases", str(target), "--out", str(out))
    assert resumed.returncode in (0, 1), resumed.stderr
    final = read_stats(out)
    assert final["next_index"] == final["cases"] == target
    assert final["started"] == stats["started"]


@pytest.mark.slow
def test_jobs_do_not_change_what_is_found(tmp_path: Path) -> None:
    """Issue 5 acceptance: the same seed finds the same buckets and coverage with 1 or 2 jobs."""

    def campaign(jobs: str) -> tuple[object, ...]:
        out = tmp_path / f"jobs{jobs}"
        result = run_cli(
            "fuzz", "--jobs", jobs, "--cases", "2200", "--seed", "5", "--policy", "none",
            "--out", str(out),
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        stats = read_stats(out)
        buckets = {
            path.parent.name: json.loads(path.read_text())["count"]
            for path in (out / "crashes").glob("*/bucket.json")
        }
        coverage = json.loads((out / "coverage.json").read_text())
        counts = [stats[key] for key in ("cases", "compared", "skipped", "divergences")]
        return counts, buckets, coverage

    assert campaign("1") == campaign("2")
