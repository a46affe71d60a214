"""Dedup buckets: ``crashes/<signature id>/``, one per signature (docs/campaign.md).

A bug hit ten thousand times must not produce ten thousand files: a bucket keeps the first
example forever, up to ``keep`` newest further examples (older ones are deleted as newer ones
arrive), and a hit count. A new bucket is written the moment it appears (its first example,
synced to disk: a finding is never lost); further examples and count updates are written by
:meth:`Buckets.flush`, on the statistics interval, so that a frequent bug costs a bounded
number of file writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lassfuzz.campaign.files import CRASH_FORMAT, CRASH_VERSION, InputError, versions, write_atomic
from lassfuzz.campaign.known import Known
from lassfuzz.campaign.work import SignatureHits
from lassfuzz.compare.diff import Divergence
from lassfuzz.compare.signature import Signature
from lassfuzz.outcome import Outcome, Status, outcome_to_dict

BUCKET_FILE = "bucket.json"
#: Bucket class of a worker killed by a native crash.
TOOL_CRASH = "tool-crash"


@dataclass
class Bucket:
    """One signature's bucket, as ``bucket.json`` records it."""

    id: str
    signature: dict[str, Any]
    cls: str
    summary: str
    count: int
    first_seen: float
    last_seen: float
    first_index: int
    last_index: int
    #: File names of the kept newest examples, oldest first (the first example is not listed).
    examples: list[str] = field(default_factory=list)
    known: Known | None = None
    minimized: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "signature": self.signature,
            "id": self.id,
            "class": self.cls,
            "summary": self.summary,
            "count": self.count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "first_index": self.first_index,
            "last_index": self.last_index,
            "examples": self.examples,
            "known": None if self.known is None else self.known.to_dict(),
            "minimized": self.minimized,
        }


class Buckets:
    """All buckets of a campaign directory."""

    def __init__(self, root: Path, *, keep: int, known: Mapping[str, Known]) -> None:
        self.root = root
        self.keep = keep
        self.known = known
        self._buckets: dict[str, Bucket] = {}
        self._dirty: set[str] = set()
        #: Kept examples not written yet, by bucket and file name (written by the next flush:
        #: a frequent bug would otherwise cost a file write per hit).
        self._pending: dict[str, dict[str, Mapping[str, Any]]] = {}

    def __iter__(self) -> Iterator[Bucket]:
        return iter(self._buckets.values())

    def __len__(self) -> int:
        return len(self._buckets)

    def load(self, counts: Mapping[str, int]) -> None:
        """Read the buckets a previous run left (``--resume``) with their hit ``counts`` as its
        ``stats.json`` recorded them (a bucket it does not list, created after its last write,
        starts from 0: the chunk that found it runs again). Known marks follow known.toml."""
        for path in sorted(self.root.glob(f"*/{BUCKET_FILE}")):
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
                bucket = Bucket(
                    id=document["id"],
                    signature=document["signature"],
                    cls=document["class"],
                    summary=document["summary"],
                    count=document["count"],
                    first_seen=document["first_seen"],
                    last_seen=document["last_seen"],
                    first_index=document["first_index"],
                    last_index=document["last_index"],
                    examples=list(document.get("examples", [])),
                )
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise InputError(f"{path}: not a valid bucket file ({error})") from None
            bucket.count = counts.get(bucket.id, 0)
            bucket.known = self.known.get(bucket.id)
            bucket.minimized = _minimized(path.parent, bucket.id)  # minimize may have run since
            self._buckets[bucket.id] = bucket

    def add(self, hits: SignatureHits, now: float) -> Bucket | None:
        """Count ``hits`` and keep its examples; the bucket if it is new, else None."""
        bucket = self._buckets.get(hits.id)
        first, *rest = hits.examples
        new = bucket is None
        if bucket is None:
            bucket = Bucket(
                id=hits.id,
                signature=dict(first["signature"]),
                cls=hits.cls,
                summary=hits.summary,
                count=0,
                first_seen=now,
                last_seen=now,
                first_index=hits.first_index,
                last_index=hits.last_index,
                known=self.known.get(hits.id),
            )
            self._buckets[hits.id] = bucket
            self._write(bucket.id, f"crash-{bucket.id}.json", first, durable=True)
        else:
            # Chunks finish out of order: ``first`` may be older than the bucket's first
            # example, but the first example, once written, stays (it is what users cite).
            rest = [first, *rest]
        bucket.count += hits.count
        bucket.last_seen = now
        bucket.first_index = min(bucket.first_index, hits.first_index)
        bucket.last_index = max(bucket.last_index, hits.last_index)
        for example in rest[-self.keep :] if self.keep else []:
            self._keep_example(bucket, example)
        self._dirty.add(bucket.id)
        if new:
            self._flush_one(bucket)
        return bucket if new else None

    def tool_crash(
        self,
        cause: str,
        *,
        index: int,
        case: Mapping[str, Any],
        seed: int,
        policy: str,
        trace: bool,
        now: float,
    ) -> Bucket | None:
        """Record that case ``index`` killed a worker with ``cause``; the bucket if new."""
        document = tool_crash_document(
            cause, index=index, case=case, seed=seed, policy=policy, trace=trace
        )
        signature = document["signature"]
        hits = SignatureHits(
            id=signature["id"],
            cls=TOOL_CRASH,
            summary=document["summary"],
            count=1,
            first_index=index,
            last_index=index,
            examples=(document,),
        )
        return self.add(hits, now)

    def counts(self) -> dict[str, int]:
        """Hit count per bucket id."""
        return {bucket.id: bucket.count for bucket in self._buckets.values()}

    def flush(self) -> None:
        """Write ``bucket.json`` of every bucket changed since the last flush."""
        for bucket_id in sorted(self._dirty):
            self._flush_one(self._buckets[bucket_id])

    def _flush_one(self, bucket: Bucket) -> None:
        for name, example in self._pending.pop(bucket.id, {}).items():
            self._write(bucket.id, name, example, durable=False)
        bucket.minimized = _minimized(self.root / bucket.id, bucket.id)
        path = self.root / bucket.id / BUCKET_FILE
        write_atomic(path, json.dumps(bucket.to_dict(), indent=1), durable=False)
        self._dirty.discard(bucket.id)

    def _keep_example(self, bucket: Bucket, example: Mapping[str, Any]) -> None:
        name = f"crash-{bucket.id}-{example['index']}.json"
        if name in bucket.examples:
            return  # a re-run after --resume found the same case again
        if len(bucket.examples) >= self.keep and example["index"] < _example_index(
            bucket.examples[0]
        ):
            return  # older than every kept example (its chunk finished late)
        pending = self._pending.setdefault(bucket.id, {})
        pending[name] = example
        bucket.examples.append(name)
        bucket.examples.sort(key=_example_index)
        while len(bucket.examples) > self.keep:
            oldest = bucket.examples.pop(0)
            if pending.pop(oldest, None) is None:
                (self.root / bucket.id / oldest).unlink(missing_ok=True)

    def _write(
        self, bucket_id: str, name: str, document: Mapping[str, Any], *, durable: bool
    ) -> None:
        # The first example is the finding: synced to disk and indented for people. Later
        # examples are more of the same: neither (``indent`` makes ``json`` ten times slower).
        path = self.root / bucket_id / name
        text = json.dumps(document, indent=1) if durable else json.dumps(document)
        write_atomic(path, text, durable=durable)


