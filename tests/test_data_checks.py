"""The data checks: every check fires on a planted bug and stays silent on the healthy builtins.

Contexts are built cheaply (only ``dataset`` and ``reload_data`` matter to the data stage); one test goes through the
composed config and ``harness.pipeline`` to prove the wiring (settings from YAML, outcome, blocking).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
import yaml
from helpers import headline

from harness.checks import data as data_checks
from harness.checks.base import Context
from harness.checks.data import stats
from harness.data import builtin
from harness.data.dataset import from_mapping
from harness.engine.core import Arrays
from harness.errors import HarnessError
from harness.findings import Severity

SETTINGS = data_checks.Settings()


def make_context(mapping, reload=None, with_arrays=False) -> Context:
    dataset = from_mapping(mapping)
    arrays = Arrays(*dataset.training_arrays()) if with_arrays else None
    return Context(dataset=dataset, arrays=arrays, problem=None, models=None, model_config={},
                   loss_name="", optim=None, batch_size=128, seed=0, reload_data=reload)


def check(mapping, reload=None, **settings):
    return data_checks.run(make_context(mapping, reload), dataclasses.replace(SETTINGS, **settings))


def found(outcome, fid, severity=None):
    return [f for f in outcome.findings if f.id == fid and (severity is None or f.severity.value == severity)]


def problems(outcome):
    return [f for f in outcome.findings if f.severity is not Severity.INFO]


@pytest.fixture(scope="module")
def digits():
    return builtin.digits()


def copy(mapping):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in mapping.items()}


# ----------------------------------------------------------------------------------------------------------------
# Healthy data: no error, no warning


HEALTHY = {
    "digits": lambda: builtin.digits(),
    "digits_image": lambda: builtin.digits(form="image"),
    "wine": builtin.wine,
    "breast_cancer": builtin.breast_cancer,
    "regression": builtin.regression,
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_builtins_raise_no_error_or_warning(name):
    factory = HEALTHY[name]
    outcome = check(factory(), reload=lambda: from_mapping(factory()))
    assert problems(outcome) == [], [f.message for f in problems(outcome)]
    assert outcome.metrics["data/nondeterministic/status"] == "identical"
    assert outcome.metrics["data/leakage/count"] == 0
    assert outcome.metrics["data/feature_scale/rms"] < SETTINGS.max_input_rms


def test_digits_constant_border_pixels_are_info_only(digits):
    outcome = check(digits)
    constant = found(outcome, "data.constant_features")
    assert [f.severity for f in constant] == [Severity.INFO]
    assert constant[0].evidence["count"] == 3 and constant[0].evidence["first"] == [0, 32, 39]
    # digits/16: RMS 0.48, range ratio 16 (rare border pixels have tiny std but the same 1/16 steps)
    assert outcome.metrics["data/feature_scale/rms"] == pytest.approx(0.484, abs=0.01)
    assert outcome.metrics["data/feature_scale/range_ratio"] == pytest.approx(16.0)
    assert outcome.metrics["data/examples/train"] == 1348 and outcome.metrics["data/examples/val"] == 449
    assert list(outcome.metrics)[:4] == list(data_checks.HEADLINE)
    assert outcome.series["data/class_counts"]["y"][0][:3] == [139, 135, 137]
    assert {p.name for p in outcome.plots} == {"label_distribution", "feature_scale"}


def test_plots_draw(digits, tmp_path):
    from harness.report.plots import draw_all

    files = draw_all([check(digits)], str(tmp_path))
    assert set(files) == {"data/label_distribution", "data/feature_scale"}
    for f in files.values():
        assert os.path.getsize(tmp_path / f["path"]) > 1000


# ----------------------------------------------------------------------------------------------------------------
# data.nonfinite


def test_nan_rows_are_an_error_naming_rows_features_and_what_is_left(digits):
    d = copy(digits)
    d["x_train"][[3, 7], 5] = np.nan
    d["x_train"][11, 9] = np.inf
    d["y_val"] = d["y_val"].astype(np.float64)
    d["y_val"][2] = np.nan
    outcome = check(d)
    [f] = found(outcome, "data.nonfinite")
    assert f.severity is Severity.ERROR
    assert f.evidence["x_train"] == {"nan": 2, "inf": 1, "rows": 3, "first_rows": [3, 7, 11], "features": [5, 9],
                                     "feature_counts": [2, 1]}
    assert f.evidence["y_val"]["first_rows"] == [2]
    assert headline(outcome.findings) == "data.nonfinite"
    assert f.evidence["finite_rows"] == {"train": 1345, "val": 448}
    assert "rows 3, 7, 11" in f.message and "features 5, 9" in f.message and "train 1345 of 1348" in f.message
    assert outcome.metrics["data/nonfinite/rows/train"] == 3
    # the other checks run on the finite rows: scale statistics stay finite
    assert np.isfinite(outcome.metrics["data/feature_scale/rms"])
    assert not found(outcome, "data.shape", "error")


def test_all_rows_nonfinite_blocks_later_stages():
    d = builtin.regression(num_examples=40)
    d["x_val"][:] = np.nan
    outcome = check(d)
    blocking = found(outcome, "data.shape", "error")
    assert len(blocking) == 1 and "val" in blocking[0].message
    assert headline(outcome.findings) == "data.nonfinite"


# ----------------------------------------------------------------------------------------------------------------
# data.shape


def test_mismatched_train_val_shapes_are_a_blocking_error(digits):
    from harness.pipeline import blocked_stages

    d = copy(digits)
    d["x_val"] = d["x_val"][:, :60]
    outcome = check(d)
    [f] = found(outcome, "data.shape", "error")
    assert f.evidence == {"x_train_shape": [1348, 64], "x_val_shape": [449, 60]}
    assert headline(outcome.findings) == "data.shape"
    assert set(blocked_stages(outcome.findings)) == {"model", "training", "hyperparameters"}
    assert "data/leakage/count" not in outcome.metrics  # rows of different widths are not compared


def test_featureless_inputs_are_a_blocking_error():
    d = builtin.regression()
    d["x_train"], d["x_val"] = d["x_train"][:, :0], d["x_val"][:, :0]
    outcome = check(d)
    assert [(f.id, f.severity.value) for f in problems(outcome)] == [("data.shape", "error")]
    assert headline(outcome.findings) == "data.shape"


def test_label_encodings(digits):
    d = copy(digits)
    d["y_train"] = np.eye(10, dtype=np.float32)[d["y_train"]]  # one-hot: converted, info
    d["y_val"] = d["y_val"][:, None]  # a column: squeezed, info
    outcome = check(d)
    messages = [f.message for f in found(outcome, "data.shape", "info")]
    assert any("one-hot" in m for m in messages) and any("label column" in m for m in messages)
    assert problems(outcome) == []

    soft = copy(digits)
    soft["y_train"] = np.eye(10)[soft["y_train"]] * 0.9 + 0.01  # label smoothing
    outcome = check(soft)
    assert found(outcome, "data.shape", "warning") and headline(outcome.findings) == "data.shape"

    multi = copy(digits)
    multi["y_train"] = np.eye(10)[multi["y_train"]]
    rows = np.flatnonzero(digits["y_train"] != 0)[:2]
    multi["y_train"][rows, 0] = 1  # rows with two 1s (multi-label)
    outcome = check(multi)
    [f] = found(outcome, "data.shape", "error")
    assert f.evidence["rows"] == 2 and f.evidence["first_rows"] == rows.tolist()
    assert headline(outcome.findings) == "data.shape"

    wrong = copy(digits)
    wrong["y_train"] = np.eye(7)[wrong["y_train"] % 7]  # (N, 7) with num_classes 10
    outcome = check(wrong)
    assert "y_train has shape (1348, 7)" in found(outcome, "data.shape", "error")[0].message
    assert headline(outcome.findings) == "data.shape"


def test_float_labels(digits):
    d = copy(digits)
    d["y_train"] = d["y_train"].astype(np.float32)
    [f] = found(check(d), "data.shape")
    assert f.severity is Severity.INFO and "floats" in f.message
    d["y_train"][[5, 6]] = [2.5, 7.25]
    outcome = check(d)
    [f] = found(outcome, "data.shape", "error")
    assert headline(outcome.findings) == "data.shape"
    assert f.evidence["count"] == 2 and f.evidence["values"] == [2.5, 7.25] and f.evidence["first_rows"] == [5, 6]


def test_one_feature_inputs_are_noted():
    d = builtin.regression(num_features=1)
    d["x_train"], d["x_val"] = d["x_train"][:, 0], d["x_val"][:, 0]
    outcome = check(d)
    assert any("single number" in f.message for f in found(outcome, "data.shape", "info"))
    assert problems(outcome) == []


def test_regression_with_class_like_targets_is_flagged(digits):
    d = {k: v for k, v in digits.items() if k != "num_classes"}  # forgot num_classes
    outcome = check(d)
    [f] = [f for f in found(outcome, "data.shape") if "class indices" in f.message]
    assert f.severity is Severity.WARNING and "num_classes=10" in f.suggestion
    assert headline(outcome.findings) == "data.shape"
    ratings = builtin.regression()
    ratings["y_train"] = np.rint(np.clip(ratings["y_train"] + 3, 1, 5))
    [f] = [f for f in found(check(ratings), "data.shape") if "whole-number" in f.message]
    assert f.severity is Severity.INFO  # ratings 1..5 may well be regression


def test_regression_target_shapes():
    d = builtin.regression()
    d["y_val"] = np.stack([d["y_val"], d["y_val"]], axis=1)
    outcome = check(d)
    assert found(outcome, "data.shape", "error") and headline(outcome.findings) == "data.shape"
    column = builtin.regression()
    column["y_val"] = column["y_val"][:, None]  # (N,) vs (N, 1): the loss reshapes, nothing to say
    assert not found(check(column), "data.shape")


# ----------------------------------------------------------------------------------------------------------------
# data.label_range


def test_one_based_labels(digits):
    d = copy(digits)
    d["y_train"], d["y_val"] = d["y_train"] + 1, d["y_val"] + 1
    outcome = check(d)
    [f] = found(outcome, "data.label_range")
    assert f.severity is Severity.ERROR and f.evidence["looks_one_based"]
    assert headline(outcome.findings) == "data.label_range"
    assert f.evidence["y_train"]["values"] == [10] and f.evidence["y_train"]["count"] == 138
    assert "1-based" in f.suggestion and "Subtract 1" in f.suggestion


def test_labels_beyond_num_classes_and_negative(digits):
    d = copy(digits)
    d["num_classes"] = 8
    outcome = check(d)
    [f] = found(outcome, "data.label_range")
    assert headline(outcome.findings) == "data.label_range"
    assert f.evidence["out_of_range"] == int(np.sum(d["y_train"] >= 8) + np.sum(d["y_val"] >= 8))
    assert "num_classes to 10" in f.suggestion
    n = copy(digits)
    n["y_train"][:3] = -1
    outcome = check(n)
    [f] = found(outcome, "data.label_range")
    assert headline(outcome.findings) == "data.label_range"
    assert f.evidence["y_train"] == {"count": 3, "values": [-1], "value_counts": [3], "first_rows": [0, 1, 2]}
    assert "Negative" in f.suggestion


# ----------------------------------------------------------------------------------------------------------------
# data.label_distribution and data.class_imbalance


def test_single_class_is_an_error(digits):
    d = copy(digits)
    d["y_train"][:] = 3
    outcome = check(d)
    [f] = found(outcome, "data.label_distribution", "error")
    assert f.evidence["class_present"] == 3
    assert headline(outcome.findings) == "data.label_distribution"


def test_classes_missing_from_train_and_val(digits):
    d = copy(digits)
    keep = d["y_train"] != 9
    d["x_train"], d["y_train"] = d["x_train"][keep], d["y_train"][keep]
    outcome = check(d)
    assert any(f.evidence.get("missing") == [9] for f in found(outcome, "data.label_distribution", "warning"))
    assert headline(outcome.findings) == "data.label_distribution"
    v = copy(digits)
    keep = v["y_val"] != 4
    v["x_val"], v["y_val"] = v["x_val"][keep], v["y_val"][keep]
    outcome = check(v)
    [f] = found(outcome, "data.label_distribution")
    assert headline(outcome.findings) == "data.label_distribution"
    # 400 validation examples would hold ~40 fours: chance cannot explain their absence
    assert f.severity is Severity.WARNING and f.evidence["missing"] == [4] and f.evidence["chance"] < 1e-10


def test_small_validation_split_missing_a_class_is_info():
    d = builtin.wine()
    keep = d["y_val"] != 0  # 8 of 44 val examples are class 0; a random 6-example val set can miss it
    d["x_val"], d["y_val"] = d["x_val"][keep][:6], d["y_val"][keep][:6]
    [f] = found(check(d), "data.label_distribution")
    assert f.severity is Severity.INFO and f.evidence["missing"] == [0]


def test_split_of_sorted_data_is_a_warning(digits):
    x = np.concatenate([digits["x_train"], digits["x_val"]])
    y = np.concatenate([digits["y_train"], digits["y_val"]])
    order = np.argsort(y, kind="stable")
    x, y = x[order], y[order]
    # sorted, then the last 25% taken as val, leaving one class in both splits with very different shares
    d = {"x_train": x[:1300], "y_train": y[:1300], "x_val": x[1300:], "y_val": y[1300:], "num_classes": 10}
    outcome = check(d)
    fids = [(f.id, f.severity.value) for f in outcome.findings]
    assert ("data.label_distribution", "warning") in fids
    assert headline(outcome.findings) == "data.label_distribution"
    assert outcome.metrics["data/label_distribution/shift_distance"] > 0.5


def test_wine_random_split_shift_is_not_reported():
    outcome = check(builtin.wine())
    assert outcome.metrics["data/label_distribution/shift_distance"] == pytest.approx(0.199, abs=0.01)
    assert not found(outcome, "data.label_distribution")


def test_imbalance_20_to_1_is_a_warning():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(1000, int), np.ones(50, int)]
    x = rng.normal(size=(len(y), 5)).astype(np.float32) + y[:, None]
    d = {**builtin.split(x, y, seed=0), "num_classes": 2}
    outcome = check(d)
    [f] = found(outcome, "data.class_imbalance")
    assert f.severity is Severity.WARNING
    assert headline(outcome.findings) == "data.class_imbalance"
    assert f.evidence["majority_class"] == 0 and f.evidence["ratio"] == pytest.approx(
        f.evidence["counts"][0] / f.evidence["counts"][1]) and 15 < f.evidence["ratio"] < 25
    assert "bias" in f.suggestion and "prior" in f.suggestion
    # 4:1 is info; the builtins (<= 1.6:1) say nothing
    y4 = np.r_[np.zeros(800, int), np.ones(200, int)]
    d4 = {**builtin.split(rng.normal(size=(1000, 5)), y4, seed=0), "num_classes": 2}
    assert found(check(d4), "data.class_imbalance")[0].severity is Severity.INFO


# ----------------------------------------------------------------------------------------------------------------
# data.feature_scale, data.target_scale, data.constant_features


def test_raw_digits_pixels():
    outcome = check(builtin.digits(pixel_scale=1.0))
    [f] = found(outcome, "data.feature_scale")
    assert f.severity is Severity.WARNING and f.evidence["rms"] == pytest.approx(7.75, abs=0.05)
    assert "raw pixel" in f.suggestion and "divide by 16" in f.suggestion
    assert headline(outcome.findings) == "data.feature_scale"
    d = builtin.digits(pixel_scale=16 / 255, form="image")
    d["x_train"], d["x_val"] = (np.rint(d[k]).astype(np.uint8) for k in ("x_train", "x_val"))  # 8-bit images
    outcome = check(d)
    [f] = found(outcome, "data.feature_scale")
    assert f.evidence["rms"] > 100 and "divide by 255" in f.suggestion
    assert headline(outcome.findings) == "data.feature_scale"


def test_raw_wine_scales():
    outcome = check(builtin.wine(standardize=False))
    [f] = found(outcome, "data.feature_scale")
    assert f.severity is Severity.WARNING and headline(outcome.findings) == "data.feature_scale"
    assert f.evidence["range_ratio"] > 1000 and f.evidence["widest_feature"] == 12  # proline, in the 1000s
    assert "differ by" in f.message and "Standardize each feature" in f.suggestion


def test_one_feature_on_another_scale_fires_on_ranges_only():
    d = builtin.breast_cancer()
    d["x_train"][:, 3] *= 300.0
    d["x_val"][:, 3] *= 300.0
    outcome = check(d)
    [f] = found(outcome, "data.feature_scale")
    assert f.evidence["widest_feature"] == 3 and f.evidence["range_ratio"] > 100
    assert headline(outcome.findings) == "data.feature_scale"


def test_val_preprocessed_differently():
    raw = builtin.wine(standardize=False)
    d = builtin.wine()
    d["x_val"] = raw["x_val"]  # standardized train, raw val
    outcome = check(d)
    [f] = found(outcome, "data.feature_scale")
    assert "val inputs are on a different scale" in f.message and f.evidence["split_rms_ratio"] > 100
    assert headline(outcome.findings) == "data.feature_scale"


def test_offset_and_tiny_inputs():
    rng = np.random.default_rng(0)
    x = 1.0 + 0.05 * rng.normal(size=(500, 6))
    y = rng.integers(0, 2, 500)
    outcome = check({**builtin.split(x, y), "num_classes": 2})
    [f] = found(outcome, "data.feature_scale")
    assert f.severity is Severity.WARNING and "offset" in f.message
    assert headline(outcome.findings) == "data.feature_scale"
    [f] = found(check({**builtin.split(x * 0.001 - 0.001, y), "num_classes": 2}), "data.feature_scale")
    assert f.severity is Severity.INFO and "tiny" in f.message


def test_big_regression_targets():
    d = builtin.regression()
    d["y_train"] = d["y_train"] * 3000 + 180_000
    d["y_val"] = d["y_val"] * 3000 + 180_000
    outcome = check(d)
    [f] = found(outcome, "data.target_scale")
    assert f.severity is Severity.WARNING and f.evidence["abs_mean"] > 1e5
    assert headline(outcome.findings) == "data.target_scale"
    assert "output bias" in f.suggestion
    both = builtin.regression()
    both["y_val"] = both["y_val"] * 50  # val targets scaled, train not
    outcome = check(both)
    [f] = found(outcome, "data.target_scale")
    assert "val targets" in f.message and headline(outcome.findings) == "data.target_scale"


def test_all_features_constant_is_an_error(digits):
    d = copy(digits)
    d["x_train"] = np.zeros_like(d["x_train"])
    outcome = check(d)
    [f] = found(outcome, "data.constant_features")
    assert f.severity is Severity.ERROR and f.evidence["count"] == 64
    assert headline(outcome.findings) == "data.constant_features"


# ----------------------------------------------------------------------------------------------------------------
# data.leakage and data.conflicting_labels


def test_leaked_validation_rows(digits):
    d = copy(digits)
    d["x_val"][:30] = d["x_train"][100:130]
    d["x_val"][5] = -0.0 * d["x_val"][5] + d["x_train"][105]  # -0.0 vs 0.0 still counts as the same value
    outcome = check(d)
    [f] = found(outcome, "data.leakage")
    assert f.severity is Severity.ERROR and f.evidence["count"] == 30
    assert f.evidence["val_rows"][:3] == [0, 1, 2] and f.evidence["train_rows"][:3] == [100, 101, 102]
    assert outcome.metrics["data/leakage/fraction"] == pytest.approx(30 / 449)
    assert headline(outcome.findings) == "data.leakage"
    few = copy(digits)
    few["x_val"][7] = few["x_train"][0]  # 1 of 449 (0.2%): a warning
    outcome = check(few)
    assert found(outcome, "data.leakage")[0].severity is Severity.WARNING
    assert headline(outcome.findings) == "data.leakage"


def test_leakage_across_dtypes(digits):
    d = copy(digits)
    d["x_val"] = d["x_val"].astype(np.float64)
    d["x_val"][:10] = d["x_train"][:10]
    outcome = check(d)
    assert found(outcome, "data.leakage")[0].evidence["count"] == 10
    assert headline(outcome.findings) == "data.leakage"


def test_duplicates_within_validation_are_info(digits):
    d = copy(digits)
    d["x_val"][:40] = d["x_val"][40]
    outcome = check(d)
    [f] = found(outcome, "data.leakage")
    assert f.severity is Severity.INFO and f.evidence["val_duplicates"] == 40


def planted_copies(mapping, k: int, transform, seed: int = 0):
    """``mapping`` with its first ``k`` validation rows replaced by ``transform`` of random training rows; returns
    it and the training row behind each copy."""
    d = copy(mapping)
    rng = np.random.default_rng(seed)
    src = rng.choice(len(d["x_train"]), k, replace=False)
    d["x_val"][:k] = transform(d["x_train"][src], rng)
    return d, src


def near(outcome, key):
    return outcome.metrics[f"data/leakage/near/{key}"]


def flagged(outcome, split):
    """Examples of a split within the near-copy distance of the reference, in the view that flags most."""
    return max(v for k, v in outcome.metrics.items() if k.startswith("data/leakage/near/") and k.endswith(split))


def tiny_noise(x, rng):  # 1% of each pixel's spread: invisible
    return x + 0.01 * x.std() * rng.standard_normal(x.shape).astype(x.dtype)


def test_near_copies_with_tiny_noise_are_leakage(digits):
    d, src = planted_copies(digits, 60, tiny_noise)
    outcome = check(d)
    [f] = found(outcome, "data.leakage")
    assert f.severity is Severity.ERROR and f.evidence["exact"] == 0
    assert 40 <= f.evidence["near"] == f.evidence["count"] <= 80  # an estimate: copies of held-out rows are scaled in
    assert set(f.evidence["near_val_rows"]) <= set(range(60))  # every listed row is a planted one
    pair = f.evidence["near_pair"]
    assert pair["train_row"] == src[pair["val_row"]] and pair["ratio"] < 0.05
    assert flagged(outcome, "flagged_train") == 0 and near(outcome, "p_value") < 1e-6
    assert "near-copies of training examples" in f.message and f"val row {pair['val_row']} is" in f.message
    assert "449 of 449 validation rows" in f.evidence["near_checked"]  # small data: every row checked
    assert headline(outcome.findings) == "data.leakage"


@pytest.mark.parametrize("name, transform", [
    ("rescaled", lambda x, rng: x * 255),
    ("encoded -1..1", lambda x, rng: 2 * x - 1),
    ("brightness and contrast", lambda x, rng: 0.7 * x + 0.2 + 0.005 * rng.standard_normal(x.shape)),
])
def test_rescaled_and_reencoded_copies_are_leakage(digits, name, transform):
    d, src = planted_copies(digits, 60, lambda x, rng: transform(x, rng).astype(np.float32))
    outcome = check(d)
    [f] = found(outcome, "data.leakage")
    assert f.severity is Severity.ERROR and f.evidence["near"] >= 40
    assert f.evidence["near_pair"]["view"] == "per_example"  # far apart feature by feature, one example by shape
    assert f.evidence["near_pair"]["train_row"] == src[f.evidence["near_pair"]["val_row"]]
    assert headline(outcome.findings) == "data.leakage"


def test_uint8_validation_split_with_copies_of_float_training_rows(digits):
    """The same images stored twice: training as float 0..1, validation as 8-bit 0..255 (re-encoded)."""
    d, _ = planted_copies(digits, 60, lambda x, rng: x)
    d["x_val"] = np.round(d["x_val"] * 255).astype(np.uint8)
    outcome = check(d)
    [f] = found(outcome, "data.leakage")
    assert f.severity is Severity.ERROR and f.evidence["exact"] == 0 and f.evidence["near"] >= 40
    assert headline(outcome.findings) == "data.leakage"


def test_exact_and_near_copies_are_one_finding(digits):
    d, _ = planted_copies(digits, 90, tiny_noise)
    d["x_val"][:30] = d["x_train"][100:130]  # the first 30 exact
    outcome = check(d)
    [f] = found(outcome, "data.leakage")
    assert f.evidence["exact"] == 30 and 40 <= f.evidence["near"] <= 80
    assert f.evidence["count"] == f.evidence["exact"] + f.evidence["near"]
    assert f.evidence["val_rows"][:3] == [0, 1, 2] and set(f.evidence["near_val_rows"]) <= set(range(30, 90))
    assert "also appear in the training split" in f.message and "more" in f.message
    assert outcome.metrics["data/leakage/count"] == 30  # exact matches, as before
    assert headline(outcome.findings) == "data.leakage"


HONEST = {
    "digits": builtin.digits,
    "digits_image": lambda split_seed: builtin.digits(form="image", split_seed=split_seed),
    "wine": builtin.wine,
    "wine_raw": lambda split_seed: builtin.wine(standardize=False, split_seed=split_seed),
    "breast_cancer": builtin.breast_cancer,
    "breast_cancer_raw": lambda split_seed: builtin.breast_cancer(standardize=False, split_seed=split_seed),
    "regression": lambda split_seed: builtin.regression(seed=split_seed),
}


@pytest.mark.parametrize("name", sorted(HONEST))
def test_honest_splits_have_no_near_copies(name):
    """Five random splits of each builtin: not a single example within the near-copy distance (digits' closest
    honest pair is 0.24 x the typical nearest-neighbour distance, the limit 0.2 x). Raw wine is the exception: in
    raw units one feature (proline, ~750) dominates every example's shape, so the per-example view is nearly
    one-dimensional and a training example or two falls that close; the test compares the splits and stays
    silent."""
    for seed in range(5):
        outcome = check(HONEST[name](split_seed=seed))
        assert not found(outcome, "data.leakage"), (name, seed)
        assert near(outcome, "status") == "checked" and near(outcome, "count") == 0
        if name != "wine_raw":
            assert flagged(outcome, "flagged_val") == flagged(outcome, "flagged_train") == 0, (name, seed)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_dense_low_dimensional_data_is_not_leakage(dims):
    """4000 samples of a 1-3 dimensional Gaussian in 10 features: nearest neighbours are close everywhere, so
    up to a fifth of the examples fall within the near-copy distance, validation and training alike."""
    rng = np.random.default_rng(dims)
    x = (rng.standard_normal((4000, dims)) @ rng.standard_normal((dims, 10))).astype(np.float32)
    d = {**builtin.split(x, rng.integers(0, 3, 4000)), "num_classes": 3}
    outcome = check(d)
    assert not found(outcome, "data.leakage")
    assert flagged(outcome, "flagged_val") > 20 and flagged(outcome, "flagged_train") > 20
    assert near(outcome, "p_value") > 0.01
    if dims == 3:  # the same data with 5% of validation copied: flagged beyond the training rate
        planted, _ = planted_copies(d, 50, lambda x, rng: x + 1e-4 * rng.standard_normal(x.shape).astype(x.dtype))
        outcome = check(planted)
        [f] = found(outcome, "data.leakage")
        assert f.severity is Severity.ERROR and 25 <= f.evidence["near"] <= 100
        assert headline(outcome.findings) == "data.leakage"


def test_natural_near_duplicates_split_at_random_are_not_leakage(digits):
    """A data set in which 300 of 1797 images have a near-identical twin, split at random: the twins straddle the
    split as often as they stay on one side, so training has as many near-copies as validation. (Augmenting before
    splitting looks the same and cannot be told apart from the data: split by original example.)"""
    x = np.concatenate([digits["x_train"], digits["x_val"]])
    y = np.concatenate([digits["y_train"], digits["y_val"]])
    rng = np.random.default_rng(0)
    twins = rng.choice(len(x), 300, replace=False)
    x[twins[:150]] = x[twins[150:]] + 0.01 * rng.standard_normal((150, 64)).astype(np.float32)
    outcome = check({**builtin.split(x, y), "num_classes": 10})
    assert not found(outcome, "data.leakage")
    assert flagged(outcome, "flagged_train") > 20 and flagged(outcome, "flagged_val") > 5


def test_integer_inputs_compare_exact_copies_only():
    rng = np.random.default_rng(0)
    x_train, x_val = rng.integers(0, 50, (600, 16)), rng.integers(0, 50, (200, 16))
    x_val[:20] = x_train[:20]
    outcome = check({"x_train": x_train, "y_train": rng.integers(0, 3, 600), "x_val": x_val,
                     "y_val": rng.integers(0, 3, 200), "num_classes": 3})
    [f] = found(outcome, "data.leakage")
    assert f.evidence["exact"] == 20 and "near" not in f.evidence
    assert near(outcome, "status").startswith("skipped: integer inputs are ids")
    assert headline(outcome.findings) == "data.leakage"


def test_near_copies_in_large_data_are_sampled_and_projected():
    """20k x 256 image-like rows (a smooth function of 20 latent factors), 2% of validation noisy copies: the
    search samples validation rows and projects features, and still finds them."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 256)).astype(np.float32)
    x = 1 / (1 + np.exp(-(rng.standard_normal((25_000, 20)).astype(np.float32) @ w)))
    d = {**builtin.split(x, rng.integers(0, 10, 25_000), val_fraction=0.2), "num_classes": 10}
    start = time.perf_counter()
    assert not found(check(d, check_determinism=False), "data.leakage")
    planted, src = planted_copies(d, 100, tiny_noise)
    outcome = check(planted, check_determinism=False)
    seconds = time.perf_counter() - start
    [f] = found(outcome, "data.leakage")
    assert f.severity is Severity.ERROR and 50 <= f.evidence["near"] <= 150
    assert f.evidence["near_pair"]["train_row"] == src[f.evidence["near_pair"]["val_row"]]
    assert near(outcome, "checked_val") < 5000 and "random projections" in f.evidence["near_checked"]
    assert seconds < 30, seconds  # about 2 s on an idle 2-core machine
    assert headline(outcome.findings) == "data.leakage"


