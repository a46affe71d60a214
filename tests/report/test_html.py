"""The HTML report: well-formed, self-contained, escaped, and its links lead to real files."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from lassfuzz.report.html import render_report
from lassfuzz.report.summary import load_campaign
from tests.report.campaigns import (
    BASE_ID,
    CELLS,
    HIT_CELLS,
    HOSTILE,
    LASS_ID,
    START,
    TOOL_ID,
    build_campaign,
)
from tests.report.test_plots import PNG_MAGIC

VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})


class Page(HTMLParser):
    """Parses a page, checking every element is closed in order, and collects what tests need."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.tags: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.rows: list[list[str]] = []  # text of each <td>, per <tr>
        self._cell: list[str] | None = None
        self.text: list[str] = []
        self.feed(text)
        self.close()
        assert self.open == [], f"unclosed elements: {self.open}"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        if tag == "a":
            self.links.append(values["href"] or "")
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self._cell = []
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(" ".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def render(campaign_dir: Path, out_dir: Path) -> tuple[str, Page]:
    text = render_report(load_campaign(campaign_dir), out_dir=out_dir, now=START + 7200)
    return text, Page(text)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Page]:
    """The fixture campaign's page, rendered once for the tests that only read it."""
    campaign_dir = build_campaign(tmp_path_factory.mktemp("rendered") / "campaign")
    return render(campaign_dir, campaign_dir)


def bucket_rows(page: Page) -> list[list[str]]:
    return [row for row in page.rows if len(row) == 7]


def test_page_is_well_formed_and_self_contained(rendered: tuple[str, Page]) -> None:
    text, page = rendered
    assert text.startswith("<!DOCTYPE html>")
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert "url(" not in text
    # Four figures: cases/s, unique signatures, cells covered over time, and the heatmap.
    assert len(page.images) == 4
    for source in page.images:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        assert base64.b64decode(source[len(prefix) :], validate=True).startswith(PNG_MAGIC)
    # The one external URL is a known bug's web link, not a resource the page loads.
    external = [link for link in page.links if urlsplit(link).scheme]
    assert external == ["https://example.org/bug/1"]


def test_summary_and_bucket_rows(rendered: tuple[str, Page]) -> None:
    _, page = rendered
    text = " ".join(page.text)
    assert "finished (final statistics)" in text
    assert "5,004 (lass 5,000, base 3, tool-crash 1); 4 known" in text
    rows = bucket_rows(page)
    assert [row[1] for row in rows] == ["lass", "base", "tool-crash"]
    assert [row[2] for row in rows] == ["5,000", "3", "1"]
    assert LASS_ID in rows[0][0]
    assert "2025-11-24 16:01:00 UTC" in rows[0][3]
    assert "2025-11-24 16:58:20 UTC" in rows[0][4]
    assert "first example" in rows[0][6]
    assert "minimized" in rows[0][6]
    assert "+2 newer" in rows[0][6]
    assert "Unicorn aborts on XSAVE" in rows[2][5]
    assert {"mov", "push/pop", "<odd family>"} <= set(page.text)
    assert f"{len(HIT_CELLS)} of {len(CELLS)} cells hit at least once." in text
    assert "cpl0 read user-half implicit : 4" in text  # hit outside the grid, listed
    assert "1 other cell(s) hit, outside the cells the generator targets" in text


def test_text_from_files_is_escaped(rendered: tuple[str, Page]) -> None:
    text, page = rendered
    assert HOSTILE not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; [bold]" in text
    assert "&lt;odd family&gt;" in text
    row = bucket_rows(page)[1]
    assert row[0].startswith(HOSTILE)  # shown to the reader as the text it is
    assert HOSTILE in row[5]
    # A javascript: link from known.toml is shown, never made clickable.
    assert "javascript:alert(1)" in row[5]
    assert not any(link.startswith("javascript") for link in page.links)


@pytest.mark.parametrize("where", ["inside", "beside", "elsewhere"])
def test_links_resolve_to_existing_files(campaign_dir: Path, tmp_path: Path, where: str) -> None:
    out_dir = {
        "inside": campaign_dir,
        "beside": campaign_dir.parent,
        "elsewhere": tmp_path / "a b" / "reports",
    }[where]
    _, page = render(campaign_dir, out_dir)
    relative = [link for link in page.links if not urlsplit(link).scheme]
    targets = {(out_dir / unquote(link)).resolve() for link in relative}
    crashes = (campaign_dir / "crashes").resolve()
    assert targets == {
        crashes / LASS_ID / f"crash-{LASS_ID}.json",
        crashes / LASS_ID / f"crash-{LASS_ID}.min.json",
        crashes / BASE_ID / f"crash-{BASE_ID}.json",
        crashes / TOOL_ID / f"crash-{TOOL_ID}.json",
    }
    assert all(not Path(unquote(link)).is_absolute() for link in relative)


def test_missing_optional_files_are_said_not_raised(campaign_dir: Path) -> None:
    for name in ("plot_data.csv", "coverage.json"):
        (campaign_dir / name).unlink()
    for bucket in (campaign_dir / "crashes").iterdir():
        (bucket / "bucket.json").rename(bucket / "bucket.json.old")
    (campaign_dir / "crashes" / LASS_ID / "bucket.json").write_text("{<b>")
    _, page = render(campaign_dir, campaign_dir)
    text = " ".join(page.text)
    assert page.images == []
    assert "No plot data yet" in text
    assert "No coverage data" in text
    assert "No divergences recorded." in text
    assert "Some files could not be used" in text
    assert "bucket.json: not valid JSON" in text


def test_one_plot_line_is_not_plotted(campaign_dir: Path) -> None:
    path = campaign_dir / "plot_data.csv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    _, page = render(campaign_dir, campaign_dir)
    assert len(page.images) == 1  # the heatmap only
    assert "Only one statistics interval recorded so far" in " ".join(page.text)


def test_bucket_without_its_first_example(campaign_dir: Path) -> None:
    (campaign_dir / "crashes" / BASE_ID / f"crash-{BASE_ID}.json").unlink()
    _, page = render(campaign_dir, campaign_dir)
    assert "first example missing" in bucket_rows(page)[1][6]
