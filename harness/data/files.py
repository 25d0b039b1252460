"""Your data from a file: ``harness data=file data.path=train.npz`` or ``data.path=table.csv``.

* ``.npz``: arrays ``x_train, y_train, x_val, y_val`` (and optionally ``num_classes``); a file with only ``x, y``
  (or only ``x_train, y_train``) is split like a CSV.
* ``.csv`` / ``.tsv`` (optionally ``.gz``): one row per example, one label column (by name or index; by default a
  column named label/target/y/class, else the last), every other column a numeric feature. A header row is detected
  (a first row whose numeric columns hold text). Empty cells and NA/NaN/null are read as NaN, for the data checks to
  report. Split 75/25 with :func:`harness.data.builtin.split` (a seeded permutation: the same split every run).

``task="auto"`` makes whole-number labels a classification with ``num_classes = max label + 1`` and text labels
classes in sorted order; anything else is regression. Every problem with the file is a :class:`HarnessError` keyed
``data.path`` (or the argument at fault) that names the file, and for a CSV the column and line.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import zipfile
from typing import Any, Sequence

import numpy as np

from harness.data.builtin import split
from harness.data.dataset import ARRAY_KEYS, from_mapping
from harness.errors import HarnessError

TASKS = ("auto", "classification", "regression")
LABEL_NAMES = ("label", "target", "y", "class")  # default label columns, matched case-insensitively
MISSING = {"", "na", "nan", "n/a", "null", "none", "?"}  # cells read as NaN (reported by data.nonfinite)
CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")


def load_file(path: str, label: str | int | None = None, task: str = "auto", num_classes: int | None = None,
              val_fraction: float = 0.25, split_seed: int = 0) -> dict[str, Any]:
    """Load ``path`` as the mapping every data factory returns (validated, so structural errors name the file)."""
    _check_arguments(path, task, num_classes, val_fraction, split_seed)
    resolved = os.path.expanduser(str(path))
    if not os.path.exists(resolved):
        raise HarnessError(f"{path}: no such file (looked in {os.getcwd()})" if not os.path.isabs(resolved)
                           else f"{path}: no such file", key="data.path")
    if os.path.isdir(resolved):
        raise HarnessError(f"{path}: is a directory; give a .npz or .csv file", key="data.path")
    lower = resolved.lower()
    if lower.endswith(".npz"):
        mapping = _load_npz(resolved, path, label, task, num_classes, val_fraction, split_seed)
    elif lower.endswith(CSV_SUFFIXES):
        mapping = _load_csv(resolved, path, label, task, num_classes, val_fraction, split_seed)
    else:
        suffix = os.path.splitext(resolved)[1] or "(none)"
        raise HarnessError(f"{path}: unknown file type {suffix}; use .npz (x_train, y_train, x_val, y_val) or .csv/"
                           f".tsv (one label column, numeric features)", key="data.path")
    from_mapping(mapping, source=f"data.path: {path}")  # structure (lengths, empty splits) named after the file
    return mapping


def _check_arguments(path, task, num_classes, val_fraction, split_seed):
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise HarnessError(f"must be a file path, got {path!r}", key="data.path")
    if task not in TASKS:
        raise HarnessError(f"must be one of {', '.join(TASKS)}, got {task!r}", key="data.task")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise HarnessError(f"must be an integer of at least 2 (or null), got {num_classes!r}",
                               key="data.num_classes")
        if task == "regression":
            raise HarnessError("is set but data.task is regression; drop one of them", key="data.num_classes")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise HarnessError(f"must be a number in (0, 1), got {val_fraction!r}", key="data.val_fraction")
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)):
        raise HarnessError(f"must be an integer, got {split_seed!r}", key="data.split_seed")


# ----------------------------------------------------------------------------------------------------------------
# .npz


def _load_npz(resolved: str, path: str, label, task, num_classes, val_fraction, split_seed) -> dict[str, Any]:
    if label is not None:
        raise HarnessError("applies to CSV files only; an .npz names its arrays x_train, y_train, x_val, y_val",
                           key="data.label")
    if os.path.getsize(resolved) == 0:
        raise HarnessError(f"{path}: the file is empty", key="data.path")
    if not zipfile.is_zipfile(resolved):  # np.load would try to unpickle it
        raise HarnessError(f"{path}: not a valid .npz file (not a zip archive; save with np.savez)", key="data.path")
    try:
        with np.load(resolved, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise HarnessError(f"{path}: holds Python objects (pickled arrays); save numeric arrays with np.savez",
                               key="data.path") from None
        raise HarnessError(f"{path}: not a valid .npz file ({err})", key="data.path") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise HarnessError(f"{path}: not a valid .npz file ({err})", key="data.path") from None
    stored_classes = arrays.pop("num_classes", None)
    if all(k in arrays for k in ARRAY_KEYS):
        parts = {k: arrays[k] for k in ARRAY_KEYS}
    elif "x" in arrays and "y" in arrays:
        parts = _split_pair(arrays["x"], arrays["y"], path, val_fraction, split_seed)
    elif "x_train" in arrays and "y_train" in arrays and "x_val" not in arrays and "y_val" not in arrays:
        parts = _split_pair(arrays["x_train"], arrays["y_train"], path, val_fraction, split_seed)
    else:
        missing = [k for k in ARRAY_KEYS if k not in arrays]
        found = ", ".join(sorted(arrays)) or "nothing"
        raise HarnessError(f"{path}: missing {', '.join(missing)} (found {found}); an .npz holds x_train, y_train, "
                           f"x_val, y_val (or x and y, split {1 - val_fraction:.0%}/{val_fraction:.0%})",
                           key="data.path")
    if stored_classes is not None and num_classes is None and task != "regression":
        try:
            num_classes = int(np.asarray(stored_classes).reshape(()))
        except (TypeError, ValueError):
            raise HarnessError(f"{path}: num_classes must be a single integer, got {stored_classes!r}",
                               key="data.path") from None
    return _with_task(parts, path, task, num_classes)


def _split_pair(x, y, path, val_fraction, split_seed):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise HarnessError(f"{path}: x has {len(x) if x.ndim else 0} examples but y has {len(y) if y.ndim else 0}",
                           key="data.path")
    if len(x) < 2:
        raise HarnessError(f"{path}: {len(x)} example(s) cannot be split into train and val", key="data.path")
    return split(x, y, val_fraction=val_fraction, seed=split_seed)


# ----------------------------------------------------------------------------------------------------------------
# .csv / .tsv


def _load_csv(resolved: str, path: str, label, task, num_classes, val_fraction, split_seed) -> dict[str, Any]:
    rows, lines = _read_rows(resolved, path)
    header = _detect_header(rows)
    names = [c.strip() for c in rows[0]] if header else None
    body, body_lines = (rows[1:], lines[1:]) if header else (rows, lines)
    if not body:
        raise HarnessError(f"{path}: has a header row but no data rows", key="data.path")
    width = len(rows[0])
    if width < 2:
        raise HarnessError(f"{path}: has a single column; a CSV needs a label column and at least one feature "
                           f"column", key="data.path")
    label_index = _label_column(label, names, width, path)
    table = np.array(body, dtype=object)
    label_name = _column_name(names, label_index)
    features = [j for j in range(width) if j != label_index]
    x = np.empty((len(body), len(features)), np.float32)
    for out, j in enumerate(features):
        x[:, out] = _numeric_column(table[:, j], _column_name(names, j), body_lines, path)
    y, classes_from_text = _label_values(table[:, label_index], label_name, body_lines, path, task)
    if len(x) < 2:
        raise HarnessError(f"{path}: one data row cannot be split into train and val", key="data.path")
    parts = split(x, y, val_fraction=val_fraction, seed=split_seed)
    if classes_from_text is not None and num_classes is None:
        num_classes = max(classes_from_text, 2)
    return _with_task(parts, path, task, num_classes)


def _read_rows(resolved: str, path: str) -> tuple[list[list[str]], list[int]]:
    """Non-blank rows of the file and their 1-based line numbers; every row must have the first row's width."""
    opener = gzip.open if resolved.lower().endswith(".gz") else open
    try:
        with opener(resolved, "rt", newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise HarnessError(f"{path}: is not UTF-8 text ({err.reason} at byte {err.start}); is it a CSV?",
                           key="data.path") from None
    except (OSError, EOFError) as err:
        raise HarnessError(f"{path}: cannot be read ({err})", key="data.path") from None
    if not text.strip():
        raise HarnessError(f"{path}: the file is empty", key="data.path")
    delimiter = "\t" if ".tsv" in resolved.lower() else _sniff_delimiter(text)
    rows, lines = [], []
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as err:
        raise HarnessError(f"{path}: line {reader.line_num}: not valid CSV ({err})", key="data.path") from None
    width = len(rows[0])
    for row, line in zip(rows, lines):
        if len(row) != width:
            raise HarnessError(f"{path}: line {line} has {len(row)} fields but line {lines[0]} has {width}",
                               key="data.path")
    return rows, lines


def _sniff_delimiter(text: str) -> str:
    """Comma unless the first line is clearly split by semicolons or tabs (European CSVs use ';')."""
    first = text.lstrip().splitlines()[0]
    counts = {d: first.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=counts.get)
    return best if counts[best] > counts[","] else ","


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return cell.strip().lower() in MISSING


def _detect_header(rows: list[list[str]]) -> bool:
    """A first row is a header when it holds text in a column whose other values are numbers (or, with a single
    row, when every cell is text). Text label columns (``setosa``) are text in every row and do not count."""
    first = rows[0]
    if len(rows) == 1:
        return not any(_is_number(c) and c.strip() for c in first)
    sample = rows[1:51]
    for j, cell in enumerate(first):
        if not _is_number(cell) and all(_is_number(r[j]) for r in sample):
            return True
    return False


def _column_name(names: Sequence[str] | None, j: int) -> str:
    return f"'{names[j]}' (column {j})" if names else f"column {j}"


def _label_column(label, names, width, path) -> int:
    if label is None:
        if names:
            lowered = [n.lower() for n in names]
            for candidate in LABEL_NAMES:
                if candidate in lowered:
                    return lowered.index(candidate)
        return width - 1
    if isinstance(label, bool):
        raise HarnessError(f"must be a column name or index, got {label!r}", key="data.label")
    if isinstance(label, (int, np.integer)):
        if not -width <= label < width:
            raise HarnessError(f"column {label} is out of range: {path} has {width} columns (0..{width - 1})",
                               key="data.label")
        return int(label) % width
    label = str(label)
    if names:
        if label in names:
            return names.index(label)
        lowered = [n.lower() for n in names]
        if label.lower() in lowered:
            return lowered.index(label.lower())
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise HarnessError(f"column {label!r} not found in {path} (columns: {shown})", key="data.label")
    if label.lstrip("-").isdigit():
        return _label_column(int(label), names, width, path)
    raise HarnessError(f"column {label!r} not found: {path} has no header row; give the label column's index",
                       key="data.label")


def _numeric_column(cells: np.ndarray, name: str, lines: list[int], path: str) -> np.ndarray:
    try:
        return _to_float(cells)
    except ValueError:
        for cell, line in zip(cells, lines):
            if not _is_number(cell):
                raise HarnessError(f"{path}: {name}, line {line}: {cell.strip()!r} is not a number (features must be "
                                   f"numeric; encode categories first, or make this the label column)",
                                   key="data.path") from None
        raise


def _to_float(cells: np.ndarray) -> np.ndarray:
    """Cells to float64; the missing markers become NaN."""
    try:
        return np.asarray(cells, dtype=str).astype(np.float64)
    except ValueError:
        stripped = np.char.lower(np.char.strip(np.asarray(cells, dtype=str)))
        missing = np.isin(stripped, list(MISSING))
        out = np.full(len(cells), np.nan)
        out[~missing] = stripped[~missing].astype(np.float64)  # raises ValueError on the first non-number
        return out


def _label_values(cells: np.ndarray, name: str, lines: list[int], path: str, task: str):
    """Numeric labels as float64 (NaN for missing), or text labels as class indices in sorted order (with the
    number of classes). Text labels are an error for regression."""
    try:
        return _to_float(cells), None
    except ValueError:
        pass
    if task == "regression":
        for cell, line in zip(cells, lines):
            if not _is_number(cell):
                raise HarnessError(f"{path}: label {name}, line {line}: {cell.strip()!r} is not a number, but "
                                   f"data.task is regression", key="data.path")
    text = np.char.strip(np.asarray(cells, dtype=str))
    empty = np.flatnonzero(np.isin(np.char.lower(text), list(MISSING)))
    if empty.size:
        raise HarnessError(f"{path}: label {name}, line {lines[empty[0]]} is empty ({len(empty)} rows without a "
                           f"label); drop them or fill them in", key="data.path")
    classes, indices = np.unique(text, return_inverse=True)
    return indices.astype(np.int64), len(classes)


# ----------------------------------------------------------------------------------------------------------------
# The task


def _with_task(parts: dict[str, Any], path: str, task: str, num_classes: int | None) -> dict[str, Any]:
    """Classification (with ``num_classes``) or regression (without), as the mapping's ``num_classes`` says."""
    parts = {k: np.asarray(v) for k, v in parts.items()}
    ys = [parts["y_train"], parts["y_val"]]
    if any(y.dtype.kind in "USO" for y in ys):  # text labels in an .npz: classes in sorted order
        if task == "regression":
            raise HarnessError(f"{path}: the labels are text, but data.task is regression", key="data.path")
        classes, inverse = np.unique(np.concatenate([y.astype(str).ravel() for y in ys]), return_inverse=True)
        n = parts["y_train"].size
        parts["y_train"] = inverse[:n].reshape(parts["y_train"].shape)
        parts["y_val"] = inverse[n:].reshape(parts["y_val"].shape)
        num_classes = num_classes or max(len(classes), 2)
    if task == "regression":
        return parts
    if num_classes is None:
        num_classes = _infer_classes(ys, task, path)
    if num_classes is None:
        return parts  # auto: not class labels, so regression
    for key in ("y_train", "y_val"):  # whole-number float labels (a CSV's) as integers; others left for the checks
        y = parts[key]
        if y.dtype.kind == "f" and np.isfinite(y).all() and np.all(y == np.round(y)):
            parts[key] = y.astype(np.int64)
    return {**parts, "num_classes": int(num_classes)}


def _infer_classes(ys: list[np.ndarray], task: str, path: str) -> int | None:
    """``max + 1`` for whole-number labels (the width for one-hot ones); None (regression) for other values under
    ``task=auto``. Under ``task=classification`` non-integer labels still get a class count (rounded), and the
    data checks report them (data.shape)."""
    if all(y.ndim == 2 and y.shape[1] > 1 for y in ys) and all(np.isin(y, (0, 1)).all() for y in ys):
        return int(ys[0].shape[1])  # one-hot
    values = np.concatenate([y.ravel() for y in ys]).astype(np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        if task == "classification":
            raise HarnessError(f"{path}: no finite label to count the classes from; set data.num_classes",
                               key="data.path")
        return None
    whole = bool(np.all(values == np.round(values)))
    if task == "auto" and not whole:
        return None
    return max(int(np.rint(values.max())) + 1, 2)
