"""Scales: inputs far from normalized or with features on wildly different scales (``data.feature_scale``),
regression targets far from unit scale (``data.target_scale``), and features that never vary
(``data.constant_features``).

Seeds: "Values not normalized (raw pixels 0-255 instead of 0-1)" (seed 001); "Data Scaling: you forgot to scale
your inputs (StandardScaler), causing the optimizer to struggle with oblong loss surfaces" (seed 002); "If feature 1
has an order of magnitude 1 but feature 2 has order of magnitude 1000, then gradient components corresponding to
feature 2 will be much larger" and "in a regression task, if you know the mean of the target is around some value
mu, you should initialize the bias of the last layer to mu" (seed 003); "Oscillating loss: inconsistent
preprocessing" (seed 000). Background: LeCun, Bottou, Orr, Mueller, "Efficient BackProp" (1998), section 4.3:
inputs should have zero mean and similar, unit-order variances.

Why these statistics (measured on the builtins, training split):

* **RMS over all values**, not ``max |x|``: a fan-in initialized first layer's pre-activation variance is the mean of
  ``x**2`` over features, so the RMS is the scale the network sees. ``max |x|`` false-alarms on standardized data
  with outliers (breast_cancer standardized reaches 12; its RMS is 1.0). digits/16 has RMS 0.48; raw digits 7.75;
  0-255 pixels about 124; raw wine 236. Threshold 4: no normalized input reaches it (standardized data has RMS 1
  exactly, [0, 1] data at most 1), every raw example above does.
* **Per-feature range** (max - min) ratios, not std ratios: a rarely-lit border pixel of digits/16 has std 0.0017 but
  its values are the same 1/16 steps as every pixel, so std ratios reach 241 on healthy digits while range ratios
  are 16; standardized wine/breast_cancer/regression have range ratios 1.7/3.0/1.1, raw wine 2620, raw
  breast_cancer 1.4e5. Threshold 100 (two orders of magnitude).
* **Offset** ``|mean| / std`` of all values pooled: inputs riding on a constant (0.9-1.1 readings, an unsubtracted
  baseline) give the first layer a large shared component and a small signal. digits/16 0.8, white-background
  [0, 1] images about 3; threshold 10.
* **Train vs val**: the median over features of ``|mean_val - mean_train| / std_train`` and of ``std_val /
  std_train``, and the val/train ratio of the RMS: a split preprocessed differently (standardized train, raw val) is
  off by orders of magnitude; random splits of the builtins by at most 0.25 (ratios 0.86-1.0). Threshold 3.
"""

from __future__ import annotations

import numpy as np

from harness.checks.base import Plot
from harness.checks.data import stats
from harness.checks.data.common import Part, Views
from harness.findings import error, info, warning

# Below this many finite validation examples a std estimate is off by a factor of 2 too often to compare scales.
MIN_EXAMPLES_FOR_SHIFT = 10
MAX_SERIES_FEATURES = 4096  # per-feature series/plots beyond this are too long to read


