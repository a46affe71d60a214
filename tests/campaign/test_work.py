"""Chunks and the chunk runner: determinism, index reporting, examples kept per signature."""

from __future__ import annotations

import pickle

import pytest

from lassfuzz.campaign.work import Chunk, ChunkResult, ChunkRunner, running_index
from lassfuzz.generator.generate import generate_case


def totals(results: list[ChunkResult]) -> tuple[object, ...]:
    """What must not depend on how the indices were cut into chunks."""
    hits: dict[str, int] = {}
    for result in results:
        for found in result.findings:
            hits[found.id] = hits.get(found.id, 0) + found.count
    cells: dict[str, int] = {}
    for result in results:
        for cell, count in result.cells.items():
            cells[cell] = cells.get(cell, 0) + count
    return (
        sum(r.cases for r in results),
        sum(r.compared for r in results),
        sum(r.skipped for r in results),
        sum(r.errors for r in results),
        hits,
        cells,
    )


def test_chunk_cases_are_generate_case() -> None:
    chunk = Chunk(seed=9, start=40, count=3)
    assert chunk.stop == 43
    assert chunk.case(41) == generate_case(9, 41)


def test_bad_chunk_is_rejected() -> None:
    with pytest.raises(ValueError, match="count >= 1"):
        Chunk(seed=1, start=0, count=0)


def test_results_do_not_depend_on_chunking() -> None:
    runner = ChunkRunner()
    whole = runner.run(Chunk(seed=3, start=0, count=120, policy="none"))
    parts = [runner.run(Chunk(seed=3, start=s, count=40, policy="none")) for s in (0, 40, 80)]
    assert totals([whole]) == totals(parts)
    assert whole.findings, "policy none must diverge on some LASS case"
    assert whole.cells and whole.families


def test_runner_reports_each_index_then_idle() -> None:
    seen: list[int] = []
    ChunkRunner(seen.append).run(Chunk(seed=1, start=7, count=4))
    # Then the indices of diverging cases again, if any, while their examples are triaged.
    assert seen[:4] == [7, 8, 9, 10] and seen[-1] == -1
    assert set(seen[4:-1]) <= {7, 8, 9, 10}
    assert running_index() == -1


def test_examples_are_the_first_and_the_newest() -> None:
    result = ChunkRunner().run(Chunk(seed=3, start=0, count=600, policy="none", keep=1))
    busiest = max(result.findings, key=lambda found: found.count)
    assert busiest.count >= 3
    indices = [document["index"] for document in busiest.examples]
    assert len(indices) == 2 and indices[0] < indices[1]
    assert indices[0] == busiest.first_index and indices[-1] == busiest.last_index
    assert all(d["signature"]["id"] == busiest.id for d in busiest.examples)
    assert busiest.cls in ("lass", "base")


def test_result_is_picklable_and_corpus_names_first_cells() -> None:
    result = ChunkRunner().run(Chunk(seed=2, start=0, count=30))
    again = pickle.loads(pickle.dumps(result))
    assert again == result
    cells = [record.key for record in result.corpus]
    assert len(cells) == len(set(cells)) == len(result.cells)
    assert result.compared + result.skipped + result.errors == result.cases == 30
