"""known.toml parsing: good entries load, anything unexpected is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from lassfuzz.campaign.files import InputError
from lassfuzz.campaign.known import Known, load_known


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "known.toml"
    path.write_text(text)
    return path


def test_entries_load_by_signature(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[known]]\nsignature = "abc"\nreason = "lazy flags"\nlink = "https://x"\n'
        '[[known]]\nsignature = "def"\nreason = "other"\n',
    )
    known = load_known(path)
    assert known == {"abc": Known("abc", "lazy flags", "https://x"), "def": Known("def", "other")}
    assert known["def"].to_dict() == {"reason": "other", "link": None}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[known]]\nsignature = "a"\nreason = "r"\nwhy = "x"\n', "unknown key(s) why"),
        ('[[known]]\nsignature = "a"\n', "'reason' must be a non-empty string"),
        ('[[known]]\nsignature = "a"\nreason = "r"\n' * 2, "listed twice"),
        ("[other]\n", "unknown top-level key(s) other"),
        ("[[known]\n", "not valid TOML"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_known(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_known(tmp_path / "nope.toml")
