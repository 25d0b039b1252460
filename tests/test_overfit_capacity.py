"""Overfit one batch judged by what the model can fit: healthy models that are small on purpose are never an error,
and the bugs the test exists for still are.

(a) Small on purpose, each with the built-in loss and with a user-written one: linear regression on noisy linear
targets, two tanh units on noisy XOR, a 4-unit ReLU classifier on digits, logistic regression on breast cancer.
None can memorize 32 arbitrary examples; each gets at most an info finding, with the capacity facts in evidence.

(b) Broken: a big MLP at a learning rate of 1e-7, a big MLP whose loss clips probabilities at 0.1 (no gradient for
most examples), a network frozen by a stop_gradient (only the output bias trains), a pipeline that zeroes its inputs,
and a small model with a sign-flipped loss: each is still an error.

The small models and their data are defined here, so each setup is one compile of the overfit program (plus one
for the capacity judgement and one for the linear references when the run fails).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import compose, headline, replace_group

from harness.checks.training import overfit_batch as ob
from harness.engine.core import Arrays, Problem
from harness.models import adapters
from harness.pipeline import build_context

MODULE = __name__


# --------------------------------------------------------------------------------------------------------------
# Data and losses a user would write (``_target_`` factories).


def _split(x, y, n_val: int = 64):
    return {"x_train": x[n_val:], "y_train": y[n_val:], "x_val": x[:n_val], "y_val": y[:n_val]}


def noisy_linear(num_examples: int = 320, num_features: int = 5, noise: float = 0.5, seed: int = 0):
    """y = x w + noise: a linear model is the right model, and nothing without 32 parameters memorizes 32 noisy
    targets."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, num_features)).astype(np.float32)
    w = rng.standard_normal(num_features)
    y = (x @ w + noise * rng.standard_normal(num_examples)).astype(np.float32)
    return _split(x, y)


