"""Small helpers to build model test cases by hand and read their outcomes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from iced_x86 import BlockEncoder, Instruction

from lassfuzz.arch import CR4_LASS, CR4_PAE, CR4_SMAP, CR4_SMEP, GPR_NAMES, PAGE_SIZE, RFLAGS_FIXED1
from lassfuzz.case import (
    COMPAT_CODE_ADDRESS,
    DEFAULT_CODE_ADDRESS,
    Page,
    State,
    System,
    TestCase,
    materialize,
)
from lassfuzz.model.engine import ReferenceModel
from lassfuzz.outcome import Outcome

#: CR4 with LASS and its companions on (the usual setting of a LASS kernel).
LASS_CR4 = CR4_PAE | CR4_SMEP | CR4_SMAP | CR4_LASS
USER_DATA = 0x0000_0000_0060_0000
KERNEL_DATA = 0xFFFF_8880_0000_0000
USER_STACK = 0x0000_0000_0070_0000
KERNEL_STACK = 0xFFFF_C900_0000_0000


def encode(*instructions: Instruction, address: int, bitness: int = 64) -> bytes:
    """Encode iced ``Instruction.create*`` objects at ``address``."""
    encoder = BlockEncoder(bitness)
    encoder.add_many(list(instructions))
    return bytes(encoder.encode(address))


def make_case(
    code: bytes | str | Iterable[Instruction],
    *,
    cpl: int = 0,
    regs: Mapping[str, int] | None = None,
    pages: Iterable[Page] = (),
    rflags: int = RFLAGS_FIXED1,
    cr4: int = LASS_CR4,
    code_address: int | None = None,
    **state: int | bool | str | System | None,
) -> TestCase:
    """A case with ``code`` (hex string, bytes or iced instructions) at the default address."""
    default = COMPAT_CODE_ADDRESS if state.get("mode") == "compat" else DEFAULT_CODE_ADDRESS[cpl]
    address = default if code_address is None else code_address
    if isinstance(code, str):
        raw = bytes.fromhex(code)
    elif isinstance(code, bytes):
        raw = code
    else:
        raw = encode(*code, address=address)
    values = dict.fromkeys(GPR_NAMES, 0)
    values.update(regs or {})
    return TestCase(
        state=State(
            cpl=cpl,
            gprs=tuple(values[name] for name in GPR_NAMES),
            rflags=rflags,
            cr4=cr4,
            **state,  # type: ignore[arg-type]
        ),
        code=raw,
        code_address=address,
        pages=tuple(pages),
    )


def run(case: TestCase, *, max_instructions: int = 10_000) -> Outcome:
    """Run ``case`` with the trace on."""
    return ReferenceModel(max_instructions=max_instructions).run(case, trace=True)


def reg(outcome: Outcome, name: str) -> int:
    assert outcome.registers is not None, outcome.detail
    return outcome.registers.as_dict()[name]


def linear_bytes(case: TestCase, outcome: Outcome, address: int, size: int) -> bytes:
    """Final bytes at a linear address (within one page) of the case's layout."""
    page = address & ~(PAGE_SIZE - 1)
    frame = materialize(case).page_frames[page]
    offset = address - page
    return outcome.memory[frame][offset : offset + size]


def leaf_entry(case: TestCase, memory: Mapping[int, bytes], address: int) -> int:
    """The leaf PTE of the page containing ``address`` in ``memory`` (frames by address)."""
    image = materialize(case)
    entry = image.cr3
    for shift in (39, 30, 21, 12):
        table = entry & 0x000F_FFFF_FFFF_F000
        slot = (address >> shift) & 0x1FF
        location = table + slot * 8
        entry = int.from_bytes(memory[location & ~0xFFF][location & 0xFFF :][:8], "little")
    return entry
