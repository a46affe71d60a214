"""The machine's door to Unicorn: the few ``Uc`` calls it makes per case, through the C API.

Unicorn's Python binding spends most of a short case's time outside QEMU: ``reg_read_batch`` of
23 registers takes ~90 us (it picks a register class per id with a generator and builds three
ctypes arrays per call), ``reg_write_batch`` ~65 us, ``hook_add`` ~40 us (a new ctypes callback
per call), ``mem_read`` ~4 us (a new string buffer). A case makes a few of each, so they cost
more than running its instructions. :class:`FastPort` makes the same calls on ``uclib`` with
arrays built once per register set and callbacks built once per machine (measured: a batch of
23 registers ~4 us). It relies on the 2.1.4 binding's ``uclib`` and ``Uc._uch``, which the
self-test pins (``lassfuzz.emulator.selftest``).

Only 64-bit scalar registers (GPRs, RIP, RFLAGS, CRn, segment bases and selectors) are read and
written as integers. :class:`RawRegisters` carries any other register (XMM, x87, GDTR) across a
context restore as opaque bytes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

import unicorn
from unicorn.unicorn_const import UC_ERR_OK, UC_HOOK_CODE
from unicorn.unicorn_py3.arch.types import uc_hook_h
from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, uccallback, uclib
from unicorn.x86_const import UC_X86_REG_MSR

from lassfuzz.arch import PAGE_SIZE

_UNICORN: Final[Any] = unicorn
#: Unicorn's exception type (the binding is untyped); the port raises it like the binding does.
UcError: Final[type[Exception]] = _UNICORN.UcError
#: What a code hook receives: the address and size of the instruction about to run.
CodeHook = Callable[[int, int], None]
#: Bytes reserved per register by :class:`RawRegisters` (an x86 register is at most 64 bytes).
_RAW_SLOT: Final = 64


class UnicornPort(Protocol):
    """The part of a Unicorn ``Uc`` the shim uses (typed; Unicorn's x86 class is not)."""

    def reg_read(self, reg_id: int) -> int: ...
    def reg_write(self, reg_id: int, value: int) -> None: ...
    def mem_read(self, address: int, size: int) -> bytes: ...
    def mem_write(self, address: int, data: bytes) -> None: ...
    def ctl(self, ctl: int, op: int, *args: int) -> Any: ...
    def emu_stop(self) -> None: ...


class _Batch:
    """Prebuilt C arrays for one tuple of register ids: ids, 64-bit values, value pointers."""

    def __init__(self, reg_ids: Sequence[int]) -> None:
        count = len(reg_ids)
        self.count = ctypes.c_int(count)
        self.ids = (ctypes.c_int * count)(*reg_ids)
        self.values = (ctypes.c_uint64 * count)()
        size = ctypes.sizeof(ctypes.c_uint64)
        base = ctypes.addressof(self.values)
        self.pointers = (ctypes.c_void_p * count)(*(base + i * size for i in range(count)))
        self.bytes = count * size


class _MsrValue(ctypes.Structure):
    """Unicorn's ``uc_x86_msr``: the MSR index in, its value out."""

    _fields_ = (("rid", ctypes.c_uint32), ("value", ctypes.c_uint64))


class FastPort:
    """A :class:`UnicornPort` over a ``Uc`` that calls the C API directly (see module doc)."""

    def __init__(self, uc: Any) -> None:
        self._uc = uc
        self._handle = uc._uch
        self._value = ctypes.c_uint64()
        self._pointer = ctypes.byref(self._value)
        self._msr = _MsrValue()
        self._msr_pointer = ctypes.byref(self._msr)
        self._batches: dict[tuple[int, ...], _Batch] = {}
        self._buffer = ctypes.create_string_buffer(PAGE_SIZE)
        #: Code hooks by the key Unicorn passes back as user data, and keys by hook handle.
        self._code_hooks: dict[int, CodeHook] = {}
        self._hook_keys: dict[int, int] = {}
        self._next_key = 0
        # One ctypes callback for every code hook added here: the binding's hook_add builds one
        # per call, and dispatching on the hook's address range is what Unicorn does anyway.
        self._code_callback = uccallback(uc, HOOK_CODE_CFUNC)(self._on_code)

    # ------------------------------------------------------------------------- registers

    def reg_read(self, reg_id: int) -> int:
        """A scalar register of up to 64 bits (GPR, RIP, EFLAGS, CRn, segment base)."""
        self._value.value = 0  # EFLAGS is written as 32 bits: clear the upper half first
        status = uclib.uc_reg_read(self._handle, reg_id, self._pointer)
        if status != UC_ERR_OK:
            raise UcError(status)
        return self._value.value

    def reg_write(self, reg_id: int, value: int) -> None:
        self._value.value = value
        status = uclib.uc_reg_write(self._handle, reg_id, self._pointer)
        if status != UC_ERR_OK:
            raise UcError(status)

    def _batch(self, reg_ids: tuple[int, ...]) -> _Batch:
        batch = self._batches.get(reg_ids)
        if batch is None:
            batch = self._batches[reg_ids] = _Batch(reg_ids)
        return batch

    def reg_read_batch(self, reg_ids: tuple[int, ...]) -> tuple[int, ...]:
        """Scalar registers, in order, in one C call."""
        batch = self._batch(reg_ids)
        ctypes.memset(batch.values, 0, batch.bytes)  # 32-bit registers fill the low half
        status = uclib.uc_reg_read_batch(self._handle, batch.ids, batch.pointers, batch.count)
        if status != UC_ERR_OK:
            raise UcError(status)
        return tuple(batch.values)

    def reg_write_batch(self, reg_ids: tuple[int, ...], values: Sequence[int]) -> None:
        """Scalar registers, in order, in one C call."""
        batch = self._batch(reg_ids)
        batch.values[:] = list(values)
        status = uclib.uc_reg_write_batch(self._handle, batch.ids, batch.pointers, batch.count)
        if status != UC_ERR_OK:
            raise UcError(status)

    def msr_read(self, msr: int) -> int:
        self._msr.rid = msr
        status = uclib.uc_reg_read(self._handle, UC_X86_REG_MSR, self._msr_pointer)
        if status != UC_ERR_OK:
            raise UcError(status)
        return int(self._msr.value)

    def msr_write(self, msr: int, value: int) -> None:
        self._msr.rid = msr
        self._msr.value = value
        status = uclib.uc_reg_write(self._handle, UC_X86_REG_MSR, self._msr_pointer)
        if status != UC_ERR_OK:
            raise UcError(status)

    # ------------------------------------------------------------------------- memory

    def mem_read(self, address: int, size: int) -> bytes:
        """Physical memory, copied out of one buffer reused for every read up to a page."""
        buffer = self._buffer if size <= PAGE_SIZE else ctypes.create_string_buffer(size)
        status = uclib.uc_mem_read(self._handle, address, buffer, size)
        if status != UC_ERR_OK:
            raise UcError(status)
        return ctypes.string_at(buffer, size)

    def mem_write(self, address: int, data: bytes) -> None:
        status = uclib.uc_mem_write(self._handle, address, data, len(data))
        if status != UC_ERR_OK:
            raise UcError(status)

    def read_frames(self, frames: Iterable[int]) -> dict[int, bytes]:
        """Whole 4 KiB frames, one C call per run of contiguous frames (a case's frames are
        two runs: its paging structures and its data pages)."""
        result: dict[int, bytes] = {}
        for start, count in _runs(frames):
            data = self.mem_read(start, count * PAGE_SIZE)
            for index in range(count):
                result[start + index * PAGE_SIZE] = data[
                    index * PAGE_SIZE : (index + 1) * PAGE_SIZE
                ]
        return result

    def write_frames(self, frames: Mapping[int, bytes]) -> None:
        """Whole 4 KiB frames, one C call per run of contiguous frames."""
        for start, count in _runs(frames):
            addresses = range(start, start + count * PAGE_SIZE, PAGE_SIZE)
            self.mem_write(start, b"".join(frames[address] for address in addresses))

    # ------------------------------------------------------------------------- control

    def ctl(self, ctl: int, op: int, *args: int) -> Any:
        return self._uc.ctl(ctl, op, *args)

    def emu_stop(self) -> None:
        self._uc.emu_stop()

    def context_restore(self, context: Any) -> None:
        self._uc.context_restore(context)

    def hook_code(self, begin: int, end: int, hook: CodeHook) -> int:
        """A code hook on ``begin ..= end`` calling ``hook(address, size)``; remove it with
        :meth:`hook_del`."""
        self._next_key += 1
        key = self._next_key
        handle = uc_hook_h()
        status = uclib.uc_hook_add(
            self._handle,
            ctypes.byref(handle),
            UC_HOOK_CODE,
            self._code_callback,
            ctypes.c_void_p(key),
            ctypes.c_uint64(begin),
            ctypes.c_uint64(end),
        )
        if status != UC_ERR_OK:
            raise UcError(status)
        self._code_hooks[key] = hook
        self._hook_keys[int(handle.value)] = key
        return int(handle.value)

    def hook_del(self, handle: int) -> None:
        """Remove a hook added by :meth:`hook_code` or by the binding's ``hook_add``."""
        key = self._hook_keys.pop(handle, None)
        if key is None:
            self._uc.hook_del(handle)
            return
        status = uclib.uc_hook_del(self._handle, uc_hook_h(handle))
        if status != UC_ERR_OK:
            raise UcError(status)
        del self._code_hooks[key]

    def _on_code(self, _uc: Any, address: int, size: int, key: int) -> None:
        self._code_hooks[key](address, size)


def _runs(frames: Iterable[int]) -> list[tuple[int, int]]:
    """(first frame, frame count) of each run of contiguous frames, in address order."""
    runs: list[tuple[int, int]] = []
    for frame in sorted(frames):
        if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == frame:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((frame, 1))
    return runs


class RawRegisters:
    """Registers of any type carried as opaque bytes: ``save`` then ``restore`` puts back
    exactly what was read (XMM, x87, GDTR ...), two C calls in all."""

    def __init__(self, port: FastPort, reg_ids: Sequence[int]) -> None:
        count = len(reg_ids)
        self._handle = port._handle
        self._count = ctypes.c_int(count)
        self._ids = (ctypes.c_int * count)(*reg_ids)
        self._store = ctypes.create_string_buffer(count * _RAW_SLOT)
        base = ctypes.addressof(self._store)
        self._pointers = (ctypes.c_void_p * count)(*(base + i * _RAW_SLOT for i in range(count)))

    def save(self) -> None:
        ctypes.memset(self._store, 0, len(self._store))
        status = uclib.uc_reg_read_batch(self._handle, self._ids, self._pointers, self._count)
        if status != UC_ERR_OK:
            raise UcError(status)

    def restore(self) -> None:
        status = uclib.uc_reg_write_batch(self._handle, self._ids, self._pointers, self._count)
        if status != UC_ERR_OK:
            raise UcError(status)
