"""From options to a campaign config: defaults, resume from campaign.json, known files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lassfuzz.campaign.files import InputError
from lassfuzz.campaign.fuzz import FuzzOptions, configure
from lassfuzz.campaign.supervisor import CampaignConfig


def record(out: Path, config: CampaignConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "campaign.json").write_text(json.dumps(config.fixed()))


def test_new_campaign_takes_given_values_and_defaults(tmp_path: Path) -> None:
    config = configure(FuzzOptions(tmp_path, seed=7, policy="none", cases=10, keep=2))
    assert (config.seed, config.policy, config.keep, config.cases) == (7, "none", 2, 10)
    assert config.trace is False and config.timeout_s == 10.0 and not config.resume


def test_resume_takes_the_recorded_values(tmp_path: Path) -> None:
    record(tmp_path, CampaignConfig(tmp_path, seed=7, policy="none", trace=True, keep=3))
    config = configure(FuzzOptions(tmp_path, resume=True, cases=50, policy="none"))
    assert (config.seed, config.policy, config.trace, config.keep) == (7, "none", True, 3)
    assert config.resume and config.cases == 50


def test_resume_refuses_a_contradiction(tmp_path: Path) -> None:
    record(tmp_path, CampaignConfig(tmp_path, seed=7, timeout_s=2.0))
    with pytest.raises(InputError, match=r"--seed 8 differs .* \(7\)"):
        configure(FuzzOptions(tmp_path, resume=True, seed=8))
    with pytest.raises(InputError, match=r"--timeout 3\.0 differs"):
        configure(FuzzOptions(tmp_path, resume=True, timeout_s=3.0))


def test_resume_without_a_campaign(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no campaign to resume"):
        configure(FuzzOptions(tmp_path, resume=True))


def test_known_from_the_directory_and_a_file(tmp_path: Path) -> None:
    (tmp_path / "known.toml").write_text(
        '[[known]]\nsignature = "a"\nreason = "dir"\n[[known]]\nsignature = "b"\nreason = "dir"\n'
    )
    extra = tmp_path / "extra.toml"
    extra.write_text('[[known]]\nsignature = "b"\nreason = "file"\n')
    known = configure(FuzzOptions(tmp_path, known=extra)).known
    assert {key: entry.reason for key, entry in known.items()} == {"a": "dir", "b": "file"}
