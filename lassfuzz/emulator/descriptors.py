"""Segment descriptors, system descriptors and gates as the Unicorn machine's shim reads them.

Cases with descriptor tables (``State.system``) have the shim emulate every instruction that
loads a descriptor, because QEMU cannot be told that those reads are implicit supervisor
accesses (its TLB-fill hook sees no MMU index). This module only decodes the bytes (SDM Vol. 3A
3.4.5, 3.5, 6.14.1, 5.8.3.1); the checks are in :mod:`lassfuzz.emulator.system`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

TYPE_LDT: Final = 0x2
TYPE_TSS_AVAILABLE: Final = 0x9
TYPE_TSS_BUSY: Final = 0xB
TYPE_CALL_GATE: Final = 0xC
TYPE_INTERRUPT_GATE: Final = 0xE
TYPE_TRAP_GATE: Final = 0xF
#: Bit of the type field: accessed (code/data), busy (TSS).
TYPE_ACCESSED: Final = 0x1
TYPE_BUSY: Final = 0x2


@dataclass(frozen=True)
class Descriptor:
    """An 8-byte descriptor (``high`` holds bytes 8-15 of a 16-byte system descriptor or gate)."""

    low: int
    high: int = 0

    @property
    def type(self) -> int:
        return (self.low >> 40) & 0xF

    @property
    def s(self) -> bool:
        """Code or data (S = 1), not a system descriptor or gate."""
        return bool(self.low >> 44 & 1)

    @property
    def dpl(self) -> int:
        return (self.low >> 45) & 3

    @property
    def present(self) -> bool:
        return bool(self.low >> 47 & 1)

    @property
    def long(self) -> bool:
        return bool(self.low >> 53 & 1)

    @property
    def default32(self) -> bool:
        return bool(self.low >> 54 & 1)

    @property
    def code(self) -> bool:
        return self.s and bool(self.type & 0x8)

    @property
    def data(self) -> bool:
        return self.s and not self.type & 0x8

    @property
    def conforming(self) -> bool:
        return self.code and bool(self.type & 0x4)

    @property
    def readable(self) -> bool:
        """Data segments are always readable; code segments when R = 1."""
        return self.data or (self.code and bool(self.type & 0x2))

    @property
    def writable(self) -> bool:
        return self.data and bool(self.type & 0x2)

    @property
    def accessed(self) -> bool:
        return bool(self.type & TYPE_ACCESSED)

    @property
    def base(self) -> int:
        """The 32-bit base of a code/data descriptor (64 bits for a system descriptor)."""
        base = (self.low >> 16) & 0xFF_FFFF | ((self.low >> 56) & 0xFF) << 24
        return base if self.s else base | (self.high & 0xFFFF_FFFF) << 32

    @property
    def limit(self) -> int:
        """The byte-granular limit (G scales 4 KiB units)."""
        raw = self.low & 0xFFFF | ((self.low >> 48) & 0xF) << 16
        return raw << 12 | 0xFFF if self.low >> 55 & 1 else raw

    @property
    def gate_selector(self) -> int:
        return (self.low >> 16) & 0xFFFF

    @property
    def gate_offset(self) -> int:
        """A 64-bit gate's target offset."""
        return (
            self.low & 0xFFFF | ((self.low >> 48) & 0xFFFF) << 16 | (self.high & 0xFFFF_FFFF) << 32
        )

    @property
    def ist(self) -> int:
        return (self.low >> 32) & 7

    @property
    def flat(self) -> bool:
        """Base 0 and a 4 GiB limit: the only code/data segments the machine models."""
        return self.base == 0 and self.limit == 0xFFFF_FFFF

    def upper_type_ok(self) -> bool:
        """Bytes 8-15 of a 64-bit system descriptor or gate: the type field there must be 0."""
        return (self.high >> 40) & 0x1F == 0