def _minimized(directory: Path, bucket_id: str) -> str | None:
    """The file name of the bucket's minimized case (``lassfuzz minimize``), if it exists."""
    name = f"crash-{bucket_id}.min.json"
    return name if (directory / name).exists() else None


def _example_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1].removesuffix(".json"))


def tool_crash_signature(cause: str) -> Signature:
    """The signature of a worker death: the crash kind alone (one bucket per kind)."""
    return Signature(
        divergence=TOOL_CRASH,
        reference="none",
        emulator=cause,
        access="none",
        half="none",
        cpl=0,
        smap=False,
        ac=False,
        family="none",
    )


def tool_crash_document(
    cause: str, *, index: int, case: Mapping[str, Any], seed: int, policy: str, trace: bool
) -> dict[str, Any]:
    """A crash document (format ``lassfuzz-crash``) for a case that killed its worker.

    No outcome exists, so both sides are recorded as errors naming the cause; the file still
    loads with ``repro``/``show`` like any crash file (``repro`` may, of course, crash too).
    """
    signature = tool_crash_signature(cause)
    detail = f"worker died running the case ({cause})"
    return {
        "format": CRASH_FORMAT,
        "version": CRASH_VERSION,
        "signature": {"id": signature.id, **asdict(signature)},
        "class": TOOL_CRASH,
        "summary": f"{TOOL_CRASH}: {cause}",
        "divergence": asdict(Divergence(TOOL_CRASH, "status", "none", cause)),
        "seed": seed,
        "index": index,
        "trace": trace,
        "versions": versions(policy),
        "case": dict(case),
        "reference": outcome_to_dict(Outcome("model", Status.ERROR, detail="not run")),
        "emulator": outcome_to_dict(Outcome("unicorn", Status.ERROR, detail=detail)),
    }
