"""The machine a generated case starts from: control state, memory layout, register values.

Address registers are assigned by construction so that memory operands can aim at chosen pages:

- R12-R15 ("homes") each point into a data page and are never written by generated code;
  R11 holds a small index value and is never written either.
- RSI/RDI point into data pages, usually near a page or half edge; only string instructions
  move them, by a bounded amount.
- RSP/RBP point into the stack page.
- The other GPRs are scratch: arbitrary values, never used to form an address.

Code and landing pads live in regions megabytes away from every data page, so no generated
store (even after bounded RSP/RSI/RDI drift) can modify code.

The address space depends on the mode and the paging depth (:class:`Geometry`): with LA57 the
canonical boundaries move to bit 56, in compatibility mode every address is below 4 GiB (and wraps
there). Descriptor tables (:func:`draw_system`) live in table regions of their own, in either half.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from iced_x86 import Register

if TYPE_CHECKING:  # iced's stubs type codes and registers as enums; at run time they are ints
    from iced_x86._iced_x86_py import Register as RegisterValue

from lassfuzz.arch import (
    CR0_WP,
    CR4_LA57,
    CR4_LASS,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PGE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_SCE,
    GPR_NAMES,
    MASK64,
    PAGE_SIZE,
    RFLAGS_AC,
    RFLAGS_AF,
    RFLAGS_CF,
    RFLAGS_DF,
    RFLAGS_IF,
    RFLAGS_OF,
    RFLAGS_PF,
    RFLAGS_SF,
    RFLAGS_TF,
    RFLAGS_ZF,
)
from lassfuzz.case import (
    DEFAULT_CR0,
    DEFAULT_CR4,
    DEFAULT_EFER,
    DEFAULT_RFLAGS,
    Page,
    State,
    System,
    is_canonical48,
    is_canonical57,
)
from lassfuzz.generator.choices import Chooser, Weighted
from lassfuzz.generator.config import GeneratorConfig
from lassfuzz.system import DATA_SELECTORS, STACK_SELECTOR, Tables

USER_TOP_PAGE: Final = 0x0000_7FFF_FFFF_F000
SUPERVISOR_BOTTOM_PAGE: Final = 0xFFFF_8000_0000_0000
WRAP_PAGE: Final = 0xFFFF_FFFF_FFFF_F000
#: The pages at the half boundaries (LASS.md section 8): 0 and the wrap page are reached with
#: absolute disp32 operands, the two middle ones through home registers.
BOUNDARY_PAGES: Final = (0x0, USER_TOP_PAGE, SUPERVISOR_BOTTOM_PAGE, WRAP_PAGE)
#: First non-canonical pages on either side of the canonical hole.
NON_CANONICAL_PAGES: Final = (0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000)
#: With LA57 (57-bit canonical addresses): the half edges, and the first non-canonical pages.
USER_TOP_PAGE_57: Final = 0x00FF_FFFF_FFFF_F000
SUPERVISOR_BOTTOM_PAGE_57: Final = 0xFF00_0000_0000_0000
NON_CANONICAL_PAGES_57: Final = (0x0100_0000_0000_0000, 0xFEFF_FFFF_FFFF_F000)
#: In compatibility mode every address is below 4 GiB; the top page wraps into page 0.
COMPAT_TOP_PAGE: Final = 0xFFFF_F000

#: Code and landing-pad regions per half (index: 0 = user half, 1 = supervisor half).
CODE_REGIONS: Final = (0x0000_0000_0040_0000, 0xFFFF_FFFF_8000_0000)
PAD_REGIONS: Final = (0x0000_0000_0080_0000, 0xFFFF_FFFF_8080_0000)
#: A user page of 32-bit code that IRETQ and RET far enter compatibility mode at, in 64-bit
#: cases with descriptor tables: ``nop; ud2``, so that the case ends through the #UD handler
#: (code_end, in the supervisor half for CPL 0-2 code, is out of 32-bit reach). It writes no
#: register: the upper halves of the GPRs are undefined in a 32-bit mode (SDM Vol. 1 3.4.1.1).
COMPAT_ENTRY: Final = PAD_REGIONS[0] + 0x20_0000
COMPAT_ENTRY_CODE: Final = bytes.fromhex("900f0b")
#: The stack those transfers load (the page above the entry page): below 4 GiB, so that ESP
#: and RSP agree; a 64-bit RSP would make the next push address undefined.
COMPAT_STACK_TOP: Final = COMPAT_ENTRY + 2 * PAGE_SIZE
#: The entry and stack pages (the same in every such case).
_COMPAT_PAGES: Final = (
    Page(COMPAT_ENTRY, user=True, writable=False, data=COMPAT_ENTRY_CODE),
    Page(COMPAT_STACK_TOP - PAGE_SIZE, user=True),
)
#: Ordinary data and stack pages are drawn from these ranges (far from the code regions).
DATA_RANGES: Final = (
    (0x0000_0001_0000_0000, 0x0000_7FFF_0000_0000),
    (0xFFFF_8000_1000_0000, 0xFFFF_FFFF_0000_0000),
)
#: Compatibility mode: two ranges below 4 GiB (both in the user half for LASS), clear of the
#: code, pad and table regions.
COMPAT_DATA_RANGES: Final = ((0x0100_0000, 0x8000_0000), (0x8000_0000, 0xB000_0000))
#: Descriptor tables, the handler and the kernel stacks, one page each, per half (the user-half
#: region lies below 4 GiB so that compatibility-mode cases can have their tables there too).
TABLE_REGIONS: Final = (0x0000_0000_C000_0000, 0xFFFF_FFFF_C000_0000)
_GDT, _IDT, _TSS, _HANDLER, _KERNEL_STACK, _IST_STACK, _DF_STACK = range(7)
#: An unmapped page between two slots: a kernel stack pointer near its page's bottom makes the
#: frame cross into nothing (#PF), not into a neighbouring table.
_TABLE_SPACING: Final = 2 * PAGE_SIZE


@dataclass(frozen=True)
class Geometry:
    """The address space of a case's mode and paging depth.

    ``boundary_pages`` are the pages at the half edges and the wrap; those in ``home_pages``
    are out of reach of an absolute disp32 and need a home register. ``mask`` is where
    addresses wrap (2^64, or 2^32 for compatibility-mode code).
    """

    boundary_pages: tuple[int, ...]
    home_pages: frozenset[int]
    non_canonical: tuple[int, ...]
    data_ranges: tuple[tuple[int, int], ...]
    la57: bool
    mask: int

    def canonical(self, address: int) -> bool:
        if self.mask != MASK64:
            return address <= self.mask
        return is_canonical57(address) if self.la57 else is_canonical48(address)


GEOMETRY_48: Final = Geometry(
    boundary_pages=BOUNDARY_PAGES,
    home_pages=frozenset({USER_TOP_PAGE, SUPERVISOR_BOTTOM_PAGE}),
    non_canonical=NON_CANONICAL_PAGES,
    data_ranges=DATA_RANGES,
    la57=False,
    mask=MASK64,
)
#: LA57: the 57-bit half edges, and the 48-bit edges, which are now ordinary canonical pages.
GEOMETRY_57: Final = Geometry(
    boundary_pages=(
        0x0,
        USER_TOP_PAGE_57,
        NON_CANONICAL_PAGES[0],
        NON_CANONICAL_PAGES[1],
        SUPERVISOR_BOTTOM_PAGE_57,
        WRAP_PAGE,
    ),
    home_pages=frozenset({USER_TOP_PAGE_57, SUPERVISOR_BOTTOM_PAGE_57, *NON_CANONICAL_PAGES}),
    non_canonical=NON_CANONICAL_PAGES_57,
    data_ranges=DATA_RANGES,
    la57=True,
    mask=MASK64,
)
GEOMETRY_COMPAT: Final = Geometry(
    boundary_pages=(0x0, COMPAT_TOP_PAGE),
    home_pages=frozenset(),
    non_canonical=(),
    data_ranges=COMPAT_DATA_RANGES,
    la57=False,
    mask=0xFFFF_FFFF,
)


def geometry(mode: str, la57: bool) -> Geometry:
    """The :class:`Geometry` of a mode and paging depth."""
    if mode == "compat":
        return GEOMETRY_COMPAT
    return GEOMETRY_57 if la57 else GEOMETRY_48


HOME_REGISTERS: Final = (Register.R12, Register.R13, Register.R14, Register.R15)
STRING_REGISTERS: Final = (Register.RSI, Register.RDI)
INDEX_REGISTER: Final = Register.R11
#: Registers generated code may overwrite freely (never used to form an address).
SCRATCH_REGISTERS: Final = (
    Register.RAX,
    Register.RCX,
    Register.RDX,
    Register.RBX,
    Register.R8,
    Register.R9,
    Register.R10,
)
#: Values for R11 as an index: small, some negative, so scaled indexes stay near their base.
INDEX_VALUES: Final = (0, 1, 8, 0x10, 0xFF8, MASK64, (-8) & MASK64, (-0x1000) & MASK64)

_OPTIONAL_CR4: Final = (CR4_PSE, CR4_PGE, CR4_OSFXSR, CR4_OSXMMEXCPT)
_STATUS_FLAGS: Final = (RFLAGS_CF, RFLAGS_PF, RFLAGS_AF, RFLAGS_ZF, RFLAGS_SF, RFLAGS_OF)
#: Offsets of a register inside its page: the start, middle, last qword, one past the end.
_POINTER_OFFSETS: Final = Weighted.of(
    [(0, 3), (0x800, 3), (PAGE_SIZE - 8, 2), (PAGE_SIZE, 1), (PAGE_SIZE - 3, 1), (0x10, 1)]
)
_RSP_OFFSETS: Final = Weighted.of([(0x800, 6), (0x10, 2), (PAGE_SIZE, 1), (0x8, 1), (0x3C, 1)])
_RBP_ABOVE_RSP: Final = (0x40, 0, 0x100, 0x8)


def half_of(address: int) -> int:
    """0 for the user half, 1 for the supervisor half (bit 63)."""
    return address >> 63


@dataclass(frozen=True)
class Control:
    """The non-memory part of the initial state."""

    cpl: int
    lass_supported: bool
    cr0: int
    cr4: int
    rflags: int
    mode: str = "64"


@dataclass(frozen=True)
class Layout:
    """Pages, code placement and address-register values of one case.

    ``targets`` are the page bases memory operands aim at (mapped, unmapped and non-canonical);
    ``safe_targets`` the mapped ones the case's CPL can read and write without any fault, so
    that most accesses succeed and later instructions run. ``far_targets`` are branch targets
    outside the code (landing pads, unmapped pages, non-canonical addresses). ``pads`` are the
    landing-pad pages' addresses and U/S bits: their pages are made once the case's code end,
    their code, is known.
    """

    pages: tuple[Page, ...]
    code_address: int
    code_page: Page | None
    pads: tuple[tuple[int, bool], ...]
    targets: tuple[int, ...]
    safe_targets: tuple[int, ...]
    far_targets: tuple[int, ...]
    registers: tuple[tuple[RegisterValue, int], ...]
    fs_base: int
    gs_base: int


@dataclass(frozen=True)
class Setup:
    """Everything about a case but its code."""

    control: Control
    layout: Layout
    scratch: tuple[tuple[RegisterValue, int], ...]
    #: Descriptor tables and their pages (GDT, IDT, TSS, handler, kernel stacks), if any.
    system: System | None = None
    system_pages: tuple[Page, ...] = ()
    #: Where IRETQ and far transfers may enter compatibility mode (:data:`COMPAT_ENTRY`).
    compat_entry: int | None = None

    def state(self) -> State:
        """The case's initial :class:`State`."""
        values = dict(self.scratch)
        values.update(self.layout.registers)
        # The upper halves of the GPRs are undefined after a switch to a 32-bit mode (SDM Vol. 1
        # 3.4.1.1): compatibility-mode cases start with 32-bit values throughout.
        mask = MASK64 if self.control.mode == "64" else 0xFFFF_FFFF
        gprs = tuple(values.get(register, 0) & mask for register in _GPR_REGISTERS)
        control = self.control
        return State(
            mode=control.mode,
            cpl=control.cpl,
            gprs=gprs,
            rflags=control.rflags,
            cr0=control.cr0,
            cr4=control.cr4,
            efer=DEFAULT_EFER | (EFER_SCE if self.system is not None else 0),
            fs_base=self.layout.fs_base,
            gs_base=self.layout.gs_base,
            lass_supported=control.lass_supported,
            system=self.system,
        )


