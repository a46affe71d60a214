"""Atomic writes and strict reading of case and crash files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lassfuzz.campaign.files import InputError, load_file, write_atomic


def test_write_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "stats.json"
    write_atomic(target, "first")
    write_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(os.listdir(target.parent)) == ["stats.json"]


def test_write_atomic_gives_the_permissions_open_would(tmp_path: Path) -> None:
    # mkstemp creates 0600 files; a report or crash file must be readable like any other file.
    # The module reads the umask once, at import: compare with the process umask.
    mask = os.umask(0o022)
    os.umask(mask)
    write_atomic(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_write_atomic_interrupted_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "crash.json"
    write_atomic(target, "old")

    def broken_replace(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["crash.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "expected a JSON object"),
        ('{"version": 9, "code": {"bytes": "90"}}', "unsupported case format version 9"),
        ('{"format": "lassfuzz-crash", "version": 7}', "unsupported crash file version 7"),
        (
            '{"format": "lassfuzz-crash", "version": 1, '
            '"case": {"version": 1, "code": {"bytes": "90"}}}',
            "no valid 'signature'",
        ),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as raised:
        load_file(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_file(tmp_path / "absent.json")


def test_plain_case_file_loads_without_signature(tmp_path: Path) -> None:
    path = tmp_path / "case.json"
    path.write_text('{"version": 1, "code": {"bytes": "90"}}')
    loaded = load_file(path)
    assert loaded.crash is None and loaded.signature is None and loaded.case.code == b"\x90"
