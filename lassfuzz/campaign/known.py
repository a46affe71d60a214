"""``known.toml``: divergences already understood, so they stop raising the alarm.

A known signature is still counted and bucketed (its hit count says whether it got more
common), but it does not make ``lassfuzz fuzz`` exit 1 and the live display does not announce
it as new. The format is in docs/campaign.md; anything else in the file is an error, so a typo
cannot silently un-suppress (or suppress) a bug.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from lassfuzz.campaign.files import InputError

_KEYS: Final = frozenset({"signature", "reason", "link"})


@dataclass(frozen=True)
class Known:
    """Why one signature is known, and where to read more."""

    signature: str
    reason: str
    link: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"reason": self.reason, "link": self.link}


def load_known(path: Path) -> Mapping[str, Known]:
    """Known entries by signature id; :class:`InputError` (one line) for any problem."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: not valid TOML ({error})") from None
    extra = sorted(set(document) - {"known"})
    if extra:
        raise InputError(f"{path}: unknown top-level key(s) {', '.join(extra)}; expected [[known]]")
    entries = document.get("known", [])
    if not isinstance(entries, list):
        raise InputError(f"{path}: 'known' must be an array of tables ([[known]])")
    known: dict[str, Known] = {}
    for number, entry in enumerate(entries, 1):
        item = _entry(path, number, entry)
        if item.signature in known:
            raise InputError(f"{path}: entry {number}: signature {item.signature} listed twice")
        known[item.signature] = item
    return MappingProxyType(known)


def _entry(path: Path, number: int, entry: Any) -> Known:
    where = f"{path}: entry {number}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a table")
    extra = sorted(set(entry) - _KEYS)
    if extra:
        raise InputError(f"{where}: unknown key(s) {', '.join(extra)}; known: {sorted(_KEYS)}")
    for key in ("signature", "reason"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise InputError(f"{where}: '{key}' must be a non-empty string")
    link = entry.get("link")
    if link is not None and not isinstance(link, str):
        raise InputError(f"{where}: 'link' must be a string")
    return Known(entry["signature"], entry["reason"], link)
