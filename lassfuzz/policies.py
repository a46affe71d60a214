"""LASS shim policies: the rule the Unicorn machine enforces, swappable to test the fuzzer.

A policy answers one question for the emulator shim: *does this access violate LASS?* It never
chooses the fault (the shim raises #SS(0) for SS-segment data, #GP(0) otherwise) and is only
asked when IA32_EFER.LMA = 1 and CR4.LASS = 1.

Three policies are built in (:data:`BUILTIN`):

- ``sdm``: the Intel SDM rules (the default; ``shared/LASS.md`` section 3).
- ``bochs``: Bochs' 2024 implementation, which deviates from the SDM in two places: it checks
  nothing outside 64-bit mode, and RFLAGS.AC also exempts implicit supervisor accesses.
- ``none``: the first KVM patch series: the CPUID bit is advertised and CR4.LASS accepted, but
  nothing is enforced.

A user policy is any function ``f(access: PolicyAccess) -> bool`` named as
``"package.module:function"`` (see :func:`load_policy`). The shim asks about one page piece at a
time and caches the answer per page and per MMU state (CPL, CR4.SMAP and RFLAGS.AC), until a write
to CR0, CR3 or CR4; a policy must therefore decide from the fields of :class:`PolicyAccess` alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from lassfuzz.arch import BIT63, CR4_SMAP, MASK64, RFLAGS_AC

ACCESS_KINDS: Final = ("read", "write", "fetch")


@dataclass(frozen=True)
class PolicyAccess:
    """One memory access (or one page piece of it) as a policy sees it.

    The attribute names are a public interface: user policies read them.
    """

    address: int  #: linear address of the first byte
    size: int  #: bytes, starting at ``address`` (wrapping modulo 2**64)
    kind: str  #: "read" | "write" | "fetch"
    implicit: bool  #: an implicit supervisor-mode access (descriptor tables, IDT, TSS)
    cpl: int
    cr4: int
    rflags: int
    efer: int
    #: CS.L when the access is made: True in 64-bit mode, False in compatibility mode, for
    #: implicit accesses too (their addresses are 64-bit either way: see :meth:`touches`)
    cs_l: bool

    def __post_init__(self) -> None:
        if self.kind not in ACCESS_KINDS:
            raise ValueError(f"access kind {self.kind!r} is not one of {ACCESS_KINDS}")
        if self.size < 1:
            raise ValueError(f"access size {self.size} is not positive")

    @property
    def supervisor(self) -> bool:
        """A supervisor-mode access: CPL < 3, or an implicit supervisor-mode access."""
        return self.cpl < 3 or self.implicit

    def touches(self, *, supervisor_half: bool) -> bool:
        """Whether some byte of the access lies in the given half (bit 63 after wrapping).

        In compatibility mode an explicit access's address is segment-relative and 32-bit, so it
        counts as a user-half address (bit 63 = 0). Implicit accesses (GDT, LDT, IDT, TSS) use
        the 64-bit bases of GDTR, IDTR, LDTR and TR in either mode: bit 63 counts for them.
        """
        if not self.cs_l and not self.implicit:
            return not supervisor_half
        last = self.address + self.size - 1
        if last > MASK64:  # wraps from the top of the supervisor half into the user half
            return True
        wanted = BIT63 if supervisor_half else 0
        return wanted in (self.address & BIT63, last & BIT63)


#: A policy: True means the access violates LASS.
Policy = Callable[[PolicyAccess], bool]


class PolicyError(Exception):
    """A policy name that cannot be resolved: the message names the cause."""


def sdm(access: PolicyAccess) -> bool:
    """The SDM decision rule (LASS.md section 3), for 64-bit and compatibility mode alike."""
    if not access.supervisor:
        return access.touches(supervisor_half=True)
    if not access.touches(supervisor_half=False):
        return False
    if access.kind == "fetch":
        return True
    if not access.cr4 & CR4_SMAP:
        return False
    return access.implicit or not access.rflags & RFLAGS_AC


def bochs(access: PolicyAccess) -> bool:
    """Bochs 2024: like the SDM, but no check outside 64-bit mode (implicit accesses made in
    compatibility mode included), and AC exempts implicit supervisor accesses too (LASS.md
    section 6, D1 and D2)."""
    if not access.cs_l:
        return False
    if access.implicit and access.kind != "fetch" and access.rflags & RFLAGS_AC:
        return False
    return sdm(access)


def none(access: PolicyAccess) -> bool:
    """The first KVM LASS patch: LASS is advertised and CR4.LASS accepted, nothing enforced."""
    return False


BUILTIN: Final[Mapping[str, Policy]] = MappingProxyType({"sdm": sdm, "bochs": bochs, "none": none})
DEFAULT_POLICY: Final = "sdm"


def load_policy(spec: str | None) -> tuple[str, Policy]:
    """Resolve a policy name: a built-in ("sdm", "bochs", "none") or "package.module:function".

    ``None`` means the default, ``sdm``. Returns the name to record and the callable.
    """
    name = DEFAULT_POLICY if spec is None else spec.strip()
    if name in BUILTIN:
        return name, BUILTIN[name]
    module_name, colon, attribute = name.partition(":")
    if not colon or not module_name or not attribute:
        raise PolicyError(
            f"unknown policy {name!r}: use one of {', '.join(BUILTIN)} or 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import can fail in any way: report it, do not crash
        raise PolicyError(f"policy {name!r}: cannot import {module_name!r}: {error}") from error
    try:
        policy = getattr(module, attribute)
    except AttributeError:
        raise PolicyError(
            f"policy {name!r}: module {module_name!r} has no attribute {attribute!r}"
        ) from None
    if not callable(policy):
        raise PolicyError(f"policy {name!r}: {attribute!r} is not callable")
    return name, policy