def test_near_duplicates_switched_off_and_settings_checked(digits):
    from harness.config import settings_from

    d, _ = planted_copies(digits, 60, tiny_noise)
    outcome = check(d, near_duplicate_distance=0.0)
    assert not found(outcome, "data.leakage") and near(outcome, "status").startswith("skipped")
    for key, value in (("near_duplicate_distance", 1.0), ("near_duplicate_p_value", 0.0)):
        with pytest.raises(HarnessError, match=f"diagnostics.data.{key}"):
            settings_from(data_checks.Settings, {key: value}, "diagnostics.data")


def test_hypergeometric_tail_matches_scipy():
    from scipy.stats import hypergeom

    from harness.checks.data.duplicates import hypergeometric_tail

    for k, population, marked, drawn in [(5, 1797, 5, 449), (3, 100, 10, 30), (0, 50, 5, 10), (12, 3000, 40, 1000)]:
        expected = hypergeom.sf(k - 1, population, marked, drawn)
        assert hypergeometric_tail(k, population, marked, drawn) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_conflicting_duplicates(digits):
    d = copy(digits)
    d["x_train"][500:520] = d["x_train"][:20]
    d["y_train"][500:520] = (d["y_train"][:20] + 1) % 10
    outcome = check(d)
    [f] = found(outcome, "data.conflicting_labels")
    assert f.severity is Severity.WARNING and f.evidence["count"] == 40 and f.evidence["groups"] == 20
    assert f.evidence["example_rows"] == [0, 500]
    assert headline(outcome.findings) == "data.conflicting_labels"
    # harmless duplicates (same label) are not conflicts
    same = copy(digits)
    same["x_train"][500:520], same["y_train"][500:520] = same["x_train"][:20], same["y_train"][:20]
    assert not found(check(same), "data.conflicting_labels")
    # labels shuffled independently of the inputs on duplicated data: most duplicates conflict -> error
    many = copy(digits)
    many["x_train"][674:] = many["x_train"][:674]
    many["y_train"][674:] = np.random.default_rng(0).permutation(many["y_train"][:674])
    outcome = check(many)
    assert found(outcome, "data.conflicting_labels")[0].severity is Severity.ERROR
    assert headline(outcome.findings) == "data.conflicting_labels"


