"""Can the data be trained on at all: non-finite values (``data.nonfinite``) and shapes, label encodings and the
task (``data.shape``).

Seeds: "a single NaN or Infinity value in your input features or labels will instantly poison the entire network"
(seed 002); "check the data for NaNs" and "Data shapes ... Data types correct" (seeds 000, 001); "a loss function
can expect labels of shape (batch size, 1) but your data loader samples labels with shape (batch size,)" (seed 003).
"""

from __future__ import annotations

import numpy as np

from harness.checks.data import stats
from harness.checks.data.common import SPLITS, Part, Views
from harness.findings import error, info, warning


def check_nonfinite(v: Views) -> Part:
    """``data.nonfinite``: how many NaN/inf values, in which splits, rows and feature columns."""
    s = v.settings
    part = Part()
    described, evidence = [], {}
    for split in SPLITS:
        n = len(v.x(split))
        kept = int(v.finite[split].sum())
        part.metrics[f"data/nonfinite/values/{split}"] = v.nonfinite_x[split].values + v.nonfinite_y[split].values
        part.metrics[f"data/nonfinite/rows/{split}"] = n - kept
        for kind, bad in (("x", v.nonfinite_x[split]), ("y", v.nonfinite_y[split])):
            if not bad.values:
                continue
            key = f"{kind}_{split}"
            what = " and ".join(p for p in (f"{bad.nan} NaN" if bad.nan else "", f"{bad.inf} inf" if bad.inf else "")
                                if p)
            text = f"{key}: {what} in {len(bad.rows)} of {n} rows (rows {stats.listing(bad.rows, s.max_listed)})"
            if kind == "x" and v.x(split).ndim > 1:
                text += f", features {stats.listing(bad.columns, s.max_listed)}"
            described.append(text)
            evidence[key] = {"nan": bad.nan, "inf": bad.inf, "rows": int(len(bad.rows)),
                             "first_rows": stats.first(bad.rows, s.max_listed)}
            if kind == "x" and v.x(split).ndim > 1:
                evidence[key]["features"] = stats.first(bad.columns, s.max_listed)
                evidence[key]["feature_counts"] = stats.first(bad.column_counts[bad.columns], s.max_listed)
    if described:
        kept = {split: int(v.finite[split].sum()) for split in SPLITS}
        totals = {split: len(v.x(split)) for split in SPLITS}
        part.findings.append(error(
            "data.nonfinite",
            f"non-finite values: {'; '.join(described)}. Later stages drop these rows and run on the finite ones "
            f"(train {kept['train']} of {totals['train']}, val {kept['val']} of {totals['val']}).",
            "Find where the NaN/inf come from (missing values, a division by zero in preprocessing, log of 0) and "
            "clean them at the source: impute or drop the rows before training; one NaN in a batch makes every "
            "parameter NaN after the next update.",
            **evidence, finite_rows=kept,
        ))
    for split in SPLITS:
        if not v.finite[split].any():
            part.findings.append(error(
                "data.shape",
                f"no example of the {split} split is finite ({len(v.x(split))} rows, all with NaN/inf): nothing "
                f"is left to {'train' if split == 'train' else 'validate'} on, so the later stages are skipped.",
                "Clean the non-finite values (see data.nonfinite) and run again.",
                split=split, rows=len(v.x(split)),
            ))
    return part


def check_shapes(v: Views) -> Part:
    """``data.shape``: train/val inputs that differ in shape (blocks the later stages), label encodings the
    harness converts (info), cannot use (error) or converts lossily (warning), and targets that suggest the
    wrong task."""
    d = v.dataset
    part = Part()
    part.metrics["data/examples/train"] = len(d.x_train)
    part.metrics["data/examples/val"] = len(d.x_val)
    part.metrics["data/features"] = int(np.prod(d.input_shape)) if d.input_shape else 1
    if not v.same_input_shape:
        part.findings.append(error(
            "data.shape",
            f"train and val examples differ in shape: x_train examples are {d.x_train.shape[1:]}, x_val examples "
            f"are {d.x_val.shape[1:]}; a model built for one cannot run on the other, so the later stages are "
            f"skipped.",
            "Apply the same preprocessing (reshape, crop, feature selection) to both splits.",
            x_train_shape=list(d.x_train.shape), x_val_shape=list(d.x_val.shape),
        ))
    if d.x_train.ndim > 1 and d.x_train[0].size == 0:
        part.findings.append(error(
            "data.shape",
            f"x_train examples have no features (shape {d.x_train.shape}): there is nothing to learn from, so the "
            f"later stages are skipped.",
            "Check the feature selection (an empty column list, a filter that drops every column).",
            x_train_shape=list(d.x_train.shape)))
    if d.x_train.ndim == 1:
        part.findings.append(info(
            "data.shape",
            f"x_train has shape {d.x_train.shape}: each example is a single number (one feature).",
            "If that is meant, nothing to do (the model sees inputs of shape (N, 1)). If each example should have "
            "several features, the inputs were flattened: reshape to (examples, features).",
            x_train_shape=list(d.x_train.shape),
        ))
    if d.classification:
        part.add(_label_encoding(v))
    else:
        part.add(_regression_targets(v))
    return part