def check_feature_scale(v: Views) -> Part:
    """``data.feature_scale`` (warning): unnormalized inputs, features whose ranges differ by orders of magnitude,
    a large constant offset, val preprocessed differently from train; (info) inputs far below unit scale. Integer
    inputs are ids (tokens, categories) that a model embeds, not magnitudes: they are not judged, except 8-bit
    images (``uint8`` inputs outside a language model: raw 0..255 intensities)."""
    s = v.settings
    part = Part()
    if v.integer_inputs:
        part.metrics["data/feature_scale/status"] = "skipped: integer inputs (token ids) are not scaled"
        return part
    st = v.x_stats["train"]
    if st.count == 0 or st.mean.size == 0:
        return part
    dtype = v.x("train").dtype
    constant = stats.constant_mask(st, dtype)
    varying = np.flatnonzero(~constant)
    rms, mean, spread = st.rms, st.overall_mean, st.overall_std
    lo, hi = float(np.min(st.min)), float(np.max(st.max))
    offset = abs(mean) / spread if spread > 0 else 0.0
    part.metrics.update({"data/feature_scale/rms": rms, "data/feature_scale/min": lo, "data/feature_scale/max": hi,
                         "data/feature_scale/mean": mean, "data/feature_scale/std": spread,
                         "data/feature_scale/offset": offset})
    evidence = {"rms": rms, "min": lo, "max": hi, "mean": mean, "std": spread}
    problems, fixes = [], []
    if rms > s.max_input_rms:
        problems.append(f"inputs are not normalized: their RMS is {rms:.3g} (values from {lo:.4g} to {hi:.4g}, mean "
                        f"{mean:.3g}, std {spread:.3g}), where a network initialized for unit-scale inputs expects "
                        f"about 1")
        if lo >= 0 and 1 < hi <= 255 and stats.integer_valued(v.x("train"), v.finite["train"]):
            fixes.append(f"these look like raw pixel intensities (whole numbers 0..{hi:g}): divide by "
                         f"{255 if hi > 16 else hi:g} so they lie in [0, 1] (or standardize per channel)")
        else:
            fixes.append("standardize each feature with the training split's mean and std, (x - mean) / std, and "
                         "apply the same statistics to val (scikit-learn's StandardScaler)")
    elif spread > 0 and offset > s.max_input_offset:
        problems.append(f"inputs ride on a large constant offset: mean {mean:.4g} vs std {spread:.3g} "
                        f"({offset:.0f}x), so the signal is a small ripple on a shared constant")
        fixes.append("subtract the per-feature training mean (and divide by the std)")
    if len(varying) >= 2:
        ranges = st.range[varying]
        widest, narrowest = varying[np.argmax(ranges)], varying[np.argmin(ranges)]
        ratio = float(ranges.max() / ranges.min())
        part.metrics["data/feature_scale/range_ratio"] = ratio
        evidence.update(range_ratio=ratio, widest_feature=int(widest), widest_range=float(st.range[widest]),
                        narrowest_feature=int(narrowest), narrowest_range=float(st.range[narrowest]))
        if ratio > s.max_feature_range_ratio:
            problems.append(f"feature ranges differ by {ratio:.3g}x (feature {int(widest)} spans "
                            f"{st.range[widest]:.4g}, feature {int(narrowest)} spans {st.range[narrowest]:.3g}), so "
                            f"the wide features dominate the gradients")
            if not any("standardize each feature" in f for f in fixes):
                fixes.append("standardize each feature with the training split's mean and std (per-feature, not "
                             "one global scale)")
    shift = _split_shift(v, varying)
    if shift is not None:
        mean_shift, std_ratio, rms_ratio = shift
        part.metrics["data/feature_scale/split_mean_shift"] = mean_shift
        part.metrics["data/feature_scale/split_std_ratio"] = std_ratio
        part.metrics["data/feature_scale/split_rms_ratio"] = rms_ratio
        evidence.update(split_mean_shift=mean_shift, split_std_ratio=std_ratio, split_rms_ratio=rms_ratio)
        k = s.max_split_shift
        if mean_shift > k or not 1 / k <= std_ratio <= k or not 1 / k <= rms_ratio <= k:
            vs = v.x_stats["val"]
            problems.append(f"val inputs are on a different scale from train: RMS train {rms:.3g}, val {vs.rms:.3g}; "
                            f"per feature (median), val means sit {mean_shift:.3g} training stds away and val stds "
                            f"are {std_ratio:.3g}x the training ones, as if the two splits were preprocessed "
                            f"differently")
            fixes.append("apply exactly the same preprocessing to both splits, with statistics computed on the "
                         "training split")
    if problems:
        part.findings.append(warning("data.feature_scale", "; ".join(problems) + ".",
                                     _sentence("; ".join(fixes)), **evidence))
    elif 0 < rms < s.min_input_rms:
        part.findings.append(info(
            "data.feature_scale",
            f"inputs are tiny: their RMS is {rms:.3g} (values from {lo:.3g} to {hi:.3g}); a fan-in initialized first "
            f"layer starts with pre-activations about {rms:.1g} of the unit scale it was designed for.",
            "If the inputs were scaled twice (e.g. divided by 255 twice), scale them once; sparse, normalized "
            "features (tf-idf) are fine as they are.", **evidence))
    if st.mean.size <= MAX_SERIES_FEATURES:
        part.series["data/feature_std"] = {"x": list(range(st.mean.size)), "y": st.std.tolist(), "keys": ["std"],
                                          "xname": "feature"}
        part.plots.append(Plot("feature_scale", "Per-feature scale (training split)",
                               lambda path: _draw_feature_scale(path, st, constant)))
    return part


