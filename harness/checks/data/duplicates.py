"""Exact duplicates: validation examples also in training (``data.leakage``) and identical training inputs with
different labels (``data.conflicting_labels``).

Seeds: "Check if validation data appears in training set: set(map(tuple, train_data)) & set(map(tuple, val_data))"
(seed 001), "Perfect training accuracy: data leakage" (seed 000), "Data leakage: are you accidentally training on
your test data?" (seed 002), "noisy data" and "labels misaligned" (seeds 003, 000). Rows are compared by exact
value (a 64-bit hash per row, then confirmed element by element), so the check is linear in the data: about a second
for 100k x 1k.

Thresholds. Leakage is reported by the fraction of validation examples found in training: from
``leakage_error_fraction`` (1%) an error (validation metrics are inflated by up to that much accuracy, the size of
many real improvements); down to ``leakage_info_fraction`` (0.1%) a warning; below, info (a handful of natural
duplicates in a large set, like MNIST's). None of the builtins has a single duplicate row. Conflicts are an error
from ``conflicting_error_fraction`` (5% of training examples: an irreducible error floor that size is a labelling
bug, not noise), else a warning.
"""

from __future__ import annotations

import numpy as np

from harness.checks.data import stats
from harness.checks.data.common import Part, Views
from harness.findings import error, info, warning


def check_leakage(v: Views) -> Part:
    """``data.leakage``: validation examples whose inputs also appear in training; duplicates within validation
    (info from ``val_duplicate_fraction``: they weight a few examples' errors several times)."""
    s = v.settings
    part = Part()
    if not v.has_features:
        return part  # data.shape reports it; featureless rows would all "match"
    g_train, g_val = v.groups["train"], v.groups["val"]
    part.metrics["data/duplicates/train"] = g_train.extra_copies
    part.metrics["data/duplicates/val"] = g_val.extra_copies
    if not v.same_input_shape:
        return part  # data.shape already reports it; rows of different shapes cannot match
    val_rows, train_rows = stats.matches_in(v.x("val"), v.row_hashes["val"], g_val.rows,
                                            v.x("train"), v.row_hashes["train"], g_train.rows)
    n_val = len(g_val.rows)
    leaked = len(val_rows)
    fraction = leaked / n_val if n_val else 0.0
    part.metrics["data/leakage/count"] = leaked
    part.metrics["data/leakage/fraction"] = fraction
    if leaked:
        same_label = _same_labels(v, val_rows, train_rows)
        make = (error if fraction >= s.leakage_error_fraction else
                warning if fraction >= s.leakage_info_fraction else info)
        labels = (f"; {int(same_label.sum())} of them with the same label" if same_label is not None else "")
        part.findings.append(make(
            "data.leakage",
            f"{leaked} of {n_val} validation examples ({fraction:.1%}) also appear in the training split (exact "
            f"input matches{labels}; val rows {stats.listing(val_rows, s.max_listed)} = train rows "
            f"{stats.listing(train_rows, s.max_listed)}): validation metrics on them measure memorization, not "
            f"generalization.",
            "Deduplicate before splitting (e.g. on a hash of each example), and split by the unit that must not "
            "leak (patient, user, document) rather than by row.",
            count=leaked, fraction=fraction, val_rows=stats.first(val_rows, s.max_listed),
            train_rows=stats.first(train_rows, s.max_listed),
            same_label=int(same_label.sum()) if same_label is not None else None))
    dup_fraction = g_val.extra_copies / n_val if n_val else 0.0
    if dup_fraction >= s.val_duplicate_fraction:
        part.findings.append(info(
            "data.leakage",
            f"{g_val.extra_copies} of {n_val} validation examples ({dup_fraction:.1%}) are exact copies of other "
            f"validation examples: the validation metric counts them several times.",
            "Deduplicate the validation split, so each distinct example counts once.",
            val_duplicates=g_val.extra_copies, fraction=dup_fraction))
    return part


def _same_labels(v: Views, val_rows: np.ndarray, train_rows: np.ndarray) -> np.ndarray | None:
    yv, yt = stats.flat(v.y("val"))[val_rows], stats.flat(v.y("train"))[train_rows]
    if yv.shape[1:] != yt.shape[1:]:
        return None
    return np.all(yv == yt, axis=1)


def check_conflicting_labels(v: Views) -> Part:
    """``data.conflicting_labels`` (classification): identical training inputs labelled with different classes.
    In regression, repeated inputs with different targets are ordinary noise, so only the count is recorded.
    Per-position labels conflict when identical inputs carry different label sequences (label maps); a language
    model's identical contexts followed by different next tokens are what language is, so it is not judged."""
    s = v.settings
    part = Part()
    if not v.has_features or v.causal:
        return part
    groups = v.groups["train"]
    labels = v.labels["train"] if v.dataset.classification else None
    if labels is None:
        return part
    duplicated = groups.duplicated
    part.metrics["data/conflicting_labels/count"] = 0
    if not duplicated.any():
        return part
    idx = np.rint(labels).astype(np.int64) if labels.dtype.kind == "f" else labels.astype(np.int64)
    per_position = idx.ndim > 1
    if per_position:  # a label sequence or map per example: compare whole rows, by an exact hash of each
        idx = stats.row_hashes(np.where(idx < 0, -1, idx))
    # Per group: the smallest and largest label; a group conflicts when they differ.
    n_groups = len(groups.sizes)
    lo = np.full(n_groups, np.iinfo(np.int64).max)
    hi = np.full(n_groups, np.iinfo(np.int64).min)
    np.minimum.at(lo, groups.group, idx)
    np.maximum.at(hi, groups.group, idx)
    conflicting_group = lo != hi
    in_conflict = conflicting_group[groups.group]
    count = int(in_conflict.sum())
    part.metrics["data/conflicting_labels/count"] = count
    part.metrics["data/conflicting_labels/groups"] = int(conflicting_group.sum())
    if not count:
        return part
    n = len(groups.rows)
    fraction = count / n
    part.metrics["data/conflicting_labels/fraction"] = fraction
    rows = groups.rows[in_conflict]
    first_group = groups.group[in_conflict][0]
    example_rows = groups.rows[groups.group == first_group]
    example_labels = idx[groups.group == first_group]
    make = error if fraction >= s.conflicting_error_fraction else warning
    labelled = ("different labels at some positions" if per_position else
                f"labels {stats.listing(example_labels, 5)}")
    part.findings.append(make(
        "data.conflicting_labels",
        f"{count} of {n} training examples ({fraction:.1%}) share identical inputs with an example of a different "
        f"{'labelling' if per_position else 'class'} ({int(conflicting_group.sum())} groups; e.g. rows "
        f"{stats.listing(example_rows, 5)} have {labelled}): no model can fit them all, and a large share means "
        f"labels are misaligned with inputs.",
        "Check that inputs and labels are shuffled and filtered together (one permutation for both); if the "
        "duplicates are real, merge them under one label (majority vote) or drop them.",
        count=count, fraction=fraction, groups=int(conflicting_group.sum()),
        first_rows=stats.first(rows, s.max_listed), example_rows=stats.first(example_rows, 5),
        example_labels=None if per_position else stats.first(example_labels, 5)))
    return part
