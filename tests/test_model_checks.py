"""Model checks: the readings on hand-built arrays (analytic answers), the activation capture (names, restoration,
other threads untouched), then the compiled stage on the reference job (known numbers, no recompile on a second
run, plots), silence on the healthy setups and every finding on its planted bug (tests/planted.py).

Every compiled run is one model: about one compile for the init program (plus one for the float64 gradient check
where it is enabled). Planted models run with the gradient check off unless it is what they test.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compose, headline, replace_group

import planted
from harness.checks import model
from harness.checks.model import batch_dependence, capture, forward, gradient_check, noise, units
from harness.checks.model import programs as model_programs
from harness.checks.base import Context
from harness.config import FactoryConfig, config_dir, settings_from
from harness.engine import compile as programs
from harness.errors import HarnessError
from harness.findings import FINDING_IDS, Severity
from harness import losses
from harness.losses import cross_entropy, mse
from harness.models.adapters import ModelFactory
from harness.pipeline import BLOCKING, adapt_model, build_context, make_loss, make_model_factory

DEFAULTS = model.Settings()


@dataclasses.dataclass(frozen=True)
class Planted:
    """A planted model or loss (tests/planted.py) swapped into a composed context."""

    group: str  # "model" or "loss"
    name: str


def model_factory(name):
    return Planted("model", f"planted.{name}")


def loss_factory(name):
    return Planted("loss", f"planted.{name}")


@functools.cache
def composed(overrides: tuple[str, ...]):
    """``harness <overrides>`` composed and loaded once per distinct overrides (Hydra compose costs ~0.3 s)."""
    rc = compose(["logger=none", *overrides])
    return rc, build_context(rc)


def context(overrides=()) -> tuple[Context, model.Settings]:
    """A Context for the overrides, with planted models and losses built the way the pipeline builds the user's
    (``make_model_builder``, ``make_loss``: the documented factory signatures)."""
    rc, base = composed(tuple(o for o in overrides if isinstance(o, str)))
    ctx = dataclasses.replace(base, shared={})
    for item in (o for o in overrides if isinstance(o, Planted)):
        if item.group == "model":
            fc = FactoryConfig(item.name, {})
            ctx.models = make_model_factory(fc, ctx.dataset)
            ctx.problem = dataclasses.replace(ctx.problem, model=adapt_model(ctx.models, fc))
        else:
            fn, ctx.loss_name = make_loss(FactoryConfig(item.name, {}, partial=True), ctx.dataset)
            ctx.problem = dataclasses.replace(ctx.problem, loss_fn=fn)
        ctx.problem = dataclasses.replace(ctx.problem, fingerprint=None)
    return ctx, rc.settings["model"]


def run_stage(overrides=(), **settings):
    """The model stage for ``harness <overrides>`` (planted pieces swapped in), gradient check off unless asked."""
    ctx, defaults = context(overrides)
    chosen = dataclasses.replace(defaults, **{"gradient_check": False, **settings})
    return model.run(ctx, chosen), ctx, chosen


def problems(outcome, *severities):
    severities = severities or (Severity.ERROR, Severity.WARNING)
    return [(f.severity.value, f.id) for f in outcome.findings if f.severity in severities]


# --------------------------------------------------------------------------------------------------------------
# Readings on hand-built arrays.


def test_unit_statistics_known_answers():
    # 4 examples x 4 ReLU units: units 0 and 2 are zero for every example -> half the layer is dead.
    relu_out = np.array([[0, 1, 0, 0.5], [0, 0, 0, 2], [0, 3, 0, 0], [0, 1, 0, 1]], np.float32)
    # tanh: unit 0 pinned at +-1 for all 10 examples, unit 1 for 8 of 10 (below 90%), unit 2 never.
    tanh_out = np.zeros((10, 3), np.float32)
    tanh_out[:, 0] = np.where(np.arange(10) % 2, 0.999, -0.995)
    tanh_out[:8, 1] = 0.995
    # sigmoid: saturated below 0.01 or above 0.99; a conv activation pools examples and positions per channel.
    sigmoid_out = np.stack([np.full((5, 2, 2), 0.005), np.full((5, 2, 2), 0.5)], axis=-1).astype(np.float32)
    inputs = np.array([[0.0, 1.0], [2.0, 1.0]], np.float32)
    # tanh pre-activations: 5 of 8 beyond +-5 (5.0 itself is not beyond); the outputs are what tanh makes of them.
    pre = np.array([[6.0, -7.0, 5.0, 0.1], [-5.5, 9.0, 1.0, 20.0]], np.float32)
    thresholds = dict(saturation_level=0.99, saturated_example_fraction=0.9, preactivation_saturation=5.0)

    @jax.jit  # one program for all cases
    def stats(relu_out, tanh_out, sigmoid_out, inputs, pre):
        of = lambda function, kind, y, x=None: units.statistics(  # noqa: E731
            capture.Activation("h", function, kind, y, x), thresholds)
        return (of("relu", "rectifier", relu_out, relu_out), of("tanh", "tanh", tanh_out),
                of("sigmoid", "sigmoid", sigmoid_out), units.spread(inputs), of("tanh", "tanh", jnp.tanh(pre), pre))

    relu, tanh, sigmoid, spread, flat = jax.tree.map(np.asarray, stats(relu_out, tanh_out, sigmoid_out, inputs, pre))
    assert relu["dead"] == 0.5 and math.isnan(relu["saturated"]) and relu["units"] == 4
    assert math.isnan(relu["preactivation_saturated"])  # a ReLU has no flat tails
    assert relu["rms"] == pytest.approx(np.sqrt(np.mean(relu_out ** 2)))
    assert tanh["saturated"] == pytest.approx(1 / 3) and math.isnan(tanh["dead"])
    assert sigmoid["saturated"] == 0.5 and sigmoid["units"] == 2
    assert spread == pytest.approx(0.5)  # feature stds 1 and 0
    assert flat["preactivation_saturated"] == pytest.approx(5 / 8)


def test_unit_judgement_thresholds():
    def layer(name, dead=np.nan, saturated=np.nan, ratio=1.0, everywhere=False):
        return dict(layer=name, function="relu", units=8, dead_fraction=dead, dead_everywhere=everywhere,
                    saturated_fraction=saturated, saturated_everywhere=everywhere, spread=ratio, spread_ratio=ratio,
                    finite=True)

    assert units.judge([layer("a", dead=0.5), layer("b", saturated=0.3)], DEFAULTS, 4) == []  # at/below threshold
    (f,) = units.judge([layer("a", dead=0.75)], DEFAULTS, 4)
    assert (f.severity, f.id, f.evidence["worst_fraction"]) == (Severity.WARNING, "model.dead_units", 0.75)
    (f,) = units.judge([layer("a", dead=1.0, everywhere=True)], DEFAULTS, 4)
    assert f.severity is Severity.ERROR and "Every unit of a is dead" in f.message
    (f,) = units.judge([layer("a", ratio=1e-4), layer("b", ratio=0.05)], DEFAULTS, 4)
    assert f.id == "model.dead_units" and "vanish" in f.message and list(f.evidence["layers"]) == ["a"]


def test_saturation_per_layer_from_pre_activations():
    """DeepDiagnosis' rule names a layer whose pre-activations are mostly beyond +-5 even when no unit is pinned for
    90% of the examples; one finding per id, each layer with what each rule measured."""
    def layer(name, pinned=0.0, beyond=0.0, function="tanh"):
        return dict(layer=name, function=function, units=8, dead_fraction=np.nan, dead_everywhere=False,
                    saturated_fraction=pinned, saturated_everywhere=False, preactivation_saturated=beyond,
                    preactivation_saturated_everywhere=beyond >= 1, spread=1.0, spread_ratio=1.0, rms=1.0,
                    finite=True)

    assert units.judge([layer("a", pinned=0.2, beyond=0.5)], DEFAULTS, 4) == []  # at the threshold: silent
    (f,) = units.judge([layer("a", pinned=0.1, beyond=0.62), layer("b", pinned=0.9, beyond=0.3, function="sigmoid")],
                       DEFAULTS, 4)
    assert (f.severity, f.id) == (Severity.WARNING, "model.saturated_units")
    assert "a (tanh): 62% of its pre-activations beyond +-5" in f.message
    assert "b (sigmoid): 90% of its units pinned" in f.message and "DeepDiagnosis" in f.message
    assert f.evidence["preactivation_layers"] == {"a": 0.62} and f.evidence["layers"] == {"b": 0.9}
    (f,) = units.judge([layer("a", beyond=1.0)], DEFAULTS, 4)
    assert f.severity is Severity.ERROR and "All of a is saturated" in f.message


def test_exploding_activation_readings():
    """Growth of the activations' RMS across depth, from the lowest earlier level and never from below the unit scale;
    the layer where it starts is named; an error from two orders of magnitude."""
    def layers(*levels, function="relu"):
        return [dict(layer=f"h{i}", function=function, units=8, dead_fraction=0.0, dead_everywhere=False,
                     saturated_fraction=np.nan, saturated_everywhere=False, spread=v, spread_ratio=1.0, rms=v,
                     finite=True) for i, v in enumerate(levels)]

    def exploding(rows, input_rms=None):
        return [f for f in units.judge(rows, DEFAULTS, 4, input_rms) if f.id == "model.exploding_activations"]

    assert exploding(layers(*[0.5 * 1.05 ** i for i in range(20)]), 0.4) == []  # 1.05^19 = 2.5x: healthy drift
    assert exploding(layers(0.002, 0.7, 0.7), 0.001) == []  # tiny inputs, then a normalization: back to unit scale
    assert exploding(layers(100.0, 120.0, 90.0), 100.0) == []  # unscaled inputs: large, but not growing
    (f,) = exploding(layers(1.0, 0.5, 2.0, 6.0, 20.0), 1.0)
    assert f.severity is Severity.WARNING and f.evidence["growth"] == pytest.approx(20.0)
    assert f.evidence["start_layer"] == "h2" and f.evidence["onset_layer"] == "h4"  # from h1's 0.5 (floored at 1)
    (f,) = exploding(layers(*[0.8 * 1.7 ** i for i in range(20)]), 0.4)
    assert f.severity is Severity.ERROR and f.evidence["start"] == "the inputs" and f.evidence["start_layer"] == "h0"
    assert f.evidence["per_layer_growth"] == pytest.approx((0.8 * 1.7 ** 19 / 0.4) ** (1 / 20))
    assert "explode across depth" in f.message and "h19" in f.message
    assert exploding(layers(*[1.7 ** i for i in range(20)])) != []  # integer inputs: counted from the first layer
    (f,) = exploding(layers(1.0, 50.0, np.inf), 1.0)  # overflowed
    assert f.severity is Severity.ERROR and "overflowing float32" in f.message and f.evidence["peak_layer"] == "h2"


def test_relative_error_and_floor():
    errors = gradient_check.relative_errors(np.array([1.0, -2.0, 1e-12]), np.array([1.0001, 2.0, 0.0]),
                                            grad_norm=1.0, num_params=100)
    assert errors[0] == pytest.approx(1e-4, rel=1e-3)  # |1 - 1.0001| / 1.0001
    assert errors[1] == pytest.approx(2.0)  # a sign flip
    assert errors[2] == pytest.approx(1e-12 / 0.01)  # both ~0: the floor (0.1 |g| / sqrt(n)) keeps it small


def test_output_range_readings():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.5, (4, 64, 10))
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    judge = lambda out, loss="cross_entropy": forward.output_range_findings(out, loss, True, DEFAULTS)[0]  # noqa
    assert [f.evidence["looks_like"] for f in judge(probabilities)] == ["softmax"]
    assert [f.evidence["looks_like"] for f in judge(1 / (1 + np.exp(-logits)))] == ["sigmoid"]
    assert judge(logits) == []
    assert judge(np.zeros((4, 64, 10))) == []  # a zero-initialized head gives valid (uniform) logits
    assert judge(probabilities, loss="my_nll_on_probabilities") == []  # a loss we do not know takes what it wants


def saturation_of(loss_fn, num_classes=10, shape=(64, 10), targets=np.arange(64) % 10):
    """The loss-saturation judgement of ``loss_fn`` on logits of ``shape`` (the null prediction as the model stage
    reads it: zero logits)."""
    logits = np.random.default_rng(0).normal(0, 0.1, (4, *shape)).astype(np.float32)
    confident = jax.tree.map(float, losses.confident_losses(loss_fn, num_classes, shape, jnp.float32, targets))
    null = losses.null_prediction(loss_fn, num_classes, logits, targets)
    return forward.loss_saturation_findings(confident, null, losses.output_space(logits), "user loss")


def focal(logits, y, gamma=2.0):
    p = jax.nn.softmax(logits)[jnp.arange(len(y)), y]
    return -((1 - p) ** gamma) * jnp.log(p)


def temperature_ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits / 10.0, y)


def double_sigmoid_bce(logit, y):
    return optax.sigmoid_binary_cross_entropy(jax.nn.sigmoid(logit[:, 0]), y.astype(jnp.float32))


def bce(logit, y):
    return optax.sigmoid_binary_cross_entropy(logit[:, 0], y.astype(jnp.float32))


def test_a_loss_that_squashes_logits_before_its_log_is_output_range():
    """Both directions, on the loss alone: probabilities fed to a cross-entropy on logits (softmax, or a sigmoid
    for one binary logit) level off well above 0 along confidently correct logits; cross-entropy, focal, label
    smoothing (rising), a temperature and a plain sigmoid BCE do not."""
    (f,) = saturation_of(planted.softmax_then_cross_entropy)
    assert f.id == "model.output_range" and f.severity == Severity.ERROR
    assert f.evidence["floor_fraction"] == pytest.approx(np.log(1 + 9 / np.e) / np.log(10), rel=1e-3)
    binary = np.arange(64) % 2
    (f,) = saturation_of(double_sigmoid_bce, 2, (64, 1), binary)
    assert "squashes" in f.message
    for healthy in (cross_entropy, planted.my_ce, focal, temperature_ce, planted.label_smoothed_cross_entropy):
        assert saturation_of(healthy) == [], healthy
    assert saturation_of(bce, 2, (64, 1), binary) == []
    assert saturation_of(planted.negated_cross_entropy) == []  # sign flipped: confidence does not help
    assert losses.confident_losses(mse, None, (64, 1), jnp.float32, np.zeros(64)) == {}  # regression: no logits


def test_clamped_regression_head_readings():
    """Outputs tied at one extreme at every init with targets beyond it (a ReLU head on standardized targets) are
    an error; the same head on non-negative targets, continuous outputs and classification are silent."""
    rng = np.random.default_rng(0)
    raw = rng.normal(0, 1, (4, 64, 1))
    targets = rng.normal(0, 1, 200)
    def judge(out, y, classification=False):
        return forward.clamped_output_findings(out, y, classification, DEFAULTS)

    (f,) = judge(np.maximum(raw, 0), targets)
    assert f.id == "model.output_range" and f.evidence["side"] == "below" and f.evidence["bound"] == 0
    assert f.evidence["unreachable_target_fraction"] == pytest.approx(np.mean(targets < 0))
    (f,) = judge(np.minimum(raw, 1.0), targets)  # clipped from above, targets above 1
    assert f.evidence["side"] == "above"
    assert judge(np.maximum(raw, 0), np.abs(targets)) == []  # counts, prices: a ReLU head by design
    one_open = np.maximum(raw, 0)
    one_open[2] = np.abs(raw[2]) + 0.5  # at one init every pre-activation fell on the open side: still a clamp
    assert len(judge(one_open, targets)) == 1
    assert judge(raw, targets) == []  # continuous outputs do not tie
    duplicated = raw.copy()
    duplicated[:, :8] = duplicated[:, :1] - 10  # 8 copies of one example, lowest at every init, moving with it
    assert judge(duplicated, targets) == []
    assert judge(np.maximum(raw, 0), targets, classification=True) == []


def test_initial_loss_readings():
    y = np.arange(64) % 10
    ok = forward.initial_loss_findings(np.full((4, 64), np.log(10) + 0.3), cross_entropy, 10, y, y, DEFAULTS)
    assert ok[0] == [] and ok[1]["model/expected_initial_loss"] == pytest.approx(np.log(10))
    (f,), _ = forward.initial_loss_findings(np.full((4, 64), np.log(10) + 1.5), cross_entropy, 10, y, y, DEFAULTS)
    assert f.id == "model.initial_loss" and f.evidence["excess_nats"] == pytest.approx(1.5, rel=1e-6)
    imbalanced = np.array([0] * 60 + [1] * 4)
    (f,), _ = forward.initial_loss_findings(np.full((4, 64), 3.0), cross_entropy, 2, imbalanced, imbalanced,
                                            DEFAULTS)
    assert "log(class frequency)" in f.suggestion
    targets = np.ones(64)  # E[y^2] = 1
    assert forward.initial_loss_findings(np.full((4, 64), 2.9), mse, None, targets, targets, DEFAULTS)[0] == []
    (f,), _ = forward.initial_loss_findings(np.full((4, 64), 3.5), mse, None, targets, targets, DEFAULTS)
    assert f.evidence["ratio"] == pytest.approx(3.5)
    unknown = forward.initial_loss_findings(np.full((4, 64), -7.0), planted.negated_cross_entropy, 10, y, y, DEFAULTS)
    assert unknown == ([], {"model/initial_loss": -7.0})  # no outputs to place a null prediction in: reported
    huge = forward.initial_loss_findings(np.full((4, 64), 760_000.0), cross_entropy, 10, y, y, DEFAULTS)[0]
    assert [(f.severity, f.id) for f in huge] == [(Severity.ERROR, "model.initial_loss")]
    assert "orders of magnitude" in huge[0].message


def logits_at_init(classes=10, batch=64, scale=0.1, seed=0):
    """(inits, batch, classes) logits of a well-initialized classifier."""
    return np.random.default_rng(seed).normal(0, scale, (4, batch, classes)).astype(np.float32)


def log_probability_nll(log_probabilities, y):
    return -jnp.take_along_axis(log_probabilities, y[:, None].astype(jnp.int32), 1)[:, 0]


def range_normalized_cross_entropy(logits, y):
    """Undefined (0 / 0) at every null prediction: the logits' range across classes is exactly 0 there."""
    top = logits.max(-1, keepdims=True)
    return my_ce((logits - top) / (top - logits.min(-1, keepdims=True)), y)


