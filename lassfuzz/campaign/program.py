"""A case's code as an editable list of instructions, re-encoded in place.

The minimizer edits programs, not bytes: it decodes ``case.code`` once with iced-x86, drops or
rewrites items, and re-encodes at the same ``code_address``. Branches whose target was an
instruction boundary (or ``code_end``) follow that instruction by identity; other targets stay
absolute. Undecodable bytes are kept verbatim, since they may be what the case is about.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Final

from iced_x86 import (
    Decoder,
    Encoder,
    EncodingKind,
    Instruction,
    MandatoryPrefix,
    OpCodeInfo,
    OpKind,
    Register,
    RegisterExt,
)

from lassfuzz.arch import MASK64

#: Target of a branch to the end of the code (``code_end``), which moves as items are dropped.
END: Final = -1

_NEAR_BRANCH_KINDS: Final = frozenset(
    {OpKind.NEAR_BRANCH16, OpKind.NEAR_BRANCH32, OpKind.NEAR_BRANCH64}
)
_IMMEDIATE_KINDS: Final = frozenset(
    {
        OpKind.IMMEDIATE8,
        OpKind.IMMEDIATE8_2ND,
        OpKind.IMMEDIATE16,
        OpKind.IMMEDIATE32,
        OpKind.IMMEDIATE64,
        OpKind.IMMEDIATE8TO16,
        OpKind.IMMEDIATE8TO32,
        OpKind.IMMEDIATE8TO64,
        OpKind.IMMEDIATE32TO64,
    }
)
_CANONICAL_GPR: Final = {1: Register.AL, 2: Register.AX, 4: Register.EAX, 8: Register.RAX}
#: Legacy prefixes that may precede REX and the opcode (SDM Vol. 2A 2.1.1).
_LEGACY_PREFIXES: Final = frozenset(
    {0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67}
)
_OPERAND_SIZE_PREFIX: Final = 0x66
_REX_W: Final = 0x08
_MAX_OPERAND_COUNT: Final = 5
#: Layout passes before giving up; lengths only change when a short branch must become near.
_MAX_LAYOUT_ROUNDS: Final = 8


class EncodeError(ValueError):
    """A program that cannot be encoded (branch out of range, invalid operand combination)."""


@dataclass(frozen=True)
class Item:
    """One decoded instruction, or undecodable bytes kept as they are (``instruction`` None).

    ``ident`` is the item's position in the originally decoded program and never changes;
    ``target`` is the ``ident`` of a branch's target item, :data:`END`, or None for absolute
    targets and non-branches. ``original`` is emitted verbatim while that stays correct.
    The iced ``Instruction`` is never mutated: rewrites work on copies.
    """

    ident: int
    instruction: Instruction | None
    original: bytes
    original_ip: int
    target: int | None = None
    modified: bool = False

    @property
    def is_branch(self) -> bool:
        return self.instruction is not None and is_near_branch(self.instruction)

    def _position_dependent(self) -> bool:
        instruction = self.instruction
        return instruction is not None and (
            is_near_branch(instruction) or instruction.is_ip_rel_memory_operand
        )

    def emit(self, ip: int, target: int | None) -> bytes:
        """The bytes of this item at ``ip``, branching to ``target`` (absolute, if a branch)."""
        instruction = self.instruction
        if instruction is None:
            return self.original
        if not self.modified and (
            not self._position_dependent()
            or (
                ip == self.original_ip
                and (target is None or target == instruction.near_branch_target)
            )
        ):
            return self.original
        copy = instruction.copy()
        if target is not None:
            copy.near_branch64 = target
        try:
            return _encode(copy, ip)
        except ValueError as error:
            if not self.is_branch:
                raise EncodeError(f"{instruction} at {ip:#x}: {error}") from None
        copy.as_near_branch()
        try:
            return _encode(copy, ip)
        except ValueError as error:
            raise EncodeError(f"{instruction} at {ip:#x}: {error}") from None


def _encode(instruction: Instruction, ip: int) -> bytes:
    """Encode one instruction; a fresh encoder, since a failed encode leaves partial bytes."""
    encoder = Encoder(64)
    encoder.encode(instruction, ip)
    return bytes(encoder.take_buffer())


def is_near_branch(instruction: Instruction) -> bool:
    """Whether the instruction has a relative (near) branch target operand."""
    return any(
        instruction.op_kind(index) in _NEAR_BRANCH_KINDS for index in range(instruction.op_count)
    )


@dataclass(frozen=True)
class Program:
    """The instruction list of a case, placed at ``address``."""

    address: int
    items: tuple[Item, ...]

    @classmethod
    def decode(cls, code: bytes, address: int) -> Program:
        """Decode ``code`` as 64-bit code at ``address``; invalid bytes become raw items."""
        decoder = Decoder(64, code, ip=address)
        decoded: list[tuple[Instruction | None, bytes, int]] = []
        offset = 0
        for decoded_instruction in decoder:
            length = decoded_instruction.len
            valid = None if decoded_instruction.is_invalid else decoded_instruction
            decoded.append((valid, code[offset : offset + length], (address + offset) & MASK64))
            offset += length
        boundaries = {ip: ident for ident, (_, _, ip) in enumerate(decoded)}
        boundaries.setdefault((address + len(code)) & MASK64, END)
        items = []
        for ident, (instruction, raw, ip) in enumerate(decoded):
            target = None
            if instruction is not None and is_near_branch(instruction):
                target = boundaries.get(instruction.near_branch_target)
            items.append(Item(ident, instruction, raw, ip, target))
        return cls(address, tuple(items))

    def __len__(self) -> int:
        return len(self.items)

    def without(self, indices: Collection[int]) -> Program:
        """The program with the items at ``indices`` (positions, not idents) dropped."""
        kept = tuple(item for index, item in enumerate(self.items) if index not in indices)
        return replace(self, items=kept)

    def with_instruction(self, index: int, instruction: Instruction) -> Program:
        """The program with item ``index`` rewritten to ``instruction`` (same branch target)."""
        item = replace(self.items[index], instruction=instruction, modified=True)
        return replace(self, items=(*self.items[:index], item, *self.items[index + 1 :]))

    def encode(self) -> bytes:
        """The code bytes, laid out from ``address``; raises :class:`EncodeError`.

        A branch to a dropped item goes to the end of the code. Layout iterates because a
        short branch that no longer reaches is widened, which moves everything after it.
        """
        lengths = [len(item.original) for item in self.items]
        for _ in range(_MAX_LAYOUT_ROUNDS):
            ips = []
            ip = self.address
            for length in lengths:
                ips.append(ip)
                ip = (ip + length) & MASK64
            where = {item.ident: item_ip for item, item_ip in zip(self.items, ips, strict=True)}
            chunks = [
                item.emit(item_ip, self._target(item, where, ip))
                for item, item_ip in zip(self.items, ips, strict=True)
            ]
            new_lengths = [len(chunk) for chunk in chunks]
            if new_lengths == lengths:
                return b"".join(chunks)
            lengths = new_lengths
        raise EncodeError("branch layout did not converge")

    @staticmethod
    def _target(item: Item, where: dict[int, int], end: int) -> int | None:
        if item.instruction is None or not item.is_branch:
            return None
        if item.target is None:
            return int(item.instruction.near_branch_target)
        return where.get(item.target, end)


# --------------------------------------------------------------------------------------------
# Operand simplifications. Each step maps an instruction to the simpler variants worth trying,
# in order (first accepted wins), or to nothing when it does not apply. The minimizer re-runs
# each step on the instruction as the previous steps left it. Variants that make no
# sense for the instruction are left for the encoder to reject.
# --------------------------------------------------------------------------------------------

Simplifier = Callable[[Instruction], list[Instruction]]


def _immediate_step(operand: int) -> Simplifier:
    def step(instruction: Instruction) -> list[Instruction]:
        if operand >= instruction.op_count or (
            instruction.op_kind(operand) not in _IMMEDIATE_KINDS
        ):
            return []
        current = instruction.immediate(operand)
        variants = []
        for value in (0, 1):
            if current <= value:
                break
            copy = instruction.copy()
            copy.set_immediate_u64(operand, value)
            variants.append(copy)
        return variants

    return step


def _register_step(operand: int) -> Simplifier:
    def step(instruction: Instruction) -> list[Instruction]:
        if operand >= instruction.op_count or instruction.op_kind(operand) != OpKind.REGISTER:
            return []
        register = instruction.op_register(operand)
        canonical = _CANONICAL_GPR.get(RegisterExt.size(register))
        if not RegisterExt.is_gpr(register) or canonical is None or canonical == register:
            return []
        copy = instruction.copy()
        copy.set_op_register(operand, canonical)
        return [copy]

    return step


def _has_memory_operand(instruction: Instruction) -> bool:
    return any(instruction.op_kind(index) == OpKind.MEMORY for index in range(instruction.op_count))


def _drop_index(instruction: Instruction) -> list[Instruction]:
    if not _has_memory_operand(instruction) or instruction.memory_index == Register.NONE:
        return []
    copy = instruction.copy()
    copy.memory_index = Register.NONE
    copy.memory_index_scale = 1
    return [copy]


def _drop_displacement(instruction: Instruction) -> list[Instruction]:
    if (
        not _has_memory_operand(instruction)
        or instruction.is_ip_rel_memory_operand
        or instruction.memory_displacement == 0
    ):
        return []
    copy = instruction.copy()
    copy.memory_displacement = 0
    return [copy]


def _canonical_base(instruction: Instruction) -> list[Instruction]:
    base = instruction.memory_base
    if (
        not _has_memory_operand(instruction)
        or not RegisterExt.is_gpr(base)
        or RegisterExt.full_register(base) == Register.RAX
    ):
        return []
    copy = instruction.copy()
    copy.memory_base = _CANONICAL_GPR[RegisterExt.size(base)]
    return [copy]


def _drop_segment_override(instruction: Instruction) -> list[Instruction]:
    if instruction.segment_prefix == Register.NONE:
        return []
    copy = instruction.copy()
    copy.segment_prefix = Register.NONE
    return [copy]


def _drop_lock(instruction: Instruction) -> list[Instruction]:
    if not instruction.has_lock_prefix:
        return []
    copy = instruction.copy()
    copy.has_lock_prefix = False
    return [copy]


def _drop_rep(instruction: Instruction) -> list[Instruction]:
    if not (instruction.has_rep_prefix or instruction.has_repne_prefix):
        return []
    copy = instruction.copy()
    copy.has_rep_prefix = False
    copy.has_repne_prefix = False
    return [copy]


def _resize(instruction: Instruction, bits: int) -> Instruction | None:
    """The instruction with operand size ``bits`` (32 or 64), or None if there is no such form.

    Done on the encoding: operand size is the 0x66 prefix and REX.W for every legacy opcode, so
    rewriting those and decoding again finds the right iced ``Code`` without a table. Zero
    padding lets an immediate grow (``66 05 iw`` becomes ``05 id``).
    """
    info = OpCodeInfo(instruction.code)
    if (
        instruction.encoding != EncodingKind.LEGACY
        or info.mandatory_prefix == MandatoryPrefix.P66
        or is_near_branch(instruction)
        or instruction.is_ip_rel_memory_operand
    ):
        return None
    try:
        encoded = _encode(instruction, instruction.ip)
    except ValueError:
        return None
    start = 0
    while start < len(encoded) and encoded[start] in _LEGACY_PREFIXES:
        start += 1
    prefixes = bytes(byte for byte in encoded[:start] if byte != _OPERAND_SIZE_PREFIX)
    rex = encoded[start] if 0x40 <= encoded[start] <= 0x4F else None
    body = encoded[start + (rex is not None) :]
    if bits == 64:
        rex = (rex or 0x40) | _REX_W
    elif rex is not None:
        rex &= ~_REX_W
    resized = prefixes + (b"" if rex is None else bytes([rex])) + body
    padded = resized + bytes(8)
    candidate = Decoder(64, padded, ip=instruction.ip).decode()
    if (
        candidate.is_invalid
        or candidate.mnemonic != instruction.mnemonic
        or OpCodeInfo(candidate.code).operand_size != bits
        or candidate.op_count != instruction.op_count
        or candidate.len < len(resized)
    ):
        return None
    return candidate


def _operand_size(instruction: Instruction) -> list[Instruction]:
    """64-bit first, then 32; never narrower, so the step cannot undo itself."""
    current = OpCodeInfo(instruction.code).operand_size
    wanted = (64,) if current == 32 else (64, 32) if current == 16 else ()
    return [variant for bits in wanted if (variant := _resize(instruction, bits)) is not None]


#: Operand simplifications in the order the minimizer tries them.
OPERAND_STEPS: Final[tuple[Simplifier, ...]] = (
    *(_immediate_step(operand) for operand in range(_MAX_OPERAND_COUNT)),
    *(_register_step(operand) for operand in range(_MAX_OPERAND_COUNT)),
    _drop_index,
    _drop_displacement,
    _drop_segment_override,
    _canonical_base,
    _drop_lock,
    _drop_rep,
    _operand_size,
)