def _label_encoding(v: Views) -> Part:
    d, s = v.dataset, v.settings
    c = d.num_classes
    part = Part()
    for split in SPLITS:
        y, layout, key = v.y(split), v.layouts[split], f"y_{split}"
        if layout == "bad":
            part.findings.append(error(
                "data.shape",
                f"{key} has shape {y.shape}; classification labels must be class indices (N,), a column (N, 1), "
                f"one-hot (N, {c}) for num_classes={c}, or class indices per position ((N, T) sequences, (N, H, W) "
                f"label maps), but its rows look one-hot over {y.shape[-1]} classes.",
                f"Return class indices of shape (N,). If there are {y.shape[-1]} classes, set num_classes to "
                f"{y.shape[-1]}.",
                key=key, shape=list(y.shape), num_classes=c,
            ))
        elif layout == "column":
            part.findings.append(info(
                "data.shape", f"{key} has shape {y.shape} (a label column); the harness squeezes it to (N,).",
                "Nothing to do here; if your own loss expects (N,) labels, squeeze them in the data factory.",
                key=key, shape=list(y.shape)))
        elif layout == "one_hot":
            part.findings.append(info(
                "data.shape", f"{key} is one-hot, shape {y.shape}; the harness converts it to class indices.",
                "Nothing to do; integer class indices save memory and are what cross-entropy losses take.",
                key=key, shape=list(y.shape)))
        elif layout == "soft":
            part.findings.append(warning(
                "data.shape",
                f"{key} holds soft labels (rows of probabilities, shape {y.shape}); the harness trains on their "
                f"argmax, so its results ignore the label smoothing/distillation targets.",
                "Return hard class indices for the diagnosis, or a loss that takes probability targets.",
                key=key, shape=list(y.shape)))
        elif layout in ("multi_hot", "other"):
            rows = y[v.finite[split]]
            bad = np.flatnonzero(~(np.all((rows == 0) | (rows == 1), axis=1) & (rows.sum(axis=1) == 1)))
            what = ("multi-label rows (several 1s, or none)" if layout == "multi_hot"
                    else "values that are neither one-hot nor probabilities")
            part.findings.append(error(
                "data.shape",
                f"{key} has shape {y.shape} with {what} in {len(bad)} rows (rows "
                f"{stats.listing(bad, s.max_listed)}); single-label training would take their argmax and mislabel "
                f"them.",
                "For single-label classification return one class index per example; multi-label tasks need a "
                "sigmoid/binary cross-entropy loss, not softmax classification.",
                key=key, shape=list(y.shape), rows=int(len(bad)), first_rows=stats.first(bad, s.max_listed)))
        labels = v.labels[split]
        if labels is not None and labels.dtype.kind == "f" and layout in ("index", "column", "per_position"):
            whole = labels == np.round(labels)
            if not whole.all():
                bad = np.flatnonzero(v.finite[split])[~whole.reshape(len(labels), -1).all(axis=1)]
                values = np.unique(labels[~whole])
                part.findings.append(error(
                    "data.shape",
                    f"{key} holds non-integer class labels ({int((~whole).sum())} of {labels.size}, e.g. "
                    f"{stats.listing(values, 5)}; rows {stats.listing(bad, s.max_listed)}), but this is "
                    f"classification with {c} classes; they would be rounded to the nearest class.",
                    "Return integer class indices; if the targets are continuous, this is regression: drop "
                    "num_classes (or use task=regression for files).",
                    key=key, count=int((~whole).sum()), values=[float(x) for x in values[:s.max_listed]],
                    first_rows=stats.first(bad, s.max_listed)))
            else:
                part.findings.append(info(
                    "data.shape", f"{key} holds class labels as floats ({y.dtype}, all whole numbers); the harness "
                    f"converts them to integers.",
                    "Nothing to do; integer labels avoid surprises in your own losses and metrics.",
                    key=key, dtype=str(y.dtype)))
    part.add(_per_position_labels(v))
    return part


