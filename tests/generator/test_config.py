"""GeneratorConfig validation and its dict form."""

from __future__ import annotations

import pytest

from lassfuzz.generator.config import GROUPS, ConfigError, GeneratorConfig
from lassfuzz.generator.generate import generate_case


def test_unknown_keys_are_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="max_instrs"):
        GeneratorConfig.from_dict({"max_instrs": 3})


def test_from_dict_round_trips_changed_fields() -> None:
    config = GeneratorConfig.from_dict(
        {"max_instructions": 4, "p_compat": 1.0, "groups": {"mov": 2, "alu": 1, "sreg": 3}}
    )
    assert config.max_instructions == 4 and config.p_compat == 1.0
    assert config.groups == (("mov", 2), ("alu", 1), ("sreg", 3))
    assert GeneratorConfig.from_dict(config.to_dict()) == config
    assert GeneratorConfig().to_dict() == {}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"min_instructions": 0}, "min_instructions"),
        ({"min_instructions": 5, "max_instructions": 4}, "max_instructions"),
        ({"max_instructions": "8"}, "not an integer"),
        ({"p_smap": 1.5}, "p_smap"),
        ({"p_ac": True}, "p_ac"),
        ({"p_compat": -0.1}, "p_compat"),
        ({"p_system": "0.5"}, "p_system"),
        ({"p_la57": 2}, "p_la57"),
        ({"groups": {"mov": 1, "frobnicate": 2}}, "frobnicate"),
        ({"groups": {"mov": 0}}, "positive weight"),
        ({"groups": {"mov": -1}}, "non-negative"),
        ({"groups": 7}, "mapping"),
    ],
)
def test_bad_values_name_the_field(document: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GeneratorConfig.from_dict(document)


def test_only_terminal_groups_is_an_error_at_generation() -> None:
    with pytest.raises(ConfigError, match="terminal"):
        generate_case(0, 0, GeneratorConfig(groups=(("hlt", 1),)))


def test_default_groups_cover_every_builder() -> None:
    from lassfuzz.generator.generate import ALL_BUILDERS

    assert set(GROUPS) == set(ALL_BUILDERS)
