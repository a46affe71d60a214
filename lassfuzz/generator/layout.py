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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from iced_x86 import Register

if TYPE_CHECKING:  # iced's stubs type codes and registers as enums; at run time they are ints
    from iced_x86._iced_x86_py import Register as RegisterValue

from lassfuzz.arch import (
    CR0_WP,
    CR4_LASS,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PGE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    GPR_NAMES,
    MASK64,
    PAGE_SIZE,
    RFLAGS_AC,
    RFLAGS_AF,
    RFLAGS_CF,
    RFLAGS_DF,
    RFLAGS_OF,
    RFLAGS_PF,
    RFLAGS_SF,
    RFLAGS_ZF,
)
from lassfuzz.case import DEFAULT_CR0, DEFAULT_CR4, DEFAULT_RFLAGS, Page, State, is_canonical48
from lassfuzz.generator.choices import Chooser, Weighted
from lassfuzz.generator.config import GeneratorConfig

USER_TOP_PAGE: Final = 0x0000_7FFF_FFFF_F000
SUPERVISOR_BOTTOM_PAGE: Final = 0xFFFF_8000_0000_0000
WRAP_PAGE: Final = 0xFFFF_FFFF_FFFF_F000
#: The pages at the half boundaries (LASS.md section 8): 0 and the wrap page are reached with
#: absolute disp32 operands, the two middle ones through home registers.
BOUNDARY_PAGES: Final = (0x0, USER_TOP_PAGE, SUPERVISOR_BOTTOM_PAGE, WRAP_PAGE)
#: First non-canonical pages on either side of the canonical hole.
NON_CANONICAL_PAGES: Final = (0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000)

#: Code and landing-pad regions per half (index: 0 = user half, 1 = supervisor half).
CODE_REGIONS: Final = (0x0000_0000_0040_0000, 0xFFFF_FFFF_8000_0000)
PAD_REGIONS: Final = (0x0000_0000_0080_0000, 0xFFFF_FFFF_8080_0000)
#: Ordinary data and stack pages are drawn from these ranges (far from the code regions).
DATA_RANGES: Final = (
    (0x0000_0001_0000_0000, 0x0000_7FFF_0000_0000),
    (0xFFFF_8000_1000_0000, 0xFFFF_FFFF_0000_0000),
)

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


@dataclass(frozen=True)
class Layout:
    """Pages, code placement and address-register values of one case.

    ``targets`` are the page bases memory operands aim at (mapped, unmapped and non-canonical);
    ``safe_targets`` the mapped ones the case's CPL can read and write without any fault, so
    that most accesses succeed and later instructions run. ``far_targets`` are branch targets
    outside the code (landing pads, unmapped pages, non-canonical addresses). ``pads`` are
    landing-pad pages whose code is filled in once the case's code end is known.
    """

    pages: tuple[Page, ...]
    code_address: int
    code_page: Page | None
    pads: tuple[Page, ...]
    targets: tuple[int, ...]
    safe_targets: tuple[int, ...]
    far_targets: tuple[int, ...]
    registers: tuple[tuple[RegisterValue, int], ...]
    fs_base: int
    gs_base: int

    def value(self, register: RegisterValue) -> int:
        """Initial value of an address register (0 for registers the layout does not set)."""
        for reg, value in self.registers:
            if reg == register:
                return value
        return 0


@dataclass(frozen=True)
class Setup:
    """Everything about a case but its code."""

    control: Control
    layout: Layout
    scratch: tuple[tuple[RegisterValue, int], ...]

    def state(self) -> State:
        """The case's initial :class:`State`."""
        values = dict(self.scratch)
        values.update(self.layout.registers)
        gprs = tuple(values.get(_GPR_REGISTERS[name], 0) for name in GPR_NAMES)
        control = self.control
        return State(
            cpl=control.cpl,
            gprs=gprs,
            rflags=control.rflags,
            cr0=control.cr0,
            cr4=control.cr4,
            fs_base=self.layout.fs_base,
            gs_base=self.layout.gs_base,
            lass_supported=control.lass_supported,
        )


_GPR_REGISTERS: Final = {name: getattr(Register, name.upper()) for name in GPR_NAMES}


def draw_control(chooser: Chooser, config: GeneratorConfig) -> Control:
    """CPL, CPUID LASS bit, CR0/CR4 and RFLAGS, within what docs/machine.md supports."""
    cpl = 3 if chooser.boolean(config.p_cpl3) else 0
    lass_supported = not chooser.boolean(1.0 - config.p_lass_supported)
    cr4 = DEFAULT_CR4
    if lass_supported and chooser.boolean(config.p_lass):
        cr4 |= CR4_LASS
    if chooser.boolean(config.p_smap):
        cr4 |= CR4_SMAP
    if chooser.boolean(config.p_smep):
        cr4 |= CR4_SMEP
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
    return Control(cpl=cpl, lass_supported=lass_supported, cr0=cr0, cr4=cr4, rflags=rflags)


def _page(chooser: Chooser, config: GeneratorConfig, address: int) -> Page:
    """A data page with independently drawn U/S, R/W, NX, P, A, D bits and a little content."""
    natural = half_of(address) == 0
    user = not natural if chooser.boolean(1.0 - config.p_natural_user_bit) else natural
    accessed_dirty = chooser.choice((0, 0, 1, 2))  # A/D clear, A set, A and D set
    size = chooser.choice((0, 16, 64))
    return Page(
        address=address,
        user=user,
        writable=not chooser.boolean(0.15),
        nx=chooser.boolean(0.2),
        present=not chooser.boolean(0.1),
        accessed=accessed_dirty > 0,
        dirty=accessed_dirty > 1,
        # Without trailing zeros: the JSON form drops them, so cases round-trip exactly.
        data=chooser.data(size).rstrip(b"\0") if size else b"",
    )


