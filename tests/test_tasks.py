"""Task shapes: every check with the right expectation for per-position classification, next-token language
modelling, dense labels and multi-output regression, and nothing dividing by a loss of 0.

The data and models are generated here (``tasks_helpers``): arithmetic progressions mod 12 as a language model
(the first next token is ambiguous, the rest follow from the two last tokens), a padded tagger, pixel classes,
three regression targets. Pipeline runs use reduced budgets; everything else is host-side numpy or a jitted
function of a few arrays.
"""

from __future__ import annotations

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasks_helpers
from helpers import compose, headline, replace_group
from harness import losses, pipeline
from harness.checks import data as data_checks
from harness.checks.base import Context
from harness.checks.data.common import label_layout
from harness.checks.model import batch_dependence, forward
from harness.checks.model.settings import Settings as ModelSettings
from harness.checks.training import controls, lr_range, overfit_batch
from harness.data.dataset import from_mapping
from harness.findings import Severity, first_to_fix

VOCAB = tasks_helpers.VOCAB
FIRST_STAGES = "diagnostics.run=[data,model,overfit_batch]"


def run(data: str, model: str | None, *overrides: str, model_kwargs=None, data_kwargs=None):
    """``harness`` on a ``tasks_helpers`` data factory and model (None: the configured built-in model)."""
    model_group = replace_group("model", f"tasks_helpers.{model}", **(model_kwargs or {})) if model else []
    return pipeline.run(compose(["logger=none", *replace_group("data", f"tasks_helpers.{data}", **(data_kwargs or {})),
                                 *model_group, *overrides]))


def problems(findings):
    return [(f.id, f.severity.value, f.message) for f in findings if f.severity is not Severity.INFO]


def data_check(mapping):
    dataset = from_mapping(mapping)
    ctx = Context(dataset=dataset, arrays=None, problem=None, models=None, model_config={}, loss_name="",
                  optim=None, batch_size=32, seed=0, reload_data=None)
    return data_checks.run(ctx, data_checks.Settings())


def found(outcome, fid, severity=None):
    return [f for f in outcome.findings if f.id == fid and (severity is None or f.severity.value == severity)]


# ----------------------------------------------------------------------------------------------------------------
# A next-token language model, end to end.


@pytest.fixture(scope="module")
def language_model():
    return run("progressions", "TinyCausalLM", FIRST_STAGES, "optim.lr=0.01")


def test_language_model_is_healthy(language_model):
    r = language_model
    assert r.context.problem.task.kind == "language_model"
    assert r.status == "healthy" and problems(r.findings) == []
    metrics = pipeline.flat_metrics(r.outcomes)
    assert metrics["model/task"] == "language_model"
    assert metrics["model/expected_initial_loss"] == pytest.approx(math.log(VOCAB))
    assert metrics["model/initial_loss"] == pytest.approx(math.log(VOCAB), abs=0.1)
    # Token ids are not feature scales.
    assert not [f for f in r.findings if f.id in ("data.feature_scale", "data.constant_features")]
    assert metrics["data/feature_scale/status"].startswith("skipped")


def brute_force_floor(x, y) -> float:
    """The conditional entropy of the next token given the whole prefix, by Python dictionaries."""
    counts: dict[tuple, dict[int, float]] = {}
    for i in range(len(x)):
        real = y[i] >= 0
        for t in np.flatnonzero(real):
            key = tuple(x[i, : t + 1])
            counts.setdefault(key, {}).setdefault(int(y[i, t]), 0.0)
            counts[key][int(y[i, t])] += 1.0 / (len(x) * real.sum())
    total = 0.0
    for by_token in counts.values():
        mass = sum(by_token.values())
        total -= sum(w * math.log(w / mass) for w in by_token.values())
    return total


def test_overfit_floor_counts_continuations_a_causal_model_cannot_separate(language_model):
    metrics = pipeline.flat_metrics(language_model.outcomes)
    floor = metrics["overfit_batch/loss_floor"]
    ctx = language_model.context
    arrays, _ = overfit_batch.batch_arrays(ctx, overfit_batch.Settings())
    assert metrics["overfit_batch/loss_floor_kind"] == "conditional_entropy"
    assert floor > 0.03 and floor == pytest.approx(brute_force_floor(arrays.x_train, arrays.y_train), rel=1e-9)
    # The model memorized what can be memorized: it passes at the floor, where the plain target (0.01) would fail.
    assert metrics["overfit_batch/passed"] is True
    assert metrics["overfit_batch/final_loss"] > overfit_batch.CLASSIFICATION_TARGET

    # A loss harness does not know: the outputs are minimized tied within each prefix group, to the same floor.
    own = dataclasses.replace(ctx.problem, loss_fn=tasks_helpers.token_cross_entropy, fingerprint=None)
    tied, kind = overfit_batch.loss_floor(types.SimpleNamespace(problem=own), arrays)
    assert kind == "prefix_tied_outputs" and tied == pytest.approx(floor, rel=1e-3)


