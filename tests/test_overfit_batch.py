"""Overfit one batch: the curve readings on hand-built curves, then the compiled test on the reference job (passes,
steps to target reported), the regression job (passes), shuffled labels (still memorizes: that is the point) and
planted bugs (each fires with the right id and the evidence-ranked cause).

Compiled runs use 250 steps (the reference job reaches the target near step 100); planted models and losses are
defined here, small, so each costs one compile.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import compose, headline

from harness.models import adapters
from harness.checks.training import overfit_batch as ob
from harness.config import settings_from
from harness.engine.core import Arrays, Problem
from harness.errors import HarnessError
from harness.pipeline import build_context

FAST = ob.Settings(steps=250)


# --------------------------------------------------------------------------------------------------------------
# Pure readings.


def test_batch_is_class_stratified_and_seed_independent():
    y = np.array([0, 0, 1, 2, 1, 0, 2])
    # Round-robin in dataset order: first of each class (0, 2, 3), then second of each (1, 4).
    assert ob.choose_batch(y, 5, classification=True).tolist() == [0, 2, 3, 1, 4]
    assert ob.choose_batch(y, 50, classification=True).size == 7
    assert ob.choose_batch(np.linspace(0, 1, 9), 4, classification=False).tolist() == [0, 1, 2, 3]


def test_default_targets():
    assert ob.default_target(True, np.array([0, 1])) == 0.01
    assert ob.default_target(False, np.array([-1.0, 1.0])) == pytest.approx(0.01)  # 1% of variance 1


def curve(values, target=0.01, nonfinite=-1, grad0=1.0):
    return ob.read_curve(np.asarray(values, float), target, nonfinite, np.full(len(values), grad0))


def test_read_curve_steps_to_target():
    c = curve(np.geomspace(2.0, 1e-4, 100))
    assert c.steps_to_target == int(np.argmax(np.geomspace(2.0, 1e-4, 100) < 0.01))
    assert c.reached and not c.diverged


def test_rising_ignores_noise_and_memorized_wobble():
    rng = np.random.default_rng(0)
    falling = np.geomspace(2.3, 0.05, 300) * np.exp(rng.normal(0, 0.3, 300))  # Adam-like noise, falling
    assert ob.rising(falling, 0.01) is None
    wobble = np.concatenate([np.geomspace(2.3, 1e-5, 150), np.full(150, 1e-3)])  # up 100x, but below target
    assert ob.rising(wobble, 0.01) is None


def test_rising_net_rise_and_rebound():
    assert ob.rising(np.linspace(1.0, 3.0, 300), 0.01)["kind"] == "net_rise"
    rebound = np.concatenate([np.geomspace(2.3, 0.1, 150), np.geomspace(0.1, 1.0, 150)])
    r = ob.rising(rebound, 0.01)
    assert r["kind"] == "rebound" and r["lowest_window_median"] < 0.2


def test_sign_flip_evidence():
    healthy = curve(np.geomspace(2.3, 1e-3, 100))
    assert ob.sign_flipped(healthy, "cross_entropy", True, 1.0, 0.1, 10) is None
    negative = curve(np.linspace(0.5, -0.2, 100))
    assert "cannot be negative" in ob.sign_flipped(negative, "mse", False, np.nan, np.nan, None)
    worse = curve(np.linspace(-2.3, -9.0, 100))
    assert "accuracy fell" in ob.sign_flipped(worse, "my_loss", True, 0.0, 0.1, 10)
    unbounded = curve(np.linspace(-1.0, -500.0, 100))
    assert "without bound" in ob.sign_flipped(unbounded, "my_loss", False, np.nan, np.nan, None)


def test_failure_shapes():
    assert ob.failure_shape(curve(np.linspace(2.3, 2.25, 300)), 0.01) == "flat"
    assert ob.failure_shape(curve(np.geomspace(2.3, 0.05, 300)), 0.01) == "slow"  # geometric: reaches soon
    plateau = np.concatenate([np.geomspace(2.3, 0.8, 100), np.full(200, 0.8)])
    assert ob.failure_shape(curve(plateau), 0.01) == "stalled"
    assert ob.failure_shape(curve(np.r_[2.3, 5.0, np.full(10, np.nan)], nonfinite=2), 0.01) == "diverged"


def fake_result(configured_loss, final_acc, steps=500):
    """A SweepResult for plan (lr 1e-3, probes 0.1x and 10x): configured, probes, zero input, untrained."""
    from harness.engine.core import Hparams
    from harness.engine.driver import SweepResult

    flat = np.full(steps, 2.3)
    loss = np.stack([configured_loss, flat, flat, flat, flat])
    acc = np.array([[final_acc], [0.1], [0.1], [0.1], [0.1]])
    return SweepResult(hparams=Hparams.make(n=5), loss=loss, grad_norm=np.ones_like(loss), lr=np.ones_like(loss),
                       eval_steps=np.array([steps]), val_loss=loss[:, -1:], val_accuracy=acc,
                       train_eval_loss=loss[:, -1:], first_nonfinite=np.full(5, -1), batch_loss=loss[:, -1:],
                       batch_accuracy=acc)


def test_memorized_but_slow_classification_passes_with_a_note():
    """The small CNN on digits at Adam 1e-3: 100% batch accuracy, loss 0.017 at step 500 and still halving every
    ~70 steps. It memorized the batch; failing it would be a false alarm."""
    plan = ob.Plan(1e-3, (0.1, 10.0))
    slow = 2.3 * np.exp(-np.arange(500) * np.log(2.3 / 0.0167) / 499)
    g = ob.read(plan, fake_result(slow, 1.0), target=0.01, steps=500, batch_size=32, classification=True,
                loss_name="cross_entropy", num_classes=10)
    assert g.passed and g.on_track == pytest.approx(552, abs=5)
    assert [f.severity.value for f in ob.findings_for(g)] == ["info"]
    # The same curve without 100% accuracy has not memorized anything: it fails.
    g = ob.read(plan, fake_result(slow, 0.9), target=0.01, steps=500, batch_size=32, classification=True,
                loss_name="cross_entropy", num_classes=10)
    assert not g.passed and g.shape == "slow"
    # Memorized but crawling (would need 10x the budget) fails too.
    crawl = np.concatenate([np.geomspace(2.3, 0.5, 100), np.geomspace(0.5, 0.3, 400)])
    g = ob.read(plan, fake_result(crawl, 1.0), target=0.01, steps=500, batch_size=32, classification=True,
                loss_name="cross_entropy", num_classes=10)
    assert not g.passed


def test_settings_validation_and_config_file_match():
    with pytest.raises(HarnessError, match="probe_lr_factors"):
        settings_from(ob.Settings, {"probe_lr_factors": [1.0]}, "diagnostics.overfit_batch")
    with pytest.raises(HarnessError, match="eval_every"):
        settings_from(ob.Settings, {"steps": 100, "eval_every": 500}, "diagnostics.overfit_batch")
    import yaml

    path = os.path.join(os.path.dirname(ob.__file__), "..", "..", "conf", "diagnostics", "overfit_batch",
                        "default.yaml")
    with open(path) as f:
        node = yaml.safe_load(f)
    assert set(node) == {f.name for f in dataclasses.fields(ob.Settings)}
    assert settings_from(ob.Settings, node, "diagnostics.overfit_batch") == ob.Settings()


# --------------------------------------------------------------------------------------------------------------
# Planted bugs (small, defined here).


class InputIgnored(nnx.Module):
    """Bug: the output is a learned bias only, the input never reaches it (a variable overwritten)."""

    def __init__(self, *, rngs, num_outputs=10):
        self.bias = nnx.Param(jnp.zeros(num_outputs))

    def __call__(self, x):
        return jnp.broadcast_to(self.bias[...], (x.shape[0], self.bias.shape[0]))


class FrozenZeroOutput(nnx.Module):
    """Bug: a zero-initialized output layer behind a stop_gradient: no gradient ever arrives."""

    def __init__(self, *, rngs, inputs=64, num_outputs=10):
        self.out = nnx.Linear(inputs, num_outputs, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x):
        return jax.lax.stop_gradient(self.out(x))


def flipped_cross_entropy(logits, labels):
    return -optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def naive_cross_entropy(logits, labels):
    """Bug: log of a softmax, which underflows to log(0) = -inf once the logits grow large."""
    probs = jax.nn.softmax(logits)
    return -jnp.log(jnp.take_along_axis(probs, labels[:, None].astype(jnp.int32), axis=1)[:, 0])


@pytest.fixture(scope="module")
def digits_ctx():
    return build_context(compose(["logger=none"]))


def with_lr(ctx, value):
    return dataclasses.replace(ctx, optim=dataclasses.replace(ctx.optim, lr=value))


def with_problem(ctx, *, model=None, loss=None, loss_name=None):
    p = ctx.problem
    adapted = adapters.ModelFactory(lambda rngs: model(rngs=rngs), {}, (), 0, ctx.arrays.x_train[:2]).adapt() \
        if model else p.model
    problem = Problem(adapted, loss or p.loss_fn, p.optim, p.task)
    return dataclasses.replace(ctx, problem=problem, loss_name=loss_name or ctx.loss_name)


def ids(outcome):
    return {f.id: f for f in outcome.findings}


@pytest.fixture(scope="module")
def reference(digits_ctx):
    return ob.run(digits_ctx, FAST)


def test_reference_job_passes_with_steps_to_target(reference):
    m = reference.metrics
    assert reference.findings == []
    assert m["overfit_batch/passed"] is True
    assert 30 <= m["overfit_batch/steps_to_target"] <= 200  # measured: step 100 at Adam 1e-3
    assert m["overfit_batch/final_loss"] < 0.01 and m["overfit_batch/final_batch_accuracy"] == 1.0
    assert m["overfit_batch/batch_size"] == 32


def test_curve_series_members_and_plot(reference, tmp_path):
    assert len(reference.series["overfit_batch/loss"]) == FAST.steps
    assert reference.series["overfit_batch/eval_step"][-1] == FAST.steps
    assert [m["member"] for m in reference.members][:2] == ["configured", "lr_x0.01"]
    path = tmp_path / "overfit.png"
    reference.plots[0].draw(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_job_passes():
    ctx = build_context(compose(["logger=none", "data=regression"]))
    out = ob.run(ctx, FAST)
    assert out.findings == []
    assert out.metrics["overfit_batch/steps_to_target"] is not None
    assert out.metrics["overfit_batch/target_loss"] == pytest.approx(0.01 * np.var(ctx.arrays.y_train[:32]), rel=1e-4)


def smoothed_cross_entropy(logits, labels, smoothing=0.1):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def test_reference_loss_floor_is_zero(reference):
    assert reference.metrics["overfit_batch/loss_floor"] == 0.0  # the built-in cross-entropy: no program needed
    assert reference.metrics["overfit_batch/loss_floor_kind"] == "built_in"
    assert reference.metrics["overfit_batch/target_loss"] == pytest.approx(0.01)


def test_label_smoothed_loss_passes_at_its_floor(digits_ctx):
    """Label smoothing makes 0 unreachable: the loss's minimum is the entropy of the smoothed targets. A healthy
    model memorizes the batch down to that floor, and must pass (it used to fail with a 'plateau' error)."""
    ctx = with_problem(digits_ctx, loss=smoothed_cross_entropy, loss_name="smoothed_cross_entropy")
    out = ob.run(ctx, FAST)
    p_true, p_other = 0.9 + 0.1 / 10, 0.1 / 10
    entropy = -(p_true * np.log(p_true) + 9 * p_other * np.log(p_other))
    assert out.metrics["overfit_batch/loss_floor"] == pytest.approx(entropy, rel=1e-3)
    assert out.findings == [] and out.metrics["overfit_batch/passed"] is True


def test_the_floor_does_not_hide_a_model_that_cannot_memorize(digits_ctx):
    ctx = with_problem(digits_ctx, model=InputIgnored, loss=smoothed_cross_entropy, loss_name="smoothed")
    out = ob.run(ctx, FAST)
    assert out.metrics["overfit_batch/loss_floor"] > 0.4
    assert ids(out)["train.overfit_batch"].severity.value == "error"
    assert headline(out.findings, trained=True) == "train.overfit_batch"


def test_shuffled_labels_are_still_memorized(digits_ctx):
    a = digits_ctx.arrays
    perm = np.random.default_rng(0).permutation(len(a.y_train))
    ctx = dataclasses.replace(digits_ctx, arrays=Arrays(a.x_train, a.y_train[perm], a.x_val, a.y_val))
    out = ob.run(ctx, FAST)
    assert out.findings == [] and out.metrics["overfit_batch/passed"]


def test_lr_far_too_high_fails_and_names_the_lr(digits_ctx):
    out = ob.run(with_lr(digits_ctx, 10.0), FAST)
    f = ids(out)["train.overfit_batch"]
    assert f.severity.value == "error"
    assert f.evidence["causes"][0].startswith("the learning rate is too high")
    assert f.evidence["probe_lower_lr"]["factor"] < 1
    assert f"optim.lr to about {f.evidence['probe_lower_lr']['lr']:.3g}" in f.suggestion
    assert headline(out.findings, trained=True) == "train.overfit_batch"


def test_lr_far_too_low_is_flat_and_names_the_lr(digits_ctx):
    out = ob.run(with_lr(digits_ctx, 1e-7), FAST)
    f = ids(out)["train.overfit_batch"]
    assert f.evidence["failure"] == "flat"
    assert f.evidence["causes"][0].startswith("the learning rate is too low")
    assert "ignores its input" not in f.message  # the MLP's output does depend on its input
    assert headline(out.findings, trained=True) == "train.overfit_batch"


def test_sign_flipped_loss_is_named(digits_ctx):
    ctx = with_problem(digits_ctx, loss=flipped_cross_entropy, loss_name="flipped_cross_entropy")
    out = ob.run(ctx, FAST)
    found = ids(out)
    assert "sign is flipped" in found["train.loss_increasing"].message
    assert found["train.loss_increasing"].severity.value == "error"
    assert found["train.overfit_batch"].evidence["failure"] == "sign_flipped"
    assert out.metrics["overfit_batch/steps_to_target"] is None  # a negative loss "under the target" is no pass
    assert out.metrics["overfit_batch/loss_floor"] is None  # unbounded below: the usual target stays
    assert headline(out.findings, trained=True) == "train.loss_increasing"


def test_output_that_ignores_its_input(digits_ctx):
    out = ob.run(with_problem(digits_ctx, model=InputIgnored), FAST)
    f = ids(out)["train.overfit_batch"]
    assert f.evidence["failure"] == "flat"
    assert "ignores its input" in f.evidence["causes"][0]
    assert headline(out.findings, trained=True) == "train.overfit_batch"


def test_zero_initialized_output_behind_stop_gradient(digits_ctx):
    out = ob.run(with_problem(digits_ctx, model=FrozenZeroOutput), FAST)
    f = ids(out)["train.overfit_batch"]
    assert f.evidence["causes"][0].startswith("no gradient reaches the parameters")
    assert headline(out.findings, trained=True) == "train.overfit_batch"


def test_divergence_is_reported(digits_ctx):
    ctx = with_lr(with_problem(digits_ctx, loss=naive_cross_entropy, loss_name="naive_cross_entropy"), 10.0)
    out = ob.run(ctx, FAST)
    found = ids(out)
    assert found["train.divergence"].severity.value == "error"
    assert found["train.divergence"].evidence["first_nonfinite_step"] >= 0
    assert found["train.overfit_batch"].evidence["failure"] == "diverged"
    assert headline(out.findings, trained=True) == "train.divergence"
