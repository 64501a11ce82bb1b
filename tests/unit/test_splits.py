"""The train/val split of a finetune job: stratified, seeded, never empty for a class that can spare one."""

from __future__ import annotations

from collections import Counter

from orchestrator.inputs.labeledsources import LabeledItem
from workers.training.splits import stratified_split


def items_of(counts: dict[str, int]) -> list[LabeledItem]:
    return [LabeledItem(f"{label}/{i:03d}.png", f"file:///d/{label}/{i:03d}.png", label)
            for label, n in counts.items() for i in range(n)]


def test_the_split_is_stratified_and_keeps_a_val_item_for_small_classes():
    items = items_of({"a": 100, "b": 20, "c": 2, "d": 1})
    train, val = stratified_split(items, 0.1, seed=0)
    assert Counter(i.label for i in val) == {"a": 10, "b": 2, "c": 1}
    assert Counter(i.label for i in train) == {"a": 90, "b": 18, "c": 1, "d": 1}
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(items)


def test_the_split_is_deterministic_per_seed():
    items = items_of({"a": 50, "b": 50})
    first, again = stratified_split(items, 0.2, seed=3), stratified_split(list(reversed(items)), 0.2, seed=3)
    assert first == again
    assert stratified_split(items, 0.2, seed=4)[1] != first[1]


def test_a_zero_split_keeps_everything_for_training():
    items = items_of({"a": 5, "b": 5})
    assert stratified_split(items, 0.0, seed=0) == (sorted(items, key=lambda i: i.key), [])
