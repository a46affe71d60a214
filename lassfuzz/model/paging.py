"""4- and 5-level paging: the walk, Accessed/Dirty updates and #PF error codes (SDM Vol. 3A 4.5-4.7,
docs/machine.md "Paging details").

The walk is split in two: :func:`walk` finds the leaf (setting non-leaf Accessed bits) and is
cached per linear page, because cases never write page tables except through A/D updates
(docs/machine.md "TLB"); :func:`translate` checks the rights of one access against it and sets
the leaf's A/D bits only when the access is allowed. The caches of a run are a :class:`Tlb`.
"""

from __future__ import annotations

import struct
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

#: The non-leaf levels (the PTE is the leaf) with the linear-address bit each indexes from.
_UPPER: Final = ((39, "PML4E"), (30, "PDPTE"), (21, "PDE"))
#: 5-level paging adds the PML5 above the PML4 (SDM Vol. 3A 4.5.1, CR4.LA57 = 1).
_UPPER57: Final = ((48, "PML5E"), *_UPPER)
#: An entry with any of these bits other than P needs a closer look (:func:`_check`); most
#: entries are present with PS = 0 and NX = 0.
_UNUSUAL: Final = PTE_P | PTE_PS | PTE_NX
#: A little-endian paging-structure entry.
_U64: Final = struct.Struct("<Q")


@dataclass(frozen=True)
class Translation:
    """A linear page's leaf: its frame, the leaf entry's physical address, and the combined
    rights (U/S and R/W are the AND over all levels, NX the OR: SDM Vol. 3A 4.6.1)."""

    frame: int
    leaf: int
    user: bool
    writable: bool
    nx: bool


class Tlb:
    """The translation caches of one run (SDM Vol. 3A 4.10): ``pages`` maps a linear page to its
    walked leaf (the TLB proper); ``tables`` maps a 2 MiB region to the page table its walk
    reached and the U/S, R/W and NX of the entries above (a paging-structure cache of PDEs).

    Both stay valid until :meth:`clear` (MOV CR0/CR3/CR4, INVLPG): cases never write page
    tables except through A/D updates, and a cached walk has set the A bit of every non-leaf
    entry it used, so walking them again would read the same entries and write nothing.
    """

    __slots__ = ("pages", "tables")

    def __init__(self) -> None:
        self.pages: dict[int, Translation] = {}
        self.tables: dict[int, tuple[int, int, int]] = {}

    def clear(self) -> None:
        self.pages.clear()
        self.tables.clear()


class _WalkFault(Exception):
    """The walk stopped: a non-present entry (error bits 0) or a reserved bit (RSVD | P)."""

    def __init__(self, error_bits: int, reason: str) -> None:
        super().__init__(reason)
        self.error_bits = error_bits
        self.reason = reason


def walk(
    phys: PhysicalMemory,
    cr3: int,
    page: int,
    efer: int,
    *,
    la57: bool = False,
    mark: bool = True,
    tables: dict[int, tuple[int, int, int]] | None = None,
) -> Translation:
    """Walk the 4-level (5-level with ``la57``) tables for linear ``page``; sets the A bit of
    each present non-leaf entry in order, even when a later level faults (docs/machine.md
    "Paging details"). ``mark=False`` walks without writing anything: the trusted reads of the
    initial descriptor tables (docs/machine.md "Descriptor tables", Start). ``tables`` is the
    paging-structure cache (:class:`Tlb`) a marking walk starts from and fills."""
    region = page >> 21
    cached = tables.get(region) if tables is not None else None
    if cached is not None:
        table, rights, nx = cached
    else:
        table = cr3 & PTE_ADDR
        rights = PTE_US | PTE_RW  # U/S and R/W: the AND over the levels
        nx = 0  # NX: the OR over the levels
        read_frame = phys.frame
        for shift, name in _UPPER57 if la57 else _UPPER:
            offset = ((page >> shift) & 0x1FF) * 8
            frame = read_frame(table)
            entry: int
            (entry,) = _U64.unpack_from(frame, offset)
            if entry & _UNUSUAL != PTE_P:
                _check(entry, name, table + offset, efer, leaf=False)
                nx |= entry & PTE_NX
            if mark and not entry & PTE_A:
                _U64.pack_into(frame, offset, entry | PTE_A)
            rights &= entry
            table = entry & PTE_ADDR
        if mark and tables is not None:
            tables[region] = (table, rights, nx)
    leaf = table + ((page >> 12) & 0x1FF) * 8
    entry = phys.read_u64(leaf)
    if entry & _UNUSUAL != PTE_P:
        _check(entry, "PTE", leaf, efer, leaf=True)
        nx |= entry & PTE_NX
    rights &= entry
    table = entry & PTE_ADDR
    phys.check(table)  # a leaf pointing outside the image is unsupported, not a fault
    return Translation(table, leaf, bool(rights & PTE_US), bool(rights & PTE_RW), bool(nx))


def _check(entry: int, name: str, address: int, efer: int, *, leaf: bool) -> None:
    """Fault on an entry that is not present or has a reserved bit set (SDM Vol. 3A 4.7);
    a large page is not modelled. Entries without these problems pass."""
    if not entry & PTE_P:
        raise _WalkFault(0, f"{name} not present")
    # SDM 4.5.4: XD (bit 63) is reserved unless IA32_EFER.NXE = 1 -> RSVD #PF.
    if entry & PTE_NX and not efer & EFER_NXE:
        raise _WalkFault(PFEC_RSVD | PFEC_P, f"{name} has bit 63 set while EFER.NXE = 0")
    if not leaf and entry & PTE_PS:
        raise Unsupported(f"{name} at {address:#x} maps a large page (PS = 1)")


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
    tlb: Tlb,
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
    t = tlb.pages.get(page)
    reason = None
    if t is None:
        try:
            t = walk(phys, cr3, page, efer, la57=bool(cr4 & CR4_LA57), tables=tlb.tables)
        except _WalkFault as fault:
            error = fault.error_bits
            reason = fault.reason
        else:
            tlb.pages[page] = t
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
