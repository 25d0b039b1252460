"""The dataset a run works on, validated at the boundary.

A data factory (built-in, file loader or the user's ``_target_``) returns a mapping with numpy-convertible
``x_train, y_train, x_val, y_val`` and, for classification, ``num_classes`` (no ``num_classes`` means regression).
Structural problems that make any work impossible (a missing key, text where numbers belong, an empty split,
inputs and targets of different lengths) are :class:`HarnessError` naming the key. Problems in the *values* (NaN,
labels out of range, leakage, ...) are left for the data checks to report as findings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from harness.errors import HarnessError

ARRAY_KEYS = ("x_train", "y_train", "x_val", "y_val")


@dataclasses.dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int | None
    name: str = "data"

    @property
    def classification(self) -> bool:
        return self.num_classes is not None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_outputs(self) -> int:
        if self.classification:
            return int(self.num_classes)
        return int(np.prod(self.y_train.shape[1:])) if self.y_train.ndim > 1 else 1

    def finite_rows(self, split: str) -> np.ndarray:
        """Mask of examples whose inputs and targets are all finite."""
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        fx = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.size else np.ones(len(x), bool)
        fy = np.isfinite(y.reshape(len(y), -1)).all(axis=1) if y.size else np.ones(len(y), bool)
        return fx & fy

    def training_arrays(self):
        """(x_train, y_train, x_val, y_val) ready for the compiled programs: float32 inputs, int32 labels or
        float32 targets, non-finite examples dropped (the data checks report them; later stages run on the rest)."""
        out = []
        for split in ("train", "val"):
            keep = self.finite_rows(split)
            x = getattr(self, f"x_{split}")[keep].astype(np.float32)
            y = getattr(self, f"y_{split}")[keep]
            if self.classification and y.ndim == 2:
                # (N, 1) column labels are squeezed; (N, C) one-hot labels become class indices.
                y = y[:, 0] if y.shape[1] == 1 else np.argmax(y, axis=1)
            if self.classification:
                y = np.clip(np.rint(y), 0, self.num_classes - 1).astype(np.int32)
            else:
                y = y.astype(np.float32)
            out += [x, y]
        return tuple(out)


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


def from_mapping(mapping: Mapping[str, Any], *, source: str = "data", name: str = "data") -> Dataset:
    """Validate a data factory's result. ``source`` names where it came from (config key or file) in errors."""
    if not isinstance(mapping, Mapping):
        raise HarnessError(
            f"{source} must return a mapping with keys {', '.join(ARRAY_KEYS)} (and num_classes for "
            f"classification), got {type(mapping).__name__}"
        )
    missing = [k for k in ARRAY_KEYS if k not in mapping]
    if missing:
        raise HarnessError(f"{source}: missing {', '.join(missing)}; a data factory returns {', '.join(ARRAY_KEYS)}")
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
    return Dataset(num_classes=num_classes, name=name, **arrays)