my_ce = planted.my_ce


def test_null_prediction_of_any_loss():
    """The user's own loss at the null prediction of the space the model's outputs live in."""
    y = np.arange(64) % 10
    logits = logits_at_init()
    softmax = np.asarray(jax.nn.softmax(logits))
    cases = {  # loss, outputs at init -> the null prediction used
        "cross-entropy on logits": (my_ce, logits, losses.ZERO_LOGITS),
        "NLL on probabilities": (planted.my_probability_nll, softmax, losses.UNIFORM_PROBABILITIES),
        "NLL on log-probabilities": (log_probability_nll, np.log(softmax), losses.UNIFORM_LOG_PROBABILITIES),
        # A model that forgot its softmax: zero "probabilities" cost 16 nats, uniform ones log C: the lower is kept.
        "NLL on probabilities, fed logits": (planted.my_probability_nll, logits, losses.UNIFORM_PROBABILITIES),
    }
    for what, (loss, outputs, name) in cases.items():
        found = losses.null_prediction(loss, 10, outputs, y)
        assert (found.name, found.cross_entropy_like) == (name, True), what
        assert found.value == pytest.approx(np.log(10), rel=1e-5), what
    # Label smoothing keeps log C at uniform predictions: still judged in nats.
    smoothed = lambda o, t: optax.softmax_cross_entropy(o, optax.smooth_labels(jax.nn.one_hot(t, 10), 0.1))  # noqa
    assert losses.null_prediction(smoothed, 10, logits, y).cross_entropy_like
    # A summed per-class binary cross-entropy is not log C there: judged by ratio.
    bce = lambda o, t: optax.sigmoid_binary_cross_entropy(o, jax.nn.one_hot(t, 10)).sum(-1)  # noqa: E731
    found = losses.null_prediction(bce, 10, logits, y)
    assert found.value == pytest.approx(10 * np.log(2), rel=1e-5) and not found.cross_entropy_like
    # Undefined at every null prediction: the best constant output, found from the model's own mean output.
    found = losses.null_prediction(range_normalized_cross_entropy, 10, logits + np.arange(10, dtype=np.float32), y)
    # (logits forced to a range of 1: no constant reaches log 10; a random search finds 2.328, one class 1 below
    # the others gives 2.337)
    assert found.name == losses.CONSTANT_MINIMUM and np.log(10) < found.value < 2.337

    # Regression: the higher of zero outputs and the target mean, which for squared error is the built-in's E[y^2].
    targets = np.random.default_rng(1).normal(3.0, 1.0, 64).astype(np.float32)
    outputs = np.zeros((4, 64, 1), np.float32)
    found = losses.null_prediction(planted.my_mse, None, outputs, targets)
    assert found.name == losses.ZERO_OUTPUTS and found.value == pytest.approx(np.mean(targets ** 2), rel=1e-5)
    assert losses.expected_initial_loss(planted.my_mse, None, targets, outputs[0]) == pytest.approx(
        losses.expected_initial_loss(mse, None, targets), rel=1e-5)
    mae = lambda o, t: jnp.abs(o[:, 0] - t)  # noqa: E731
    assert losses.null_prediction(mae, None, outputs, targets).value == pytest.approx(np.mean(np.abs(targets)))