# ----------------------------------------------------------------------------------------------------------------
# data.nondeterministic


def unseeded_digits():
    """A user's factory that shuffles with an unseeded generator (the bug)."""
    d = builtin.digits()
    order = np.random.default_rng().permutation(len(d["x_train"]))
    return {**d, "x_train": d["x_train"][order], "y_train": d["y_train"][order]}


def test_unseeded_shuffle_is_an_error():
    ctx = make_context(unseeded_digits(), reload=lambda: from_mapping(unseeded_digits()))
    outcome = data_checks.run(ctx, SETTINGS)
    [f] = found(outcome, "data.nondeterministic")
    assert f.severity is Severity.ERROR and f.evidence["differing"] == ["x_train", "y_train"]
    assert f.evidence["x_train"]["same_rows_reordered"] and "unseeded shuffle" in f.message
    assert headline(outcome.findings) == "data.nondeterministic"
    assert "_reloaded_arrays" in ctx.shared  # the second load is shared with later determinism checks


def test_nondeterminism_skips_and_reload_failures(digits):
    outcome = check(digits)
    assert outcome.metrics["data/nondeterministic/status"].startswith("skipped")
    assert not found(outcome, "data.nondeterministic")
    off = check(digits, reload=lambda: 1 / 0, check_determinism=False)
    assert not found(off, "data.nondeterministic")

    def broken():
        raise HarnessError("data (mine.load): file moved")

    outcome = check(digits, reload=broken)
    [f] = found(outcome, "data.nondeterministic")
    assert "second time failed" in f.message and headline(outcome.findings) == "data.nondeterministic"


