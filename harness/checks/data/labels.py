"""Classification labels: out of range (``data.label_range``), classes missing or distributed differently between
the splits (``data.label_distribution``), and imbalance (``data.class_imbalance``).

Seeds: "Check label distribution: value_counts(normalize=True)" (seed 000), "Labels unique: [0, 1, 2]" (seed 001),
"class imbalance, biased validation dataset, different training and test distributions" (seed 003), and for the
fix of an imbalance, "if you know you have a 100:1 class imbalance, set the bias of the logits such that the initial
output probability is 0.1" (seed 003; Karpathy, "A Recipe for Training Neural Networks", 2019: "init well").
"""

from __future__ import annotations

import math

import numpy as np

from harness.checks.data import stats
from harness.checks.data.common import SPLITS, Part, Views
from harness.findings import error, info, warning


def check_label_range(v: Views) -> Part:
    """``data.label_range``: class labels outside ``[0, num_classes)`` (after rounding, as training reads them).
    Per-position labels (token ids, label maps) must lie in ``[0, num_classes)`` (the vocabulary, for a language
    model); their negative values are padding, which the loss ignores, and are counted, not reported."""
    s, c = v.settings, v.dataset.num_classes
    part = Part()
    described, evidence, all_values = [], {}, []
    total = 0
    padding = v.per_position
    what = "token ids" if v.causal else "class labels"
    for split in SPLITS:
        labels = v.labels[split]
        if labels is None:
            continue
        idx = np.rint(labels) if labels.dtype.kind == "f" else labels
        out = (idx >= c) if padding else (idx < 0) | (idx >= c)
        part.metrics[f"data/label_range/out_of_range/{split}"] = int(out.sum())
        if padding:
            part.metrics[f"data/label_range/padding/{split}"] = int((idx < 0).sum())
            idx = idx[idx >= 0]
        all_values.append(idx.ravel())
        if not out.any():
            continue
        rows = np.flatnonzero(v.finite[split])[out.reshape(len(out), -1).any(axis=1)]
        values, counts = np.unique(labels[out], return_counts=True)
        total += int(out.sum())
        described.append(f"y_{split} has {int(out.sum())} of {labels.size} (values "
                         f"{stats.listing(_plain(values), s.max_listed)})")
        evidence[f"y_{split}"] = {"count": int(out.sum()), "values": _plain(values[:s.max_listed]),
                                  "value_counts": _plain(counts[:s.max_listed]),
                                  "first_rows": stats.first(rows, s.max_listed)}
    part.metrics["data/label_range/out_of_range"] = total
    if not described:
        return part
    every = np.concatenate(all_values)
    lo, hi = float(every.min()), float(every.max())
    one_based = lo == 1 and hi == c
    if v.causal and not one_based:
        suggestion = (f"Token ids reach {hi:g} but the vocabulary size (num_classes) is {c}: set num_classes to the "
                      f"tokenizer's vocabulary size (at least {int(hi) + 1}), or check that the targets come from the "
                      f"same tokenizer as the inputs.")
    elif one_based:
        suggestion = (f"The labels run from 1 to {c}: they look 1-based. Subtract 1 so they run from 0 to {c - 1} "
                      f"(cross-entropy indexes logits from 0).")
    elif lo >= 0:
        suggestion = (f"Labels reach {hi:g} but num_classes is {c}: set num_classes to {int(hi) + 1} if those "
                      f"classes are real, or remap the labels to 0..{c - 1}.")
    else:
        suggestion = (f"Negative labels (down to {lo:g}) are often 'unlabeled/ignore' markers: drop those examples, "
                      f"or remap the labels to 0..{c - 1}.")
    part.findings.append(error(
        "data.label_range",
        f"{what} outside [0, {c}): {'; '.join(described)}. The harness clips them into range to keep going, "
        f"which mislabels those {'positions' if padding else 'examples'}.",
        suggestion, num_classes=c, out_of_range=total, label_min=lo, label_max=hi, looks_one_based=one_based,
        **evidence))
    return part


