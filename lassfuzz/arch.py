"""Architectural constants of x86-64 shared by every part of lassfuzz.

Only *names and bit positions* from the Intel SDM live here (register order, control-register
bits, exception vectors). No decision logic: the reference model and the emulator shim each
implement the rules on their own, so a wrong rule cannot hide by being shared.
"""

from __future__ import annotations

from typing import Final

PAGE_SIZE: Final = 0x1000
PAGE_MASK: Final = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
MASK64: Final = 0xFFFF_FFFF_FFFF_FFFF
BIT63: Final = 1 << 63

#: General-purpose registers in encoding order (ModRM/REX numbering).
GPR_NAMES: Final = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
RSP: Final = 4
RBP: Final = 5

# CR0 (SDM Vol. 3A 2.5)
CR0_PE: Final = 1 << 0
CR0_MP: Final = 1 << 1
CR0_EM: Final = 1 << 2
CR0_TS: Final = 1 << 3
CR0_ET: Final = 1 << 4
CR0_NE: Final = 1 << 5
CR0_WP: Final = 1 << 16
CR0_AM: Final = 1 << 18
CR0_NW: Final = 1 << 29
CR0_CD: Final = 1 << 30
CR0_PG: Final = 1 << 31

# CR4 (SDM Vol. 3A 2.5)
CR4_PSE: Final = 1 << 4
CR4_PAE: Final = 1 << 5
CR4_PGE: Final = 1 << 7
CR4_OSFXSR: Final = 1 << 9
CR4_OSXMMEXCPT: Final = 1 << 10
CR4_LA57: Final = 1 << 12
CR4_SMEP: Final = 1 << 20
CR4_SMAP: Final = 1 << 21
CR4_LASS: Final = 1 << 27

# IA32_EFER (SDM Vol. 3A 2.2.1)
EFER_SCE: Final = 1 << 0
EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10
EFER_NXE: Final = 1 << 11

# RFLAGS (SDM Vol. 1 3.4.3)
RFLAGS_CF: Final = 1 << 0
RFLAGS_FIXED1: Final = 1 << 1
RFLAGS_PF: Final = 1 << 2
RFLAGS_AF: Final = 1 << 4
RFLAGS_ZF: Final = 1 << 6
RFLAGS_SF: Final = 1 << 7
RFLAGS_TF: Final = 1 << 8
RFLAGS_IF: Final = 1 << 9
RFLAGS_DF: Final = 1 << 10
RFLAGS_OF: Final = 1 << 11
RFLAGS_IOPL: Final = 3 << 12
RFLAGS_NT: Final = 1 << 14
RFLAGS_RF: Final = 1 << 16
RFLAGS_VM: Final = 1 << 17
RFLAGS_AC: Final = 1 << 18
RFLAGS_VIF: Final = 1 << 19
RFLAGS_VIP: Final = 1 << 20
RFLAGS_ID: Final = 1 << 21
RFLAGS_STATUS: Final = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF

# Exception vectors (SDM Vol. 3A 6.3.1)
VEC_DE: Final = 0
VEC_DB: Final = 1
VEC_BP: Final = 3
VEC_UD: Final = 6
VEC_DF: Final = 8
VEC_TS: Final = 10
VEC_NP: Final = 11
VEC_SS: Final = 12
VEC_GP: Final = 13
VEC_PF: Final = 14
VEC_AC: Final = 17

VECTOR_NAMES: Final = {
    VEC_DE: "#DE",
    VEC_DB: "#DB",
    VEC_BP: "#BP",
    VEC_UD: "#UD",
    VEC_DF: "#DF",
    VEC_TS: "#TS",
    VEC_NP: "#NP",
    VEC_SS: "#SS",
    VEC_GP: "#GP",
    VEC_PF: "#PF",
    VEC_AC: "#AC",
}

#: Vectors that push an error code (SDM Vol. 3A Table 6-1).
VECTORS_WITH_ERROR_CODE: Final = frozenset({VEC_DF, VEC_TS, VEC_NP, VEC_SS, VEC_GP, VEC_PF, VEC_AC})

# Page-table entry bits (SDM Vol. 3A 4.5)
PTE_P: Final = 1 << 0
PTE_RW: Final = 1 << 1
PTE_US: Final = 1 << 2
PTE_A: Final = 1 << 5
PTE_D: Final = 1 << 6
PTE_PS: Final = 1 << 7
PTE_NX: Final = 1 << 63
PTE_ADDR: Final = 0x000F_FFFF_FFFF_F000

# #PF error code bits (SDM Vol. 3A 4.7)
PFEC_P: Final = 1 << 0
PFEC_W: Final = 1 << 1
PFEC_U: Final = 1 << 2
PFEC_RSVD: Final = 1 << 3
PFEC_I: Final = 1 << 4


def is_supervisor_half(address: int) -> bool:
    """Bit 63 of a 64-bit linear address (the LASS half selector)."""
    return bool(address & BIT63)