# ----------------------------------------------------------------------------------------------------------------
# Settings, config, pipeline


def test_yaml_lists_exactly_the_settings_with_comments():
    from harness.config import config_dir

    path = os.path.join(config_dir(), "diagnostics", "data", "default.yaml")
    with open(path) as f:
        text = f.read()
    values = yaml.safe_load(text)
    fields = {f.name: f.default for f in dataclasses.fields(data_checks.Settings)}
    assert values == fields
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert "#" in line, f"no comment: {line}"


@pytest.mark.parametrize("key, value", [("max_input_rms", -1.0), ("imbalance_warning_ratio", 2.0),
                                        ("leakage_error_fraction", 1.5), ("max_feature_range_ratio", 0.5),
                                        ("min_input_rms", 5.0), ("max_listed", 0)])
def test_settings_validation_names_the_key(key, value):
    from harness.config import settings_from

    with pytest.raises(HarnessError, match=f"diagnostics.data.{key}"):
        settings_from(data_checks.Settings, {key: value}, "diagnostics.data")


def test_through_the_pipeline_with_composed_config():
    from helpers import compose

    from harness import pipeline

    rc = compose(["data=wine", "data.standardize=false", "diagnostics.run=[data]", "logger=none",
                  "diagnostics.data.max_feature_range_ratio=1e6", "diagnostics.data.max_input_rms=1000"])
    result = pipeline.run(rc)
    [outcome] = result.outcomes
    assert outcome.name == "data" and outcome.skipped is None
    assert problems(outcome) == []  # thresholds from the command line reached the checks
    assert outcome.metrics["data/nondeterministic/status"] == "identical"  # reload_data wired by build_context


