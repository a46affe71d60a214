"""Fixtures for the report tests: a hand-built campaign directory (see campaigns.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.campaigns import build_campaign


@pytest.fixture
def campaign_dir(tmp_path: Path) -> Path:
    return build_campaign(tmp_path / "campaign")
