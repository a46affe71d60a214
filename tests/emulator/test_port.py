"""The machine's C-API door to Unicorn (lassfuzz.emulator.port): same answers as the binding."""

from __future__ import annotations

from typing import Any

import pytest
import unicorn
from unicorn.unicorn_const import UC_ARCH_X86, UC_MODE_64
from unicorn.x86_const import (
    UC_CPU_X86_BROADWELL,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_GDTR,
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RIP,
    UC_X86_REG_XMM3,
)

from lassfuzz.arch import PAGE_SIZE
from lassfuzz.emulator.port import FastPort, RawRegisters, UcError

MSR_EFER = 0xC000_0080


@pytest.fixture
def uc() -> Any:
    uc = unicorn.Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(UC_CPU_X86_BROADWELL)
    uc.mem_map(0, 0x10_0000)
    return uc


def test_registers_read_and_write_like_the_binding(uc: Any) -> None:
    port = FastPort(uc)
    registers = (UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_EFLAGS)
    port.reg_write_batch(registers, (2**64 - 1, 7, 0x202))
    assert [uc.reg_read(register) for register in registers] == [2**64 - 1, 7, 0x202]
    uc.reg_write(UC_X86_REG_RBX, 0x1234)
    assert port.reg_read_batch(registers) == (2**64 - 1, 0x1234, 0x202)
    port.reg_write(UC_X86_REG_RIP, 0x5000)
    assert (port.reg_read(UC_X86_REG_RIP), uc.reg_read(UC_X86_REG_RIP)) == (0x5000, 0x5000)
    # EFLAGS is 32 bits wide: a read after a 64-bit value in the buffer has no stale high half
    assert port.reg_read(UC_X86_REG_EFLAGS) == 0x202


def test_msr_read_and_write_like_the_binding(uc: Any) -> None:
    port = FastPort(uc)
    port.msr_write(MSR_EFER, 0x500)
    assert uc.msr_read(MSR_EFER) == 0x500 == port.msr_read(MSR_EFER)


def test_frames_are_read_and_written_in_runs(uc: Any) -> None:
    port = FastPort(uc)
    frames = {
        address: bytes([index + 1]) * PAGE_SIZE
        for index, address in enumerate((0x1000, 0x2000, 0x3000, 0x8000))
    }
    port.write_frames(frames)
    assert bytes(uc.mem_read(0x2000, PAGE_SIZE)) == frames[0x2000]
    assert bytes(uc.mem_read(0x4000, 16)) == bytes(16)  # between the two runs: untouched
    assert port.read_frames(frames) == frames
    assert port.mem_read(0x1FFE, 4) == b"\x01\x01\x02\x02"


def test_failures_raise_unicorns_error(uc: Any) -> None:
    port = FastPort(uc)
    with pytest.raises(UcError):
        port.mem_read(0x2000_0000, 8)  # unmapped
    with pytest.raises(UcError):
        port.mem_write(0x2000_0000, b"\0")


def test_code_hooks_dispatch_per_hook_and_delete(uc: Any) -> None:
    port = FastPort(uc)
    uc.mem_write(0x1000, bytes.fromhex("90" * 4))  # nop x4
    seen: list[tuple[str, int]] = []
    first = port.hook_code(0x1000, 0x1000, lambda address, size: seen.append(("a", address)))
    port.hook_code(0x1002, 0x1003, lambda address, size: seen.append(("b", address)))
    uc.emu_start(0x1000, 0x1004)
    assert seen == [("a", 0x1000), ("b", 0x1002), ("b", 0x1003)]
    port.hook_del(first)
    seen.clear()
    uc.ctl_remove_cache(0x1000, 0x1004)  # translated blocks carry their hooks
    uc.emu_start(0x1000, 0x1004)
    assert seen == [("b", 0x1002), ("b", 0x1003)]


def test_raw_registers_carry_any_register_type(uc: Any) -> None:
    port = FastPort(uc)
    carried = RawRegisters(port, (UC_X86_REG_XMM3, UC_X86_REG_GDTR, UC_X86_REG_RAX))
    uc.reg_write(UC_X86_REG_XMM3, 0x1122_3344_5566_7788_99AA_BBCC_DDEE_FF00)
    uc.reg_write(UC_X86_REG_GDTR, (0, 0xFFFF_8000_0000_1000, 0x7F, 0))
    uc.reg_write(UC_X86_REG_RAX, 9)
    carried.save()
    uc.reg_write(UC_X86_REG_XMM3, 0)
    uc.reg_write(UC_X86_REG_GDTR, (0, 0, 0, 0))
    uc.reg_write(UC_X86_REG_RAX, 0)
    carried.restore()
    assert uc.reg_read(UC_X86_REG_XMM3) == 0x1122_3344_5566_7788_99AA_BBCC_DDEE_FF00
    assert uc.reg_read(UC_X86_REG_GDTR)[1:3] == (0xFFFF_8000_0000_1000, 0x7F)
    assert uc.reg_read(UC_X86_REG_RAX) == 9