def test_null_prediction_per_position_with_padding():
    """A user's per-position loss on (batch, T, vocabulary) outputs and padded targets (negative): log V."""
    import tasks_helpers

    targets = np.tile(np.arange(16) % 5, (8, 1))
    targets[:, 12:] = -1
    outputs = np.random.default_rng(0).normal(0, 0.1, (4, 8, 16, 7)).astype(np.float32)
    found = losses.null_prediction(tasks_helpers.token_cross_entropy, 7, outputs, targets)
    assert found.cross_entropy_like and found.value == pytest.approx(np.log(7), rel=1e-5)


def test_initial_loss_with_user_losses():
    """A user-written loss is judged like the built-in one: in nats when it behaves like cross-entropy, by ratio
    otherwise; an error when orders of magnitude off; no scale when its null value is not positive."""
    y = np.arange(64) % 10
    logits = logits_at_init()

    def judge(value, loss, outputs=logits):
        return forward.initial_loss_findings(np.full((4, 64), value), loss, 10, y, y, DEFAULTS, outputs=outputs)

    findings, metrics = judge(np.log(10) + 0.3, my_ce)
    assert findings == [] and metrics["model/expected_initial_loss"] == pytest.approx(np.log(10), rel=1e-5)
    (f,), _ = judge(np.log(10) + 1.5, my_ce)
    assert f.severity is Severity.WARNING and f.evidence["excess_nats"] == pytest.approx(1.5, rel=1e-4)
    assert f.evidence["null_prediction"] == losses.ZERO_LOGITS
    (f,), _ = judge(760_000.0, my_ce)  # the 20-layer ReLU net of issue 10
    assert f.severity is Severity.ERROR and f.evidence["ratio"] > 1e5
    softmax = np.asarray(jax.nn.softmax(logits))
    (f,), _ = judge(np.log(10) + 2.0, planted.my_probability_nll, softmax)
    assert f.severity is Severity.WARNING and f.evidence["null_prediction"] == losses.UNIFORM_PROBABILITIES
    bce = lambda o, t: optax.sigmoid_binary_cross_entropy(o, jax.nn.one_hot(t, 10)).sum(-1)  # noqa: E731
    assert judge(2.5 * 10 * np.log(2), bce)[0] == []  # 2.5x its null value: under the ratio of 3
    (f,), _ = judge(4 * 10 * np.log(2), bce)
    assert f.severity is Severity.WARNING and f.evidence["ratio"] == pytest.approx(4, rel=1e-4)
    findings, metrics = judge(-7.0, planted.negated_cross_entropy)
    assert findings == [] and metrics["model/expected_initial_loss"] == pytest.approx(-np.log(10), rel=1e-5)


