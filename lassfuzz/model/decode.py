"""Instruction decoding with iced-x86 into a small operand description the semantics compile.

iced-x86 only tells what the bytes *are* (length, mnemonic, operands, prefixes); what they *do*
is written in :mod:`lassfuzz.model.instructions`. Decoding is done at address 0, so RIP-relative
displacements and branch targets come out relative to the instruction's first byte and the
description (and the plan compiled from it) can be reused wherever the same bytes appear.

The descriptions are values: the engine's decode cache shares them between cases, and nothing
writes to them. They are slotted dataclasses rather than frozen ones because a frozen dataclass
costs about twice as much to build, and a case builds several for each new instruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import iced_x86 as iced

from lassfuzz.model.faults import Unsupported

_MNEMONICS: Final = {getattr(iced.Mnemonic, n): n for n in dir(iced.Mnemonic) if n.isupper()}
_CODES: Final = {getattr(iced.Code, n): n for n in dir(iced.Code) if n.isupper()}
_SEGMENTS: Final = {
    iced.Register.ES: "es",
    iced.Register.CS: "cs",
    iced.Register.SS: "ss",
    iced.Register.DS: "ds",
    iced.Register.FS: "fs",
    iced.Register.GS: "gs",
}
_HIGH_BYTE_REGISTERS: Final = frozenset(
    {iced.Register.AH, iced.Register.CH, iced.Register.DH, iced.Register.BH}
)
_IMMEDIATES: Final = frozenset(
    {
        iced.OpKind.IMMEDIATE8,
        iced.OpKind.IMMEDIATE8_2ND,
        iced.OpKind.IMMEDIATE16,
        iced.OpKind.IMMEDIATE32,
        iced.OpKind.IMMEDIATE64,
        iced.OpKind.IMMEDIATE8TO16,
        iced.OpKind.IMMEDIATE8TO32,
        iced.OpKind.IMMEDIATE8TO64,
        iced.OpKind.IMMEDIATE32TO64,
    }
)
_STRING_SOURCES: Final = frozenset({iced.OpKind.MEMORY_SEG_RSI})
_STRING_DESTINATIONS: Final = frozenset({iced.OpKind.MEMORY_ESRDI})
_STRING_SOURCES32: Final = frozenset({iced.OpKind.MEMORY_SEG_ESI})
_STRING_DESTINATIONS32: Final = frozenset({iced.OpKind.MEMORY_ESEDI})
_UNSUPPORTED_STRING_FORMS: Final = frozenset(
    {
        iced.OpKind.MEMORY_SEG_SI,
        iced.OpKind.MEMORY_SEG_DI,
        iced.OpKind.MEMORY_SEG_EDI,
        iced.OpKind.MEMORY_SEG_RDI,
        iced.OpKind.MEMORY_ESDI,
    }
)
_RSI: Final = 6
_RDI: Final = 7
# iced constants the decoder compares against for every instruction.
_NO_MORE_BYTES: Final = iced.DecoderError.NO_MORE_BYTES
_LEGACY: Final = iced.EncodingKind.LEGACY
_NO_CONDITION: Final = iced.ConditionCode.NONE
_REGISTER: Final = iced.OpKind.REGISTER
_MEMORY: Final = iced.OpKind.MEMORY
_NO_REGISTER: Final = iced.Register.NONE
_INSTRUCTION_POINTERS: Final = frozenset({iced.Register.RIP, iced.Register.EIP})


@dataclass(slots=True, unsafe_hash=True)
class Reg:
    """A general-purpose register operand: GPR number, bit shift (8 for AH/CH/DH/BH), bytes."""

    index: int
    shift: int
    size: int


@dataclass(slots=True, unsafe_hash=True)
class Mem:
    """A ModRM/moffs memory operand. ``displacement`` includes, for RIP-relative operands, the
    distance from the instruction's first byte; ``address_bits`` is 64 or 32 (0x67 prefix, or
    compatibility mode). ``segment`` is the effective segment ("ss" for RSP/RBP bases without
    override). ``linear_bits`` is 32 in compatibility mode, where the linear address (segment
    base + offset) is truncated to 32 bits (SDM Vol. 3A 3.4.4 and docs/machine.md)."""

    segment: str
    base: int | None
    rip_relative: bool
    index: int | None
    scale: int
    displacement: int
    address_bits: int
    size: int
    linear_bits: int = 64


@dataclass(slots=True, unsafe_hash=True)
class StringMem:
    """The implicit operand of a string instruction: ``segment``:RSI (source, overridable) or
    ES:RDI (destination), ``size`` bytes; ``address_bits`` 32 uses ESI/EDI/ECX (0x67 prefix or
    compatibility mode)."""

    register: int
    segment: str
    size: int
    address_bits: int = 64


@dataclass(slots=True, unsafe_hash=True)
class Imm:
    """An immediate, as a u64 already sign- or zero-extended by the encoding."""

    value: int


@dataclass(slots=True, unsafe_hash=True)
class Branch:
    """A relative branch: the target is the instruction's address plus ``offset``, modulo
    2^64 (64-bit mode) or 2^32 (32-bit operand size in compatibility mode)."""

    offset: int


@dataclass(slots=True, unsafe_hash=True)
class SegReg:
    """A segment register operand (MOV/POP Sreg): its name, "cs" .. "gs"."""

    name: str


@dataclass(slots=True, unsafe_hash=True)
class ControlReg:
    """A control register (CR0..CR15) as a MOV operand."""

    number: int


Operand = Reg | Mem | StringMem | Imm | Branch | ControlReg | SegReg


@dataclass(slots=True, unsafe_hash=True)
class Decoded:
    """One decoded instruction: what the semantics need, and ``text`` to name it in messages.

    ``condition`` is the SDM condition-code nibble (tttn) of Jcc/SETcc/CMOVcc, else None;
    ``stack_increment`` is iced's RSP change (-8/-2 for pushes), used for operand sizes only.
    """

    mnemonic: str
    code: str
    raw: bytes
    operands: tuple[Operand, ...]
    lock: bool
    rep: bool
    repne: bool
    condition: int | None
    stack_increment: int
    bitness: int = 64

    @property
    def length(self) -> int:
        return len(self.raw)

    @property
    def text(self) -> str:
        """The Intel-syntax text, formatted only when a message needs it (most never do)."""
        if self.code == "INVALID_LOCK":
            return f"lock {_format(self.raw, self.bitness, iced.DecoderOptions.NO_INVALID_CHECK)}"
        return _format(self.raw, self.bitness)

    def describe(self, rip: int) -> str:
        """``'mnemonic text' (bytes) at RIP`` for messages naming this instruction."""
        return f"'{self.text}' ({self.raw.hex(' ')}) at {rip:#x}"


class NeedMoreBytes(Exception):
    """The instruction continues past the bytes given (the fetch must cross a page)."""


#: Formats instructions for messages only (Decoded.text); decoding never needs it.
_FORMATTER: Final = iced.Formatter(iced.FormatterSyntax.INTEL)


def _format(
    raw: bytes, bitness: int, options: iced.DecoderOptions_ = iced.DecoderOptions.NONE
) -> str:
    """The Intel-syntax text of the instruction ``raw`` (decoded at address 0, as decode does)."""
    return _FORMATTER.format(iced.Decoder(bitness, raw, ip=0, options=options).decode())


class _NotModelled(Exception):
    """An operand form the model does not describe; decode names the instruction."""


class InstructionDecoder:
    """Decodes 64-bit-mode or (``bitness`` 32) compatibility-mode instructions, whose default
    operand and address sizes are 32 bits (no REX: 0x40-0x4F are INC/DEC).

    Decoding has two steps: :meth:`instruction_at` finds the instruction's bytes (iced-x86),
    :meth:`describe` turns them into a :class:`Decoded`. The second depends on the bytes alone,
    so a caller may cache its result by them.
    """

    def decode(self, window: bytes, bitness: int = 64) -> Decoded:
        """Decode the instruction at the start of ``window`` (at most 15 bytes).

        Raises NeedMoreBytes if ``window`` ends inside it, Unsupported for bytes iced rejects
        or forms not modelled, and returns a description with ``code == "INVALID_LOCK"`` for a
        LOCK prefix on an instruction that cannot take it (SDM Vol. 2 "LOCK": #UD).
        """
        raw, instruction = self.instruction_at(window, bitness)
        return self.describe(raw, instruction, bitness)

    def instruction_at(
        self, window: bytes, bitness: int = 64
    ) -> tuple[bytes, iced.Instruction | None]:
        """The bytes of the instruction at the start of ``window`` and iced's instruction, None
        for a LOCK prefix the instruction cannot take. Raises NeedMoreBytes if ``window`` ends
        inside it, Unsupported for bytes iced rejects."""
        decoder = iced.Decoder(bitness, window, ip=0)
        instruction = decoder.decode()
        if decoder.last_error == _NO_MORE_BYTES:
            if len(window) >= 15:
                raise Unsupported(f"instruction longer than 15 bytes ({window.hex(' ')})")
            raise NeedMoreBytes
        if instruction.is_invalid:
            relaxed = iced.Decoder(
                bitness, window, ip=0, options=iced.DecoderOptions.NO_INVALID_CHECK
            ).decode()
            if not relaxed.is_invalid and relaxed.has_lock_prefix:
                return window[: relaxed.len], None
            raise Unsupported(f"undecodable instruction bytes ({window.hex(' ')})")
        return window[: instruction.len], instruction

    def describe(
        self, raw: bytes, instruction: iced.Instruction | None, bitness: int = 64
    ) -> Decoded:
        """The description of ``raw`` as :meth:`instruction_at` found it; Unsupported for
        operand forms not modelled."""
        if instruction is None:
            return Decoded("LOCK", "INVALID_LOCK", raw, (), True, False, False, None, 0, bitness)
        try:
            if instruction.encoding != _LEGACY:
                raise _NotModelled("VEX/EVEX/XOP encodings")
            operands = tuple(
                [_operand(instruction, number, bitness) for number in range(instruction.op_count)]
            )
        except _NotModelled as error:
            text = _FORMATTER.format(instruction)
            raise Unsupported(f"'{text}' ({raw.hex(' ')}): {error}") from None
        condition = instruction.condition_code
        return Decoded(
            _MNEMONICS.get(instruction.mnemonic, "?"),
            _CODES.get(instruction.code, "?"),
            raw,
            operands,
            instruction.has_lock_prefix,
            instruction.has_rep_prefix,
            instruction.has_repne_prefix,
            None if condition == _NO_CONDITION else condition - 1,
            instruction.stack_pointer_increment,
            bitness,
        )


def _gpr(register: iced.Register_) -> Reg:
    """The operand description of an iced general-purpose register (SDM Vol. 1 3.4.1)."""
    full = iced.RegisterExt.full_register(register)
    shift = 8 if register in _HIGH_BYTE_REGISTERS else 0
    return Reg(full - iced.Register.RAX, shift, iced.RegisterExt.size(register))


#: iced register -> its Reg, for every general-purpose register (Reg is immutable: shared).
_GPRS: Final = {
    value: _gpr(value)
    for name in dir(iced.Register)
    if name.isupper() and iced.RegisterExt.is_gpr(value := getattr(iced.Register, name))
}


def _operand(instruction: iced.Instruction, number: int, bitness: int) -> Operand:
    kind = instruction.op_kind(number)
    if kind == _REGISTER:
        register = instruction.op_register(number)
        gpr = _GPRS.get(register)
        if gpr is not None:
            return gpr
        if iced.RegisterExt.is_cr(register):
            return ControlReg(register - iced.Register.CR0)
        if register in _SEGMENTS:
            return SegReg(_SEGMENTS[register])
        raise _NotModelled(f"register operand {number} is not a GPR")
    if kind in _IMMEDIATES:
        return Imm(instruction.immediate(number))
    if kind == iced.OpKind.NEAR_BRANCH64:
        return Branch(instruction.near_branch64)
    if kind == iced.OpKind.NEAR_BRANCH32:
        return Branch(instruction.near_branch32)
    if kind == _MEMORY:
        return _memory(instruction, bitness)
    strings = (_STRING_SOURCES, _STRING_DESTINATIONS, _STRING_SOURCES32, _STRING_DESTINATIONS32)
    if any(kind in forms for forms in strings):
        number = _RSI if kind in _STRING_SOURCES or kind in _STRING_SOURCES32 else _RDI
        segment = _SEGMENTS[instruction.memory_segment] if number == _RSI else "es"
        bits = 64 if kind in _STRING_SOURCES or kind in _STRING_DESTINATIONS else 32
        return StringMem(number, segment, iced.MemorySizeExt.size(instruction.memory_size), bits)
    if kind in _UNSUPPORTED_STRING_FORMS:
        raise _NotModelled("string instruction with 16-bit addresses")
    raise _NotModelled(f"operand kind {kind} is not modelled")


def _memory(instruction: iced.Instruction, bitness: int) -> Mem:
    base = instruction.memory_base
    index = instruction.memory_index
    rip_relative = base in _INSTRUCTION_POINTERS
    address_bits = 64
    for register in (base, index):
        if register == _NO_REGISTER or register in _INSTRUCTION_POINTERS:
            continue
        gpr = _GPRS.get(register)
        if gpr is None:
            raise _NotModelled("vector-indexed addressing")
        if gpr.size == 2:
            raise _NotModelled("16-bit addressing")
        if gpr.size == 4:
            address_bits = 32
    if base == iced.Register.EIP:
        address_bits = 32
    if bitness == 32:
        # Compatibility mode: 32-bit addresses; an 0x67 prefix selects 16-bit addressing.
        if instruction.memory_displ_size == 2:
            raise _NotModelled("16-bit addressing")
        address_bits = 32
    # An absolute 0x67 address needs no mask: iced already zero-extends its disp32.
    return Mem(
        _SEGMENTS[instruction.memory_segment],
        None if base == _NO_REGISTER or rip_relative else _GPRS[base].index,
        rip_relative,
        None if index == _NO_REGISTER else _GPRS[index].index,
        instruction.memory_index_scale,
        instruction.memory_displacement,
        address_bits,
        iced.MemorySizeExt.size(instruction.memory_size),
        bitness,
    )