#: The iced register of each GPR, in :data:`lassfuzz.arch.GPR_NAMES` order.
_GPR_REGISTERS: Final = tuple(getattr(Register, name.upper()) for name in GPR_NAMES)


def draw_control(chooser: Chooser, config: GeneratorConfig) -> Control:
    """Mode, CPL, CPUID LASS bit, CR0/CR4 and RFLAGS, within what docs/machine.md supports."""
    cpl = 3 if chooser.boolean(config.p_cpl3) else 0
    if cpl == 0 and chooser.boolean(config.p_cpl12):
        cpl = chooser.integer(1, 2)
    mode = "compat" if chooser.boolean(config.p_compat) else "64"
    lass_supported = not chooser.boolean(1.0 - config.p_lass_supported)
    cr4 = DEFAULT_CR4
    if lass_supported and chooser.boolean(config.p_lass):
        cr4 |= CR4_LASS
    if chooser.boolean(config.p_smap):
        cr4 |= CR4_SMAP
    if chooser.boolean(config.p_smep):
        cr4 |= CR4_SMEP
    if chooser.boolean(config.p_la57):
        cr4 |= CR4_LA57
    for bit in _OPTIONAL_CR4:
        if chooser.boolean(0.25):
            cr4 |= bit
    cr0 = DEFAULT_CR0 & ~CR0_WP if chooser.boolean(config.p_wp_clear) else DEFAULT_CR0
    rflags = DEFAULT_RFLAGS
    if chooser.boolean(config.p_ac):
        rflags |= RFLAGS_AC
    if chooser.boolean(config.p_df):
        rflags |= RFLAGS_DF
    for flag in _STATUS_FLAGS:
        if chooser.boolean(0.5):
            rflags |= flag
    return Control(
        cpl=cpl, lass_supported=lass_supported, cr0=cr0, cr4=cr4, rflags=rflags, mode=mode
    )