def test_prefix_groups_and_conditional_entropy():
    x = np.array([[1, 2, 3], [1, 2, 4], [1, 5, 3], [1, 2, 3]])
    groups = overfit_batch.prefix_groups(x)
    assert groups[0, 0] == groups[1, 0] == groups[2, 0] == groups[3, 0]  # the same first token
    assert groups[0, 1] == groups[1, 1] == groups[3, 1] != groups[2, 1]
    assert groups[0, 2] == groups[3, 2] and len({groups[0, 2], groups[1, 2], groups[2, 2]}) == 3
    y = np.array([[2, 3, 0], [2, 4, 0], [5, 3, 0], [2, 3, 1]])
    # Every position weighs 1/12. Position 0: one group, targets 2, 2, 5, 2; position 1: rows 0, 1, 3 see (1, 2),
    # targets 3, 4, 3; position 2: rows 0 and 3 see (1, 2, 3), targets 0 and 1; every other group is alone.
    def entropy(*p):
        return -sum(q * math.log(q) for q in p)

    expected = 4 / 12 * entropy(0.75, 0.25) + 3 / 12 * entropy(2 / 3, 1 / 3) + 2 / 12 * entropy(0.5, 0.5)
    assert overfit_batch.conditional_entropy(groups, y, 6) == pytest.approx(expected)
    assert overfit_batch.conditional_entropy(groups, y, 6) == pytest.approx(brute_force_floor(x, y))
    padded = y.copy()
    padded[3] = -1  # an all-padding example weighs 0, and its positions are no target
    assert overfit_batch.conditional_entropy(groups, padded, 6) == pytest.approx(brute_force_floor(x, padded))


# ----------------------------------------------------------------------------------------------------------------
# Data checks on tokens.


def test_token_ids_out_of_range_are_a_label_range_error():
    r = run("progressions", "TinyCausalLM", "diagnostics.run=[data]", data_kwargs={"bad_token": 0})
    [f] = [f for f in r.findings if f.id == "data.label_range"]
    assert f.severity is Severity.ERROR and r.status == "unhealthy"
    assert f.message.startswith("token ids outside [0, 12)") and f.evidence["out_of_range"] == 1
    assert f.evidence["y_train"]["values"] == [VOCAB] and "vocabulary" in f.suggestion
    assert first_to_fix(r.findings).id == "data.label_range"
    assert problems(data_check(tasks_helpers.progressions()).findings) == []


