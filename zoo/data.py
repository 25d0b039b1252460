"""Data factories of the zoo, as users write them: a few clean pipelines and many with one mistake each.

Every factory returns the harness data contract: a mapping of numpy arrays ``x_train, y_train, x_val, y_val`` plus
``num_classes`` for classification (none for regression). All of them are deterministic (seeded) except
:func:`unseeded_split`, whose mistake is exactly that. Data ship offline: scikit-learn's bundled tables (through
harness's built-in loaders, as a user would call them), generated data, and Python's own standard-library sources
for the sequence tasks.
"""

from __future__ import annotations

import collections
import io

import numpy as np

from experiments.char_lm import read_corpus  # one reader of Python's sources for the example and the zoo
from harness.data import builtin


def _split(x, y, val_fraction: float = 0.25, seed: int = 0) -> dict:
    return builtin.split(np.asarray(x), np.asarray(y), val_fraction=val_fraction, seed=seed)


def _standardize(parts: dict) -> dict:
    mean, std = parts["x_train"].mean(axis=0), parts["x_train"].std(axis=0) + 1e-8
    return {**parts, "x_train": ((parts["x_train"] - mean) / std).astype(np.float32),
            "x_val": ((parts["x_val"] - mean) / std).astype(np.float32)}


def _digits_arrays():
    """All 1797 digits, pixels in [0, 1] (as harness's built-in does), labels 0..9."""
    d = builtin.digits(val_fraction=0.0)
    return d["x_train"], d["y_train"]


# ----------------------------------------------------------------------------------------------------------------
# Clean data


def noisy_linear(num_examples: int = 600, num_features: int = 8, noise: float = 0.5, seed: int = 0):
    """A linear regression with noisy targets: y = x w + noise, x ~ N(0, I), w ~ N(0, 1/d). The best any model
    reaches is the noise variance (0.25 of a total ~1.25): a linear model is right for it, and cannot memorize."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, num_features)).astype(np.float32)
    w = rng.standard_normal(num_features) / np.sqrt(num_features)
    y = (x @ w + noise * rng.standard_normal(num_examples)).astype(np.float32)
    return _split(x, y, seed=seed)


def noisy_xor(num_examples: int = 800, spread: float = 0.35, label_noise: float = 0.1, seed: int = 0):
    """XOR of two noisy signs: four Gaussian clusters at (+-1, +-1), class = whether the signs differ, with
    ``label_noise`` of the labels flipped. Two tanh units solve it up to the noise; nothing memorizes the flips."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 2, (num_examples, 2))
    x = (2.0 * corners - 1.0 + spread * rng.standard_normal((num_examples, 2))).astype(np.float32)
    y = (corners[:, 0] ^ corners[:, 1]).astype(np.int64)
    flip = rng.random(num_examples) < label_noise
    y[flip] = 1 - y[flip]
    return {**_split(x, y, seed=seed), "num_classes": 2}


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def digits_raw_pixels():
    """Digits as 8-bit images (0..255) that the pipeline forgot to divide by 255."""
    x, y = _digits_arrays()
    x = np.round(x * 255.0).astype(np.float32)  # the bug: `/ 255.0` missing before training
    return {**_split(x, y), "num_classes": 10}


def quoted_csv_features():
    """Wine read with ``np.genfromtxt`` from a CSV whose numbers are quoted: every feature parses as NaN, and the
    ``np.nan_to_num`` meant for a few missing values turns all of them into zeros. The labels (unquoted) survive."""
    d = builtin.wine(standardize=True, val_fraction=0.0)
    x, y = d["x_train"], d["y_train"]
    lines = [",".join(f'"{v:.6f}"' for v in row) + f",{label}" for row, label in zip(x, y)]
    table = np.genfromtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.float64)
    features = np.nan_to_num(table[:, :-1]).astype(np.float32)  # the bug: all zeros
    labels = table[:, -1].astype(np.int64)
    return {**_split(features, labels), "num_classes": 3}


def breast_cancer_missing_values(fraction: float = 0.02, seed: int = 0):
    """Standardized breast cancer data with ``fraction`` of the entries missing, left as NaN."""
    d = builtin.breast_cancer(standardize=True)
    rng = np.random.default_rng(seed)
    for key in ("x_train", "x_val"):
        x = d[key].copy()
        x[rng.random(x.shape) < fraction] = np.nan  # the bug: missing values never imputed
        d[key] = x
    return d


