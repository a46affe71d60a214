"""A campaign output directory written by hand from docs/campaign.md, as a fuzz run would leave it.

It has every kind of thing a report shows: three buckets (one with a minimized case and newer
examples, one known through known.toml whose text tries to inject markup, one tool crash known
through bucket.json with a web link), a hang, coverage of a third of the matrix, and a
plot_data.csv whose last line is still being written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lassfuzz.campaign.coverage import REACHABLE_CELLS

START = 1_764_000_000.0  # 2025-11-24 16:00:00 UTC
LASS_ID = "a" * 40
BASE_ID = "b" * 40
TOOL_ID = "c" * 40
HOSTILE = '<script>alert("x")</script> & [bold]'
#: Every third reachable cell is hit (coverage.json lists the others with 0 hits, as fuzz does).
CELLS = sorted(REACHABLE_CELLS)
HIT_CELLS = CELLS[::3]


def stats_document(**overrides: Any) -> dict[str, Any]:
    document = {
        "format": "lassfuzz-stats",
        "version": 1,
        "final": True,
        "seed": 7,
        "policy": "none",
        "started": START,
        "updated": START + 3600,
        "elapsed_s": 3600.0,
        "cases": 720_000,
        "cases_per_sec": 200.0,
        "compared": 700_000,
        "skipped": 19_000,
        "errors": 1000,
        "next_index": 720_000,
        "jobs": 2,
        "divergences": 5004,
        "divergences_by_class": {"lass": 5000, "base": 3, "tool-crash": 1},
        "known_divergences": 4,
        "unique_signatures": 3,
        "unique_signatures_by_class": {"lass": 1, "base": 1, "tool-crash": 1},
        "last_new_signature": START + 600,
        "since_last_new_signature_s": 3000.0,
        "cells_covered": len(HIT_CELLS),
        "cells_total": len(CELLS),
        "worker_restarts": 1,
        "hangs": 1,
        "skip_reasons": {"unsupported instruction": 19_000},
    }
    document.update(overrides)
    return document


def write_json(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")


def bucket(bucket_id: str, cls: str, summary: str, count: int, **extra: Any) -> dict[str, Any]:
    return {
        "signature": {"divergence": "fault"},
        "id": bucket_id,
        "class": cls,
        "summary": summary,
        "count": count,
        "first_seen": START + 60,
        "last_seen": START + 3500,
        "first_index": 1200,
        "last_index": 719_000,
        "known": None,
        "minimized": None,
        **extra,
    }


def crash(bucket_id: str) -> dict[str, Any]:
    return {"format": "lassfuzz-crash", "version": 1, "signature": {"id": bucket_id}}


def build_campaign(directory: Path) -> Path:
    write_json(directory / "campaign.json", {"seed": 7, "policy": "none"})
    write_json(directory / "stats.json", stats_document())
    header = "unix_time,elapsed_s,cases,cases_per_sec,divergences,unique_signatures,"
    header += "cells_covered,worker_restarts,hangs\n"
    lines = [
        f"{START + 180 * i},{180.0 * i},{36_000 * i},{200 + i},{250 * i},{min(i, 3)},"
        f"{min(25 * i, len(HIT_CELLS))},{int(i > 10)},{int(i > 15)}\n"
        for i in range(1, 21)
    ]
    # A write in progress: no newline yet, so a reader must not use it.
    (directory / "plot_data.csv").write_text(header + "".join(lines) + "9999999999,1", "utf-8")
    hits = {name: 10 + i if i % 3 == 0 else 0 for i, name in enumerate(CELLS)}
    hits["cpl0 read user-half implicit"] = 4  # a cell the generator does not target
    write_json(
        directory / "coverage.json",
        {
            "cells": hits,
            "families": {"mov": 400_000, "push/pop": 120_000, "<odd family>": 3},
            "cells_total": len(CELLS),
        },
    )
    crashes = directory / "crashes"
    write_json(
        crashes / LASS_ID / "bucket.json",
        bucket(LASS_ID, "lass", "fault [mov] cpl3 read supervisor-half: reference #GP(0)", 5000),
    )
    write_json(crashes / LASS_ID / f"crash-{LASS_ID}.json", crash(LASS_ID))
    for index in (5000, 6000):
        write_json(crashes / LASS_ID / f"crash-{LASS_ID}-{index}.json", crash(LASS_ID))
    # Written by `lassfuzz minimize`, which does not update bucket.json.
    write_json(crashes / LASS_ID / f"crash-{LASS_ID}.min.json", crash(LASS_ID))
    write_json(crashes / BASE_ID / "bucket.json", bucket(BASE_ID, "base", HOSTILE, 3))
    write_json(crashes / BASE_ID / f"crash-{BASE_ID}.json", crash(BASE_ID))
    write_json(
        crashes / TOOL_ID / "bucket.json",
        bucket(
            TOOL_ID,
            "tool-crash",
            "SIGABRT",
            1,
            known={"reason": "Unicorn aborts on XSAVE", "link": "https://example.org/bug/1"},
        ),
    )
    write_json(crashes / TOOL_ID / f"crash-{TOOL_ID}.json", crash(TOOL_ID))
    (directory / "known.toml").write_text(
        f"[[known]]\nsignature = '{BASE_ID}'\nreason = '{HOSTILE}'\nlink = 'javascript:alert(1)'\n",
        encoding="utf-8",
    )
    write_json(directory / "hangs" / "hang-4242.json", {"index": 4242})
    return directory