# ----------------------------------------------------------------------------------------------------------------
# Scale: 100k x 1k


def test_large_inputs_stay_fast():
    rng = np.random.default_rng(0)
    x_train = rng.standard_normal((100_000, 1000), dtype=np.float32)
    x_val = rng.standard_normal((10_000, 1000), dtype=np.float32)
    x_val[:25] = x_train[:25]
    y_train, y_val = rng.integers(0, 10, 100_000), rng.integers(0, 10, 10_000)
    d = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val, "num_classes": 10}
    ctx = make_context(d, reload=lambda: from_mapping(d), with_arrays=True)  # as build_context makes it
    start = time.perf_counter()
    outcome = data_checks.run(ctx, SETTINGS)
    seconds = time.perf_counter() - start
    assert ctx.shared["_reloaded_arrays"] is ctx.arrays  # identical reload: no second conversion
    assert outcome.metrics["data/leakage/count"] == 25
    assert outcome.metrics["data/leakage/near/count"] == 0  # sampled: see data/leakage/near/checked_val
    assert outcome.metrics["data/feature_scale/rms"] == pytest.approx(1.0, abs=0.01)
    assert problems(outcome) == [f for f in problems(outcome) if f.id == "data.leakage"]
    assert headline(outcome.findings) == "data.leakage"
    assert seconds < 15, seconds  # about 1.5 s on an idle 2-core machine