# ----------------------------------------------------------------------------------------------------------------
# Labels


def digits_one_based_labels():
    """Digits whose labels were read from a file that numbers classes 1..10; ``num_classes`` counted as the number of
    distinct labels (10), so label 10 is out of range."""
    x, y = _digits_arrays()
    y = y + 1  # the bug: 1-based class ids
    return {**_split(x, y), "num_classes": int(len(np.unique(y)))}


def digits_shuffled_labels(seed: int = 0):
    """Digits whose training labels were shuffled on their own (``rng.shuffle(y_train)`` in a pipeline that meant to
    shuffle examples): no input says anything about its label any more. Validation is intact."""
    d = builtin.digits()
    rng = np.random.default_rng(seed)
    y = d["y_train"].copy()
    rng.shuffle(y)  # the bug: shuffles labels, not (input, label) pairs
    return {**d, "y_train": y}


def wine_labels_off_by_one_row():
    """Wine whose training labels are misaligned by one row (a header row counted twice when joining the label
    file): each example carries its neighbour's label."""
    d = builtin.wine()
    return {**d, "y_train": np.roll(d["y_train"], 1)}


def digits_conflicting_labels(fraction: float = 0.3, seed: int = 0):
    """Digits merged from two annotators: ``fraction`` of the training images appear twice, the second copy with a
    different (wrong) label."""
    d = builtin.digits()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(d["x_train"]), int(fraction * len(d["x_train"])), replace=False)
    wrong = (d["y_train"][idx] + rng.integers(1, 10, len(idx))) % 10
    x = np.concatenate([d["x_train"], d["x_train"][idx]])
    y = np.concatenate([d["y_train"], wrong])
    order = rng.permutation(len(x))
    return {**d, "x_train": x[order], "y_train": y[order]}


def imbalanced_blobs(majority: int = 5000, ratio: int = 50, num_features: int = 10, shift: float = 1.0,
                     seed: int = 0):
    """Fraud-like data: ``majority`` normal examples against ``majority / ratio`` positives, two overlapping
    Gaussians. Nobody reweighted or resampled: predicting "normal" is 98% accurate."""
    rng = np.random.default_rng(seed)
    minority = majority // ratio
    x0 = rng.standard_normal((majority, num_features))
    x1 = rng.standard_normal((minority, num_features)) + shift / np.sqrt(num_features) * 3
    x = np.concatenate([x0, x1]).astype(np.float32)
    y = np.concatenate([np.zeros(majority, np.int64), np.ones(minority, np.int64)])
    return {**_split(x, y, seed=seed), "num_classes": 2}


# ----------------------------------------------------------------------------------------------------------------
# Splits


def digits_val_copied_from_train(num_val: int = 400):
    """A validation set taken as a slice of the training set (``x_val = x_train[:400]``): every validation example
    is a training example."""
    d = builtin.digits()
    return {**d, "x_val": d["x_train"][:num_val].copy(), "y_val": d["y_train"][:num_val].copy()}


def breast_cancer_val_near_duplicates(noise: float = 1e-3, seed: int = 0):
    """Validation examples that are training examples with a little noise added ("augmented" copies of the training
    set used as validation): not bitwise equal, but the same examples."""
    d = builtin.breast_cancer()
    rng = np.random.default_rng(seed)
    n_val = len(d["x_val"])
    idx = rng.choice(len(d["x_train"]), n_val, replace=False)
    x_val = d["x_train"][idx] + noise * rng.standard_normal((n_val, d["x_train"].shape[1])).astype(np.float32)
    return {**d, "x_val": x_val.astype(np.float32), "y_val": d["y_train"][idx].copy()}


def digits_split_sorted_by_class(val_fraction: float = 0.25):
    """Digits stored sorted by class, split without shuffling: the last quarter (classes 7-9) is validation, and
    the model never sees those classes in training."""
    x, y = _digits_arrays()
    order = np.argsort(y, kind="stable")
    x, y = x[order], y[order]
    n_val = int(round(len(x) * val_fraction))
    return {"x_train": x[:-n_val], "y_train": y[:-n_val], "x_val": x[-n_val:], "y_val": y[-n_val:],
            "num_classes": 10}