def test_sign_step_moves_zero_parameters_and_keeps_zero_gradients():
    params = {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)}
    scales = noise.leaf_scales(jax.tree.leaves(params))
    assert [float(v) for v in scales] == pytest.approx([1.0, 1 / 8])  # bias (fan-in 1), kernel (fan-in 64)
    grads = {"kernel": jnp.ones((64, 10)).at[0].set(0.0), "bias": jnp.full(10, jnp.nan)}
    moved = noise.sign_step(params, grads, 0.01)
    assert np.all(np.asarray(moved["kernel"])[1:] == -0.01 / 8) and np.all(np.asarray(moved["kernel"])[0] == 0)
    assert np.all(np.asarray(moved["bias"]) == 0)  # non-finite gradients do not move
    assert np.all(np.asarray(noise.perturb(params, 0, 0.01)["kernel"]) != 0)  # a zero model is perturbed too


def test_checked_rows_spread_over_the_batch():
    assert batch_dependence.checked_rows(64, 4).tolist() == [0, 21, 42, 63]
    assert batch_dependence.checked_rows(3, 4).tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------------------------
# Activation capture.


def captured(factory, x):
    """Activations recorded from a built-in model's train-mode forward pass, as the model stage records them."""
    model = ModelFactory(factory, dict(width=8), x.shape[1:], 10, x).adapt()
    params, rest = model.init(jax.random.key(0), x)
    _, acts = capture.record_activations(lambda p, x: model.apply(p, rest, x, train=True)[0], params, x)
    return [(a.name, a.function, a.output.shape) for a in acts]


