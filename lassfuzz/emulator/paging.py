"""The 4- or 5-level page walk the Unicorn machine's TLB-fill hook performs (docs/machine.md,
Paging; 5 levels when CR4.LA57 = 1).

Unicorn's virtual-TLB mode leaves translation to us, so this walk *is* the emulator's MMU. It is
pure: it reads paging entries through a callable and returns what happened, including which
Accessed/Dirty bits the walk would set; the caller writes them back only for allowed accesses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from lassfuzz.arch import (
    CR0_WP,
    CR4_LA57,
    CR4_SMAP,
    CR4_SMEP,
    EFER_NXE,
    PFEC_I,
    PFEC_P,
    PFEC_RSVD,
    PFEC_U,
    PFEC_W,
    PTE_A,
    PTE_ADDR,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    RFLAGS_AC,
)

KINDS: Final = ("read", "write", "fetch")
_LEVEL_SHIFTS: Final = (39, 30, 21, 12)
_LA57_LEVEL_SHIFTS: Final = (48, *_LEVEL_SHIFTS)
_ENTRY_BYTES: Final = 8


class WalkUnsupported(Exception):
    """The page tables hold something the machine does not model (large page, stray frame)."""


@dataclass(frozen=True)
class MmuState:
    """The register bits that decide paging permissions for one access."""

    cpl: int
    cr0: int
    cr4: int
    rflags: int
    efer: int

    def supervisor_blocked_by_smap(self, *, implicit: bool = False) -> bool:
        """SMAP forbids supervisor data accesses to user pages (AC lifts it, except implicit)."""
        return bool(self.cr4 & CR4_SMAP) and (implicit or not self.rflags & RFLAGS_AC)


@dataclass(frozen=True)
class Walk:
    """A completed walk for one linear page.

    ``leaf`` is the leaf entry as found; ``leaf_address`` its physical address. ``error`` maps
    each access kind paging refuses to its #PF error code; ``accessed`` lists the non-leaf entry
    addresses whose A bit the walk sets (done even when the access then faults). A walk that
    stops at a non-present or reserved entry has ``leaf`` None and one error for every kind.
    """

    leaf: int | None
    leaf_address: int | None
    error: dict[str, int]
    accessed: tuple[int, ...]

    @property
    def frame(self) -> int:
        assert self.leaf is not None
        return self.leaf & PTE_ADDR

    def allows(self, kind: str) -> bool:
        return kind not in self.error

    def refreshed(self, read_entry: Callable[[int], int]) -> Walk:
        """This walk as a fresh walk of the same page under the same MMU state would find it
        now. During a case paging entries change only in their A/D bits (docs/machine.md), and
        nothing a walk decides (path, frame, permissions, error codes) depends on those bits:
        only the leaf as read and the non-leaf entries still without A can differ, and those
        are read again here."""
        accessed = tuple(address for address in self.accessed if not read_entry(address) & PTE_A)
        leaf = None if self.leaf_address is None else read_entry(self.leaf_address)
        if accessed == self.accessed and leaf == self.leaf:
            return self
        return Walk(leaf, self.leaf_address, self.error, accessed)


def walk(
    read_entry: Callable[[int], int],
    frame_known: Callable[[int], bool],
    cr3: int,
    page: int,
    mmu: MmuState,
) -> Walk:
    """Walk the paging structures at ``cr3`` (a PML5 when ``mmu.cr4`` has LA57, else a PML4)
    for linear ``page`` under ``mmu``.

    ``read_entry(physical_address)`` returns a u64 entry; ``frame_known(frame)`` says whether a
    frame belongs to the case image (anything else is :class:`WalkUnsupported`).
    """
    user_mode = mmu.cpl == 3
    nxe = bool(mmu.efer & EFER_NXE)
    fetch_bit = PFEC_I if nxe or mmu.cr4 & CR4_SMEP else 0
    base_code = PFEC_U if user_mode else 0
    table = cr3 & PTE_ADDR
    accessed: list[int] = []
    user = writable = True
    no_exec = False
    shifts = _LA57_LEVEL_SHIFTS if mmu.cr4 & CR4_LA57 else _LEVEL_SHIFTS
    for level, shift in enumerate(shifts):
        if not frame_known(table):
            raise WalkUnsupported(f"paging structure at {table:#x} is outside the case image")
        address = table + ((page >> shift) & 0x1FF) * _ENTRY_BYTES
        entry = read_entry(address)
        if not entry & PTE_P:
            return _refused(base_code, fetch_bit, accessed)
        # MAXPHYADDR is 52 here, so NX with EFER.NXE = 0 is the one reserved bit that faults;
        # a PS bit (large page, or reserved in the PML4E) is outside the case format.
        if entry & PTE_NX and not nxe:
            return _refused(base_code | PFEC_P | PFEC_RSVD, fetch_bit, accessed)
        leaf_level = level == len(shifts) - 1
        if entry & PTE_PS and not leaf_level:
            raise WalkUnsupported(f"large page (PS=1) in entry at {address:#x}")
        user &= bool(entry & PTE_US)
        writable &= bool(entry & PTE_RW)
        no_exec |= bool(entry & PTE_NX)
        if leaf_level:
            if not frame_known(entry & PTE_ADDR):
                raise WalkUnsupported(
                    f"page {page:#x} maps frame {entry & PTE_ADDR:#x} outside the image"
                )
            errors = _protection(
                mmu, user=user, writable=writable, no_exec=no_exec and nxe, code=base_code | PFEC_P
            )
            if fetch_bit and "fetch" in errors:
                errors["fetch"] |= fetch_bit
            return Walk(entry, address, errors, tuple(accessed))
        if not entry & PTE_A:
            accessed.append(address)
        table = entry & PTE_ADDR
    raise AssertionError("unreachable: the last level is a leaf")


def _refused(code: int, fetch_bit: int, accessed: list[int]) -> Walk:
    errors = {"read": code, "write": code | PFEC_W, "fetch": code | fetch_bit}
    return Walk(None, None, errors, tuple(accessed))


def _protection(
    mmu: MmuState, *, user: bool, writable: bool, no_exec: bool, code: int
) -> dict[str, int]:
    """#PF error codes for the kinds a present leaf refuses (U/S, R/W, NX, SMEP, SMAP, WP)."""
    errors: dict[str, int] = {}
    if mmu.cpl == 3:
        if not user:
            errors = {"read": code, "write": code | PFEC_W, "fetch": code}
        elif not writable:
            errors["write"] = code | PFEC_W
        if no_exec:
            errors.setdefault("fetch", code)
        return errors
    if user and mmu.supervisor_blocked_by_smap():
        errors["read"] = code
        errors["write"] = code | PFEC_W
    if not writable and mmu.cr0 & CR0_WP:
        errors.setdefault("write", code | PFEC_W)
    if no_exec or (user and mmu.cr4 & CR4_SMEP):
        errors["fetch"] = code
    return errors


def updated_leaf(leaf: int, kind: str) -> int:
    """The leaf entry after an allowed access of ``kind``: A set, and D for a write."""
    return leaf | PTE_A | (PTE_D if kind == "write" else 0)
