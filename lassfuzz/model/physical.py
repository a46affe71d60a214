"""Physical memory: the frames of a case's MemoryImage, nothing else.

A physical address outside the image has no defined content, so touching one makes the case
unsupported (docs/machine.md "Paging details": a frame outside the image).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from lassfuzz.arch import PAGE_SIZE
from lassfuzz.model.faults import Unsupported


class PhysicalMemory:
    """Mutable copies of the image's 4 KiB frames, keyed by frame address."""

    __slots__ = ("frames",)

    def __init__(self, frames: Mapping[int, bytes]) -> None:
        self.frames = {address: bytearray(data) for address, data in frames.items()}

    def frame(self, address: int) -> bytearray:
        """The frame containing physical ``address``."""
        frame = self.frames.get(address & ~(PAGE_SIZE - 1))
        if frame is None:
            raise Unsupported(f"physical address {address:#x} is outside the case's memory image")
        return frame

    def read_u64(self, address: int) -> int:
        offset = address & (PAGE_SIZE - 1)
        return int.from_bytes(self.frame(address)[offset : offset + 8], "little")

    def write_u64(self, address: int, value: int) -> None:
        offset = address & (PAGE_SIZE - 1)
        self.frame(address)[offset : offset + 8] = value.to_bytes(8, "little")

    def snapshot(self) -> Mapping[int, bytes]:
        """Read-only copy of every frame, in address order (for Outcome.memory)."""
        return MappingProxyType(
            {address: bytes(self.frames[address]) for address in sorted(self.frames)}
        )