def check_label_distribution(v: Views) -> Part:
    """``data.label_distribution``: one class only (error), classes never seen in training (warning), classes
    absent from validation (warning when chance cannot explain it, else info), and train/val class proportions that
    differ beyond sampling noise (warning: typically data sorted by label and split without shuffling).

    Per-position labels are counted over positions, and judged only by what holds for them: one class only is
    still an error, and a label map's classes (not a language model's: a sample of text never holds every token of
    a vocabulary) should all appear in training. The chance arguments (a class missing from validation, a shift
    in proportions) assume independent labels, which the positions of one sequence or image are not, and a
    language model's token frequencies are skewed by nature (Zipf): those are not judged."""
    s, c = v.settings, v.dataset.num_classes
    part = Part()
    counts = v.class_counts
    if counts["train"] is None or counts["train"].sum() == 0:
        return part
    train = counts["train"]
    part.series["data/class_counts"] = {
        "x": list(range(c)), "y": [train.tolist()] + ([counts["val"].tolist()] if counts["val"] is not None else []),
        "keys": ["train"] + (["val"] if counts["val"] is not None else []), "xname": "class"}
    present = np.flatnonzero(train)
    missing_train = np.flatnonzero(train == 0)
    part.metrics["data/label_distribution/classes_train"] = int(len(present))
    part.metrics["data/label_distribution/missing_train"] = int(len(missing_train))
    if len(present) == 1:
        part.findings.append(error(
            "data.label_distribution",
            f"y_train holds a single class: all {int(train.sum())} labels are {int(present[0])} (num_classes={c}); "
            f"a model can reach zero loss by always predicting it and learns nothing about the inputs.",
            "Check how labels are read and filtered (a wrong label column, a filter that keeps one class, a split "
            "of data sorted by label).",
            class_present=int(present[0]), examples=int(train.sum()), num_classes=c))
    elif len(missing_train) and not v.causal:
        above = bool(missing_train.min() > present.max())
        hint = (f" Labels only reach {int(present.max())}: is num_classes={c} right?" if above else "")
        part.findings.append(warning(
            "data.label_distribution",
            f"{len(missing_train)} of {c} classes never appear in y_train (classes "
            f"{stats.listing(missing_train, s.max_listed)}): the model cannot learn to predict them.{hint}",
            "Make sure every class has training examples (a stratified split), or set num_classes to the classes "
            "that exist.", missing=stats.first(missing_train, s.max_listed), missing_count=int(len(missing_train)),
            num_classes=c))
    val = counts["val"]
    if val is None or val.sum() == 0 or v.per_position:
        return part
    part.add(_missing_from_val(train, val, s))
    part.add(_split_shift(train, val, s))
    return part


def _missing_from_val(train: np.ndarray, val: np.ndarray, s) -> Part:
    """Classes seen in training but not in validation. With ``n_val`` examples and a class of training frequency
    ``p``, a random split leaves it out of validation with probability about ``exp(-n_val * p)`` (Poisson); over
    ``K`` classes, a class is missed by chance with probability at most ``K * exp(-expected)`` (union bound). We warn
    only when that is below ``missing_class_alpha``: wine's 45 validation examples over 3 classes can legitimately
    miss a rare class, 450 digits cannot miss one of ten."""
    part = Part()
    c = len(train)
    missing = np.flatnonzero((val == 0) & (train > 0))
    part.metrics["data/label_distribution/missing_val"] = int(len(missing))
    if not len(missing):
        return part
    n_val = int(val.sum())
    expected = n_val * train[missing] / train.sum()
    chance = np.minimum(1.0, c * np.exp(-expected))
    unexplained = chance < s.missing_class_alpha
    only = np.flatnonzero(val)
    single = f" y_val holds only class {int(only[0])}." if len(only) == 1 else ""
    make = warning if unexplained.any() else info
    part.findings.append(make(
        "data.label_distribution",
        f"{len(missing)} classes seen in training never appear in y_val (classes "
        f"{stats.listing(missing, s.max_listed)}; {n_val} validation examples would hold about "
        f"{stats.listing(np.round(expected, 1), s.max_listed)} of them).{single} "
        + ("A random split would almost never do this." if unexplained.any()
           else "With this few validation examples, chance can explain it."),
        "Split with stratification (the same class proportions in both splits), and shuffle before splitting "
        "data that is sorted by label." if unexplained.any() else
        "Validation metrics say nothing about these classes; a larger or stratified validation split fixes that.",
        missing=stats.first(missing, s.max_listed), expected_counts=[float(e) for e in expected[:s.max_listed]],
        chance=float(chance.min()), validation_examples=n_val))
    return part


