"""Files a campaign writes and reads: crash files, corpus cases, statistics.

Every write is atomic (write a temporary file beside the target, fsync, rename), so an
interrupted run never leaves a half-written finding. Reading is strict and fails with one clear
line (:class:`InputError`) for a missing file, bad JSON or an unknown format version.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final

import lassfuzz
from lassfuzz.case import CaseFormatError, TestCase, case_from_dict, case_to_dict
from lassfuzz.compare.differential import Finding
from lassfuzz.compare.signature import Signature
from lassfuzz.outcome import outcome_to_dict

CRASH_FORMAT: Final = "lassfuzz-crash"
CRASH_VERSION: Final = 1


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any worker thread.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Files lassfuzz writes get the permissions ``open()`` would give them (mkstemp makes 0600).
_FILE_MODE: Final = 0o666 & ~_read_umask()


class InputError(Exception):
    """A file lassfuzz cannot use; the message is one line naming the file and the cause."""


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one.

    ``durable`` also syncs the data to disk before the rename, so the file survives a power
    loss too; a campaign skips that (milliseconds each) for files it can rebuild or that only
    summarise others (corpus entries, bucket summaries), keeping it for findings and stats.
    """
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except FileNotFoundError:  # creating the directory only when needed saves a system call
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def versions(policy_name: str) -> dict[str, str]:
    """What produced a finding, recorded in every crash file."""
    return {
        "lassfuzz": lassfuzz.__version__,
        "unicorn": version("unicorn"),
        "policy": policy_name,
    }


def crash_document(
    finding: Finding,
    *,
    policy_name: str,
    seed: int | None,
    index: int | None,
    trace: bool,
) -> dict[str, Any]:
    """The self-contained crash file content for ``finding``."""
    result = finding.result
    return {
        "format": CRASH_FORMAT,
        "version": CRASH_VERSION,
        "signature": {"id": finding.signature.id, **asdict(finding.signature)},
        "class": finding.cls,
        "summary": finding.signature.describe(),
        "divergence": asdict(finding.divergence),
        "seed": seed,
        "index": index,
        "trace": trace,
        "versions": versions(policy_name),
        "case": case_to_dict(result.case),
        "reference": outcome_to_dict(result.reference),
        "emulator": outcome_to_dict(result.emulator),
    }


def crash_filename(signature: Signature, *, minimized: bool = False) -> str:
    return f"crash-{signature.id}{'.min' if minimized else ''}.json"


@dataclass(frozen=True)
class LoadedFile:
    """A case file or a crash file, as read from disk."""

    path: Path
    case: TestCase
    crash: dict[str, Any] | None  # the crash document, when the file is a crash file

    @property
    def trace(self) -> bool:
        """Whether the finding was made comparing access traces (replays must do the same)."""
        return bool(self.crash and self.crash.get("trace"))

    @property
    def signature(self) -> Signature | None:
        if self.crash is None:
            return None
        fields = {k: v for k, v in self.crash["signature"].items() if k != "id"}
        return Signature(**fields)


def load_file(path: Path) -> LoadedFile:
    """Read a case or crash file; :class:`InputError` with one clear line on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise InputError(f"{path}: expected a JSON object")
    try:
        if document.get("format") == CRASH_FORMAT:
            if document.get("version") != CRASH_VERSION:
                raise InputError(
                    f"{path}: unsupported crash file version {document.get('version')!r} "
                    f"(this lassfuzz reads {CRASH_VERSION})"
                )
            case = case_from_dict(document.get("case"))
            try:
                Signature(**{k: v for k, v in document["signature"].items() if k != "id"})
            except (KeyError, TypeError, AttributeError):
                raise InputError(f"{path}: crash file has no valid 'signature'") from None
            return LoadedFile(path, case, document)
        return LoadedFile(path, case_from_dict(document), None)
    except CaseFormatError as error:
        raise InputError(f"{path}: {error}") from None
