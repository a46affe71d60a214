"""The test case: an initial machine state, a memory layout and code, and its JSON form.

A case is what both engines run. It is deliberately small enough to write by hand: code bytes and
a handful of fields, everything else defaulted (see README, "Case files").

The memory layout is a list of *linear* pages. :func:`materialize` turns it into a physical memory
image with 4-level page tables; both engines start from that same image, and the final contents of
every frame (page tables included, so Accessed/Dirty bits count) are part of the outcome.
Building the initial image is part of the case's meaning, not of any engine's LASS logic.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final

from lassfuzz.arch import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    GPR_NAMES,
    MASK64,
    PAGE_SIZE,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_RW,
    PTE_US,
    RFLAGS_FIXED1,
)

CASE_FORMAT: Final = "lassfuzz-case"
CASE_VERSION: Final = 1

DEFAULT_CR0: Final = CR0_PG | CR0_WP | CR0_NE | CR0_ET | CR0_MP | CR0_PE
DEFAULT_CR4: Final = CR4_PAE
DEFAULT_EFER: Final = EFER_LME | EFER_LMA | EFER_NXE
DEFAULT_RFLAGS: Final = RFLAGS_FIXED1
#: Where code goes when a case does not say: a user-half page for CPL3, a supervisor-half page
#: for CPL0-2, so that a hand-written 64-bit case runs without a LASS fault unless it asks for one.
#: Compatibility-mode code must lie below 4 GiB, so it always defaults to the user-half page.
DEFAULT_CODE_ADDRESS: Final = {
    3: 0x0000_0000_0040_0000,
    2: 0xFFFF_FFFF_8000_0000,
    1: 0xFFFF_FFFF_8000_0000,
    0: 0xFFFF_FFFF_8000_0000,
}
COMPAT_CODE_ADDRESS: Final = 0x0000_0000_0040_0000
MODES: Final = ("64", "compat")

#: Physical layout of a materialized case. Page-table frames come first, data frames after; the
#: emulator keeps its own machine structures (GDT, boot stub) above PHYS_CASE_END.
PHYS_TABLES_BASE: Final = 0x0000_1000
PHYS_DATA_BASE: Final = 0x0010_0000
PHYS_CASE_END: Final = 0x0080_0000
MAX_PAGES: Final = (PHYS_CASE_END - PHYS_DATA_BASE) // PAGE_SIZE
#: Non-leaf entries grant everything, so the leaf alone decides U/S, R/W and NX.
_TABLE_ENTRY_FLAGS: Final = PTE_P | PTE_RW | PTE_US


class CaseFormatError(ValueError):
    """A case file or document that cannot be read: the message names the field."""


@dataclass(frozen=True)
class Page:
    """One 4 KiB linear page and the leaf page-table entry that maps it.

    ``user`` is the PTE U/S bit, independent of the address half, so that LASS and paging can
    disagree. ``present=False`` builds a non-present leaf entry (the page is in the image but
    any access faults in paging).
    """

    address: int
    user: bool
    writable: bool = True
    nx: bool = False
    present: bool = True
    accessed: bool = False
    dirty: bool = False
    data: bytes = b""

    def __post_init__(self) -> None:
        if self.address % PAGE_SIZE or not 0 <= self.address <= MASK64:
            raise CaseFormatError(f"page address {self.address:#x} is not a page-aligned u64")
        if not is_canonical57(self.address):
            raise CaseFormatError(f"page address {self.address:#x} is not canonical")
        if len(self.data) > PAGE_SIZE:
            raise CaseFormatError(f"page {self.address:#x}: data longer than {PAGE_SIZE} bytes")
        # Pages are zero-filled: keep data in one canonical form (no trailing zeros) so that
        # equal pages compare equal and JSON round trips are exact.
        object.__setattr__(self, "data", self.data.rstrip(b"\0"))

    def leaf_entry(self, frame: int) -> int:
        """The 4-level PTE for this page pointing at ``frame``."""
        entry = frame
        entry |= PTE_P if self.present else 0
        entry |= PTE_RW if self.writable else 0
        entry |= PTE_US if self.user else 0
        entry |= PTE_A if self.accessed else 0
        entry |= PTE_D if self.dirty else 0
        entry |= PTE_NX if self.nx else 0
        return entry


@dataclass(frozen=True)
class System:
    """Descriptor tables and system registers, for cases that have them (docs/machine.md,
    "System level"). The tables' bytes are ordinary page data of the case, so they can lie in
    either half; :mod:`lassfuzz.system` builds standard contents. Without a ``System`` a case has
    no descriptor tables: faults end the case and descriptor-loading instructions are
    unsupported.
    """

    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int
    cs: int
    ss: int
    ds: int = 0
    es: int = 0
    fs: int = 0
    gs: int = 0
    tr: int = 0
    ldtr: int = 0
    star: int = 0
    lstar: int = 0
    sfmask: int = 0

    def __post_init__(self) -> None:
        for name in ("gdt_base", "idt_base", "star", "lstar", "sfmask"):
            if not 0 <= getattr(self, name) <= MASK64:
                raise CaseFormatError(f"state.system.{name} {getattr(self, name):#x} is not a u64")
        for name in ("gdt_limit", "idt_limit", *SELECTOR_NAMES):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise CaseFormatError(f"state.system.{name} {getattr(self, name):#x} is not a u16")
        if self.sfmask > 0xFFFF_FFFF:
            raise CaseFormatError("state.system.sfmask: bits 63:32 are reserved")

    @property
    def selectors(self) -> tuple[int, ...]:
        """Selectors in :data:`SELECTOR_NAMES` order."""
        return tuple(getattr(self, name) for name in SELECTOR_NAMES)


#: Segment and system selectors, in the order outcomes report them.
SELECTOR_NAMES: Final = ("cs", "ss", "ds", "es", "fs", "gs", "tr", "ldtr")


@dataclass(frozen=True)
class State:
    """The initial architectural state. ``gprs`` follow :data:`lassfuzz.arch.GPR_NAMES`.

    ``mode`` is "64" (CS.L = 1) or "compat" (IA-32e compatibility mode: CS.L = 0, CS.D = 1,
    32-bit code). CPL 1 and 2 are supervisor levels for LASS and paging.
    """

    mode: str = "64"
    cpl: int = 0
    gprs: tuple[int, ...] = (0,) * 16
    rflags: int = DEFAULT_RFLAGS
    cr0: int = DEFAULT_CR0
    cr4: int = DEFAULT_CR4
    efer: int = DEFAULT_EFER
    fs_base: int = 0
    gs_base: int = 0
    lass_supported: bool = True
    system: System | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CaseFormatError(f"state.mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.cpl not in (0, 1, 2, 3):
            raise CaseFormatError(f"state.cpl {self.cpl}: expected 0, 1, 2 or 3")
        if len(self.gprs) != 16:
            raise CaseFormatError("state.gprs must hold 16 registers")
        for name, value in (
            *zip(GPR_NAMES, self.gprs, strict=True),
            ("rflags", self.rflags),
            ("cr0", self.cr0),
            ("cr4", self.cr4),
            ("efer", self.efer),
            ("fs_base", self.fs_base),
            ("gs_base", self.gs_base),
        ):
            if not 0 <= value <= MASK64:
                raise CaseFormatError(f"state.{name} {value:#x} is not a u64")

    def gpr(self, name: str) -> int:
        return self.gprs[GPR_NAMES.index(name)]

    @property
    def la57(self) -> bool:
        """5-level paging (CR4.LA57): 57-bit canonical addresses and a PML5 table."""
        return bool(self.cr4 & CR4_LA57)


@dataclass(frozen=True)
class TestCase:
    """A runnable case: state, pages, and code placed at ``code_address`` (the initial RIP).

    The case ends normally when RIP reaches ``code_end`` (the byte after the code) or on HLT at
    CPL0. Pages covering the code are created when ``pages`` does not list them (user bit = the
    CPL3-ness of the case, read-only, executable).
    """

    __test__ = False  # not a pytest test class, despite the name

    state: State
    code: bytes
    code_address: int
    pages: tuple[Page, ...] = ()
    #: Free-form provenance (generator seed/index, hand-written description); not run.
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not 0 <= self.code_address <= MASK64:
            raise CaseFormatError(f"code.address {self.code_address:#x} is not a u64")
        seen: set[int] = set()
        canonical = is_canonical57 if self.state.la57 else is_canonical48
        for page in self.pages:
            if page.address in seen:
                raise CaseFormatError(f"page {page.address:#x} listed twice")
            if not canonical(page.address):
                raise CaseFormatError(
                    f"page {page.address:#x} is not canonical with "
                    f"{'5' if self.state.la57 else '4'}-level paging"
                )
            seen.add(page.address)
        if self.state.mode == "compat" and self.code_end > 0xFFFF_FFFF:
            raise CaseFormatError("compatibility-mode code must lie below 4 GiB")
        if len(self.all_pages()) > MAX_PAGES:
            raise CaseFormatError(f"more than {MAX_PAGES} pages")

    @property
    def code_end(self) -> int:
        return (self.code_address + len(self.code)) & MASK64

    def all_pages(self) -> tuple[Page, ...]:
        """Listed pages plus the implicit code pages, code bytes laid over the page data."""
        return self._all_pages

    # Both engines and the case's own validation need the pages and the physical image of the
    # same (immutable) case: computed once per instance. cached_property stores into the
    # instance __dict__ directly, which a frozen dataclass allows; dataclasses.replace builds a
    # new instance, so a changed case never sees the old value.
    @functools.cached_property
    def _all_pages(self) -> tuple[Page, ...]:
        pages = {page.address: page for page in self.pages}
        offset = 0
        while offset < len(self.code):
            address = (self.code_address + offset) & MASK64
            base = address & ~(PAGE_SIZE - 1)
            chunk = self.code[offset : offset + PAGE_SIZE - (address - base)]
            page = pages.get(base) or Page(base, user=self.state.cpl == 3, writable=False, nx=False)
            start = address - base
            # Only as long as needed: Page keeps its data without trailing zeros anyway.
            data = bytearray(page.data.ljust(start + len(chunk), b"\0"))
            data[start : start + len(chunk)] = chunk
            pages[base] = replace(page, data=bytes(data))
            offset += len(chunk)
        return tuple(sorted(pages.values(), key=lambda p: p.address))

    def with_code(self, code: bytes) -> TestCase:
        return replace(self, code=code)

    @functools.cached_property
    def _image(self) -> MemoryImage:
        return _materialize(self)


def is_canonical48(address: int) -> bool:
    """Bits 63:47 all equal (4-level paging canonical form); used only to validate layouts."""
    top = address >> 47
    return top in (0, 0x1FFFF)


def is_canonical57(address: int) -> bool:
    """Bits 63:56 all equal (5-level paging canonical form); used only to validate layouts."""
    top = address >> 56
    return top in (0, 0xFF)


@dataclass(frozen=True)
class MemoryImage:
    """The physical memory a case starts from.

    ``frames`` maps a frame's physical address to its 4096 bytes; ``page_frames`` maps each
    linear page to its frame; ``table_frames`` lists the paging-structure frames.
    """

    cr3: int
    frames: Mapping[int, bytes]
    page_frames: Mapping[int, int]
    table_frames: tuple[int, ...]


def materialize(case: TestCase) -> MemoryImage:
    """Page tables and data frames for ``case``, deterministically (built once per case).

    Data frames are assigned in ascending linear-address order from PHYS_DATA_BASE; paging
    structures are allocated from PHYS_TABLES_BASE in the order the walk first needs them.
    With CR4.LA57 the root (CR3) is a PML5 table.
    """
    return case._image


def _materialize(case: TestCase) -> MemoryImage:
    tables: dict[int, bytearray] = {}
    next_table = PHYS_TABLES_BASE

    def new_table() -> int:
        nonlocal next_table
        frame = next_table
        if frame >= PHYS_DATA_BASE:
            raise CaseFormatError("too many paging structures for the physical layout")
        next_table += PAGE_SIZE
        tables[frame] = bytearray(PAGE_SIZE)
        return frame

    cr3 = new_table()
    frames: dict[int, bytes] = {}
    page_frames: dict[int, int] = {}
    for index, page in enumerate(case.all_pages()):
        frame = PHYS_DATA_BASE + index * PAGE_SIZE
        frames[frame] = page.data.ljust(PAGE_SIZE, b"\0")
        page_frames[page.address] = frame
        table = cr3
        for shift in (48, 39, 30, 21) if case.state.la57 else (39, 30, 21):
            slot = (page.address >> shift) & 0x1FF
            entry = int.from_bytes(tables[table][slot * 8 : slot * 8 + 8], "little")
            if not entry:
                entry = new_table() | _TABLE_ENTRY_FLAGS
                tables[table][slot * 8 : slot * 8 + 8] = entry.to_bytes(8, "little")
            table = entry & 0x000F_FFFF_FFFF_F000
        slot = (page.address >> 12) & 0x1FF
        tables[table][slot * 8 : slot * 8 + 8] = page.leaf_entry(frame).to_bytes(8, "little")
    frames.update({frame: bytes(content) for frame, content in tables.items()})
    return MemoryImage(
        cr3=cr3,
        frames=MappingProxyType(dict(sorted(frames.items()))),
        page_frames=MappingProxyType(page_frames),
        table_frames=tuple(sorted(tables)),
    )


# --------------------------------------------------------------------------------------------
# JSON form. Integers are written as hex strings ("0x..."), byte strings as plain hex.
# Readers accept JSON integers too, so that a hand-written case can say "cpl": 3.
# --------------------------------------------------------------------------------------------

_STATE_INT_FIELDS: Final = ("rflags", "cr0", "cr4", "efer", "fs_base", "gs_base")
_STATE_KEYS: Final = frozenset(
    {"mode", "cpl", "regs", "lass_supported", "system", *_STATE_INT_FIELDS}
)
_SYSTEM_FIELDS: Final = tuple(field.name for field in dataclasses.fields(System))
#: Fields a "system" object must give; the others default as in :class:`System`.
_SYSTEM_REQUIRED: Final = ("gdt_base", "gdt_limit", "idt_base", "idt_limit", "cs", "ss")
_PAGE_KEYS: Final = frozenset(
    {"address", "user", "writable", "nx", "present", "accessed", "dirty", "data"}
)
_CASE_KEYS: Final = frozenset({"format", "version", "state", "code", "pages", "meta"})
_CODE_KEYS: Final = frozenset({"address", "bytes"})


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise CaseFormatError(f"{where}: expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise CaseFormatError(f"{where}: expected an integer or a '0x...' string, got {value!r}")


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise CaseFormatError(f"{where}: expected true or false, got {value!r}")
    return value


def _hex_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise CaseFormatError(f"{where}: expected a hex string, got {value!r}")
    try:
        return bytes.fromhex(value)
    except ValueError as error:
        raise CaseFormatError(f"{where}: not a hex string ({error})") from None


def _object(value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CaseFormatError(f"{where}: expected an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise CaseFormatError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return value


def case_from_dict(document: Any) -> TestCase:
    """Read a case document (strict: unknown keys and wrong types are errors)."""
    doc = _object(document, "case", _CASE_KEYS)
    if doc.get("format", CASE_FORMAT) != CASE_FORMAT:
        raise CaseFormatError(f"format {doc.get('format')!r} is not {CASE_FORMAT!r}")
    if "version" not in doc:
        raise CaseFormatError("missing 'version'")
    version = _int(doc["version"], "version")
    if version != CASE_VERSION:
        raise CaseFormatError(
            f"unsupported case format version {version} (this lassfuzz reads {CASE_VERSION})"
        )
    raw_state = _object(doc.get("state", {}), "state", _STATE_KEYS)
    regs = _object(raw_state.get("regs", {}), "state.regs", frozenset(GPR_NAMES))
    kwargs: dict[str, Any] = {
        name: _int(raw_state[name], f"state.{name}")
        for name in _STATE_INT_FIELDS
        if name in raw_state
    }
    if "mode" in raw_state:
        kwargs["mode"] = str(raw_state["mode"])
    if "cpl" in raw_state:
        kwargs["cpl"] = _int(raw_state["cpl"], "state.cpl")
    if "lass_supported" in raw_state:
        kwargs["lass_supported"] = _bool(raw_state["lass_supported"], "state.lass_supported")
    kwargs["gprs"] = tuple(_int(regs.get(name, 0), f"state.regs.{name}") for name in GPR_NAMES)
    if raw_state.get("system") is not None:
        kwargs["system"] = _system_from_dict(raw_state["system"])
    state = State(**kwargs)
    code = _object(doc.get("code"), "code", _CODE_KEYS) if "code" in doc else {}
    if "bytes" not in code:
        raise CaseFormatError("missing 'code.bytes'")
    code_address = (
        _int(code["address"], "code.address")
        if "address" in code
        else COMPAT_CODE_ADDRESS
        if state.mode == "compat"
        else DEFAULT_CODE_ADDRESS[state.cpl]
    )
    raw_pages = doc.get("pages", [])
    if not isinstance(raw_pages, list):
        raise CaseFormatError("pages: expected a list")
    pages = []
    for index, raw in enumerate(raw_pages):
        where = f"pages[{index}]"
        item = _object(raw, where, _PAGE_KEYS)
        if "address" not in item:
            raise CaseFormatError(f"{where}: missing 'address'")
        address = _int(item["address"], f"{where}.address")
        flags = {
            key: _bool(item[key], f"{where}.{key}")
            for key in ("user", "writable", "nx", "present", "accessed", "dirty")
            if key in item
        }
        flags.setdefault("user", not address >> 63)
        data = _hex_bytes(item.get("data", ""), f"{where}.data")
        pages.append(Page(address=address, data=data, **flags))
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise CaseFormatError("meta: expected an object")
    return TestCase(
        state=state,
        code=_hex_bytes(code["bytes"], "code.bytes"),
        code_address=code_address,
        pages=tuple(pages),
        meta=MappingProxyType(dict(meta)),
    )


def _system_from_dict(value: Any) -> System:
    raw = _object(value, "state.system", frozenset(_SYSTEM_FIELDS))
    missing = [name for name in _SYSTEM_REQUIRED if name not in raw]
    if missing:
        raise CaseFormatError(f"state.system: missing {', '.join(missing)}")
    return System(**{name: _int(raw[name], f"state.system.{name}") for name in raw})


def case_to_dict(case: TestCase) -> dict[str, Any]:
    """The canonical JSON document for ``case`` (every field written out)."""
    state = case.state
    return {
        "format": CASE_FORMAT,
        "version": CASE_VERSION,
        "state": {
            "mode": state.mode,
            "cpl": state.cpl,
            "lass_supported": state.lass_supported,
            "regs": {name: hex(value) for name, value in zip(GPR_NAMES, state.gprs, strict=True)},
            **{name: hex(getattr(state, name)) for name in _STATE_INT_FIELDS},
            "system": None
            if state.system is None
            else {name: hex(getattr(state.system, name)) for name in _SYSTEM_FIELDS},
        },
        "code": {"address": hex(case.code_address), "bytes": case.code.hex()},
        "pages": [
            {
                "address": hex(page.address),
                "user": page.user,
                "writable": page.writable,
                "nx": page.nx,
                "present": page.present,
                "accessed": page.accessed,
                "dirty": page.dirty,
                "data": page.data.hex(),
            }
            for page in case.pages
        ],
        "meta": dict(case.meta),
    }


def case_from_json(text: str) -> TestCase:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise CaseFormatError(f"not valid JSON: {error}") from None
    return case_from_dict(document)


def case_to_json(case: TestCase) -> str:
    return json.dumps(case_to_dict(case), indent=1)