def test_capture_names_activations_after_the_layer_they_follow():
    x = jnp.ones((5, 64))
    assert captured(planted.MLP, x) == [("hidden/0", "relu", (5, 8)), ("hidden/1", "relu", (5, 8))]
    assert captured(planted.sequential, x) == [("layers/1", "relu", (5, 8)), ("layers/3", "gelu", (5, 8))]


# --------------------------------------------------------------------------------------------------------------
# The compiled stage on the reference job.


@pytest.fixture(scope="module")
def reference():
    ctx, settings = context()
    before = programs.STATS.compiles
    first = model.run(ctx, settings)
    middle = programs.STATS.compiles
    second = model.run(ctx, settings)
    return dict(outcome=first, again=second, compiles=(middle - before, programs.STATS.compiles - middle), ctx=ctx,
                settings=settings)


def test_reference_job_is_healthy_with_known_numbers(reference):
    o = reference["outcome"]
    assert problems(o) == [] and o.skipped is None
    m = o.metrics
    assert m["model/family"] == "nnx" and m["model/task"] == "classification"
    assert m["model/param_count"] == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10 == 26122
    assert m["model/param_count/hidden/0"] == 64 * 128 + 128
    assert m["model/initial_loss"] == pytest.approx(np.log(10), abs=0.25)  # LeCun output layer: near uniform
    assert m["model/expected_initial_loss"] == pytest.approx(np.log(10))
    assert set(k for k in m if k.startswith("model/grad_norm/")) == {
        f"model/grad_norm/{layer}/{p}" for layer in ("hidden/0", "hidden/1", "out") for p in ("kernel", "bias")}
    assert m["model/batch_dependence/cross_gradient"] == 0.0 and m["model/batch_dependence/own_gradient"] > 0
    assert m["model/gradient_check/relative_error"] < 1e-6  # float64: ~1e-9 measured
    for layer in ("hidden/0", "hidden/1"):  # He-initialized ReLU on digits: about 10% dead units (9-12% measured)
        assert 0 <= m[f"model/dead_fraction/{layer}"] < 0.25
    assert [row[:3] for row in o.series["model/activations"]["rows"]] == [["hidden/0", "relu", 128],
                                                                         ["hidden/1", "relu", 128]]


def test_reference_job_second_run_compiles_nothing(reference):
    first, second = reference["compiles"]
    assert first <= 2  # init program + gradient check (0 if this process compiled them already)
    assert second == 0
    assert reference["again"].metrics == reference["outcome"].metrics  # reruns of one program are bitwise equal


def test_reference_plots_draw(reference, tmp_path):
    plots = {p.name: p for p in reference["outcome"].plots}
    assert set(plots) == {"grad_norms", "activations"}
    for name, plot in plots.items():
        path = tmp_path / f"{name}.png"
        plot.draw(str(path))
        assert path.stat().st_size > 1000