def zipf_language(n=400, length=24, vocab=50, seed=0):
    """Sentences whose tokens follow Zipf's law (skewed; rare tokens never drawn), starting with token 1 (BOS), some
    padded at the end with token 0 / target -1, and many sharing their first tokens with different continuations."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab - 1) ** 1.3
    tokens = rng.choice(np.arange(2, vocab), size=(n, length + 1), p=p / p.sum())
    tokens[:, 0] = 1
    x, y = tokens[:, :-1].copy(), tokens[:, 1:].copy()
    cut = rng.integers(length // 2, length + 1, size=n)
    pad = np.arange(length) >= cut[:, None]
    x[pad], y[pad] = 0, -1
    return {"x_train": x[:300], "y_train": y[:300], "x_val": x[300:], "y_val": y[300:], "num_classes": vocab}


def test_skewed_tokens_padding_and_shared_prefixes_are_not_alarms():
    data = zipf_language()
    outcome = data_check(data)
    assert from_mapping(data).task.kind == "language_model"
    assert problems(outcome.findings) == []
    assert not found(outcome, "data.class_imbalance") and not found(outcome, "data.constant_features")
    assert outcome.metrics["data/class_imbalance/ratio"] > 10  # measured, not judged
    assert outcome.metrics["data/label_range/padding/train"] > 0 and outcome.metrics[
        "data/label_range/out_of_range"] == 0
    # The same context followed by different tokens: language, not a labelling bug.
    full = int(np.flatnonzero(data["y_train"][:, -1] >= 0)[0])
    data["x_train"][-1], data["y_train"][-1] = data["x_train"][full], data["y_train"][full]
    data["y_train"][-1, -1] = 2 + (data["y_train"][full, -1] - 1) % 48
    outcome = data_check(data)
    assert outcome.metrics["data/duplicates/train"] >= 1 and not found(outcome, "data.conflicting_labels")


def test_per_position_labels_conflict_when_whole_label_rows_differ():
    data = tasks_helpers.tagging()
    data["x_train"][1] = data["x_train"][0]
    data["y_train"][1] = (data["y_train"][0] + 1) % 3
    outcome = data_check(data)
    [f] = found(outcome, "data.conflicting_labels")
    assert f.evidence["count"] == 2 and f.evidence["example_labels"] is None
    assert headline(outcome.findings) == "data.conflicting_labels"


def test_label_layouts():
    rng = np.random.default_rng(0)
    assert label_layout(rng.integers(0, 5, size=(8, 16)), 5) == "per_position"
    assert label_layout(rng.integers(0, 5, size=(8, 5)), 5) == "per_position"  # a sequence as long as C
    assert label_layout(rng.integers(0, 3, size=(8, 4, 4)), 3) == "per_position"
    assert label_layout(np.eye(5)[rng.integers(0, 5, 8)], 5) == "one_hot"
    assert label_layout(np.eye(5)[rng.integers(0, 5, 8)], 7) == "bad"  # one-hot of another width
    assert label_layout(np.eye(5)[rng.integers(0, 5, 8)] * 0.9 + 0.02, 5) == "soft"
    # Training reads labels the same way: soft labels are one class per example (their argmax), not a sequence.
    soft = tasks_helpers.multi_regression()
    classes = rng.integers(0, 3, size=len(soft["x_train"]))
    soft.update(y_train=np.eye(3)[classes] * 0.9 + 0.1 / 3, y_val=classes[: len(soft["x_val"])], num_classes=3)
    dataset = from_mapping(soft)
    assert dataset.task.target_shape == () and np.array_equal(dataset.training_arrays()[1], classes)


# ----------------------------------------------------------------------------------------------------------------
# Losses.


def test_cross_entropy_per_example_is_unchanged_and_per_position_ignores_padding():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 5)).astype(np.float32), np.array([0, 4, 2, 1, 3, 0])
    seq = rng.normal(size=(2, 4, 5)).astype(np.float32)
    targets = np.array([[1, 2, -1, -1], [-1, -1, -1, -1]])

    @jax.jit
    def compute(logits, labels, seq, targets):
        return (losses.cross_entropy(logits, labels), optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                losses.cross_entropy(seq, targets),
                optax.softmax_cross_entropy_with_integer_labels(seq[0, :2], targets[0, :2]),
                jax.grad(lambda s: losses.cross_entropy(s, targets).mean())(seq))

    ours, optax_per_example, out, per, grad = map(np.asarray, compute(logits, labels, seq, targets))
    assert np.array_equal(ours, optax_per_example)
    assert out.shape == (2,) and out[0] == pytest.approx(per.mean()) and out[1] == 0.0
    assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0) and np.all(grad[0, 2:] == 0)
    assert losses.expected_initial_loss(losses.cross_entropy, VOCAB, np.zeros((3, 16), int)) == math.log(VOCAB)


def test_mse_takes_targets_of_any_shape():
    outputs = np.arange(24.0, dtype=np.float32).reshape(2, 3, 4)
    targets = outputs + 1.0
    same, flat = jax.jit(lambda o, t: (losses.mse(o, t), losses.mse(o.reshape(2, 12), t)))(outputs, targets)
    assert np.allclose(same, [1.0, 1.0]) and np.allclose(flat, [1.0, 1.0])  # flattened outputs too


# ----------------------------------------------------------------------------------------------------------------
# Model checks on sequences.


def test_output_range_sees_probabilities_per_position():
    logits = np.random.default_rng(1).normal(size=(4, 8, 6, VOCAB))  # (inits, batch, positions, vocabulary)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    [f] = forward.output_range_findings(probabilities, "cross_entropy", True, ModelSettings())[0]
    assert f.id == "model.output_range" and f.evidence["looks_like"] == "softmax"
    assert headline([f]) == "model.output_range"


def test_batch_dependence_on_token_ids():
    table = jnp.asarray(np.random.default_rng(2).normal(size=(VOCAB, 3)), jnp.float32)
    x = jnp.asarray(tasks_helpers.progressions()["x_train"][:8])
    rows = jnp.array([0, 7])

    def check(forward_fn):
        own, cross, leaking = jax.jit(lambda x: batch_dependence.gradients_across_batch(forward_fn, x, rows, 0))(x)
        return np.asarray(own), np.asarray(cross), np.asarray(leaking)

    own, cross, leaking = check(lambda x: table[x])
    assert np.all(own > 0) and np.all(cross == 0) and np.all(leaking == 0)
    own, cross, leaking = check(lambda x: table[x] + table[x].mean(axis=0))  # mixes the batch
    assert np.all(cross > 0) and np.all(leaking == 7)


# ----------------------------------------------------------------------------------------------------------------
# Per-position tagging with padding, and the LR range test reaching a loss of exactly 0.


@pytest.fixture(scope="module")
def tagger():
    return run("tagging", "TinyCausalLM", "diagnostics.run=[data,model,overfit_batch,lr_range]", "optim.lr=0.01",
               "diagnostics.lr_range.grid_size=8", "diagnostics.lr_range.grid_steps=100",
               "diagnostics.lr_range.min_lr=1e-3", model_kwargs={"vocab": VOCAB})


def test_tagger_is_healthy_and_the_lr_range_survives_a_loss_of_zero(tagger):
    r = tagger
    task = r.context.problem.task
    assert task.kind == "per_position_classification" and task.integer_inputs and task.pad_token == 0
    assert r.status == "healthy" and problems(r.findings) == []
    metrics = pipeline.flat_metrics(r.outcomes)
    assert metrics["data/label_range/padding/train"] > 0 and metrics["data/label_range/out_of_range"] == 0
    assert metrics["model/expected_initial_loss"] == pytest.approx(math.log(3))
    assert metrics["overfit_batch/passed"] is True and metrics["overfit_batch/loss_floor_kind"] == "built_in"
    [outcome] = [o for o in r.outcomes if o.name == "lr_range"]
    assert 0.0 in outcome.series["lr_range/grid_val_loss"]  # memorized to float32's last bit
    assert metrics["lr_range/suggested_lr"] is not None and np.isfinite(metrics["lr_range/configured_progress"])


def test_lr_range_readings_with_zero_losses():
    lrs = np.geomspace(1e-4, 1, 8)
    reading = lr_range.read_grid(lrs, [2.3, 2.0, 0.0, 0.0, 0.0, 0.0, 5.0, np.nan], np.zeros(8, bool), 2.3, 0.05)
    assert reading.best_loss == 0.0 and reading.usable_low_lr <= lrs[2] and reading.usable_high_lr >= lrs[5]
    suggestion = lr_range.suggest(reading, float(lrs[3]))
    assert suggestion.rule == "valley" and suggestion.grid_ratio_at_valley == 1.0
    verdict = lr_range.judge_configured(reading, float(lrs[4]), 0.0, [0.0, 0.5, 0.0], -1)
    assert verdict.direction is None and verdict.progress == 1.0
    ramp = lr_range.read_ramp(np.r_[np.linspace(2, 0, 150), np.zeros(50)], lr_range.ramp_lrs(lr_range.Settings()))
    lr_range.findings_for(reading, verdict, ramp, suggestion, 200)
    exploded = lr_range.judge_configured(reading, float(lrs[6]), 5.0, [0.0, 3.0, 9.0], -1)  # from a loss of 0
    [f] = [f for f in lr_range.findings_for(reading, exploded, ramp, suggestion, 200) if f.id == "train.divergence"]
    assert "blew up" in f.message
    assert controls.chance_accuracy(np.array([[0, 1, -1]]), np.array([[1, -1, -1]]), 2) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# Dense labels and multi-output regression.


def test_dense_labels_and_multi_output_regression():
    seg = run("segmentation", "PixelClassifier", FIRST_STAGES, "optim.lr=0.01")
    assert seg.context.problem.task.target_shape == (6, 6) and seg.context.problem.task.per_position
    assert seg.status == "healthy" and problems(seg.findings) == []
    assert pipeline.flat_metrics(seg.outcomes)["overfit_batch/passed"] is True

    reg = run("multi_regression", None, FIRST_STAGES)
    task = reg.context.problem.task
    assert task.kind == "regression" and task.target_shape == (3,) and task.num_outputs == 3
    assert reg.status == "healthy" and problems(reg.findings) == []
    metrics = pipeline.flat_metrics(reg.outcomes)
    assert metrics["overfit_batch/passed"] is True
    yb = reg.context.arrays.y_train[:32]
    assert metrics["overfit_batch/target_loss"] == pytest.approx(0.01 * np.var(yb, axis=0).mean(), abs=1e-6)
