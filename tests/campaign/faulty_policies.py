"""Test-only shim policies that misbehave on exactly one case, to exercise worker isolation.

The case indices come from the environment (workers inherit it): ``LASSFUZZ_TEST_ABORT_AT``
makes the policy abort the process (a native crash, as Unicorn's C code could), and
``LASSFUZZ_TEST_HANG_AT`` makes it sleep forever (an endless case). Used as
``--policy tests.campaign.faulty_policies:misbehave``. The shim asks a policy only in some
cases (CR4.LASS set, a TLB fill), so tests pick the indices with :func:`consulted`.
"""

from __future__ import annotations

import os
import time

from lassfuzz.campaign.work import Chunk, ChunkRunner, running_index
from lassfuzz.policies import PolicyAccess, sdm

MISBEHAVE = "tests.campaign.faulty_policies:misbehave"
_consulted: set[int] = set()


def _index(variable: str) -> int | None:
    value = os.environ.get(variable)
    return None if value is None else int(value)


def misbehave(access: PolicyAccess) -> bool:
    index = running_index()
    if index == _index("LASSFUZZ_TEST_ABORT_AT"):
        os.abort()
    if index == _index("LASSFUZZ_TEST_HANG_AT"):
        time.sleep(3600)
    return sdm(access)


def record(access: PolicyAccess) -> bool:
    _consulted.add(running_index())
    return sdm(access)


def consulted(seed: int, count: int) -> list[int]:
    """The indices below ``count`` whose case makes the shim ask the policy (run in-process)."""
    _consulted.clear()
    ChunkRunner().run(Chunk(seed=seed, start=0, count=count, policy=f"{__name__}:record"))
    return sorted(_consulted)
