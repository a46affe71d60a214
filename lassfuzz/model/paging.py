"""4- and 5-level paging: the walk, Accessed/Dirty updates and #PF error codes (SDM Vol. 3A 4.5-4.7,
docs/machine.md "Paging details").

The walk is split in two: :func:`walk` finds the leaf (setting non-leaf Accessed bits) and is
cached per linear page, because cases never write page tables except through A/D updates
(docs/machine.md "TLB"); :func:`translate` checks the rights of one access against it and sets
the leaf's A/D bits only when the access is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from lassfuzz.arch import (
    CR0_WP,
    CR4_LA57,
    CR4_SMAP,
    CR4_SMEP,
    EFER_NXE,
    PAGE_MASK,
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
    VEC_PF,
)
from lassfuzz.model.faults import CpuFault, Unsupported
from lassfuzz.model.physical import PhysicalMemory

_LEVELS: Final = ((39, "PML4E"), (30, "PDPTE"), (21, "PDE"), (12, "PTE"))
#: 5-level paging adds the PML5 above the PML4 (SDM Vol. 3A 4.5.1, CR4.LA57 = 1).
_LEVELS57: Final = ((48, "PML5E"), *_LEVELS)


@dataclass(frozen=True)
class Translation:
    """A linear page's leaf: its frame, the leaf entry's physical address, and the combined
    rights (U/S and R/W are the AND over all levels, NX the OR: SDM Vol. 3A 4.6.1)."""

    frame: int
    leaf: int
    user: bool
    writable: bool
    nx: bool


class _WalkFault(Exception):
    """The walk stopped: a non-present entry (error bits 0) or a reserved bit (RSVD | P)."""

    def __init__(self, error_bits: int, reason: str) -> None:
        super().__init__(reason)
        self.error_bits = error_bits
        self.reason = reason


def walk(
    phys: PhysicalMemory, cr3: int, page: int, efer: int, *, la57: bool = False, mark: bool = True
) -> Translation:
    """Walk the 4-level (5-level with ``la57``) tables for linear ``page``; sets the A bit of
    each present non-leaf entry in order, even when a later level faults (docs/machine.md
    "Paging details"). ``mark=False`` walks without writing anything: the trusted reads of the
    initial descriptor tables (docs/machine.md "Descriptor tables", Start)."""
    table = cr3 & PTE_ADDR
    user = writable = True
    nx = False
    entry_address = table
    for shift, name in _LEVELS57 if la57 else _LEVELS:
        entry_address = table + ((page >> shift) & 0x1FF) * 8
        entry = phys.read_u64(entry_address)
        if not entry & PTE_P:
            raise _WalkFault(0, f"{name} not present")
        # SDM 4.5.4: XD (bit 63) is reserved unless IA32_EFER.NXE = 1 -> RSVD #PF.
        if entry & PTE_NX and not efer & EFER_NXE:
            raise _WalkFault(PFEC_RSVD | PFEC_P, f"{name} has bit 63 set while EFER.NXE = 0")
        if shift != 12 and entry & PTE_PS:
            raise Unsupported(f"{name} at {entry_address:#x} maps a large page (PS = 1)")
        user = user and bool(entry & PTE_US)
        writable = writable and bool(entry & PTE_RW)
        nx = nx or bool(entry & PTE_NX)
        if mark and shift != 12 and not entry & PTE_A:
            phys.write_u64(entry_address, entry | PTE_A)
        table = entry & PTE_ADDR
    phys.frame(table)  # a leaf pointing outside the image is unsupported, not a fault
    return Translation(frame=table, leaf=entry_address, user=user, writable=writable, nx=nx)


def _denied(
    t: Translation,
    *,
    write: bool,
    fetch: bool,
    user: bool,
    implicit: bool,
    cr0: int,
    cr4: int,
    efer: int,
    rflags: int,
) -> str | None:
    """Why the page's rights forbid this access (SDM Vol. 3A 4.6.1), or None."""
    if user:
        if not t.user:
            return "user-mode access to a supervisor page"
        if write and not t.writable:
            return "user-mode write to a read-only page"
    elif fetch:
        if t.user and cr4 & CR4_SMEP:
            return "supervisor fetch from a user page with CR4.SMEP = 1"
    elif t.user and cr4 & CR4_SMAP and (implicit or not rflags & RFLAGS_AC):
        return "supervisor data access to a user page with CR4.SMAP = 1 (SMAP)"
    if not user and write and not t.writable and cr0 & CR0_WP:
        return "supervisor write to a read-only page with CR0.WP = 1"
    if fetch and t.nx and efer & EFER_NXE:
        return "fetch from an execute-disable page"
    return None


def translate(
    phys: PhysicalMemory,
    tlb: dict[int, Translation],
    linear: int,
    *,
    write: bool,
    fetch: bool,
    user: bool,
    implicit: bool,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    rflags: int,
) -> int:
    """Physical address of ``linear`` for one access, or #PF with CR2 = ``linear``.

    ``user`` is a user-mode access (CPL3 and not implicit, SDM Vol. 3A 4.6); ``write`` includes
    the write half of read-modify-write instructions.
    """
    page = linear & PAGE_MASK
    t = tlb.get(page)
    reason = None
    if t is None:
        try:
            t = walk(phys, cr3, page, efer, la57=bool(cr4 & CR4_LA57))
        except _WalkFault as fault:
            error = fault.error_bits
            reason = fault.reason
        else:
            tlb[page] = t
    if t is not None:
        reason = _denied(
            t, write=write, fetch=fetch, user=user, implicit=implicit,
            cr0=cr0, cr4=cr4, efer=efer, rflags=rflags,
        )  # fmt: skip
        if reason is None:
            # Leaf A (and D for writes) only for an allowed access (docs/machine.md).
            wanted = PTE_A | PTE_D if write else PTE_A
            entry = phys.read_u64(t.leaf)
            if entry & wanted != wanted:
                phys.write_u64(t.leaf, entry | wanted)
            return t.frame | (linear & ~PAGE_MASK)
        error = PFEC_P
    # SDM Vol. 3A 4.7: W/R, U/S from the access; I/D only with EFER.NXE = 1 or CR4.SMEP = 1.
    if write:
        error |= PFEC_W
    if user:
        error |= PFEC_U
    if fetch and (efer & EFER_NXE or cr4 & CR4_SMEP):
        error |= PFEC_I
    access = "fetch" if fetch else "write" if write else "read"
    raise CpuFault(VEC_PF, error, f"#PF: {reason}", cr2=linear, access=access, address=linear)


def peek(phys: PhysicalMemory, cr3: int, linear: int, efer: int, *, la57: bool) -> int | None:
    """Physical address of ``linear`` by a walk that writes nothing and checks no rights, or
    None if it is not mapped: how the initial descriptor tables are read (a trusted boot,
    docs/machine.md "Descriptor tables")."""
    try:
        t = walk(phys, cr3, linear & PAGE_MASK, efer, la57=la57, mark=False)
    except _WalkFault:
        return None
    if not phys.read_u64(t.leaf) & PTE_P:
        return None
    return t.frame | (linear & ~PAGE_MASK)
