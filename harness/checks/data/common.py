"""What the data checks share: their settings, the per-split views computed once, and the partial result each
family of checks returns."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from harness.checks.base import Plot, require_at_least
from harness.checks.data import stats
from harness.data.dataset import Dataset
from harness.errors import HarnessError
from harness.findings import Finding

NAME = "data"
SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Thresholds of the data checks (``diagnostics.data`` in the config; each is justified where it is used)."""

    max_input_rms: float = 4.0
    min_input_rms: float = 0.01
    max_input_offset: float = 10.0
    max_feature_range_ratio: float = 100.0
    max_split_shift: float = 3.0
    max_target_scale: float = 10.0
    min_target_std: float = 0.01
    max_target_range_ratio: float = 100.0
    imbalance_warning_ratio: float = 10.0
    imbalance_info_ratio: float = 3.0
    missing_class_alpha: float = 0.01
    label_shift_p_value: float = 1e-4
    label_shift_min_distance: float = 0.2
    leakage_error_fraction: float = 0.01
    leakage_info_fraction: float = 0.001
    val_duplicate_fraction: float = 0.05
    near_duplicate_distance: float = 0.2
    near_duplicate_p_value: float = 1e-3
    conflicting_error_fraction: float = 0.05
    max_regression_classes: int = 20
    check_determinism: bool = True
    max_listed: int = 10

    def validate(self, key: str):
        positive = ("max_input_rms", "min_input_rms", "max_input_offset", "max_split_shift", "max_target_scale",
                    "min_target_std")
        for name in positive:
            if getattr(self, name) <= 0:
                raise HarnessError(f"must be positive, got {getattr(self, name)}", key=f"{key}.{name}")
        if self.min_input_rms >= self.max_input_rms:
            raise HarnessError(f"must be below max_input_rms ({self.max_input_rms}), got {self.min_input_rms}",
                               key=f"{key}.min_input_rms")
        for name in ("max_feature_range_ratio", "max_target_range_ratio", "imbalance_info_ratio"):
            if getattr(self, name) <= 1:
                raise HarnessError(f"is a ratio of two scales and must be above 1, got {getattr(self, name)}",
                                   key=f"{key}.{name}")
        if self.imbalance_warning_ratio < self.imbalance_info_ratio:
            raise HarnessError(f"must be at least imbalance_info_ratio ({self.imbalance_info_ratio}), got "
                               f"{self.imbalance_warning_ratio}", key=f"{key}.imbalance_warning_ratio")
        for name in ("missing_class_alpha", "label_shift_p_value", "label_shift_min_distance",
                     "leakage_error_fraction", "leakage_info_fraction", "val_duplicate_fraction",
                     "conflicting_error_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise HarnessError(f"must be in (0, 1], got {getattr(self, name)}", key=f"{key}.{name}")
        if self.leakage_info_fraction > self.leakage_error_fraction:
            raise HarnessError(f"must be at most leakage_error_fraction ({self.leakage_error_fraction}), got "
                               f"{self.leakage_info_fraction}", key=f"{key}.leakage_info_fraction")
        if not 0 <= self.near_duplicate_distance < 1:
            raise HarnessError(f"is a fraction of the typical distance between training examples, in [0, 1) "
                               f"(0 switches near-duplicates off), got {self.near_duplicate_distance}",
                               key=f"{key}.near_duplicate_distance")
        if not 0 < self.near_duplicate_p_value < 1:
            raise HarnessError(f"must be in (0, 1), got {self.near_duplicate_p_value}",
                               key=f"{key}.near_duplicate_p_value")
        require_at_least(self, key, "max_regression_classes", 2)
        require_at_least(self, key, "max_listed", 1)


@dataclasses.dataclass
class Part:
    """What one family of checks contributes to the data outcome."""

    findings: list[Finding] = dataclasses.field(default_factory=list)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    series: dict[str, Any] = dataclasses.field(default_factory=dict)
    plots: list[Plot] = dataclasses.field(default_factory=list)

    def add(self, other: "Part") -> "Part":
        self.findings += other.findings
        self.metrics.update(other.metrics)
        self.series.update(other.series)
        self.plots += other.plots
        return self


def label_layout(y: np.ndarray, num_classes: int) -> str:
    """How classification labels are laid out: ``index`` (N,), ``column`` (N, 1), ``one_hot`` (N, C) with a
    single 1 per row, ``soft`` (N, C) probabilities, ``multi_hot`` (N, C) of 0/1 with rows not summing to 1,
    ``per_position`` a class per position (a token sequence (N, T), a label map (N, H, W); negative values are
    padding), ``other`` (N, C) of anything else, ``bad`` for any other shape. The same reading as training's
    (``Dataset.training_arrays``): (N, C) rows that are not one class per example are per-position labels when
    they hold class ids (whole numbers)."""
    if y.ndim == 1:
        return "index"
    if y.ndim < 1:
        return "bad"
    if y.ndim == 2 and y.shape[1] == 1:
        return "column"
    finite = (np.isfinite(y.reshape(len(y), -1)).all(axis=1) if y.dtype.kind == "f" else np.ones(len(y), bool))
    rows = y[finite]
    binary = bool(np.all((rows == 0) | (rows == 1)))
    if y.ndim > 2 or y.shape[1] != num_classes:
        # Rows with a single 1 look like one-hot labels of another width: num_classes is wrong, not a sequence.
        one_hot_like = y.ndim == 2 and binary and len(rows) > 0 and bool(np.all(rows.sum(axis=1) == 1))
        return "bad" if one_hot_like else "per_position"
    sums = rows.sum(axis=1)
    if binary:
        return "one_hot" if np.all(sums == 1) else "multi_hot"
    if y.dtype.kind in "iu" or bool(np.all(rows == np.round(rows))):
        return "per_position"  # class ids, one per position, in a sequence as long as num_classes
    if np.all(rows >= 0) and np.allclose(sums, 1.0, atol=1e-3):
        return "soft"
    return "other"


@dataclasses.dataclass
class Views:
    """Per-split quantities several checks need, computed once (lazily) from the dataset."""

    dataset: Dataset
    settings: Settings

    def x(self, split: str) -> np.ndarray:
        return getattr(self.dataset, f"x_{split}")

    def y(self, split: str) -> np.ndarray:
        return getattr(self.dataset, f"y_{split}")

    @functools.cached_property
    def nonfinite_x(self) -> dict[str, stats.NonFinite]:
        return {s: stats.nonfinite(self.x(s)) for s in SPLITS}

    @functools.cached_property
    def nonfinite_y(self) -> dict[str, stats.NonFinite]:
        return {s: stats.nonfinite(self.y(s)) for s in SPLITS}

    @functools.cached_property
    def finite(self) -> dict[str, np.ndarray]:
        """Examples whose inputs and targets are all finite (what later stages train on)."""
        return {s: ~(self.nonfinite_x[s].bad_rows | self.nonfinite_y[s].bad_rows) for s in SPLITS}

    @functools.cached_property
    def x_stats(self) -> dict[str, stats.FeatureStats]:
        return {s: stats.feature_stats(self.x(s), self.finite[s]) for s in SPLITS}

    @functools.cached_property
    def same_input_shape(self) -> bool:
        return self.x("train").shape[1:] == self.x("val").shape[1:]

    @property
    def has_features(self) -> bool:
        return self.x("train")[0].size > 0 if self.x("train").ndim > 1 else True

    @functools.cached_property
    def layouts(self) -> dict[str, str]:
        return {s: label_layout(self.y(s), self.dataset.num_classes) for s in SPLITS}

    @functools.cached_property
    def labels(self) -> dict[str, np.ndarray | None]:
        """Classification labels of the finite rows as class values the way training reads them (a column
        squeezed, one-hot by argmax), not yet rounded or clipped; None for a split whose layout is unusable."""
        out: dict[str, np.ndarray | None] = {}
        for s in SPLITS:
            y, layout = self.y(s)[self.finite[s]], self.layouts[s]
            if layout in ("index", "per_position"):
                out[s] = y
            elif layout == "column":
                out[s] = y[:, 0]
            elif layout in ("one_hot", "soft"):
                out[s] = np.argmax(y, axis=1)
            else:
                out[s] = None
        return out

    @functools.cached_property
    def per_position(self) -> bool:
        """Labels are one class per position (sequences, label maps), not one per example."""
        return any(layout == "per_position" for layout in self.layouts.values())

    @functools.cached_property
    def causal(self) -> bool:
        """A next-token language model (harness.tasks): its labels are the inputs shifted by one."""
        return self.per_position and self.dataset.task.causal

    @property
    def integer_inputs(self) -> bool:
        """Inputs are ids (tokens, categories) that a model embeds, not magnitudes: integer inputs, except 8-bit
        images (``uint8`` inputs of anything but a language model), whose 0..255 intensities are a scale to judge."""
        dtype = self.x("train").dtype
        return dtype.kind in "iu" and not (dtype == np.uint8 and not self.causal)

    @functools.cached_property
    def class_counts(self) -> dict[str, np.ndarray | None]:
        """Examples (positions, for per-position labels) per class in [0, num_classes), from the rounded labels
        (out-of-range ones and padding are not counted)."""
        out = {}
        c = self.dataset.num_classes
        for s in SPLITS:
            labels = self.labels[s]
            if labels is None:
                out[s] = None
                continue
            idx = np.rint(labels).astype(np.int64) if labels.dtype.kind == "f" else labels.astype(np.int64)
            out[s] = np.bincount(idx[(idx >= 0) & (idx < c)], minlength=c)
        return out

    @functools.cached_property
    def hash_dtype(self) -> np.dtype:
        return np.result_type(self.x("train").dtype, self.x("val").dtype)

    @functools.cached_property
    def row_hashes(self) -> dict[str, np.ndarray]:
        return {s: stats.row_hashes(self.x(s), self.hash_dtype) for s in SPLITS}

    @functools.cached_property
    def groups(self) -> dict[str, stats.Groups]:
        """Finite rows of each split grouped by identical inputs."""
        return {s: stats.group_rows(self.x(s), self.row_hashes[s], np.flatnonzero(self.finite[s])) for s in SPLITS}
