"""The dataset a run works on, validated at the boundary.

A data factory (built-in, file loader or the user's ``_target_``) returns a mapping with numpy-convertible
``x_train, y_train, x_val, y_val`` and, for classification, ``num_classes`` (no ``num_classes`` means regression).
Structural problems that make any work impossible (a missing key, text where numbers belong, an empty split,
inputs and targets of different lengths) are :class:`HarnessError` naming the key. Problems in the *values* (NaN,
labels out of range, leakage, ...) are left for the data checks to report as findings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import numpy as np

from harness import tasks
from harness.errors import HarnessError
from harness.tasks import Task

ARRAY_KEYS = ("x_train", "y_train", "x_val", "y_val")


@dataclasses.dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int | None
    name: str = "data"
    # What was drawn from iterables (harness.data.iterables.Drawn, one per iterable); empty for arrays.
    drawn: tuple = ()
    causal: bool | None = None  # a language model's data may say so (``causal``); None: inferred (harness.tasks)
    pad_token: int | None = None  # inputs equal to this token are padding

    @property
    def classification(self) -> bool:
        return self.num_classes is not None

    @functools.cached_property
    def task(self) -> Task:
        """What the model predicts, read off the arrays as training reads them (:mod:`harness.tasks`)."""
        x, y = self.training_arrays()[:2]
        return tasks.infer(x, y, self.num_classes, causal=self.causal, pad_token=self.pad_token)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_outputs(self) -> int:
        return self.task.num_outputs

    def finite_rows(self, split: str) -> np.ndarray:
        """Mask of examples whose inputs and targets are all finite."""
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        fx = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.size else np.ones(len(x), bool)
        fy = np.isfinite(y.reshape(len(y), -1)).all(axis=1) if y.size else np.ones(len(y), bool)
        return fx & fy

    def training_arrays(self):
        """(x_train, y_train, x_val, y_val) ready for the compiled programs: float32 inputs (integer inputs, such as
        token ids, stay integers: int32), int32 labels or float32 targets, non-finite examples dropped (the data
        checks report them; later stages run on the rest). Negative class targets (padding) stay -1."""
        out = []
        for split in ("train", "val"):
            keep = self.finite_rows(split)
            x = getattr(self, f"x_{split}")[keep]
            x = x.astype(np.int32) if x.dtype.kind in "iu" else x.astype(np.float32)
            y = getattr(self, f"y_{split}")[keep]
            if self.classification and y.ndim == 2 and (y.shape[1] == 1 or _one_hot(y, self.num_classes)
                                                        or _soft(y, self.num_classes)):
                # (N, 1) column labels are squeezed; (N, C) one-hot or soft labels become class indices.
                y = y[:, 0] if y.shape[1] == 1 else np.argmax(y, axis=1)
            if self.classification:
                y = np.rint(y)
                y = np.where(y < 0, -1, np.clip(y, 0, self.num_classes - 1)).astype(np.int32)
            else:
                y = y.astype(np.float32)
            out += [x, y]
        return tuple(out)


def _one_hot(y: np.ndarray, num_classes: int) -> bool:
    """(N, C) rows of 0/1 with a single 1: one-hot labels, not a sequence of C class indices."""
    if y.shape[1] != num_classes:
        return False
    finite = y[np.isfinite(y).all(axis=1)] if y.dtype.kind == "f" else y
    return bool(np.all((finite == 0) | (finite == 1)) and np.all(finite.sum(axis=1) == 1))


def _soft(y: np.ndarray, num_classes: int) -> bool:
    """(N, C) float rows of probabilities (label smoothing, distillation), not all whole numbers: one class per
    example (their argmax), not a sequence of C class indices (the data check ``data.shape`` warns)."""
    if y.shape[1] != num_classes or y.dtype.kind != "f":
        return False
    finite = y[np.isfinite(y).all(axis=1)]
    return bool(finite.size and not np.all(finite == np.round(finite)) and np.all(finite >= 0)
                and np.allclose(finite.sum(axis=1), 1.0, atol=1e-3))


def _as_numeric(value: Any, key: str, source: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as err:  # ragged lists, objects numpy cannot hold
        raise HarnessError(f"{source}: '{key}' could not be read as an array ({err})") from None
    if array.dtype == object or array.dtype.kind in "USV":
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError):
            raise HarnessError(f"{source}: '{key}' holds non-numeric values (dtype {array.dtype})") from None
    if array.dtype.kind == "b":
        array = array.astype(np.int64)
    if array.dtype.kind not in "iuf":
        raise HarnessError(f"{source}: '{key}' must be numeric, got dtype {array.dtype}")
    return array


def from_mapping(mapping: Mapping[str, Any], *, source: str = "data", name: str = "data", drawn: tuple = ()
                 ) -> Dataset:
    """Validate a data factory's result. ``source`` names where it came from (config key or file) in errors;
    ``drawn`` records what was drawn when the arrays came from iterables (:mod:`harness.data.iterables`)."""
    if not isinstance(mapping, Mapping):
        raise HarnessError(
            f"{source} must return a mapping with keys {', '.join(ARRAY_KEYS)} (and num_classes for "
            f"classification), or iterables of batches (a mapping with train and val, or one iterable), got "
            f"{type(mapping).__name__}"
        )
    missing = [k for k in ARRAY_KEYS if k not in mapping]
    if missing:
        raise HarnessError(f"{source}: missing {', '.join(missing)}; a data factory returns {', '.join(ARRAY_KEYS)} "
                           f"(or iterables under train and val)")
    arrays = {k: _as_numeric(mapping[k], k, source) for k in ARRAY_KEYS}
    for k, a in arrays.items():
        if a.ndim == 0 or a.shape[0] == 0:
            raise HarnessError(f"{source}: '{k}' is empty (shape {a.shape})")
    for split in ("train", "val"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise HarnessError(f"{source}: x_{split} has {nx} examples but y_{split} has {ny}")
    num_classes = mapping.get("num_classes")
    if num_classes is not None:
        try:
            num_classes = int(num_classes)
        except (TypeError, ValueError):
            raise HarnessError(f"{source}: num_classes must be an integer, got {num_classes!r}") from None
        if num_classes < 2:
            raise HarnessError(f"{source}: num_classes must be at least 2, got {num_classes}")
    causal, pad_token = mapping.get("causal"), mapping.get("pad_token")
    return Dataset(num_classes=num_classes, name=name, drawn=tuple(drawn), **arrays,
                   causal=None if causal is None else bool(causal),
                   pad_token=None if pad_token is None else int(pad_token))
