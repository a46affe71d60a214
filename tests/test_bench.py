"""``lassfuzz bench``: every row measured on the cases it claims, nothing asserted about speed."""

from __future__ import annotations

from lassfuzz.bench import ROWS, format_table, run_benchmark
from lassfuzz.policies import sdm


def test_rows_are_timed_on_the_cases_plain_unicorn_can_run() -> None:
    results = run_benchmark(cases=40, seed=3, policy=sdm, policy_name="sdm")
    assert set(results) == {key for key, _ in ROWS}
    subset = results["unicorn"]["cases"]
    # The default mix has cases with descriptor tables, which plain Unicorn cannot run.
    assert 0 < subset < 40
    for key in ("unicorn_shim", "model", "differential"):
        assert results[key]["cases"] == subset
    assert results["differential_full_mix"]["cases"] == 40
    for row in results.values():
        assert row["cases_per_sec"] > 0 and row["instructions_per_sec"] > 0
    table = format_table(results)
    assert "shim keeps" in table and "whole mix" in table