def test_capture_failure_costs_only_the_unit_checks(reference, monkeypatch):
    """If recording the activations raises while tracing, the init program runs again without the recording (here
    faked with the reference's results: the fallback logic is what is tested, without another compile)."""
    real = model_programs.init_statistics
    calls = []

    def flaky(*args, with_capture=True, **kwargs):
        calls.append(with_capture)
        if with_capture:
            raise RuntimeError("cannot record")
        stats, first = real(*args, with_capture=True, **kwargs)  # cached: no compile
        return stats._replace(units={}), first

    monkeypatch.setattr(model_programs, "init_statistics", flaky)
    settings = dataclasses.replace(reference["settings"], gradient_check=False)
    outcome = model.run(reference["ctx"], settings)
    assert calls == [True, False]
    assert [(f.severity, f.id) for f in outcome.findings] == [(Severity.INFO, "model.dead_units")]
    assert "RuntimeError: cannot record" in outcome.findings[0].message
    assert outcome.metrics["model/initial_loss"] == reference["outcome"].metrics["model/initial_loss"]
    assert "model/activations" not in outcome.series and [p.name for p in outcome.plots] == ["grad_norms"]


def test_gradient_check_in_float32_precision_is_judged_as_such():
    """A model with an explicit dtype=float32 computes in float32 even on float64 inputs: the check notices (the
    loss's dtype), uses the float32 step and tolerance, and stays silent on this healthy model."""
    ctx, settings = context([model_factory("float32_compute")])
    x, y = model.sample_batch(ctx, 8)
    init = jax.jit(lambda k: tuple(ctx.problem.model.init(k, x))).lower(jax.random.key(0))
    fast = {"xla_backend_optimization_level": 0, **(model_programs.compile_options() or {})}
    params, rest = init.compile(fast)(jax.random.key(0))
    result = gradient_check.run_check(ctx.problem, params, rest, x, y, seed=0, settings=settings,
                                      opt_level=0)
    assert np.asarray(result.loss).dtype == np.float32
    findings, metrics = gradient_check.judge(result, settings, 8)
    assert findings == [] and 1e-4 < metrics["model/gradient_check/relative_error"] < gradient_check.FLOAT32_TOLERANCE


def test_the_model_stage_compiles_for_one_run(monkeypatch):
    """The model stage's programs run once: on CPU the cheaper emitter, an XLA option a compile accepts; other
    backends keep XLA's defaults."""
    options = model_programs.compile_options()
    assert options == {"xla_cpu_use_fusion_emitters": False}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert model_programs.compile_options() is None
    monkeypatch.undo()
    double = jax.jit(lambda x: 2 * x).lower(np.ones(3, np.float32)).compile(options)  # a field XLA knows
    np.testing.assert_array_equal(double(np.ones(3, np.float32)), 2)


# --------------------------------------------------------------------------------------------------------------
# Healthy setups stay silent.

