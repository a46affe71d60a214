"""From what the user asked to a :class:`~lassfuzz.campaign.supervisor.CampaignConfig`.

``lassfuzz fuzz`` options that are left out (``None``) take their defaults for a new campaign,
and the recorded values for ``--resume``; an option given on resume that contradicts
``campaign.json`` is an error rather than silently producing a different campaign (a case index
must keep meaning the same case). Known signatures come from ``DIR/known.toml`` and
``--known FILE`` (the latter wins for a signature listed in both).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lassfuzz.campaign.files import InputError
from lassfuzz.campaign.known import Known, load_known
from lassfuzz.campaign.supervisor import (
    DEFAULT_CHUNK_CASES,
    DEFAULT_EPOCH_CASES,
    CampaignConfig,
    read_campaign,
)
from lassfuzz.campaign.work import DEFAULT_CASE_TIMEOUT_S, DEFAULT_KEEP, DEFAULT_MAX_INSTRUCTIONS
from lassfuzz.generator.config import DEFAULT_CONFIG
from lassfuzz.policies import DEFAULT_POLICY


@dataclass(frozen=True)
class FuzzOptions:
    """``lassfuzz fuzz`` options; None means "not given"."""

    out: Path
    seed: int | None = None
    policy: str | None = None
    trace: bool | None = None
    max_instructions: int | None = None
    timeout_s: float | None = None
    keep: int | None = None
    cases: int | None = None
    duration_s: float | None = None
    stop_on_first: bool = False
    resume: bool = False
    known: Path | None = None


def configure(options: FuzzOptions) -> CampaignConfig:
    """The campaign to run; :class:`InputError` (one line) for contradictions and bad files."""
    given: dict[str, Any] = {
        "seed": options.seed,
        "policy": options.policy,
        "trace": options.trace,
        "max_instructions": options.max_instructions,
        "timeout_s": options.timeout_s,
        "keep": options.keep,
    }
    fixed: dict[str, Any] = {
        "seed": 1,
        "policy": DEFAULT_POLICY,
        "trace": False,
        "max_instructions": DEFAULT_MAX_INSTRUCTIONS,
        "timeout_s": DEFAULT_CASE_TIMEOUT_S,
        "keep": DEFAULT_KEEP,
        "generator": DEFAULT_CONFIG,
        "chunk_cases": DEFAULT_CHUNK_CASES,
        "epoch_cases": DEFAULT_EPOCH_CASES,
    }
    if options.resume:
        recorded = read_campaign(options.out)
        for name, value in given.items():
            if value is not None and value != recorded.get(name):
                raise InputError(
                    f"--{name.replace('_', '-').removesuffix('-s')} {value} differs from the "
                    f"campaign being resumed ({recorded.get(name)}); leave it out to resume"
                )
        fixed.update({name: recorded[name] for name in fixed if name in recorded})
    else:
        fixed.update({name: value for name, value in given.items() if value is not None})
    return CampaignConfig(
        out=options.out,
        cases=options.cases,
        duration_s=options.duration_s,
        stop_on_first=options.stop_on_first,
        resume=options.resume,
        known=_known(options),
        **fixed,
    )


def _known(options: FuzzOptions) -> Mapping[str, Known]:
    in_dir = options.out / "known.toml"
    known = dict(load_known(in_dir)) if in_dir.exists() else {}
    if options.known is not None:
        known.update(load_known(options.known))
    return known