def noisy_xor(num_examples: int = 320, spread: float = 0.3, seed: int = 0):
    """Four Gaussian clusters at (+-1, +-1), class = whether the signs differ: two tanh units solve XOR, and cannot
    memorize 32 points."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 2, (num_examples, 2))
    x = (2.0 * corners - 1.0 + spread * rng.standard_normal((num_examples, 2))).astype(np.float32)
    y = (corners[:, 0] ^ corners[:, 1]).astype(np.int32)
    return {**_split(x, y), "num_classes": 2}


def user_mse(outputs, targets):
    return jnp.mean(jnp.square(outputs.reshape(targets.shape[0], -1) - targets.reshape(targets.shape[0], -1)),
                    axis=1)


def user_cross_entropy(logits, labels):
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def user_loss(name: str) -> list[str]:
    return replace_group("loss", f"{MODULE}.{name}", _partial_="true")


SMALL = {
    "linear_regression": [*replace_group("data", f"{MODULE}.noisy_linear"), "model.depth=0"],
    "xor_two_tanh_units": [*replace_group("data", f"{MODULE}.noisy_xor"), "model.width=2", "model.depth=1",
                           "model.activation=tanh"],
    "digits_four_units": ["model.width=4", "model.depth=1"],
    "logistic_regression": ["data=breast_cancer", "model.depth=0"],
}
USER_LOSS = {"linear_regression": "user_mse"}


def small_ctx(name: str, own_loss: bool):
    overrides = ["logger=none", *SMALL[name]]
    if own_loss:
        overrides += user_loss(USER_LOSS.get(name, "user_cross_entropy"))
    return build_context(compose(overrides))


# --------------------------------------------------------------------------------------------------------------
# Pure pieces.


def test_numerical_rank_sees_a_bottleneck_through_round_off():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((300, 4)) @ rng.standard_normal((4, 200))).astype(np.float32)  # rank 4
    assert ob.numerical_rank(a) == 4
    assert ob.numerical_rank(rng.standard_normal((50, 30)).astype(np.float32)) == 30
    assert ob.numerical_rank(np.zeros((3, 3))) == 0
    assert ob.numerical_rank(np.full((2, 2), np.nan)) is None


def test_degrees_of_freedom_per_example():
    assert ob.per_example_dof((32, 10), classification=True) == (10, 9, True)  # a softmax ignores a common shift
    assert ob.per_example_dof((32, 1), classification=False) == (1, 1, False)
    assert ob.per_example_dof((32, 1), classification=True) == (1, 1, False)  # one logit: nothing to center
    assert ob.per_example_dof((8, 16, 5), classification=True) == (80, 64, True)  # per position


def capacity(**kw):
    base = dict(params=1000, outputs_per_example=10, dof_per_example=9, distinct_examples=32, batch_dof=288,
                jacobian_rank=288, slack_examples=64, slack_dof=576, slack_rank=576)
    return ob.Capacity(**{**base, **kw})


def test_able_means_room_to_spare():
    assert capacity().able
    # Exactly at the interpolation threshold (softmax regression on 32 digits): not able with room to spare.
    assert not capacity(slack_rank=495).able
    # Without a rank, parameters are counted against twice the batch.
    assert capacity(jacobian_rank=None, slack_rank=None, params=600).able
    assert not capacity(jacobian_rank=None, slack_rank=None, params=500).able


def test_frozen_parameters_explain_only_when_they_hold_the_capacity():
    frozen = capacity(jacobian_rank=9, slack_rank=9, frozen=("hidden/0/kernel",), frozen_params=990)
    assert not frozen.able and frozen.frozen_explains
    # A bias before a BatchNorm gets no gradient either, but the rest of the model is what falls short.
    bottleneck = capacity(params=5000, jacobian_rank=100, slack_rank=150, frozen=("dense/bias",), frozen_params=64)
    assert not bottleneck.frozen_explains


def test_ignoring_the_input_means_the_whole_curve_matches_the_zero_input_one():
    same = np.geomspace(2.3, 2.2, 100)
    assert ob.ignores_its_input(curve(same), curve(same))
    # A zero-initialized linear model starts at the same loss on zero inputs, then trains apart from them.
    assert not ob.ignores_its_input(curve(np.geomspace(2.3, 0.3, 100)), curve(np.geomspace(2.3, 2.2, 100)))


def curve(values, target=0.01):
    values = np.asarray(values, float)
    return ob.read_curve(values, target, -1, np.ones(len(values)))


def fake_result(configured_loss, final_acc):
    """A SweepResult for plan (lr 1e-3, probes 0.1x and 10x): configured, probes, zero input, untrained; the other
    members stay at the untrained loss."""
    from harness.engine.core import Hparams
    from harness.engine.driver import SweepResult

    flat = np.full(len(configured_loss), configured_loss[0])
    loss = np.stack([configured_loss, flat, flat, flat * 1.5, flat])
    acc = np.array([[final_acc], [0.5], [0.5], [0.5], [0.5]])
    return SweepResult(hparams=Hparams.make(n=5), loss=loss, grad_norm=np.ones_like(loss), lr=np.ones_like(loss),
                       eval_steps=np.array([len(flat)]), val_loss=loss[:, -1:], val_accuracy=acc,
                       train_eval_loss=loss[:, -1:], first_nonfinite=np.full(5, -1), batch_loss=loss[:, -1:],
                       batch_accuracy=acc)


def small_reading(configured, *, probe_final, linear_loss, linear_rank=3, rank=9):
    plan = ob.Plan(1e-3, (0.1, 10.0))
    g = ob.read(plan, fake_result(configured, 0.6), target=0.01, steps=len(configured), batch_size=32,
                classification=True, loss_name="user_cross_entropy", num_classes=2)
    probe = curve(np.geomspace(configured[0], probe_final, len(configured)))
    g.capacity = capacity(params=12, outputs_per_example=2, dof_per_example=1, batch_dof=32, jacobian_rank=rank,
                          slack_dof=64, slack_rank=rank, linear_rank=linear_rank, linear_loss=linear_loss,
                          linear_probe=probe)
    return g


def test_small_model_severities():
    # Stalled above the target, at least as good as a linear model trained the same way: context.
    stalled = np.concatenate([np.geomspace(0.71, 0.56, 200), np.full(300, 0.56)])
    g = small_reading(stalled, probe_final=0.68, linear_loss=0.68)
    [f] = [f for f in ob.findings_for(g) if f.id == "train.overfit_batch"]
    assert f.severity.value == "info" and f.evidence["small_model"] is True
    assert f.evidence["capacity"]["jacobian_rank"] == 9 and f.evidence["capacity"]["able_to_memorize"] is False
    # The same curve when a linear model trained the same way gets far lower: worse than linear.
    g = small_reading(stalled, probe_final=0.2, linear_loss=0.1)
    [f] = [f for f in ob.findings_for(g) if f.id == "train.overfit_batch"]
    assert f.severity.value == "warning" and "worse than a linear model" in f.message
    # ... unless the model is less flexible than a linear one on this batch (a bottleneck): then it is no bar.
    g = small_reading(stalled, probe_final=0.2, linear_loss=0.1, linear_rank=30, rank=9)
    assert [f.severity.value for f in ob.findings_for(g) if f.id == "train.overfit_batch"] == ["info"]
    # Barely moved although a linear model reaches far lower: a warning.
    flat = np.linspace(0.71, 0.70, 500)
    g = small_reading(flat, probe_final=0.69, linear_loss=0.1)
    [f] = [f for f in ob.findings_for(g) if f.id == "train.overfit_batch"]
    assert f.severity.value == "warning" and "barely learned" in f.message


# --------------------------------------------------------------------------------------------------------------
# (a) Small on purpose: never an error.


@pytest.mark.parametrize("own_loss", [False, True], ids=["builtin_loss", "user_loss"])
@pytest.mark.parametrize("name", list(SMALL))
def test_small_models_are_not_errors(name, own_loss):
    out = ob.run(small_ctx(name, own_loss), ob.Settings())
    assert not [f for f in out.findings if f.severity.value == "error"], [f.message for f in out.findings]
    m = out.metrics
    assert m["overfit_batch/passed"] is False and m["overfit_batch/able_to_memorize"] is False
    [f] = [f for f in out.findings if f.id == "train.overfit_batch"]
    assert f.severity.value == "info", f.message
    cap = f.evidence["capacity"]
    assert cap["jacobian_rank"] < cap["batch_degrees_of_freedom"]  # cannot memorize: the facts say why
    assert cap["linear_model_loss"] is not None and cap["linear_probe_final_loss"] is not None
    if name == "xor_two_tanh_units":
        assert cap["narrowest_layer"]["units"] == 2 and cap["params"] == 12
    if name == "digits_four_units":
        assert cap["narrowest_layer"]["units"] == 4 and cap["jacobian_rank"] < cap["linear_model_rank"]
    if name in ("linear_regression", "logistic_regression"):
        # A linear model is its own linear probe: trained the same way, the probe follows the model's curve.
        assert cap["narrowest_layer"] is None
        assert cap["linear_probe_final_loss"] == pytest.approx(m["overfit_batch/final_loss"], rel=1e-3)
    if name == "linear_regression":
        # The best linear fit leaves the noise (0.25 x (1 - 6/32) in expectation): nothing near 1% of the variance.
        assert 0.1 < cap["linear_model_loss"] < 0.4 and cap["params"] == 6


# --------------------------------------------------------------------------------------------------------------
# (b) Broken: still errors.


@pytest.fixture(scope="module")
def digits_ctx():
    return build_context(compose(["logger=none"]))


def with_problem(ctx, *, model=None, loss=None, loss_name=None):
    p = ctx.problem
    adapted = adapters.ModelFactory(lambda rngs: model(rngs=rngs), {}, (), 0, ctx.arrays.x_train[:2]).adapt() \
        if model else p.model
    return dataclasses.replace(ctx, problem=Problem(adapted, loss or p.loss_fn, p.optim, p.task),
                               loss_name=loss_name or ctx.loss_name)


def overfit_finding(out):
    [f] = [f for f in out.findings if f.id == "train.overfit_batch"]
    return f


def test_big_mlp_at_a_learning_rate_of_1e_7_is_an_error(digits_ctx):
    ctx = dataclasses.replace(digits_ctx, optim=dataclasses.replace(digits_ctx.optim, lr=1e-7))
    out = ob.run(ctx, ob.Settings(steps=250))
    f = overfit_finding(out)
    assert f.severity.value == "error" and f.evidence["causes"][0].startswith("the learning rate is too low")
    assert headline(out.findings, trained=True) == "train.overfit_batch"


def test_a_zeroed_pipeline_is_not_excused_by_its_duplicates(digits_ctx):
    """Inputs that all collapsed to zero are 32 copies of one input: no model memorizes their labels, and the loss
    floor does not excuse it (the test exists to catch such a pipeline). The curves match the zero-input member's,
    so it is an error whatever the model's capacity."""
    a = digits_ctx.arrays
    zeroed = dataclasses.replace(digits_ctx, arrays=Arrays(np.zeros_like(a.x_train), a.y_train, a.x_val, a.y_val))
    out = ob.run(zeroed, ob.Settings(steps=250))
    f = overfit_finding(out)
    assert f.severity.value == "error" and "ignores its input" in f.evidence["causes"][0]
    assert headline(out.findings, trained=True) == "train.overfit_batch"  # the data stage did not run