def unseeded_split(val_fraction: float = 0.25):
    """Digits split with ``np.random.permutation`` and no seed: another split on every call, every run."""
    x, y = _digits_arrays()
    order = np.random.permutation(len(x))  # the bug: the global, unseeded generator
    n_val = int(round(len(x) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val], "num_classes": 10}


# ----------------------------------------------------------------------------------------------------------------
# Regression targets


def house_prices(num_examples: int = 1000, num_features: int = 8, dollars: float = 1000.0, base: float = 3000.0,
                 seed: int = 0):
    """harness's generated regression as prices in dollars: targets around 3000 with a spread of 1000, never
    standardized."""
    d = builtin.regression(num_examples=num_examples, num_features=num_features, seed=seed)
    for key in ("y_train", "y_val"):
        d[key] = (base + dollars * d[key]).astype(np.float32)  # the bug: raw dollar amounts as targets
    return d


def regression_missing_targets(fraction: float = 0.02, seed: int = 0):
    """harness's generated regression with ``fraction`` of the training targets missing, left as NaN."""
    d = builtin.regression(seed=seed)
    rng = np.random.default_rng(seed + 1)
    y = d["y_train"].copy()
    y[rng.random(len(y)) < fraction] = np.nan
    return {**d, "y_train": y}


def positive_regression(num_examples: int = 1000, num_features: int = 8, seed: int = 0):
    """A regression with positive targets (a rate: 1 + softplus of a nonlinear signal), unit scale."""
    d = builtin.regression(num_examples=num_examples, num_features=num_features, seed=seed)
    for key in ("y_train", "y_val"):
        d[key] = (1.0 + np.log1p(np.exp(d[key]))).astype(np.float32)
    return d


# ----------------------------------------------------------------------------------------------------------------
# Sequences: text that ships with every Python


SOURCES = ("textwrap.py", "functools.py", "argparse.py")
UNK = 0


def python_chars(num_train: int = 512, num_val: int = 128, seq_len: int = 32, vocab_size: int = 32,
                 sources=SOURCES):
    """Next-character pairs from Python's own standard-library sources: ``(N, seq_len)`` windows, the targets the
    inputs shifted by one. The vocabulary is the ``vocab_size - 1`` most frequent training characters (ids 1..),
    any other character is 0. Training windows from the start of the text, validation from its end."""
    text = read_corpus(tuple(sources))  # the char-LM example's reader of stdlib sources
    need = (num_train + num_val) * seq_len + 2
    if len(text) < need:
        raise ValueError(f"the text has {len(text)} characters, {need} needed")
    train_text = text[: num_train * seq_len + 1]
    val_text = text[len(text) - num_val * seq_len - 1:]
    counts = collections.Counter(train_text)
    chars = sorted(counts, key=lambda c: (-counts[c], c))[: vocab_size - 1]
    ids = {c: i + 1 for i, c in enumerate(chars)}

    def windows(part: str, n: int):
        tokens = np.array([ids.get(c, UNK) for c in part], np.int32)
        index = (np.arange(n) * seq_len)[:, None] + np.arange(seq_len + 1)[None, :]
        w = tokens[index]
        return w[:, :-1], w[:, 1:]

    x_train, y_train = windows(train_text, num_train)
    x_val, y_val = windows(val_text, num_val)
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val, "num_classes": vocab_size,
            "causal": True}


PAD = 0


def tagged_tokens(num_train: int = 512, num_val: int = 128, seq_len: int = 16, vocab_size: int = 20,
                  seed: int = 0):
    """Per-position tagging of right-padded token sequences (pad token 0, label -100 there): a token's tag is 1
    when it is larger than the token before it (the first real token: larger than vocab/2), so a tagger needs its
    left neighbour, which self-attention gives it."""
    rng = np.random.default_rng(seed)
    n = num_train + num_val
    x = rng.integers(1, vocab_size, (n, seq_len)).astype(np.int32)
    lengths = rng.integers(4, seq_len + 1, n)
    prev = np.concatenate([np.full((n, 1), vocab_size // 2), x[:, :-1]], axis=1)
    y = (x > prev).astype(np.int32)
    for i, length in enumerate(lengths):
        x[i, length:] = PAD
        y[i, length:] = -100
    return {"x_train": x[:num_train], "y_train": y[:num_train], "x_val": x[num_train:], "y_val": y[num_train:],
            "num_classes": 2, "pad_token": PAD, "causal": False}
