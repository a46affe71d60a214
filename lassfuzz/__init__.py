"""lassfuzz: a differential fuzzer for Intel Linear Address Space Separation (LASS).

The public surface is small: the case and outcome types, the shim policies
(:mod:`lassfuzz.policies`) and the Hypothesis strategies (:mod:`lassfuzz.strategies`).
Everything else is engine room.
"""

__version__ = "0.1.0"
