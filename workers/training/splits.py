"""Which labeled images a finetune job trains on and which it validates on."""

from __future__ import annotations

import random
from collections import defaultdict

from orchestrator.inputs.labeledsources import LabeledItem, label_options
from orchestrator.inputs.labels import check_val_labels, class_names, load_labeled
from orchestrator.jobspec.modelspecs import FinetuneSpec
from orchestrator.store.storage import ObjectStore


def stratified_split(items: list[LabeledItem], val_split: float,
                     seed: int) -> tuple[list[LabeledItem], list[LabeledItem]]:
    """(train, val): the same share of every class in val, the same split for the same seed.

    Each class shuffles with its own seeded generator, so adding a class does not
    reshuffle the others. A class with 2+ items gives at least one to val (and keeps one).
    """
    by_label: dict[str, list[LabeledItem]] = defaultdict(list)
    for item in sorted(items, key=lambda item: item.key):
        by_label[item.label].append(item)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label]
        random.Random(f"{seed}/{label}").shuffle(group)
        n_val = round(len(group) * val_split)
        if val_split > 0 and len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return sorted(train, key=lambda item: item.key), sorted(val, key=lambda item: item.key)


def train_val(spec: FinetuneSpec, store: ObjectStore) -> tuple[list[LabeledItem], list[LabeledItem], list[str]]:
    """(train, val, class names): --val as given, else a stratified --val-split of --train; SpecError
    when validation holds classes training does not."""
    items = load_labeled(spec.train, store, label_options(spec))
    if spec.val is not None:
        train, val = items, load_labeled(spec.val, store, label_options(spec))
    else:
        train, val = stratified_split(items, spec.val_split, spec.seed)
    names = class_names(train)
    check_val_labels(set(names), val)
    return train, val, names