def _split_shift(train: np.ndarray, val: np.ndarray, s) -> Part:
    """Train vs val class proportions: a chi-square test of homogeneity on the 2 x K table, reported only when it
    is both significant (p below ``label_shift_p_value``: random splits of the builtins give p >= 0.04) and large
    (total variation distance at least ``label_shift_min_distance``: wine's legitimate random split has 0.20)."""
    part = Part()
    used = (train + val) > 0
    table = np.stack([train[used], val[used]]).astype(np.float64)
    if table.shape[1] < 2:
        return part
    p_train, p_val = table[0] / table[0].sum(), table[1] / table[1].sum()
    distance = 0.5 * float(np.abs(p_train - p_val).sum())
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(np.sum((table - expected) ** 2 / expected))
    from scipy.special import chdtrc  # scipy comes with scikit-learn; only the chi-square tail is needed

    p_value = float(chdtrc(table.shape[1] - 1, statistic))
    part.metrics["data/label_distribution/shift_distance"] = distance
    part.metrics["data/label_distribution/shift_p_value"] = p_value
    if p_value < s.label_shift_p_value and distance >= s.label_shift_min_distance:
        part.findings.append(warning(
            "data.label_distribution",
            f"train and val class proportions differ far beyond sampling noise (total variation {distance:.2f}, "
            f"chi-square p = {p_value:.1e}): train {_percent(p_train)}, val {_percent(p_val)}.",
            "Shuffle before splitting (data sorted by label or by time gives each split different classes) and "
            "split with stratification; if the shift is real (a later time period), expect val metrics to differ.",
            total_variation=distance, p_value=p_value, train_fraction=[float(x) for x in p_train],
            val_fraction=[float(x) for x in p_val]))
    return part


def check_class_imbalance(v: Views) -> Part:
    """``data.class_imbalance``: the majority/minority count ratio among the classes present in training. Warning
    from ``imbalance_warning_ratio`` (10:1: accuracy then rewards predicting the majority), info from
    ``imbalance_info_ratio`` (3:1). The builtins are at most 1.6:1 (wine, breast_cancer). Per-position labels get
    the metrics only: token frequencies are skewed by nature (Zipf's law) and background pixels dominate label
    maps, so a ratio says nothing about a bug there."""
    s = v.settings
    part = Part()
    train = v.class_counts["train"]
    if train is None:
        return part
    present = np.flatnonzero(train)
    if len(present) < 2:
        return part
    major, minor = int(present[np.argmax(train[present])]), int(present[np.argmin(train[present])])
    ratio = float(train[major] / train[minor])
    baseline = float(train[major] / train.sum())
    part.metrics["data/class_imbalance/ratio"] = ratio
    part.metrics["data/class_imbalance/majority_fraction"] = baseline
    if ratio < s.imbalance_info_ratio or v.per_position:
        return part
    make = warning if ratio >= s.imbalance_warning_ratio else info
    prior = train[present] / train.sum()
    part.findings.append(make(
        "data.class_imbalance",
        f"classes are imbalanced {ratio:.1f}:1 in y_train (class {major}: {int(train[major])} examples, class "
        f"{minor}: {int(train[minor])}); always predicting class {major} already scores {baseline:.1%} accuracy.",
        "Weight the loss by inverse class frequency or resample to balance batches; initialize the output bias to "
        f"the log class prior (log p, e.g. {math.log(prior.max()):.2f} for class {major}) so training does not "
        "spend its first steps learning the base rate (Karpathy's recipe); judge by balanced accuracy or per-class "
        "recall, not accuracy.",
        ratio=ratio, majority_class=major, minority_class=minor, counts=[int(x) for x in train],
        majority_fraction=baseline))
    return part


def _plain(values) -> list:
    return [int(x) if float(x).is_integer() else float(x) for x in np.asarray(values).tolist()]


def _percent(p: np.ndarray, k: int = 6) -> str:
    text = " ".join(f"{x:.0%}" for x in p[:k])
    return f"[{text}{' ...' if len(p) > k else ''}]"


def draw_label_distribution(path: str, counts: dict):
    import matplotlib.pyplot as plt

    splits = [(name, c) for name, c in counts.items() if c is not None and c.sum() > 0]
    num_classes = len(splits[0][1])
    fig, ax = plt.subplots(figsize=(max(5.0, min(12.0, 0.35 * num_classes + 3)), 3.8))
    width = 0.8 / len(splits)
    for i, (name, c) in enumerate(splits):
        ax.bar(np.arange(num_classes) + (i - (len(splits) - 1) / 2) * width, c / c.sum(), width,
               label=f"{name} ({int(c.sum())})")
    ax.set_xlabel("class")
    ax.set_ylabel("fraction of split")
    if num_classes <= 30:
        ax.set_xticks(np.arange(num_classes))
    ax.set_title("Label distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
