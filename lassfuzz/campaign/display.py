"""What a running campaign shows: a live ``rich`` panel on a terminal, plain lines otherwise.

Both displays take the ``stats.json`` document (the same figures the file has) on every
statistics interval, and are told about each new bucket that is not in ``known.toml``.
Plain lines go to a log or a pipe, where redrawing would only produce noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lassfuzz.campaign.buckets import Bucket

#: New findings listed under the live panel.
_RECENT = 8


class Display(Protocol):
    def update(self, stats: Mapping[str, Any]) -> None: ...

    def announce(self, bucket: Bucket) -> None: ...

    def close(self) -> None: ...


def progress_line(stats: Mapping[str, Any]) -> str:
    """One line of the main figures (plain display, and the end of a campaign)."""
    by_class = stats["divergences_by_class"]
    return (
        f"cases {stats['cases']}  {stats['cases_per_sec']:.0f} cases/s  "
        f"divergences {stats['divergences']} (lass {by_class.get('lass', 0)}, "
        f"base {by_class.get('base', 0)}, tool-crash {by_class.get('tool-crash', 0)}, "
        f"known {stats['known_divergences']})  unique {stats['unique_signatures']}  "
        f"cells {stats['cells_covered']}/{stats['cells_total']}  hangs {stats['hangs']}  "
        f"restarts {stats['worker_restarts']}  skipped {stats['skipped']}  "
        f"errors {stats['errors']}"
    )


def announcement(bucket: Bucket) -> str:
    return f"new {bucket.cls} divergence: {bucket.summary}  (crashes/{bucket.id}/)"


class PlainDisplay:
    """A progress line per interval and a line per new finding, for logs and pipes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def update(self, stats: Mapping[str, Any]) -> None:
        self.stream.write(progress_line(stats) + "\n")
        self.stream.flush()

    def announce(self, bucket: Bucket) -> None:
        self.stream.write(announcement(bucket) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class LiveDisplay:
    """A ``rich`` panel redrawn in place: figures, then the most recent new findings."""

    def __init__(self, stream: TextIO) -> None:
        self._recent: list[str] = []
        self._stats: Mapping[str, Any] | None = None
        self._live = Live(
            self._render(), console=Console(file=stream), auto_refresh=False, transient=False
        )
        self._live.start()

    def update(self, stats: Mapping[str, Any]) -> None:
        self._stats = stats
        self._live.update(self._render(), refresh=True)

    def announce(self, bucket: Bucket) -> None:
        self._recent = [*self._recent, announcement(bucket)][-_RECENT:]
        self._live.update(self._render(), refresh=True)

    def close(self) -> None:
        self._live.stop()

    def _render(self) -> Group:
        table = Table(title="lassfuzz campaign", show_header=False, expand=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        stats = self._stats
        if stats is None:
            table.add_row("starting", "")
            return Group(table)
        since = stats["since_last_new_signature_s"]
        rows = [
            ("run time", _duration(stats["elapsed_s"])),
            ("cases", f"{stats['cases']:,}  ({stats['cases_per_sec']:.0f}/s)"),
            (
                "compared / skipped / errors",
                f"{stats['compared']} / {stats['skipped']} / {stats['errors']}",
            ),
            ("divergences", str(stats["divergences"])),
            *(
                (f"  {cls}", f"{count} ({stats['unique_signatures_by_class'].get(cls, 0)} unique)")
                for cls, count in sorted(stats["divergences_by_class"].items())
            ),
            ("  known (suppressed)", str(stats["known_divergences"])),
            ("unique signatures", str(stats["unique_signatures"])),
            ("since last new signature", "never" if since is None else _duration(since)),
            ("cells covered", f"{stats['cells_covered']} / {stats['cells_total']}"),
            ("worker restarts", str(stats["worker_restarts"])),
            ("hangs", str(stats["hangs"])),
            ("jobs", str(stats["jobs"])),
        ]
        for name, value in rows:
            table.add_row(name, value)
        return Group(table, *(Text(line) for line in self._recent))


def _duration(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
