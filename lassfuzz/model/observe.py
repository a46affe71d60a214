"""An optional observer of a reference-model run: the hook coverage measurement hangs on.

``ReferenceModel(observer=...)`` calls :meth:`Observer.instruction` for every instruction it
starts and :meth:`Observer.access` for every access that reaches the LASS check (after the
canonical check, with the inputs of :func:`lassfuzz.model.lass.check_access`). The model never
reads anything back, so an observer cannot change an outcome; without one the model pays a
single ``is None`` test per instruction and per LASS check.

Fetches are reported as the model checks them: once per code page and MMU state (the model
caches the check per page, ``LinearMemory.fetch_page``), with ``size`` running to the end of
that page; the page's first fetched address is ``address``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lassfuzz.model.decode import Decoded
    from lassfuzz.model.lass import Kind
    from lassfuzz.model.state import Cpu


class Observer(Protocol):
    """What the model reports. ``cpu`` is the live state: read it during the call, never keep
    it or write to it."""

    def instruction(self, decoded: Decoded) -> None:
        """An instruction was fetched and decoded and is about to execute (it may fault)."""
        ...

    def access(
        self, cpu: Cpu, address: int, size: int, kind: Kind, *, implicit: bool, stack: bool
    ) -> None:
        """An access of ``size`` bytes at linear ``address`` is about to be LASS-checked."""
        ...