HEALTHY = {
    "cnn_digits_image": (["data=digits_image", "model=cnn"], dict(gradient_check=True)),
    "mlp_wine": (["data=wine"], {}),
    "mlp_breast_cancer": (["data=breast_cancer"], {}),
    "mlp_regression": (["data=regression"], {}),
    "mlp_dropout": (["model.dropout=0.3"], {}),
    "residual_batchnorm": ([model_factory("ResidualBatchNorm")], {}),  # BatchNorm; zero-init branches
    # Deep nets initialized right: no growth, no saturation, no vanishing.
    "he_relu_20_layers": ([model_factory("deep_he_relu")], {}),
    "lecun_tanh_10_layers": ([model_factory("lecun_tanh")], {}),
    # The user's own losses: judged from their value at the null prediction, silent on a good init.
    "mlp_user_cross_entropy": ([loss_factory("my_ce")], {}),
    "mlp_user_label_smoothing": ([loss_factory("label_smoothed_cross_entropy")], {}),
    "softmax_head_user_nll_on_probabilities": ([model_factory("SoftmaxHead"), loss_factory("my_probability_nll")], {}),
    "regression_user_squared_error": (["data=regression", loss_factory("my_mse")], {}),
    "language_model_user_token_loss": ([*replace_group("data", "tasks_helpers.progressions"),
                                        *replace_group("model", "tasks_helpers.TinyCausalLM"),
                                        Planted("loss", "tasks_helpers.token_cross_entropy")], {}),
    # Other libraries as their users write them (tests/families.py, tests/sequence_models.py).
    "linen_mlp": (replace_group("model", "families.linen_mlp"), {}),
    "equinox_mlp": (replace_group("model", "equinox.nn.MLP", in_size=64, out_size=10, width_size=128, depth=2), {}),
    "haiku_mlp": (replace_group("model", "families.haiku_mlp"), {}),
    "linen_batchnorm": (replace_group("model", "families.linen_batchnorm_mlp"), {}),
    "haiku_batchnorm": (replace_group("model", "families.haiku_batchnorm_mlp"), {}),
    "equinox_cnn": ([*replace_group("model", "families.EquinoxCNN"), "data=digits_image"], {}),
    "nnx_transformer_layernorm": ([*replace_group("data", "sequence_models.lm_data"),
                                   *replace_group("model", "sequence_models.nnx_transformer")], {}),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_setups_are_silent(name):
    overrides, settings = HEALTHY[name]
    outcome, _, _ = run_stage(overrides, **settings)
    assert problems(outcome) == [], [f.message for f in outcome.findings]
    # Exactly 0 for the per-example models; the tiny causal LM shows ~5e-9, far under the check's tolerance.
    m = outcome.metrics
    assert m["model/batch_dependence/cross_gradient"] <= 1e-6 * m["model/batch_dependence/own_gradient"]
    if settings.get("gradient_check"):
        assert outcome.metrics["model/gradient_check/relative_error"] < 1e-6
    assert outcome.series["model/activations"]["rows"], "activations were captured"


# --------------------------------------------------------------------------------------------------------------
# Each finding on its planted bug: (overrides, settings, the exact errors/warnings expected, text in the message).

PLANTED = {
    "forward_raises": ([model_factory("ShapeMismatch")], {}, [("error", "model.forward")],
                       "The forward pass raised TypeError"),
    "python_branch": ([model_factory("PythonBranch")], {}, [("error", "model.forward")],
                      "The forward pass raised TracerBoolConversionError"),
    "wrong_output_shape": ([model_factory("off_by_one_head")], {}, [("error", "model.forward")],
                           "output has shape (64, 9)"),
    "loss_broadcasts": (["data=regression", loss_factory("broadcasting_square_error")], {},
                        [("error", "model.forward")], "loss returned shape (64, 64)"),
    "loss_raises": ([loss_factory("raising_loss")], {}, [("error", "model.forward")],
                    "The loss function raised ValueError"),
    "nan_outputs": ([model_factory("LogOfNegative")], {}, [("error", "model.forward")], "non-finite"),
    "double_softmax": ([model_factory("DoubleSoftmax")], {}, [("error", "model.output_range")],
                       "softmax is applied twice"),
    "large_output_init": ([model_factory("large_output_init")], {}, [("warning", "model.initial_loss")],
                          "nats above"),
    "detached_features": ([model_factory("DetachedFeatures")], {}, [("error", "model.gradient_flow")],
                          "Zero gradient for 4 of 6 parameters"),
    "nan_gradient": ([model_factory("NormOfZero")], {}, [("error", "model.gradient_flow")],
                     "Non-finite gradients at init for 1 parameter(s): offset"),
    "deep_sigmoid": ([model_factory("deep_sigmoid")], {},
                     [("warning", "model.gradient_flow"), ("warning", "model.dead_units")], "Vanishing gradients"),
    "wrong_backward": ([loss_factory("cross_entropy_wrong_backward")], dict(gradient_check=True),
                       [("error", "model.gradient_check")], "does not match the loss"),
    "reshape_not_transpose": ([model_factory("ReshapeInsteadOfTranspose")], {}, [("error", "model.batch_dependence")],
                              "Examples are mixed"),
    "softmax_over_batch": ([model_factory("SoftmaxOverBatch")], {}, [("error", "model.batch_dependence")],
                           "Examples are mixed"),
    "dead_relus": ([model_factory("negative_bias")], {},
                   [("error", "model.gradient_flow"), ("error", "model.gradient_flow"), ("error", "model.dead_units")],
                   "Every unit of hidden/0, hidden/1 is dead"),
    "saturated_tanh": (["data.pixel_scale=1", model_factory("saturated_tanh")], {},
                       [("warning", "model.saturated_units")], "|tanh| > 0.99"),
    # Issue 10: init pathologies across depth, with the built-in loss and with the user's own.
    "exploding_relu": ([model_factory("exploding_relu")], {},
                       [("error", "model.initial_loss"), ("error", "model.exploding_activations")],
                       "explode across depth"),
    "exploding_relu_user_loss": ([model_factory("exploding_relu"), loss_factory("my_ce")], {},
                                 [("error", "model.initial_loss"), ("error", "model.exploding_activations")],
                                 "orders of magnitude off"),
    "large_output_init_user_loss": ([model_factory("large_output_init"), loss_factory("my_ce")], {},
                                    [("warning", "model.initial_loss")], "nats above"),
    "confident_probabilities_user_loss": ([model_factory("softmax_large_output_init"),
                                           loss_factory("my_probability_nll")], {},
                                          [("warning", "model.initial_loss")], "of uniform probabilities"),
    "saturated_pre_activations": ([model_factory("wide_tanh")], {}, [("warning", "model.saturated_units")],
                                  "hidden/1 (tanh): 6"),
    "loss_mixes_targets": (["data=regression", loss_factory("broadcast_mean_square_error")], {},
                           [("warning", "model.batch_dependence")], "The loss mixes examples"),
    "softmax_inside_user_loss": ([loss_factory("softmax_then_cross_entropy")], {},
                                 [("error", "model.output_range")], "squashes the model's logits"),
    "relu_on_regression_head": (["data=regression", model_factory("ReluHead")], {},
                                [("error", "model.output_range")], "outputs are clamped at 0"),
    "zero_init_mlp": ([model_factory("zero_mlp")], {},
                      [("error", "model.gradient_flow"), ("error", "model.gradient_flow"),
                       ("warning", "model.dead_units")], "all zero at init"),
}


# The cause each planted bug's report must headline (harness.causes): e.g. the explosion, not the initial loss it
# causes; the zero-initialized layers, not the dead units they make.
HEADLINE = {
    **{name: "model.forward" for name in ("forward_raises", "python_branch", "wrong_output_shape", "loss_broadcasts",
                                          "loss_raises", "nan_outputs")},
    "double_softmax": "model.output_range", "large_output_init": "model.initial_loss",
    "detached_features": "model.gradient_flow", "nan_gradient": "model.gradient_flow",
    "deep_sigmoid": "model.dead_units", "wrong_backward": "model.gradient_check",
    "reshape_not_transpose": "model.batch_dependence", "softmax_over_batch": "model.batch_dependence",
    "dead_relus": "model.dead_units", "saturated_tanh": "model.saturated_units",
    "exploding_relu": "model.exploding_activations", "exploding_relu_user_loss": "model.exploding_activations",
    "large_output_init_user_loss": "model.initial_loss", "confident_probabilities_user_loss": "model.initial_loss",
    "saturated_pre_activations": "model.saturated_units", "zero_init_mlp": "model.gradient_flow",
    "loss_mixes_targets": "model.batch_dependence",
    "softmax_inside_user_loss": "model.output_range", "relu_on_regression_head": "model.output_range",
}


@functools.cache
def planted_outcome(name):
    """The model stage's outcome on one planted bug, computed once per test process (whichever test asks first)."""
    overrides, settings, _, _ = PLANTED[name]
    return run_stage(overrides, **settings)[0]


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_bug_fires(name):
    _, _, expected, text = PLANTED[name]
    outcome = planted_outcome(name)
    assert sorted(problems(outcome)) == sorted(expected), [f.message for f in outcome.findings]
    assert any(text in f.message for f in outcome.findings), [f.message for f in outcome.findings]
    assert headline(outcome.findings) == HEADLINE[name]
    for f in outcome.findings:
        assert f.id in FINDING_IDS and f.suggestion and f.evidence


def test_forward_error_blocks_training_and_names_the_line():
    outcome, _, _ = run_stage([model_factory("ShapeMismatch")])
    (f,) = outcome.findings
    assert BLOCKING["model.forward"] == "training"
    assert f.evidence["exception"] == "TypeError" and f.evidence["location"].split(":")[0].endswith("planted.py")
    assert f.evidence["stage"] == "the forward pass"
    assert outcome.metrics["model/param_count"] > 0  # counted from the abstract model, before anything ran


def test_zero_initialized_linear_model_is_healthy():
    """Softmax regression from zero weights trains (zero init only fails to break the symmetry of hidden units): no
    "no signal flows" error, although its outputs are identical at init."""
    outcome, _, _ = run_stage([model_factory("zero_linear")])
    assert problems(outcome) == [], [f.message for f in outcome.findings]
    assert outcome.metrics["model/param_count"] == 64 * 10 + 10


def test_init_pathology_evidence():
    exploding = next(f for f in planted_outcome("exploding_relu").findings if f.id == "model.exploding_activations")
    # Kernels of N(0, 0.3^2) on 64 inputs: a gain of 0.3 * sqrt(64 / 2) = 1.7 per ReLU layer, from the inputs on.
    assert (exploding.evidence["start"], exploding.evidence["start_layer"]) == ("the inputs", "hidden/0")
    assert exploding.evidence["peak_layer"] == "hidden/19" and exploding.evidence["growth"] > 1e3
    assert 1.5 < exploding.evidence["per_layer_growth"] < 1.9
    loss = next(f for f in planted_outcome("exploding_relu_user_loss").findings if f.id == "model.initial_loss")
    builtin = next(f for f in planted_outcome("exploding_relu").findings if f.id == "model.initial_loss")
    assert loss.evidence["expected"] == pytest.approx(np.log(10), rel=1e-5)  # the user's loss at zero logits
    assert loss.evidence["initial_loss"] == pytest.approx(builtin.evidence["initial_loss"], rel=1e-4)
    (saturated,) = planted_outcome("saturated_pre_activations").findings
    assert list(saturated.evidence["preactivation_layers"]) == ["hidden/1"] and saturated.evidence["layers"] == {}
    zero = next(f for f in planted_outcome("zero_init_mlp").findings if "Zero gradient" in f.message)
    assert {"hidden/0/kernel", "hidden/1/kernel", "out/kernel"} <= set(zero.evidence["zero_initialized"])
    assert "out/bias" not in zero.evidence["parameters"]  # the output bias learns: the only thing that does


def test_planted_evidence_numbers():
    planted_outcomes = {name: planted_outcome(name) for name in ("deep_sigmoid", "dead_relus", "wrong_backward")}
    (grad,) = [f for f in planted_outcomes["deep_sigmoid"].findings if f.id == "model.gradient_flow"]
    assert "hidden/0" in grad.evidence["layers"] and grad.evidence["layers"]["hidden/0"] < 1e-2
    (dead,) = [f for f in planted_outcomes["dead_relus"].findings if f.id == "model.dead_units"]
    assert dead.evidence["worst_fraction"] == 1.0
    constant = [f for f in planted_outcomes["dead_relus"].findings if "identical for every example" in f.message]
    assert constant and constant[0].evidence["dead_layers"] == ["hidden/0", "hidden/1"]
    (check,) = planted_outcomes["wrong_backward"].findings
    assert check.evidence["precision"] == "float64" and min(check.evidence["relative_errors"]) > 0.01


# --------------------------------------------------------------------------------------------------------------
# Configuration.


def test_yaml_lists_exactly_the_settings_with_a_comment_each():
    import os

    import yaml

    path = os.path.join(config_dir(), "diagnostics", "model", "default.yaml")
    with open(path) as f:
        text = f.read()
    keys = yaml.safe_load(text)
    assert list(keys) == [f.name for f in dataclasses.fields(model.Settings)]
    assert keys == dataclasses.asdict(model.Settings())
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert "#" in line, f"no comment: {line}"


@pytest.mark.parametrize("key,value", [("batch_size", 1), ("init_seeds", 0), ("saturation_level", 0.3),
                                       ("gradient_check_tolerance", 0.0), ("max_initial_loss_ratio", 1.0),
                                       ("dead_unit_fraction", 1.5)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(HarnessError) as err:
        settings_from(model.Settings, {key: value}, "diagnostics.model")
    assert f"diagnostics.model.{key}" in str(err.value)


def test_a_gradient_leafs_summary_is_its_norm_and_whether_it_is_all_zero_and_all_finite():
    """The init program's per-leaf statistics, one variadic reduction each, against what each is on its own."""
    rng = np.random.default_rng(0)
    leaves = [rng.normal(size=(7, 5)).astype(np.float32), np.zeros((3,), np.float32),
              np.array([1.0, np.nan], np.float32), np.array(2.5, np.float32),
              jnp.asarray(rng.normal(size=(4, 4)), jnp.bfloat16), np.array([0.0, -0.0, 3.0], np.float32)]
    for leaf in leaves:
        norm, zero, finite = jax.jit(model_programs.leaf_summary)(leaf)
        expected = float(optax.tree.norm(jnp.asarray(leaf, jnp.float32)))
        if np.isfinite(expected):
            np.testing.assert_allclose(float(norm), expected, rtol=1e-6)
        else:
            assert np.isnan(float(norm))
        assert bool(zero) == bool(np.all(np.asarray(leaf, np.float32) == 0))
        assert bool(finite) == bool(np.all(np.isfinite(np.asarray(leaf, np.float32))))
    batched = jax.vmap(model_programs.leaf_summary)(np.stack([leaves[0], np.zeros_like(leaves[0])]))
    assert [bool(z) for z in batched[1]] == [False, True]
