"""``lassfuzz stats``: the report's summary and bucket list in a terminal.

A TTY gets ``rich`` tables; anything else (a pipe, a file, a cron mail) gets plain aligned lines
that ``grep`` and ``awk`` can use, with no box-drawing characters or colour codes. Strings from
campaign files are escaped for rich: a signature summary containing ``[bold]`` is text, not markup.
"""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lassfuzz.report.summary import Campaign, format_utc, summary_lines


def _known(campaign: Campaign) -> list[str]:
    return ["" if b.known is None else b.known.reason for b in campaign.buckets]


def write_plain(campaign: Campaign, out: TextIO, now: float) -> None:
    lines = summary_lines(campaign, now)
    width = max(len(line.label) for line in lines) + 1
    out.write(f"campaign {campaign.directory}\n")
    for line in lines:
        out.write(f"{line.label + ':':<{width}} {line.value}\n")
    out.write(f"\n{len(campaign.buckets)} divergence bucket(s)\n")
    for bucket, known in zip(campaign.buckets, _known(campaign), strict=True):
        suffix = f"  [known: {known}]" if known else ""
        out.write(
            f"{bucket.count:>8,}  {bucket.cls:<10}  {bucket.id}  {bucket.summary}"
            f"  (last {format_utc(bucket.last_seen)}){suffix}\n"
        )
    for problem in campaign.problems:
        out.write(f"problem: {problem}\n")


def write_rich(campaign: Campaign, out: TextIO, now: float) -> None:
    console = Console(file=out, force_terminal=True, highlight=False)
    summary = Table(title=escape(f"campaign {campaign.directory}"), show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    for line in summary_lines(campaign, now):
        summary.add_row(escape(line.label), escape(line.value))
    console.print(summary)
    if campaign.buckets:
        buckets = Table(title=f"{len(campaign.buckets)} divergence bucket(s)")
        for name in ("count", "class", "signature", "last seen", "known"):
            # fold, not ellipsis: a signature id is only useful whole (known.toml needs it).
            buckets.add_column(
                name, justify="right" if name == "count" else "left", overflow="fold"
            )
        for bucket, known in zip(campaign.buckets, _known(campaign), strict=True):
            buckets.add_row(
                f"{bucket.count:,}",
                escape(bucket.cls),
                f"{escape(bucket.summary)}\n[dim]{escape(bucket.id)}[/dim]",
                format_utc(bucket.last_seen),
                escape(known),
            )
        console.print(buckets)
    else:
        console.print("no divergence buckets")
    for problem in campaign.problems:
        console.print(f"[red]problem:[/red] {escape(problem)}")
