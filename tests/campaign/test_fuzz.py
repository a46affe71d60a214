"""The campaign loop with stand-in engines: dedup, stats, health check, stop-on-first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lassfuzz.arch import CR4_LASS, RFLAGS_FIXED1, VEC_GP
from lassfuzz.campaign.fuzz import Campaign, CampaignConfig, HealthCheckError
from lassfuzz.case import TestCase
from lassfuzz.compare.differential import Differential
from lassfuzz.outcome import Fault, Outcome, Registers, Status


def registers(case: TestCase) -> Registers:
    state = case.state
    return Registers(
        gprs=state.gprs,
        rip=case.code_end,
        rflags=RFLAGS_FIXED1,
        cr0=state.cr0,
        cr3=0x1000,
        cr4=state.cr4,
        efer=state.efer,
        cpl=state.cpl,
        fs_base=state.fs_base,
        gs_base=state.gs_base,
    )


class StandIn:
    """An engine whose verdict is a function of the case, to drive the loop deterministically."""

    def __init__(self, name: str, *, faults_when_lass: bool, unsupported: bool = False) -> None:
        self.name = name
        self.faults_when_lass = faults_when_lass
        self.unsupported = unsupported
        self.runs = 0

    def run(self, case: TestCase, *, trace: bool = False) -> Outcome:
        self.runs += 1
        if self.unsupported:
            return Outcome(self.name, Status.UNSUPPORTED, detail="stand-in cannot run anything")
        if self.faults_when_lass and case.state.cr4 & CR4_LASS and case.state.cpl == 3:
            fault = Fault(VEC_GP, 0, case.code_address, access="read", address=1 << 63)
            return Outcome(self.name, Status.FAULT, registers(case), fault)
        return Outcome(self.name, Status.COMPLETED, registers(case))


def campaign(tmp_path: Path, emulator: StandIn, **config: object) -> Campaign:
    reference = StandIn("model", faults_when_lass=True)
    settings = {"out": tmp_path, "seed": 5, "cases": 300, **config}
    return Campaign(CampaignConfig(**settings), Differential(reference, emulator))  # type: ignore[arg-type]


def test_one_bug_hit_many_times_makes_one_crash_file(tmp_path: Path) -> None:
    stats = campaign(tmp_path, StandIn("unicorn", faults_when_lass=False)).run()
    assert stats.divergences > 1
    crashes = list((tmp_path / "crashes").glob("crash-*.json"))
    assert len(crashes) == len(stats.signatures) < stats.divergences
    document = json.loads(crashes[0].read_text())
    assert document["class"] == "lass"  # disappears when LASS is disabled on both sides
    assert document["seed"] == 5 and isinstance(document["index"], int)
    written = json.loads((tmp_path / "stats.json").read_text())
    assert written["final"] and written["cases"] == 300
    assert written["divergences"] == stats.divergences
    assert sum(e["count"] for e in written["signatures"].values()) == stats.divergences


def test_agreeing_engines_find_nothing_and_keep_corpus(tmp_path: Path) -> None:
    stats = campaign(tmp_path, StandIn("unicorn", faults_when_lass=True)).run()
    assert stats.divergences == 0 and stats.compared == 300
    assert list((tmp_path / "corpus").glob("case-*.json"))
    assert not list((tmp_path / "crashes").glob("*.json"))


def test_stop_on_first(tmp_path: Path) -> None:
    stats = campaign(tmp_path, StandIn("unicorn", faults_when_lass=False), stop_on_first=True).run()
    assert stats.divergences == 1


def test_nothing_compared_fails_the_health_check(tmp_path: Path) -> None:
    with pytest.raises(HealthCheckError, match="only 0 of 200"):
        campaign(tmp_path, StandIn("unicorn", faults_when_lass=True, unsupported=True)).run()
    assert json.loads((tmp_path / "stats.json").read_text())["final"] is True