def _page(
    chooser: Chooser, config: GeneratorConfig, address: int, usable_user: bool | None = None
) -> Page:
    """A data page with independently drawn U/S, R/W, NX, P, A, D bits and a little content.

    With ``usable_user`` (the stack) it is mostly a plain present, writable page with that U/S
    bit and the drawn content instead, so that later instructions run.
    """
    natural = half_of(address) == 0
    user = not natural if chooser.boolean(1.0 - config.p_natural_user_bit) else natural
    accessed_dirty = chooser.choice((0, 0, 1, 2))  # A/D clear, A set, A and D set
    size = chooser.choice((0, 16, 64))
    writable = not chooser.boolean(0.15)
    nx = chooser.boolean(0.2)
    present = not chooser.boolean(0.1)
    # Without trailing zeros: the JSON form drops them, so cases round-trip exactly.
    data = chooser.data(size).rstrip(b"\0") if size else b""
    if usable_user is not None and not chooser.boolean(0.2):
        return Page(address, user=usable_user, data=data)
    return Page(
        address=address,
        user=user,
        writable=writable,
        nx=nx,
        present=present,
        accessed=accessed_dirty > 0,
        dirty=accessed_dirty > 1,
        data=data,
    )


def _ordinary_page(chooser: Chooser, shape: Geometry, half: int) -> int:
    lo, hi = shape.data_ranges[half]
    return lo + chooser.integer(0, (hi - lo) // PAGE_SIZE - 1) * PAGE_SIZE


def draw_layout(
    chooser: Chooser, config: GeneratorConfig, cpl: int, shape: Geometry = GEOMETRY_48
) -> Layout:
    """Data pages (boundary and ordinary), stack, code placement and address registers."""
    compat = shape is GEOMETRY_COMPAT
    # In compatibility mode every address is in the user half: its natural pages are user ones.
    natural_half = 0 if cpl == 3 or compat else 1
    pages: dict[int, Page] = {}
    # Boundary pages; those out of disp32 reach need a home register, ordinary pages (at least
    # two) fill the remaining homes.
    homes: list[int] = []
    for address in shape.boundary_pages:
        if chooser.boolean(0.7):
            pages[address] = _page(chooser, config, address)
            if address in shape.home_pages:
                homes.append(address)
    for slot in range(max(2, len(HOME_REGISTERS) - len(homes))):
        if slot < 2 or chooser.boolean(0.6):
            address = _ordinary_page(chooser, shape, slot % 2)
            if address not in pages:
                pages[address] = _page(chooser, config, address)
                homes.append(address)
                if chooser.boolean(0.3) and address + PAGE_SIZE not in pages:
                    pages[address + PAGE_SIZE] = _page(chooser, config, address + PAGE_SIZE)
    # The stack: a page of its own, usually in the half the CPL may use, or a boundary page.
    stack_half = 1 - natural_half if chooser.boolean(config.p_stack_other_half) else natural_half
    if chooser.boolean(0.2):
        stack_page = chooser.choice(shape.boundary_pages)
    else:
        stack_page = _ordinary_page(chooser, shape, stack_half)
    if stack_page not in pages:
        user = cpl == 3 if compat else half_of(stack_page) == 0
        pages[stack_page] = _page(chooser, config, stack_page, usable_user=user)
    rsp = (stack_page + chooser.weighted(_RSP_OFFSETS)) & shape.mask
    rbp = (rsp + chooser.choice(_RBP_ABOVE_RSP)) & shape.mask

    registers: list[tuple[RegisterValue, int]] = [(Register.RSP, rsp), (Register.RBP, rbp)]
    data_pages = sorted(pages)
    for index, register in enumerate(HOME_REGISTERS):
        page = homes[index] if index < len(homes) else chooser.choice(data_pages)
        registers.append((register, (page + chooser.weighted(_POINTER_OFFSETS)) & shape.mask))
    safe_targets = tuple(
        page.address
        for page in pages.values()
        if page.present
        and page.writable
        and page.user == (cpl == 3)
        and half_of(page.address) == natural_half
    )
    for register in STRING_REGISTERS:
        if safe_targets and chooser.boolean(0.5):  # room for a few string iterations
            value = chooser.choice(safe_targets) + 0x800
        else:
            value = chooser.choice(data_pages) + chooser.weighted(_POINTER_OFFSETS)
        registers.append((register, value & shape.mask))
    registers.append((INDEX_REGISTER, chooser.choice(INDEX_VALUES)))
    segment_bases = (0, *data_pages)
    fs_base = chooser.choice(segment_bases)
    gs_base = chooser.choice(segment_bases)

    # Code: usually where the CPL may fetch, sometimes in the other half (compatibility-mode
    # code always lies below 4 GiB).
    code_half = 1 - natural_half if chooser.boolean(config.p_code_other_half) else natural_half
    code_half = 0 if compat else code_half
    code_address = CODE_REGIONS[code_half] + chooser.integer(0, 15) * PAGE_SIZE
    code_address += chooser.integer(0, 0x100)
    code_page = None
    if chooser.boolean(0.03):  # a code page whose U/S bit contradicts the CPL (SMEP, #PF)
        code_page = Page(code_address & ~(PAGE_SIZE - 1), user=cpl != 3, writable=False)

    # Landing pads and far branch targets in the other half (branch-then-fetch).
    other_half = 0 if compat else 1 - code_half
    pads: tuple[tuple[int, bool], ...] = ()
    if chooser.boolean(0.7):
        pad_address = PAD_REGIONS[other_half] + chooser.integer(0, 15) * PAGE_SIZE
        natural_user = other_half == 0
        user = (
            not natural_user if chooser.boolean(1.0 - config.p_natural_user_bit) else natural_user
        )
        pads = ((pad_address, user),)
    far_targets = (
        *(address for address, _ in pads),
        PAD_REGIONS[other_half] + 0x10_0000,  # unmapped, other half
        PAD_REGIONS[code_half] + 0x10_0000,  # unmapped, same half
        *((chooser.choice(shape.non_canonical),) if shape.non_canonical else ()),
    )
    targets = [*data_pages]
    for address in data_pages:
        for neighbour in ((address - PAGE_SIZE) & shape.mask, (address + PAGE_SIZE) & shape.mask):
            if neighbour not in pages and shape.canonical(neighbour):
                targets.append(neighbour)
    targets.extend(page for page in shape.non_canonical if chooser.boolean(0.3))
    return Layout(
        pages=tuple(pages[address] for address in data_pages),
        code_address=code_address,
        code_page=code_page,
        pads=pads,
        targets=tuple(targets),
        safe_targets=safe_targets,
        far_targets=far_targets,
        registers=tuple(registers),
        fs_base=fs_base,
        gs_base=gs_base,
    )


def draw_scratch(chooser: Chooser, layout: Layout) -> tuple[tuple[RegisterValue, int], ...]:
    """Initial values of the scratch registers: small numbers, random words, data pointers."""
    values: list[tuple[RegisterValue, int]] = []
    for register in SCRATCH_REGISTERS:
        kind = chooser.integer(0, 3)
        if kind == 0:
            value = chooser.integer(0, 0xFF)
        elif kind == 1:
            value = chooser.integer(0, MASK64)
        else:
            value = chooser.choice(layout.targets) + chooser.integer(0, PAGE_SIZE - 1)
        values.append((register, value & MASK64))
    return tuple(values)


def draw_system(
    chooser: Chooser, config: GeneratorConfig, control: Control, layout: Layout
) -> tuple[System, tuple[Page, ...]]:
    """Descriptor tables, handler and kernel stacks in the supervisor half, or some in the user
    half (LASS.md section 8 item 5); sometimes an unusual descriptor; SYSCALL MSRs aimed at the
    handler or a pad.

    One table in the user half is the sharp case (e.g. the TSS: only deliveries that switch
    stacks read it); all of them there makes every delivery fail. The handler goes to the user
    half only while LASS is off: with LASS on its fetch would fault again on every delivery, an
    endless loop that ends in a (never compared) hang.
    """
    slots = _USER_HALF_SLOTS if control.cr4 & CR4_LASS else (*_USER_HALF_SLOTS, _HANDLER)
    user_half: set[int] = set()
    if chooser.boolean(config.p_table_user_half):
        user_half = set(slots) if chooser.boolean(0.25) else {chooser.choice(slots)}
    addresses = [
        TABLE_REGIONS[0 if slot in user_half else 1] + slot * _TABLE_SPACING
        for slot in range(_DF_STACK + 1)
    ]
    handler = addresses[_HANDLER] + chooser.choice((0, 0x100))
    rsp0 = addresses[_KERNEL_STACK] + chooser.weighted(_KERNEL_RSP_OFFSETS)
    tables = Tables(
        gdt=addresses[_GDT],
        idt=addresses[_IDT],
        tss=addresses[_TSS],
        handler=handler,
        rsp0=rsp0,
        # Like Linux: #DF on a stack of its own.
        df_stack=addresses[_DF_STACK] + PAGE_SIZE if chooser.boolean(0.5) else 0,
        # Far CALL through a call gate to the handler.
        call_gate=handler if chooser.boolean(0.5) else 0,
    )
    if chooser.boolean(config.p_unusual_descriptor):
        tables = _unusual(chooser, tables, addresses[_IST_STACK], control.cpl)
    stacks = (
        addresses[_KERNEL_STACK],
        *((addresses[_IST_STACK],) if tables.ist1 else ()),
        *((addresses[_DF_STACK],) if tables.df_stack else ()),
    )
    contents = _table_contents(tables, stacks)
    handler_page = handler & ~(PAGE_SIZE - 1)
    # Supervisor pages as an OS maps them, so that LASS alone decides; now and then one user
    # page, which SMAP guards against implicit accesses (never the handler's: with SMEP every
    # delivery would fault again).
    user_page = None
    if chooser.boolean(_P_USER_TABLE_PAGE):
        user_page = chooser.choice([address for address, _ in contents if address != handler_page])
    lstar = chooser.choice((handler, *(address for address, _ in layout.pads), _UNMAPPED_USER))
    sfmask = RFLAGS_AC if chooser.boolean(config.p_sfmask_ac) else 0
    sfmask |= chooser.choice((0, RFLAGS_TF | RFLAGS_DF | RFLAGS_IF))
    system = replace(tables.system(mode=control.mode, cpl=control.cpl), lstar=lstar, sfmask=sfmask)
    if control.mode == "compat":  # a null FS/GS would fault on use in a 32-bit mode
        stack = STACK_SELECTOR[control.cpl]
        system = replace(system, fs=stack, gs=stack)
    return system, _table_pages(contents, handler_page, user_page)


# A few thousand table layouts recur over and over, and their pages (the IDT alone is 4 KiB)
# are immutable: built once, shared by the cases that draw them.
@functools.lru_cache(maxsize=2048)
def _table_contents(tables: Tables, stacks: tuple[int, ...]) -> tuple[tuple[int, bytes], ...]:
    """(page address, data) of the tables, the handler and the kernel ``stacks`` (empty), in
    address order."""
    contents = tables.contents()
    for stack in stacks:
        contents[stack] = b""
    return tuple(sorted(contents.items()))


@functools.lru_cache(maxsize=4096)
def _table_pages(
    contents: tuple[tuple[int, bytes], ...], handler_page: int, user_page: int | None
) -> tuple[Page, ...]:
    """The pages of :func:`_table_contents`: supervisor pages but ``user_page``, all writable
    but the handler's."""
    return tuple(
        Page(address, user=address == user_page, writable=address != handler_page, data=data)
        for address, data in contents
    )


#: Kernel stack pointers inside their page: the top, the middle, and close enough to the bottom
#: that the 5-word frame crosses into the (unmapped) page below.
_KERNEL_RSP_OFFSETS: Final = Weighted.of([(PAGE_SIZE, 4), (0x800, 3), (0x18, 1)])
_USER_HALF_SLOTS: Final = (_GDT, _IDT, _TSS, _KERNEL_STACK, _IST_STACK, _DF_STACK)
_P_USER_TABLE_PAGE: Final = 0.15
#: An unmapped user-half address (a SYSCALL target whose fetch faults).
_UNMAPPED_USER: Final = TABLE_REGIONS[0] + 0x10_0000


def _unusual(chooser: Chooser, tables: Tables, ist_page: int, cpl: int) -> Tables:
    """``tables`` with one departure from the standard layout. The data selector it changes is
    never the one the case starts with in SS, DS and ES (the trusted boot would refuse it)."""
    selector = chooser.choice([s for s in DATA_SELECTORS if s != STACK_SELECTOR[cpl] & ~3])
    kind = chooser.integer(0, 5)
    if kind == 0:  # loading it writes the A bit back: an implicit supervisor write
        return replace(tables, unaccessed=frozenset({selector}))
    if kind == 1:
        return replace(tables, not_present=frozenset({selector}))
    if kind == 2:
        return replace(tables, dpl=((selector, chooser.integer(0, 3)),))
    if kind == 3:  # INT n from CPL > 0 then #GPs on the gate's DPL
        return replace(tables, gate_dpl=0)
    if kind == 4:  # every delivery switches to IST1
        return replace(tables, ist1=ist_page + chooser.weighted(_KERNEL_RSP_OFFSETS))
    return replace(tables, tss_busy=False)  # LTR then succeeds and sets the busy bit


def draw_setup(chooser: Chooser, config: GeneratorConfig) -> Setup:
    """Control state, layout, scratch registers and descriptor tables of one case."""
    control = draw_control(chooser, config)
    shape = geometry(control.mode, bool(control.cr4 & CR4_LA57))
    layout = draw_layout(chooser, config, control.cpl, shape)
    if (
        control.cpl < 3
        and control.mode == "64"
        and half_of(layout.code_address) == 0
        and chooser.boolean(0.5)
    ):
        # Supervisor code in the user half with LASS off at first runs until a CR4 write
        # sets LASS; then its next fetch faults (LASS.md section 8 item 7).
        control = replace(control, cr4=control.cr4 & ~CR4_LASS)
    scratch = draw_scratch(chooser, layout)
    if not chooser.boolean(config.p_system):
        return Setup(control=control, layout=layout, scratch=scratch)
    system, pages = draw_system(chooser, config, control, layout)
    if control.mode == "compat":
        return Setup(control, layout, scratch, system, pages)
    return Setup(control, layout, scratch, system, (*pages, *_COMPAT_PAGES), COMPAT_ENTRY)
