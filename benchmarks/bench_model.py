"""Benchmark the reference model: instructions/s and cases/s on one core.

Usage: ``python benchmarks/bench_model.py [--generated N] [--seed S] [--repeats R]``.
Two workloads: hand-built loops of ~16 mixed instructions (the per-instruction cost, target
>= 100k instructions/s) and generated cases (the per-case cost, including materialize()).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand, Register, Register_

from lassfuzz.arch import CR4_LASS, CR4_PAE, CR4_SMAP, GPR_NAMES, RFLAGS_AC, RFLAGS_FIXED1
from lassfuzz.case import Page, State, TestCase
from lassfuzz.generator.generate import generate_case
from lassfuzz.model.engine import ReferenceModel

R = Register
KERNEL_CODE = 0xFFFF_FFFF_8000_0000
KERNEL_DATA = 0xFFFF_8880_0000_0000
USER_CODE = 0x0000_0000_0040_0000
USER_DATA = 0x0000_0000_0060_0000


def _mixed_body(data: Register_) -> list[Instruction]:
    """16 instructions: loads, RMW stores, stack, LEA, flags consumers, a bit test."""
    return [
        Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, MemoryOperand(data)),
        Instruction.create_mem_reg(Code.ADD_RM64_R64, MemoryOperand(data, displ=8), R.RAX),
        Instruction.create_reg(Code.PUSH_R64, R.RAX),
        Instruction.create_reg(Code.POP_R64, R.RDX),
        Instruction.create_reg_mem(Code.LEA_R64_M, R.RSI, MemoryOperand(data, R.RCX, 8, 16)),
        Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EDX, R.EDX),
        Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RAX, R.RDX),
        Instruction.create_reg(Code.SETNE_RM8, R.BL),
        Instruction.create_reg_mem(Code.MOVZX_R32_RM8, R.ECX, MemoryOperand(data, displ=3)),
        Instruction.create_mem_i32(Code.SUB_RM32_IMM8, MemoryOperand(data, displ=16), 3),
        Instruction.create_reg_reg(Code.CMOVB_R64_RM64, R.RDI, R.RAX),
        Instruction.create_mem_reg(Code.BTS_RM64_R64, MemoryOperand(data, displ=24), R.RCX),
        Instruction.create_mem_reg(Code.XCHG_RM64_R64, MemoryOperand(data, displ=32), R.RDX),
        Instruction.create_reg_i32(Code.AND_RM64_IMM32, R.RAX, 0x7FFF_FFFF),
        Instruction.create_reg(Code.INC_RM64, R.R8),
        Instruction.create_mem(Code.PUSH_RM64, MemoryOperand(data, displ=40)),
    ]


def _loop(address: int, body: list[Instruction], counter: Register_) -> bytes:
    """``body`` followed by POP (rebalance the last push), DEC counter, JNZ to the start."""
    instructions = [
        *body,
        Instruction.create_reg(Code.POP_R64, R.R9),
        Instruction.create_reg(Code.DEC_RM64, counter),
        Instruction.create_branch(Code.JNE_REL32_64, address),
    ]
    for position, instruction in enumerate(instructions):
        instruction.ip = address + position  # distinct IPs; only the branch target matters
    encoder = BlockEncoder(64)
    encoder.add_many(instructions)
    return bytes(encoder.encode(address))


def loop_case(cpl: int, iterations: int) -> TestCase:
    """A loop of 19 instructions x ``iterations``, with LASS + SMAP on (AC set at CPL0)."""
    code_address, data = (USER_CODE, USER_DATA) if cpl == 3 else (KERNEL_CODE, KERNEL_DATA)
    code = _loop(code_address, _mixed_body(R.RBX), R.R15)
    gprs = dict.fromkeys(GPR_NAMES, 0)
    gprs.update(rbx=data, rsp=data + 0x1000, r15=iterations)
    state = State(
        cpl=cpl,
        gprs=tuple(gprs[name] for name in GPR_NAMES),
        cr4=CR4_PAE | CR4_SMAP | CR4_LASS,
        rflags=RFLAGS_FIXED1 | (RFLAGS_AC if cpl == 0 else 0),
    )
    page = Page(data, user=cpl == 3, data=bytes(range(256)) * 16)
    return TestCase(state=state, code=code, code_address=code_address, pages=(page,))


def _time(model: ReferenceModel, cases: Sequence[TestCase], repeats: int) -> tuple[float, int]:
    """Median seconds for one pass over ``cases`` and the instructions one pass executes."""
    times = []
    executed = 0
    for _ in range(repeats):
        start = time.perf_counter()
        executed = sum(model.run(case).instructions for case in cases)
        times.append(time.perf_counter() - start)
    return statistics.median(times), executed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generated", type=int, default=2000, help="generated cases to run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = ReferenceModel(max_instructions=100_000)

    loops = [loop_case(0, 500), loop_case(3, 500)]
    seconds, executed = _time(model, loops, args.repeats)
    print(f"mixed loops: {executed / seconds:,.0f} instructions/s ({executed} instructions)")

    short = [loop_case(cpl, 1) for cpl in (0, 3)] * 200
    seconds, executed = _time(model, short, args.repeats)
    print(
        f"19-instruction cases: {len(short) / seconds:,.0f} cases/s, "
        f"{executed / seconds:,.0f} instructions/s"
    )

    generated = [generate_case(args.seed, index) for index in range(args.generated)]
    seconds, executed = _time(model, generated, args.repeats)
    print(
        f"generated cases (seed {args.seed}): {len(generated) / seconds:,.0f} cases/s, "
        f"{executed / seconds:,.0f} instructions/s, {executed / len(generated):.1f} per case"
    )


if __name__ == "__main__":
    main()