def _per_position_labels(v: Views) -> Part:
    """Per-position labels (sequences, label maps) must be per position in both splits, with the same shape per
    example: the model's outputs on either split are read against them position by position."""
    part = Part()
    layouts = v.layouts
    kinds = {split: layouts[split] == "per_position" for split in SPLITS}
    if not any(kinds.values()):
        return part
    shapes = {split: tuple(v.y(split).shape[1:]) for split in SPLITS}
    if kinds["train"] != kinds["val"] and "bad" not in layouts.values():
        per, one = ("train", "val") if kinds["train"] else ("val", "train")
        part.findings.append(error(
            "data.shape",
            f"y_{per} holds a class per position (shape {v.y(per).shape}) but y_{one} one class per example (shape "
            f"{v.y(one).shape}): the two splits describe different tasks.",
            "Give both splits labels of the same layout: (N,) class indices for one label per example, or (N, T) / "
            "(N, H, W) class indices per position.",
            y_train_shape=list(v.y("train").shape), y_val_shape=list(v.y("val").shape)))
    elif all(kinds.values()) and shapes["train"] != shapes["val"]:
        part.findings.append(error(
            "data.shape",
            f"per-position labels differ in shape between splits: y_train examples are {shapes['train']}, y_val "
            f"examples {shapes['val']}; a model's outputs cannot match both.",
            "Pad or crop both splits to the same length (pad labels with -1, which the loss ignores).",
            y_train_shape=list(v.y("train").shape), y_val_shape=list(v.y("val").shape)))
    return part


def _regression_targets(v: Views) -> Part:
    d, s = v.dataset, v.settings
    part = Part()
    trail = {split: v.y(split).shape[1:] for split in SPLITS}
    size = {split: int(np.prod(t)) if t else 1 for split, t in trail.items()}
    if size["train"] != size["val"]:
        part.findings.append(error(
            "data.shape",
            f"regression targets differ between splits: y_train examples are {trail['train']} ({size['train']} "
            f"outputs), y_val examples are {trail['val']} ({size['val']}).",
            "Give both splits targets of the same shape.",
            y_train_shape=list(d.y_train.shape), y_val_shape=list(d.y_val.shape)))
    elif trail["train"] != trail["val"] and {trail["train"], trail["val"]} != {(), (1,)}:
        part.findings.append(info(
            "data.shape",
            f"regression targets are laid out differently: y_train examples are {trail['train']}, y_val examples "
            f"{trail['val']} (same number of outputs, {size['train']}); the loss compares them flattened.",
            "Give both splits the same target shape to rule out a transposed or misordered split.",
            y_train_shape=list(d.y_train.shape), y_val_shape=list(d.y_val.shape)))
    if d.y_train.ndim > 2:
        part.findings.append(info(
            "data.shape",
            f"regression targets of shape {trail['train']} per example; the model predicts them with outputs of "
            f"that shape per example, or as {size['train']} flattened outputs.",
            "Nothing to do if that is meant (dense targets); with flattened outputs, check their order matches the "
            "targets' (row-major).", y_train_shape=list(d.y_train.shape)))
    # Forgotten num_classes: targets that are a handful of whole numbers look like class labels (Karpathy, "A
    # Recipe for Training Neural Networks": know your data). 0..K-1 exactly is what class indices look like: a
    # warning; other small integer sets (ratings 1-5, counts) are plausibly regression: info.
    y = d.y_train[v.finite["train"]]
    if y.size and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        values = np.unique(y)
        whole = bool(np.all(values == np.round(values)))
        if whole and 2 <= len(values) <= s.max_regression_classes:
            contiguous = bool(values[0] == 0 and values[-1] == len(values) - 1)
            make = warning if contiguous else info
            part.findings.append(make(
                "data.shape",
                f"this is regression (no num_classes), but y_train takes only {len(values)} whole-number values "
                f"({stats.listing(values.astype(np.int64), s.max_listed)}): "
                f"{'exactly what class indices look like' if contiguous else 'possibly classes'}.",
                f"If these are classes, return num_classes={int(values[-1]) + 1} from the data factory (or use "
                f"task=classification for files); if they are ordered quantities, nothing to do.",
                distinct_values=int(len(values)), values=[float(x) for x in values[:s.max_listed]]))
    return part
