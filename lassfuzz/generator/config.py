"""Generator configuration: instruction counts, state biases and the instruction-group mix."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

#: Upper bound on ``max_instructions``: keeps code within two pages (<= 15 bytes each).
MAX_INSTRUCTIONS_LIMIT: Final = 256

#: Instruction groups the generator emits, simplest first (shrinking prefers earlier groups),
#: with their default weights. A group is one or more instructions kept together: e.g. "cr" is
#: ``mov rax, cr4; xor rax, imm; mov cr4, rax``. Group names are family names
#: (:data:`lassfuzz.families.FAMILIES`); a group may also contain helpers of other families.
DEFAULT_GROUP_WEIGHTS: Final[Mapping[str, int]] = {
    "nop": 2,
    "mov": 10,
    "movx": 4,
    "lea": 2,
    "alu": 10,
    "unary": 4,
    "xchg": 3,
    "cmpxchg": 3,
    "bt": 3,
    "cmov": 2,
    "setcc": 2,
    "push-pop": 6,
    "flags": 5,
    "enter-leave": 2,
    "string": 6,
    "jcc": 3,
    "jmp": 2,
    "call-ret": 3,
    "prefetch": 2,
    "clflush": 2,
    "invlpg": 1,
    "cr": 3,
    "cpuid": 1,
    "hlt": 5,
    "ud2": 3,
    # System groups: only drawn for cases with descriptor tables (State.system).
    "sreg": 6,
    "lar": 4,
    "sdt": 2,
    "ldt": 2,
    "int": 3,
    "iret": 3,
    "syscall": 3,
    "far": 3,
}
GROUPS: Final = tuple(DEFAULT_GROUP_WEIGHTS)


class ConfigError(ValueError):
    """A generator configuration that cannot be used; the message names the field."""


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. Probabilities are per case unless stated otherwise.

    ``groups`` is a tuple of ``(group name, weight)`` pairs (see :data:`GROUPS`); restricting it
    focuses a campaign on some instruction families. Every field has a default, so a config file
    lists only what it changes; unknown keys are an error (:meth:`from_dict`).
    """

    min_instructions: int = 1
    max_instructions: int = 32
    #: CPL3 rather than CPL0.
    p_cpl3: float = 0.5
    #: CPUID.(7,1).EAX[6] set; CR4.LASS can only be set when it is.
    p_lass_supported: float = 0.85
    #: CR4.LASS set initially (when supported).
    p_lass: float = 0.75
    p_smap: float = 0.5
    p_smep: float = 0.5
    #: RFLAGS.AC and RFLAGS.DF initially set.
    p_ac: float = 0.5
    p_df: float = 0.2
    #: CR0.WP cleared initially.
    p_wp_clear: float = 0.1
    #: A supervisor case runs at CPL1 or CPL2 rather than CPL0 (supervisor for LASS too).
    p_cpl12: float = 0.15
    #: IA-32e compatibility mode (32-bit code below 4 GiB; LASS sees bit 63 = 0).
    p_compat: float = 0.1
    #: 5-level paging (CR4.LA57): the canonical boundaries move, LASS does not.
    p_la57: float = 0.1
    #: Descriptor tables (State.system): events go through the IDT, segment loads read the GDT.
    p_system: float = 0.35
    #: Descriptor tables or kernel stacks in the user half (one of them, or all).
    p_table_user_half: float = 0.4
    #: Tables with an unusual descriptor (A bit clear, not present, other DPL, gate DPL 0, IST,
    #: available TSS).
    p_unusual_descriptor: float = 0.3
    #: SFMASK clears RFLAGS.AC on SYSCALL.
    p_sfmask_ac: float = 0.5
    #: Code placed in the half where its fetch violates LASS (user half at CPL0 and vice versa).
    p_code_other_half: float = 0.05
    #: Stack page in the half whose accesses violate LASS at the case's CPL.
    p_stack_other_half: float = 0.1
    #: A page's U/S bit agrees with its half (otherwise LASS and paging disagree).
    p_natural_user_bit: float = 0.6
    #: Per memory operand: aim inside a page the CPL can access without any fault (paging or
    #: LASS), so that cases run several instructions before the interesting access.
    p_safe_access: float = 0.75
    #: Per memory operand of 2 bytes or more: aim at the last bytes below 2^64, so that the
    #: access wraps into page 0 (LASS.md section 8; the matrix's "wrap" cells).
    p_wrap_access: float = 0.02
    #: Per memory operand: an explicit segment override (SS:, FS: or GS:).
    p_segment_override: float = 0.15
    #: Per memory operand: an R11-based index register.
    p_index: float = 0.15
    #: Per eligible instruction: a LOCK prefix on a memory destination.
    p_lock: float = 0.2
    groups: tuple[tuple[str, int], ...] = tuple(DEFAULT_GROUP_WEIGHTS.items())

    def __post_init__(self) -> None:
        for name in ("min_instructions", "max_instructions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} {value!r} is not an integer")
        if not 1 <= self.min_instructions <= self.max_instructions <= MAX_INSTRUCTIONS_LIMIT:
            raise ConfigError(
                "need 1 <= min_instructions <= max_instructions <= "
                f"{MAX_INSTRUCTIONS_LIMIT} (got {self.min_instructions}, {self.max_instructions})"
            )
        for spec in dataclasses.fields(self):
            if spec.name.startswith("p_"):
                value = getattr(self, spec.name)
                if (
                    not isinstance(value, int | float)
                    or isinstance(value, bool)
                    or not 0.0 <= value <= 1.0
                ):
                    raise ConfigError(f"{spec.name} {value!r} is not a probability in [0, 1]")
        names = [name for name, _ in self.groups]
        unknown = sorted(set(names) - set(GROUPS))
        if unknown:
            raise ConfigError(f"groups: unknown group(s) {', '.join(unknown)}; known: {GROUPS}")
        if len(set(names)) != len(names):
            raise ConfigError("groups: a group is listed twice")
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for _, w in self.groups):
            raise ConfigError("groups: weights must be non-negative integers")
        if not any(w for _, w in self.groups):
            raise ConfigError("groups: at least one group needs a positive weight")

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> GeneratorConfig:
        """Read a config document; unknown keys are an error. ``groups`` may be a mapping."""
        known = {spec.name for spec in dataclasses.fields(cls)}
        unknown = sorted(set(document) - known)
        if unknown:
            raise ConfigError(
                f"unknown generator option(s) {', '.join(unknown)}; known: {sorted(known)}"
            )
        values = dict(document)
        if "groups" in values:
            groups = values["groups"]
            pairs = groups.items() if isinstance(groups, Mapping) else groups
            try:
                values["groups"] = tuple((str(name), weight) for name, weight in pairs)
            except (TypeError, ValueError):
                raise ConfigError("groups: expected a mapping of group name to weight") from None
        try:
            return cls(**values)
        except TypeError as error:  # pragma: no cover - every field has a default
            raise ConfigError(str(error)) from None

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults (``groups`` as a mapping)."""
        return {name: dict(value) if name == "groups" else value for name, value in self._changes}

    # Every generated case records its config's changes: compared field by field once per
    # (immutable) config. cached_property writes the instance __dict__, which a frozen
    # dataclass allows; it is no field, so equality, hashing and replace() ignore it.
    @functools.cached_property
    def _changes(self) -> tuple[tuple[str, Any], ...]:
        default = DEFAULT_CONFIG
        return tuple(
            (spec.name, getattr(self, spec.name))
            for spec in dataclasses.fields(self)
            if getattr(self, spec.name) != getattr(default, spec.name)
        )


DEFAULT_CONFIG: Final = GeneratorConfig()
