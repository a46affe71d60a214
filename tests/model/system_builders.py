"""Cases with descriptor tables for the model's system-level tests (docs/machine.md "System
level"): the standard GDT/IDT/TSS of lassfuzz.system, each table placed in either half."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from lassfuzz.arch import CR4_LASS, CR4_PAE, CR4_SMAP, EFER_SCE, GPR_NAMES, RFLAGS_FIXED1
from lassfuzz.case import (
    COMPAT_CODE_ADDRESS,
    DEFAULT_CODE_ADDRESS,
    DEFAULT_EFER,
    Page,
    State,
    TestCase,
)
from lassfuzz.system import Tables, standard_gdt, standard_idt, tss

#: CR4 for system cases: LASS and SMAP on, SMEP off so that handlers are found by LASS alone.
SYSTEM_CR4 = CR4_PAE | CR4_SMAP | CR4_LASS
SUPERVISOR = {
    "gdt": 0xFFFF_FFFF_8010_0000,
    "idt": 0xFFFF_FFFF_8011_0000,
    "tss": 0xFFFF_FFFF_8012_0000,
}
USER = {"gdt": 0x0000_0000_0050_0000, "idt": 0x0000_0000_0051_0000, "tss": 0x0000_0000_0052_0000}
HANDLER = 0xFFFF_FFFF_8013_0000
KERNEL_STACK = 0xFFFF_C900_0000_0000
USER_STACK = 0x0000_0000_0070_0000
RSP0 = KERNEL_STACK + 0x1000


def system_case(
    code: bytes | str,
    *,
    cpl: int = 0,
    mode: str = "64",
    user_tables: Iterable[str] = (),
    regs: Mapping[str, int] | None = None,
    rflags: int = RFLAGS_FIXED1,
    cr4: int = SYSTEM_CR4,
    rsp0: int = RSP0,
    ist: tuple[int, ...] = (0,) * 7,
    code_address: int | None = None,
    pages: Iterable[Page] = (),
    lstar: int = 0,
) -> TestCase:
    """A case with the standard tables; those named in ``user_tables`` ("gdt", "idt",
    "tss") lie in the user half (user pages), the others in the supervisor half. Every
    handler is a HLT at HANDLER (CPL 0: the case halts there). Kernel and user stack pages
    are present."""
    places = {name: USER[name] if name in user_tables else SUPERVISOR[name] for name in USER}
    tables = Tables(gdt=places["gdt"], idt=places["idt"], tss=places["tss"], handler=HANDLER,
                    rsp0=rsp0)  # fmt: skip
    contents = {
        places["gdt"]: standard_gdt(places["tss"]),
        places["idt"]: standard_idt(HANDLER),
        places["tss"]: tss(rsp=(rsp0, 0, 0), ist=ist),
        HANDLER: b"\xf4",
        KERNEL_STACK: b"",
        USER_STACK: b"",
    }
    extra = {page.address: page for page in pages}
    all_pages = [
        extra.pop(address, Page(address, user=not address >> 63, data=data,
                                writable=address != HANDLER))
        for address, data in contents.items()
    ] + list(extra.values())  # fmt: skip
    values = dict.fromkeys(GPR_NAMES, 0)
    values.update(regs or {})
    system = tables.system(mode=mode, cpl=cpl)
    system = type(system)(**{**system.__dict__, "lstar": lstar})
    if code_address is None:
        code_address = COMPAT_CODE_ADDRESS if mode == "compat" else DEFAULT_CODE_ADDRESS[cpl]
    state = State(
        mode=mode,
        cpl=cpl,
        gprs=tuple(values[name] for name in GPR_NAMES),
        rflags=rflags,
        cr4=cr4,
        efer=DEFAULT_EFER | EFER_SCE,
        system=system,
    )
    raw = bytes.fromhex(code) if isinstance(code, str) else code
    return TestCase(state=state, code=raw, code_address=code_address, pages=tuple(all_pages))


def patched(case: TestCase, address: int, data: bytes) -> TestCase:
    """``case`` with ``data`` written at linear ``address`` (in one of its listed pages)."""
    pages = []
    for page in case.pages:
        if page.address == address & ~0xFFF:
            content = bytearray(page.data.ljust(4096, b"\0"))
            offset = address & 0xFFF
            content[offset : offset + len(data)] = data
            page = replace(page, data=bytes(content))
        pages.append(page)
    return replace(case, pages=tuple(pages))
