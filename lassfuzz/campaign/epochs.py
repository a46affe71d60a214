"""Epochs: which generator config each case index uses, deterministically, under steering.

Indices are cut into epochs of ``epoch_cases``; every case of epoch ``e`` uses
``steer(base, e, hits)`` (:mod:`lassfuzz.campaign.steering`) where ``hits`` is the coverage of
epochs ``0 .. e - 2`` only. Leaving out epoch ``e - 1`` (still running when ``e`` starts) is
what keeps the result independent of timing and of the number of workers, without stalling
them at every epoch boundary: epoch ``e`` waits only for epoch ``e - 2`` to be complete, which
it almost always is by then.

Coverage is kept per epoch until it is folded into the running sum the next config needs, and
configs already decided are kept until their epoch is complete, so that :meth:`Epochs.to_dict`
(saved in ``stats.json``) lets ``--resume`` decide exactly the configs an uninterrupted run
would have.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

from lassfuzz.campaign.steering import steer
from lassfuzz.generator.config import GeneratorConfig


class Epochs:
    """Per-epoch coverage and the steered config of each epoch."""

    def __init__(self, base: GeneratorConfig, epoch_cases: int) -> None:
        if epoch_cases < 1:
            raise ValueError(f"epoch_cases must be positive (got {epoch_cases})")
        self.base = base
        self.epoch_cases = epoch_cases
        #: Coverage summed over epochs ``0 .. folded_through``.
        self._folded: collections.Counter[str] = collections.Counter()
        self._folded_through = -1
        #: Coverage of each epoch after ``folded_through``.
        self._open: dict[int, collections.Counter[str]] = {}
        self._configs: dict[int, GeneratorConfig] = {}

    def epoch_of(self, index: int) -> int:
        return index // self.epoch_cases

    def end_of(self, epoch: int) -> int:
        """One past the last index of ``epoch``."""
        return (epoch + 1) * self.epoch_cases

    def config(self, epoch: int, next_index: int) -> GeneratorConfig | None:
        """The config of ``epoch``; None until every case before epoch ``epoch - 1`` is done
        (``next_index`` is the lowest index not yet done)."""
        decided = self._configs.get(epoch)
        if decided is not None:
            return decided
        if epoch >= 2 and next_index < self.end_of(epoch - 2):
            return None
        if max(epoch - 2, -1) < self._folded_through:
            raise ValueError(f"epoch {epoch} asked after epoch {self._folded_through + 2}")
        while self._folded_through < epoch - 2:
            self._folded_through += 1
            self._folded.update(self._open.pop(self._folded_through, {}))
        config = self._configs[epoch] = steer(self.base, epoch, self._folded)
        return config

    def add(self, epoch: int, cells: Mapping[str, int]) -> None:
        """Count a finished chunk's cell hits (its epoch must not be folded yet)."""
        if epoch <= self._folded_through:
            raise ValueError(f"epoch {epoch} was already folded into the steering sum")
        self._open.setdefault(epoch, collections.Counter()).update(cells)

    def to_dict(self, next_index: int) -> dict[str, Any]:
        """What ``--resume`` needs; configs of complete epochs are dropped."""
        current = self.epoch_of(next_index)
        return {
            "epoch_cases": self.epoch_cases,
            "folded_through": self._folded_through,
            "folded": dict(self._folded),
            "open": {str(epoch): dict(hits) for epoch, hits in sorted(self._open.items())},
            "configs": {
                str(epoch): config.to_dict()
                for epoch, config in sorted(self._configs.items())
                if epoch >= current
            },
        }

    @classmethod
    def from_dict(cls, base: GeneratorConfig, document: Mapping[str, Any]) -> Epochs:
        """The state :meth:`to_dict` saved (``KeyError``/``TypeError``/``ValueError`` if bad)."""
        epochs = cls(base, int(document["epoch_cases"]))
        epochs._folded_through = int(document["folded_through"])
        epochs._folded.update(document["folded"])
        epochs._open = {
            int(epoch): collections.Counter(hits) for epoch, hits in document["open"].items()
        }
        epochs._configs = {
            int(epoch): GeneratorConfig.from_dict(changes)
            for epoch, changes in document["configs"].items()
        }
        return epochs
