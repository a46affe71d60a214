"""Dedup buckets: first example kept, N newest, hit counts, known marks, resume, tool crashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lassfuzz.campaign.buckets import Buckets, tool_crash_document, tool_crash_signature
from lassfuzz.campaign.files import load_file
from lassfuzz.campaign.known import Known
from lassfuzz.campaign.work import SignatureHits
from lassfuzz.case import case_from_dict, case_to_dict

SIGNATURE = tool_crash_signature("SIGSEGV")
CASE = case_from_dict({"version": 1, "code": {"bytes": "90"}})


def example(index: int) -> dict[str, Any]:
    return tool_crash_document(
        "SIGSEGV",
        index=index,
        case=case_to_dict(CASE),
        seed=1,
        policy="sdm",
        trace=False,
    )


def hits(*indices: int, count: int | None = None) -> SignatureHits:
    return SignatureHits(
        id=SIGNATURE.id,
        cls="lass",
        summary="summary",
        count=len(indices) if count is None else count,
        first_index=indices[0],
        last_index=indices[-1],
        examples=tuple(example(i) for i in indices),
    )


def files(root: Path) -> list[str]:
    return sorted(path.name for path in (root / SIGNATURE.id).iterdir())


def test_first_example_stays_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    buckets = Buckets(tmp_path, keep=2, known={})
    assert buckets.add(hits(10, 11), now=1.0) is not None
    assert buckets.add(hits(12, 13, 14, count=30), now=2.0) is None
    buckets.flush()
    first = f"crash-{SIGNATURE.id}.json"
    assert files(tmp_path) == sorted(
        [first, "bucket.json", f"crash-{SIGNATURE.id}-13.json", f"crash-{SIGNATURE.id}-14.json"]
    )
    assert json.loads((tmp_path / SIGNATURE.id / first).read_text())["index"] == 10
    document = json.loads((tmp_path / SIGNATURE.id / "bucket.json").read_text())
    assert document["count"] == 32
    assert (document["first_index"], document["last_index"]) == (10, 14)
    assert (document["first_seen"], document["last_seen"]) == (1.0, 2.0)
    assert document["known"] is None and document["class"] == "lass"


def test_a_late_older_example_does_not_displace_newer_ones(tmp_path: Path) -> None:
    buckets = Buckets(tmp_path, keep=1, known={})
    buckets.add(hits(50, 60), now=1.0)
    buckets.add(hits(20), now=2.0)  # a chunk of lower indices finished later
    assert files(tmp_path) == sorted(
        ["bucket.json", f"crash-{SIGNATURE.id}.json", f"crash-{SIGNATURE.id}-60.json"]
    )


def test_known_signatures_are_marked_and_buckets_reload(tmp_path: Path) -> None:
    known = {SIGNATURE.id: Known(SIGNATURE.id, "understood", None)}
    buckets = Buckets(tmp_path, keep=5, known=known)
    bucket = buckets.add(hits(3), now=1.0)
    assert bucket is not None and bucket.known == known[SIGNATURE.id]
    (tmp_path / SIGNATURE.id / f"crash-{SIGNATURE.id}.min.json").write_text("{}")
    buckets.add(hits(4), now=2.0)
    buckets.flush()

    reloaded = Buckets(tmp_path, keep=5, known={})
    reloaded.load({SIGNATURE.id: 2})
    (again,) = list(reloaded)
    assert again.count == 2 and again.known is None  # known.toml of this run decides
    assert again.minimized == f"crash-{SIGNATURE.id}.min.json"
    assert reloaded.add(hits(4), now=3.0) is None
    assert again.examples == [f"crash-{SIGNATURE.id}-4.json"]
    assert again.count == 3

    unrecorded = Buckets(tmp_path, keep=5, known={})
    unrecorded.load({})  # stats.json was written before this bucket appeared
    assert [bucket.count for bucket in unrecorded] == [0]


def test_tool_crash_bucket_is_a_loadable_crash_file(tmp_path: Path) -> None:
    buckets = Buckets(tmp_path, keep=5, known={})
    case = case_to_dict(CASE)
    bucket = buckets.tool_crash(
        "SIGABRT", index=8, case=case, seed=1, policy="sdm", trace=False, now=1.0
    )
    assert bucket is not None and bucket.cls == "tool-crash"
    assert bucket.id == tool_crash_signature("SIGABRT").id != SIGNATURE.id
    loaded = load_file(tmp_path / bucket.id / f"crash-{bucket.id}.json")
    assert loaded.case == CASE
    assert loaded.signature == tool_crash_signature("SIGABRT")
    assert loaded.crash is not None and loaded.crash["class"] == "tool-crash"
