"""Physical memory: the frames of a case's MemoryImage, nothing else.

A physical address outside the image has no defined content, so touching one makes the case
unsupported (docs/machine.md "Paging details": a frame outside the image).

A run touches a few of a case's frames, so each frame is copied from the (immutable) image
only when first needed: by :meth:`PhysicalMemory.frame`, which hands out the one mutable copy
of the run, or by a write. Until then reads come from the image itself.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from lassfuzz.arch import PAGE_SIZE
from lassfuzz.model.faults import Unsupported

_FRAME_MASK: Final = ~(PAGE_SIZE - 1)
_OFFSET_MASK: Final = PAGE_SIZE - 1
#: A little-endian 64-bit value (a paging-structure entry).
_U64: Final = struct.Struct("<Q")


class PhysicalMemory:
    """The image's 4 KiB frames, keyed by frame address, copied on first use (the image itself
    is never written, and must not change during the run)."""

    __slots__ = ("_copies", "_image")

    def __init__(self, frames: Mapping[int, bytes]) -> None:
        # A plain dict: a MappingProxyType (what materialize gives) copies as fast as the dict
        # it wraps, and looks up more slowly.
        self._image = frames.copy() if isinstance(frames, dict | MappingProxyType) else dict(frames)
        #: The run's mutable frames; a frame not here still has the image's contents.
        self._copies: dict[int, bytearray] = {}

    def frame(self, address: int) -> bytearray:
        """The (mutable) frame containing physical ``address``, the same object all run long."""
        base = address & _FRAME_MASK
        frame = self._copies.get(base)
        if frame is None:
            frame = self._copies[base] = bytearray(self._original(base))
        return frame

    def _original(self, base: int) -> bytes:
        data = self._image.get(base)
        if data is None:
            raise Unsupported(f"physical address {base:#x} is outside the case's memory image")
        return data

    def _current(self, address: int) -> bytes | bytearray:
        """The frame's current contents, without copying it."""
        base = address & _FRAME_MASK
        frame = self._copies.get(base)
        return frame if frame is not None else self._original(base)

    def check(self, address: int) -> None:
        """Unsupported unless physical ``address`` lies in the image."""
        self._current(address)

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at physical ``address``, within one frame."""
        offset = address & _OFFSET_MASK
        return bytes(self._current(address)[offset : offset + size])

    def read_u64(self, address: int) -> int:
        value: int
        (value,) = _U64.unpack_from(self._current(address), address & _OFFSET_MASK)
        return value

    def write_u64(self, address: int, value: int) -> None:
        _U64.pack_into(self.frame(address), address & _OFFSET_MASK, value)

    def snapshot(self) -> Mapping[int, bytes]:
        """Read-only copy of every frame, in address order (for Outcome.memory); a frame the
        run never copied is the image's own (immutable) bytes."""
        memory = self._image.copy()
        for address, frame in self._copies.items():
            memory[address] = bytes(frame)
        addresses = list(memory)
        if addresses != sorted(addresses):
            memory = {address: memory[address] for address in sorted(addresses)}
        return MappingProxyType(memory)