def clipped_cross_entropy(logits, labels):
    """Bug: probabilities clipped at 0.1 where 1e-7 was meant, so an example whose right class has a probability
    under 0.1 (most of them at init, for 10 classes) gets no gradient and stays wrong."""
    p = jnp.take_along_axis(jax.nn.softmax(logits), labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    return -jnp.log(jnp.clip(p, 0.1, 1.0))


class FrozenBody(nnx.Module):
    """Bug: a stop_gradient around the whole network; only an output bias added after it still trains."""

    def __init__(self, *, rngs, inputs=64, width=128, num_outputs=10):
        self.hidden = nnx.Linear(inputs, width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros(num_outputs))

    def __call__(self, x):
        return jax.lax.stop_gradient(self.out(jax.nn.relu(self.hidden(x)))) + self.bias[...]


def test_frozen_network_is_an_error_that_names_the_frozen_parameters(digits_ctx):
    out = ob.run(with_problem(digits_ctx, model=FrozenBody), ob.Settings(steps=250))
    f = overfit_finding(out)
    assert f.severity.value == "error"
    cap = f.evidence["capacity"]
    assert set(cap["frozen_leaves"]) == {"hidden/kernel", "hidden/bias", "out/kernel", "out/bias"}
    assert cap["frozen_parameters"] == 64 * 128 + 128 + 128 * 10 + 10
    assert "receive no gradient" in f.evidence["causes"][0] and "stop_gradient" in f.suggestion
    assert headline(out.findings, trained=True) == "train.overfit_batch"


def test_big_mlp_whose_loss_has_a_bug_is_an_error_with_its_capacity_in_evidence(digits_ctx):
    """No bug shows in the curves alone (the loss falls, then plateaus): the capacity judgement decides, and a model
    with room to memorize twice the batch that does not memorize it is broken."""
    ctx = with_problem(digits_ctx, loss=clipped_cross_entropy, loss_name="clipped_cross_entropy")
    out = ob.run(ctx, ob.Settings(steps=250))
    f = overfit_finding(out)
    assert f.severity.value == "error" and f.evidence["failure"] in ("stalled", "slow")
    assert headline(out.findings, trained=True) == "train.overfit_batch"
    cap = f.evidence["capacity"]
    assert cap["able_to_memorize"] is True and cap["params"] == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert cap["jacobian_rank"] == cap["batch_degrees_of_freedom"] == 32 * 9
    assert cap["slack_jacobian_rank"] == cap["slack_degrees_of_freedom"] == 64 * 9
    assert cap["narrowest_layer"]["units"] == 128 and cap["frozen_leaves"] == []
    assert "It has the capacity to" in f.message


def flipped_cross_entropy(logits, labels):
    return -user_cross_entropy(logits, labels)


def test_a_small_model_with_a_real_bug_is_still_an_error():
    ctx = small_ctx("xor_two_tanh_units", own_loss=False)
    p = ctx.problem
    ctx = dataclasses.replace(ctx, problem=Problem(p.model, flipped_cross_entropy, p.optim, p.task),
                              loss_name="flipped_cross_entropy")
    out = ob.run(ctx, ob.Settings(steps=250))
    assert overfit_finding(out).severity.value == "error"
    assert "sign is flipped" in {f.id: f for f in out.findings}["train.loss_increasing"].message
    assert headline(out.findings, trained=True) == "train.loss_increasing"
