"""Epochs: steered configs depend only on the coverage of epochs two or more back."""

from __future__ import annotations

from lassfuzz.campaign.epochs import Epochs
from lassfuzz.campaign.steering import steer
from lassfuzz.generator.config import DEFAULT_CONFIG

CELL_HITS = {"a": 1}


def test_epoch_waits_for_the_epoch_two_back() -> None:
    epochs = Epochs(DEFAULT_CONFIG, epoch_cases=10)
    assert epochs.epoch_of(25) == 2 and epochs.end_of(2) == 30
    assert epochs.config(0, next_index=0) == steer(DEFAULT_CONFIG, 0, {})
    assert epochs.config(1, next_index=0) == steer(DEFAULT_CONFIG, 1, {})
    assert epochs.config(2, next_index=9) is None
    epochs.add(0, CELL_HITS)
    epochs.add(1, {"b": 5})  # epoch 1 must not influence epoch 2
    assert epochs.config(2, next_index=10) == steer(DEFAULT_CONFIG, 2, CELL_HITS)


def test_saved_state_decides_the_same_configs() -> None:
    epochs = Epochs(DEFAULT_CONFIG, epoch_cases=10)
    for epoch in range(4):
        assert epochs.config(epoch, next_index=10 * epoch) is not None
        epochs.add(epoch, {f"cell{epoch}": epoch + 1})
    saved = epochs.to_dict(next_index=35)
    restored = Epochs.from_dict(DEFAULT_CONFIG, saved)
    assert restored.config(3, next_index=35) == epochs.config(3, next_index=35)
    assert restored.config(4, next_index=35) == epochs.config(4, next_index=35)
    assert restored.config(5, next_index=40) == epochs.config(5, next_index=40)
    assert set(saved["configs"]) == {"3"}  # configs of complete epochs are not kept