# ----------------------------------------------------------------------------------------------------------------
# Helpers with analytic answers


def test_row_hash_groups_and_matches():
    x = np.array([[0.0, 1.0], [1.0, 2.0], [-0.0, 1.0], [np.nan, 1.0], [1.0, 2.0]], np.float32)
    h = stats.row_hashes(x)
    rows = np.array([0, 1, 2, 4])  # the finite rows
    groups = stats.group_rows(x, h, rows)
    assert groups.duplicated.tolist() == [True, True, True, True] and groups.extra_copies == 2
    q = np.array([[1.0, 2.0], [5.0, 5.0]], np.float64)
    query, ref = stats.matches_in(q, stats.row_hashes(q, np.float64), np.arange(2), x,
                                  stats.row_hashes(x, np.float64), rows)
    assert query.tolist() == [0] and ref.tolist() in ([1], [4])


def test_feature_stats_in_chunks_match_numpy(monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 7)  # many small chunks
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(50, 3)) * [1, 10, 1e-3] + [0, 1e6, 5]).astype(np.float64)
    keep = np.ones(50, bool)
    keep[[3, 9]] = False
    st = stats.feature_stats(x, keep)
    np.testing.assert_allclose(st.mean, x[keep].mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.std, x[keep].std(0), rtol=1e-6)
    np.testing.assert_array_equal(st.max, x[keep].max(0))
    assert st.rms == pytest.approx(float(np.sqrt(np.mean(x[keep] ** 2))), rel=1e-9)
    bad = stats.nonfinite(np.where(np.eye(50, 3, dtype=bool), np.inf, x))
    assert bad.inf == 3 and bad.rows.tolist() == [0, 1, 2] and bad.columns.tolist() == [0, 1, 2]
