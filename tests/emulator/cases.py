"""Hand-built cases for the emulator tests: small builders over lassfuzz.case, hex code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from lassfuzz.arch import CR4_LASS, CR4_PAE, CR4_SMAP, GPR_NAMES, RFLAGS_FIXED1
from lassfuzz.case import DEFAULT_CODE_ADDRESS, Page, State, TestCase
from lassfuzz.outcome import Registers

USER_DATA: Final = 0x0000_0000_0050_0000
KERNEL_DATA: Final = 0xFFFF_8000_0000_0000
KERNEL_STACK: Final = 0xFFFF_8000_0001_0000
LASS: Final = CR4_PAE | CR4_LASS
LASS_SMAP: Final = LASS | CR4_SMAP


def case(
    code_hex: str,
    *,
    cpl: int = 3,
    cr4: int = LASS,
    rflags: int = RFLAGS_FIXED1,
    pages: tuple[Page, ...] = (),
    lass_supported: bool = True,
    gprs: Mapping[str, int] | None = None,
    **registers: int,
) -> TestCase:
    """A case running ``code_hex`` at the default code address for ``cpl``; registers by name
    (keywords, or a ``gprs`` mapping for parametrized tests)."""
    values = [0] * 16
    for name, value in {**(gprs or {}), **registers}.items():
        values[GPR_NAMES.index(name)] = value
    state = State(
        cpl=cpl, cr4=cr4, rflags=rflags, gprs=tuple(values), lass_supported=lass_supported
    )
    return TestCase(state, bytes.fromhex(code_hex), DEFAULT_CODE_ADDRESS[cpl], pages)


def user_page(address: int = USER_DATA, *, writable: bool = True) -> Page:
    return Page(address, user=True, writable=writable)


def kernel_page(address: int = KERNEL_DATA) -> Page:
    return Page(address, user=False)


def gpr(registers: Registers | None, name: str) -> int:
    """A final GPR by name from ``Outcome.registers``."""
    assert registers is not None
    return registers.gprs[GPR_NAMES.index(name)]
