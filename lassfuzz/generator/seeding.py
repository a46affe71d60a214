"""Per-case seeds: numpy's ``SeedSequence(seed, spawn_key=(index,)).generate_state(4)``, in pure
Python.

numpy's SeedSequence costs ~20 us per call (array coercion around a small hash); the generator
needs one per case. The same algorithm on Python ints, with the part that depends on ``seed``
alone computed once per seed, gives the very same words several times faster.
``tests/generator/test_seeding.py`` checks it against numpy.
"""

from __future__ import annotations

import functools
from typing import Final

_MASK32: Final = 0xFFFF_FFFF
#: SeedSequence's constants (numpy/random/bit_generator.pyx): pool of 4 words, hash and mix.
_POOL_SIZE: Final = 4
_INIT_A: Final = 0x43B0D7E5
_MULT_A: Final = 0x931E8875
_INIT_B: Final = 0x8B51F9DD
_MULT_B: Final = 0x58F38DED
_MIX_MULT_L: Final = 0xCA01F9DD
_MIX_MULT_R: Final = 0x4973F715


def _words(value: int) -> list[int]:
    """``value`` as 32-bit words, lowest first (one zero word for 0), as numpy coerces ints."""
    words = [value & _MASK32]
    value >>= 32
    while value:
        words.append(value & _MASK32)
        value >>= 32
    return words


def _mix(pool: list[int], word: int, hash_const: int) -> int:
    """Mix ``word`` into every pool word (SeedSequence.mix_entropy's last loop); returns the
    hash constant it leaves."""
    for position in range(_POOL_SIZE):
        value = word ^ hash_const
        hash_const = hash_const * _MULT_A & _MASK32
        value = value * hash_const & _MASK32
        mixed = (_MIX_MULT_L * pool[position] - _MIX_MULT_R * (value ^ value >> 16)) & _MASK32
        pool[position] = mixed ^ mixed >> 16
    return hash_const


@functools.lru_cache(maxsize=16)
def _seed_pool(seed: int) -> tuple[tuple[int, ...], int]:
    """The pool and hash constant after mixing in ``seed`` (padded to the pool size, as numpy
    does when there is a spawn key), before the spawn key."""
    run = _words(seed)
    run += [0] * (_POOL_SIZE - len(run))
    hash_const = _INIT_A

    def hashmix(value: int) -> int:
        nonlocal hash_const
        value ^= hash_const
        hash_const = hash_const * _MULT_A & _MASK32
        value = value * hash_const & _MASK32
        return value ^ value >> 16

    pool = [hashmix(word) for word in run[:_POOL_SIZE]]
    for source in range(_POOL_SIZE):
        for target in range(_POOL_SIZE):
            if source != target:
                mixed = (_MIX_MULT_L * pool[target] - _MIX_MULT_R * hashmix(pool[source])) & _MASK32
                pool[target] = mixed ^ mixed >> 16
    for word in run[_POOL_SIZE:]:
        hash_const = _mix(pool, word, hash_const)
    return tuple(pool), hash_const


def _output_constants() -> tuple[tuple[int, int, int], ...]:
    """generate_state's (hash constant before, after, shift) for each output word."""
    constants = []
    hash_const = _INIT_B
    for position in range(_POOL_SIZE):
        after = hash_const * _MULT_B & _MASK32
        constants.append((hash_const, after, 32 * position))
        hash_const = after
    return tuple(constants)


_OUTPUT: Final = _output_constants()


def case_seed(seed: int, index: int) -> int:
    """The 4 words of ``SeedSequence(seed, spawn_key=(index,)).generate_state(4)`` as one
    little-endian 128-bit integer (``seed`` and ``index`` non-negative)."""
    start, hash_const = _seed_pool(seed)
    pool = list(start)
    for word in _words(index):
        hash_const = _mix(pool, word, hash_const)
    key = 0
    for (before, after, shift), word in zip(_OUTPUT, pool, strict=True):
        value = (word ^ before) * after & _MASK32
        key |= (value ^ value >> 16) << shift
    return key
