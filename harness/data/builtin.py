"""Built-in data sets that ship offline: scikit-learn's bundled tables and a generated regression.

The CSV files are read straight from scikit-learn's package data when present (importing ``sklearn.datasets``
costs about a second; reading the file costs milliseconds), with scikit-learn's loaders as the fallback.
Every split is a fixed, seeded 75/25 split so runs are comparable.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np


def _sklearn_data_file(name: str) -> str | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)
    return path if os.path.exists(path) else None


def split(x: np.ndarray, y: np.ndarray, *, val_fraction: float = 0.25, seed: int = 0):
    """A fixed random train/validation split (a seeded permutation: the same arrays on every call)."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val]}


def _standardize(parts: dict, enabled: bool) -> dict:
    """Zero mean, unit variance per feature, with statistics from the training split only (no leakage)."""
    if enabled:
        mean = parts["x_train"].mean(axis=0)
        std = parts["x_train"].std(axis=0) + 1e-8
        parts["x_train"] = (parts["x_train"] - mean) / std
        parts["x_val"] = (parts["x_val"] - mean) / std
    return parts


def _load_digits_arrays():
    path = _sklearn_data_file("digits.csv.gz")
    if path:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def _load_table(csv_name: str, loader: str):
    """scikit-learn's wine and breast_cancer CSVs: a header row of counts, then features with the label last."""
    path = _sklearn_data_file(csv_name)
    if path:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
        return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)
    import sklearn.datasets

    d = getattr(sklearn.datasets, loader)()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def digits(form: str = "flat", pixel_scale: float = 16.0, val_fraction: float = 0.25, split_seed: int = 0):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), pixels divided by ``pixel_scale``.

    ``form='flat'`` gives 64 features, ``form='image'`` gives 8x8x1 images for the CNN.
    """
    from harness.errors import HarnessError

    if form not in ("flat", "image"):
        raise HarnessError(f"unknown value {form!r}; choose flat or image", key="data.form")
    x, y = _load_digits_arrays()
    x = x / np.float32(pixel_scale)
    if form == "image":
        x = x.reshape(-1, 8, 8, 1)
    return {**split(x, y, val_fraction=val_fraction, seed=split_seed), "num_classes": 10}


def wine(standardize: bool = True, val_fraction: float = 0.25, split_seed: int = 0):
    """scikit-learn's wine recognition data (178 examples, 13 features, 3 classes)."""
    x, y = _load_table("wine_data.csv", "load_wine")
    parts = split(x, y, val_fraction=val_fraction, seed=split_seed)
    return {**_standardize(parts, standardize), "num_classes": 3}


def breast_cancer(standardize: bool = True, val_fraction: float = 0.25, split_seed: int = 0):
    """scikit-learn's Wisconsin breast cancer data (569 examples, 30 features, 2 classes)."""
    x, y = _load_table("breast_cancer.csv", "load_breast_cancer")
    parts = split(x, y, val_fraction=val_fraction, seed=split_seed)
    return {**_standardize(parts, standardize), "num_classes": 2}


def regression(
    num_examples: int = 1000, num_features: int = 8, noise: float = 0.1, seed: int = 0, val_fraction: float = 0.25
):
    """A generated nonlinear regression: y = tanh(x W1) w2 + noise, x ~ N(0, I), targets of unit scale."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, num_features)).astype(np.float32)
    w1 = rng.standard_normal((num_features, 16)) / np.sqrt(num_features)
    w2 = rng.standard_normal(16) / np.sqrt(16)
    y = np.tanh(x @ w1) @ w2
    y = (y - y.mean()) / y.std() + noise * rng.standard_normal(num_examples)
    return split(x, y.astype(np.float32), val_fraction=val_fraction, seed=seed)