def _split_shift(v: Views, varying: np.ndarray) -> tuple[float, float, float] | None:
    """Median over varying features of |mean_val - mean_train| / std_train and of std_val / std_train (robust to a
    few near-constant features, whose tiny training std magnifies any difference), and the ratio of the RMS of all
    values val / train (which catches a val split left raw even when half its features happen to be near unit
    scale, as raw wine's are: its median shift is only 2.4 training stds, its RMS ratio 236)."""
    if not v.same_input_shape or not len(varying) or v.x_stats["val"].count < MIN_EXAMPLES_FOR_SHIFT:
        return None
    tr, va = v.x_stats["train"], v.x_stats["val"]
    std = tr.std[varying]
    ok = std > 0
    if not ok.any() or tr.rms == 0:
        return None
    mean_shift = np.abs(va.mean[varying][ok] - tr.mean[varying][ok]) / std[ok]
    std_ratio = va.std[varying][ok] / std[ok]
    return float(np.median(mean_shift)), float(np.median(std_ratio)), va.rms / tr.rms


def check_target_scale(v: Views) -> Part:
    """``data.target_scale`` (regression): targets whose std or mean is far from unit scale, constant targets,
    outputs on very different scales, and val targets on a different scale from train."""
    s = v.settings
    part = Part()
    if v.dataset.classification:
        return part
    y = stats.flat(v.y("train"))
    st = stats.feature_stats(y, v.finite["train"])
    if st.count == 0:
        return part
    std, mean = float(st.std.max()), float(np.abs(st.mean).max())
    lo, hi = float(st.min.min()), float(st.max.max())
    part.metrics.update({"data/target_scale/std": std, "data/target_scale/abs_mean": mean,
                         "data/target_scale/min": lo, "data/target_scale/max": hi})
    evidence = {"std": std, "abs_mean": mean, "min": lo, "max": hi}
    problems, fixes = [], []
    if std > s.max_target_scale or mean > s.max_target_scale:
        problems.append(f"regression targets are far from unit scale: std {std:.4g}, mean {mean:.4g} (y_train from "
                        f"{lo:.4g} to {hi:.4g}); a model whose outputs start near 0 begins with a squared error near "
                        f"{float(np.mean(st.std ** 2 + st.mean ** 2)):.3g} and correspondingly large gradients")
        fixes.append("standardize the targets with the training mean and std (and invert that on predictions), or "
                     f"at least initialize the output bias to the target mean ({float(st.mean.mean()):.4g})")
    if np.all(st.std == 0):
        problems.append(f"every training target is the same value ({lo:.4g}): there is nothing to learn")
        fixes.append("check that the target column is the one you meant")
    if st.std.size > 1 and np.all(st.std > 0):
        ratio = float(st.std.max() / st.std.min())
        part.metrics["data/target_scale/output_std_ratio"] = ratio
        if ratio > s.max_target_range_ratio:
            problems.append(f"target outputs differ in scale by {ratio:.3g}x (output {int(np.argmax(st.std))} std "
                            f"{st.std.max():.3g}, output {int(np.argmin(st.std))} std {st.std.min():.3g}), so the "
                            f"squared error is almost all about the largest")
            fixes.append("standardize each target output separately")
            evidence["output_std_ratio"] = ratio
    vs = stats.feature_stats(stats.flat(v.y("val")), v.finite["val"])
    if vs.count >= MIN_EXAMPLES_FOR_SHIFT and vs.std.shape == st.std.shape and np.all(st.std > 0):
        mean_shift = float(np.max(np.abs(vs.mean - st.mean) / st.std))
        std_ratio = float(np.max(vs.std / st.std))
        part.metrics["data/target_scale/split_mean_shift"] = mean_shift
        part.metrics["data/target_scale/split_std_ratio"] = std_ratio
        if mean_shift > s.max_split_shift or not 1 / s.max_split_shift <= std_ratio <= s.max_split_shift:
            problems.append(f"val targets are on a different scale from train (val mean {mean_shift:.3g} training "
                            f"stds away, val std {std_ratio:.3g}x the training one), as if transformed differently")
            fixes.append("apply the same target transform to both splits")
            evidence.update(split_mean_shift=mean_shift, split_std_ratio=std_ratio)
    if problems:
        part.findings.append(warning("data.target_scale", "; ".join(problems) + ".", _sentence("; ".join(fixes)),
                                     **evidence))
    elif std < s.min_target_std:
        part.findings.append(info(
            "data.target_scale",
            f"regression targets are tiny: std {std:.3g} (y_train from {lo:.3g} to {hi:.3g}); the loss will be "
            f"dominated by the model's initial output noise.",
            "Standardize the targets (or scale them up) so their std is about 1.", **evidence))
    return part