def _ordinary_page(chooser: Chooser, half: int) -> int:
    lo, hi = DATA_RANGES[half]
    return lo + chooser.integer(0, (hi - lo) // PAGE_SIZE - 1) * PAGE_SIZE


def draw_layout(chooser: Chooser, config: GeneratorConfig, cpl: int) -> Layout:
    """Data pages (boundary and ordinary), stack, code placement and address registers."""
    natural_half = 0 if cpl == 3 else 1
    pages: dict[int, Page] = {}
    # Boundary pages; the two middle ones need a home register, ordinary pages fill the rest.
    homes: list[int] = []
    for address in BOUNDARY_PAGES:
        if chooser.boolean(0.7):
            pages[address] = _page(chooser, config, address)
            if address in (USER_TOP_PAGE, SUPERVISOR_BOTTOM_PAGE):
                homes.append(address)
    for slot in range(len(HOME_REGISTERS) - len(homes)):
        if slot < 2 or chooser.boolean(0.6):
            address = _ordinary_page(chooser, slot % 2)
            if address not in pages:
                pages[address] = _page(chooser, config, address)
                homes.append(address)
                if chooser.boolean(0.3) and address + PAGE_SIZE not in pages:
                    pages[address + PAGE_SIZE] = _page(chooser, config, address + PAGE_SIZE)
    # The stack: a page of its own, usually in the half the CPL may use, or a boundary page.
    stack_half = 1 - natural_half if chooser.boolean(config.p_stack_other_half) else natural_half
    if chooser.boolean(0.2):
        stack_page = chooser.choice(BOUNDARY_PAGES)
    else:
        stack_page = _ordinary_page(chooser, stack_half)
    if stack_page not in pages:
        stack = _page(chooser, config, stack_page)
        if not chooser.boolean(0.2):  # mostly a usable stack, so that later instructions run
            stack = Page(stack_page, user=half_of(stack_page) == 0, data=stack.data)
        pages[stack_page] = stack
    rsp = (stack_page + chooser.weighted(_RSP_OFFSETS)) & MASK64
    rbp = (rsp + chooser.choice(_RBP_ABOVE_RSP)) & MASK64

    registers: list[tuple[RegisterValue, int]] = [(Register.RSP, rsp), (Register.RBP, rbp)]
    data_pages = sorted(pages)
    for index, register in enumerate(HOME_REGISTERS):
        page = homes[index] if index < len(homes) else chooser.choice(data_pages)
        registers.append((register, (page + chooser.weighted(_POINTER_OFFSETS)) & MASK64))
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
        registers.append((register, value & MASK64))
    registers.append((INDEX_REGISTER, chooser.choice(INDEX_VALUES)))
    segment_bases = (0, *data_pages)
    fs_base = chooser.choice(segment_bases)
    gs_base = chooser.choice(segment_bases)

    # Code: usually where the CPL may fetch, sometimes in the other half.
    code_half = 1 - natural_half if chooser.boolean(config.p_code_other_half) else natural_half
    code_address = CODE_REGIONS[code_half] + chooser.integer(0, 15) * PAGE_SIZE
    code_address += chooser.integer(0, 0x100)
    code_page = None
    if chooser.boolean(0.03):  # a code page whose U/S bit contradicts the CPL (SMEP, #PF)
        code_page = Page(code_address & ~(PAGE_SIZE - 1), user=cpl != 3, writable=False)

    # Landing pads and far branch targets in the other half (branch-then-fetch).
    other_half = 1 - code_half
    pads: list[Page] = []
    if chooser.boolean(0.7):
        pad_address = PAD_REGIONS[other_half] + chooser.integer(0, 15) * PAGE_SIZE
        natural_user = other_half == 0
        user = (
            not natural_user if chooser.boolean(1.0 - config.p_natural_user_bit) else natural_user
        )
        pads.append(Page(pad_address, user=user, writable=False))
    far_targets = (
        *(pad.address for pad in pads),
        PAD_REGIONS[other_half] + 0x10_0000,  # unmapped, other half
        PAD_REGIONS[code_half] + 0x10_0000,  # unmapped, same half
        chooser.choice(NON_CANONICAL_PAGES),
    )
    targets = [*data_pages]
    for address in data_pages:
        for neighbour in ((address - PAGE_SIZE) & MASK64, (address + PAGE_SIZE) & MASK64):
            if neighbour not in pages and is_canonical48(neighbour):
                targets.append(neighbour)
    targets.extend(page for page in NON_CANONICAL_PAGES if chooser.boolean(0.3))
    return Layout(
        pages=tuple(pages[address] for address in sorted(pages)),
        code_address=code_address,
        code_page=code_page,
        pads=tuple(pads),
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


def draw_setup(chooser: Chooser, config: GeneratorConfig) -> Setup:
    """Control state, layout and scratch registers of one case."""
    control = draw_control(chooser, config)
    layout = draw_layout(chooser, config, control.cpl)
    return Setup(control=control, layout=layout, scratch=draw_scratch(chooser, layout))