def check_constant_features(v: Views) -> Part:
    """``data.constant_features``: features that take one value across the training split. Info: images have
    constant border pixels (3 in digits) and a constant feature is harmless, just useless; an error only when
    every feature is constant (the inputs carry no information). For integer inputs (token ids) a constant
    position (a start token, padding) is ordinary: only the error is kept."""
    s = v.settings
    part = Part()
    st = v.x_stats["train"]
    if st.count == 0 or st.mean.size == 0:
        return part
    constant = np.flatnonzero(stats.constant_mask(st, v.x("train").dtype))
    total = st.mean.size
    part.metrics["data/constant_features/count"] = int(len(constant))
    if not len(constant):
        return part
    values = [float(st.min[i]) for i in constant[:s.max_listed]]
    evidence = dict(count=int(len(constant)), features=int(total), first=stats.first(constant, s.max_listed),
                    values=values)
    if len(constant) == total:
        part.findings.append(error(
            "data.constant_features",
            f"all {total} input features are constant across the training split (e.g. {values[0]:.4g}): the inputs "
            f"carry no information, so no model can do better than predicting the label frequencies.",
            "Check how the inputs are loaded (an all-zero array, a wrong column, a broken image decoder).",
            **evidence))
    elif not v.integer_inputs:
        part.findings.append(info(
            "data.constant_features",
            f"{len(constant)} of {total} input features are constant across the training split (features "
            f"{stats.listing(constant, s.max_listed)}); they cannot help the model.",
            "Nothing is broken; drop them to save compute, and if you standardize, guard the division by their zero "
            "std (it would produce NaN/inf).", **evidence))
    return part


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "." if text else ""


def _draw_feature_scale(path: str, st: stats.FeatureStats, constant: np.ndarray):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    index = np.arange(st.mean.size)
    varying = ~constant
    ax.plot(index[varying], st.range[varying], ".", ms=4, label="range (max - min)")
    ax.plot(index[varying], st.std[varying], ".", ms=4, label="std")
    if constant.any():
        floor = np.min(st.std[varying][st.std[varying] > 0]) if np.any(st.std[varying] > 0) else 1.0
        ax.plot(index[constant], np.full(constant.sum(), floor), "x", color="gray", ms=4, label="constant")
    ax.set_yscale("log")
    ax.set_xlabel("feature (flattened index)")
    ax.set_ylabel("scale")
    ax.set_title("Per-feature scale, training split")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
