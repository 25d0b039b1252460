"""The monitor's trend detectors (harness.monitor.detectors: divergence, oscillation, plateau) and the learning rates
they suggest, proved both ways: each fires on its planted learning-rate bug, the suggested rate trains without it,
and healthy runs (Adam, AdamW with a warm-up and cosine decay, SGD with momentum; two seeds each) give no finding at
all, with or without the learning rate known to the monitor."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_monitor import batches, digits, init_mlp, make_chunk  # noqa: F401  (digits: the fixture)

import harness.monitor as hm
from harness.data import builtin, dataset
from harness.monitor import detectors

STEPS = 600
TRENDS = ("train.divergence", "train.oscillation", "train.plateau")


def train(tx, x, y, learning_rate=None, seed=0, steps=STEPS, chunk=100):
    """The user's loop on the digits MLP (test_monitor's), seeded for the init and the batches alike."""
    params = init_mlp(jax.random.key(seed))
    opt_state = tx.init(params)
    watch = hm.Monitor(params, learning_rate=learning_rate)
    xs, ys = batches(x, y, steps, seed=seed)
    step_chunk = make_chunk(tx)
    for start in range(0, steps, chunk):
        (params, opt_state), _ = step_chunk(params, opt_state, xs[start:start + chunk], ys[start:start + chunk])
        watch.read(opt_state)
    return watch


@pytest.fixture(scope="module")
def regression():
    x, y, *_ = dataset.from_mapping(builtin.regression()).training_arrays()
    return np.asarray(x, np.float32), np.asarray(y, np.float32)


def train_linear(tx, x, y, learning_rate=None, seed=0, steps=STEPS):
    """A user's own model and loss: linear regression, mean squared error, one jitted scan."""
    params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
    idx = np.random.default_rng(seed).integers(0, len(x), (steps, 64))

    def mse(p, xb, yb):
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    @jax.jit
    def loop(params, opt_state, xs, ys):
        def body(carry, batch):
            p, s = carry
            value, grads = jax.value_and_grad(mse)(p, *batch)
            updates, s = tx.update(grads, s, p, value=value)
            return (optax.apply_updates(p, updates), s), value

        return jax.lax.scan(body, (params, opt_state), (xs, ys))

    (params, opt_state), _ = loop(params, tx.init(params), jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    watch = hm.Monitor(params, learning_rate=learning_rate)
    watch.read(opt_state)  # history=steps: one read at the end
    return watch


def only(watch, fid):
    found = [f for f in watch.findings() if f.id in TRENDS]
    assert [f.id for f in found] == [fid], [f.message for f in found]
    return found[0]


HEALTHY = {
    "adam": (lambda: optax.adam(1e-3), 1e-3),
    "adamw_warmup_cosine": (lambda s: optax.adamw(s), optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, STEPS)),
    "sgd_momentum": (lambda: optax.sgd(0.05, momentum=0.9), 0.05),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_runs_give_no_finding(digits, name, seed):
    x, y = digits
    make, lr = HEALTHY[name]
    tx = make(lr) if callable(lr) else make()
    watch = train(hm.monitor(tx), x, y, learning_rate=lr, seed=seed)
    assert watch.findings() == []
    [s] = watch.series()
    assert detectors.detect(dataclasses.replace(s, lr=None)) == []  # the LR unknown: decay read from the updates


def test_a_warmup_past_the_stable_rate_diverges_at_the_named_step_and_the_suggested_rate_trains(digits):
    """SGD with momentum, the LR warmed up linearly to 2.0 over 400 steps: the loss falls, then the growing LR passes
    the stable range (held constant, 0.05-0.3 trains this MLP and 0.4 collapses it) and the network collapses to the
    label prior's entropy. The named step is the loss's lowest, before the LR at which it diverged."""
    x, y = digits
    schedule = optax.linear_schedule(0.0, 2.0, 400)
    watch = train(hm.monitor(optax.sgd(schedule, momentum=0.9)), x, y, learning_rate=schedule)
    found = only(watch, "train.divergence")
    e = found.evidence
    assert found.severity.value == "error" and f"step {e['step']}" in found.message
    assert 0 < e["step"] < 400 and e["lr_at_turn"] == pytest.approx(float(schedule(e["step"])))
    assert e["loss_at_turn"] < e["start_loss"] / 2 and e["final_loss"] > e["start_loss"]  # learned, then blew up
    # The LR at which it diverged: where the smoothed loss first passed twice its lowest, after the turn.
    [s] = watch.series()
    smooth = detectors._running_median(s.loss)
    diverged_at = e["step"] + int(np.argmax(smooth[e["step"]:] > 2 * e["loss_at_turn"]))
    assert e["suggested_lr"] < e["lr_at_turn"] < float(schedule(diverged_at))
    assert "about 0.024" in found.suggestion
    # The suggested rate, held constant, trains: no finding at all.
    suggested = e["suggested_lr"]
    assert train(hm.monitor(optax.sgd(suggested, momentum=0.9)), x, y, learning_rate=suggested).findings() == []


def test_a_warmup_to_a_peak_adam_cannot_hold_diverges(digits):
    x, y = digits
    schedule = optax.linear_schedule(0.0, 0.2, 100)
    e = only(train(hm.monitor(optax.adam(schedule)), x, y, learning_rate=schedule), "train.divergence").evidence
    assert e["final_loss"] > 2 * e["loss_at_turn"] and e["lost_fraction"] > 0.5
    assert e["suggested_lr"] == pytest.approx(0.1 * float(schedule(e["step"]))) and e["suggested_lr"] < 0.2


def test_a_learning_rate_far_too_low_is_a_plateau_with_a_higher_rate_suggested(digits):
    x, y = digits
    # The plateau is judged on the update/parameter ratio: without update norms (the default statistics) it is
    # not called, and nothing else is said about the run in its place.
    assert train(hm.monitor(optax.adam(1e-6)), x, y, learning_rate=1e-6).findings() == []
    watch = train(hm.monitor(optax.adam(1e-6), update_norms=True), x, y, learning_rate=1e-6)
    found = only(watch, "train.plateau")
    e = found.evidence
    assert found.severity.value == "warning" and e["update_ratio"] < detectors.TINY_RATIO
    assert e["layers"] == ["dense0/kernel", "dense1/kernel", "dense2/kernel"]  # the biases grew from zero
    assert 1e-4 < e["suggested_lr"] < 1e-3 and e["suggested_lr"] == pytest.approx(1e-6 * e["lr_factor"])
    # Unknown LR: the factor, no value.
    [s] = watch.series()
    [unknown] = [f for f in detectors.detect(dataclasses.replace(s, lr=None)) if f.id == "train.plateau"]
    assert unknown.evidence["suggested_lr"] is None and f"about {e['lr_factor']:.0f}x" in unknown.suggestion
    # The suggested rate trains: no finding, and the loss falls far below the plateau.
    trained = train(hm.monitor(optax.adam(e["suggested_lr"]), update_norms=True), x, y,
                    learning_rate=e["suggested_lr"])
    assert trained.findings() == [] and np.median(trained.series()[0].loss[-50:]) < 0.1 * e["loss"]


def test_plain_sgd_at_the_edge_of_stability_oscillates(digits):
    """Plain SGD at 1.0 on the MLP: it neither learns (the loss swings around 1.2) nor collapses. At the edge of
    stability the trajectory is chaotic, and another CPU's rounding takes another one: on AVX2 machines the same
    run swings down to 0.34 by its end, and then no trend may be called."""
    x, y = digits
    watch = train(hm.monitor(optax.sgd(1.0)), x, y, learning_rate=1.0)
    loss = watch.series()[0].loss
    if np.median(loss[-50:]) < 0.5 * np.median(loss[:50]):  # it learned: no oscillation to call
        assert [f.id for f in watch.findings() if f.id in TRENDS] == []
        return
    found = only(watch, "train.oscillation")
    e = found.evidence
    assert found.severity.value == "warning" and e["step"] == 400 and e["final_step"] == STEPS - 1
    assert e["autocorrelation"] > detectors.OSC_AUTOCORR and e["suggested_lr"] == 0.5


def test_a_linear_model_at_the_edge_of_stability_oscillates_and_half_the_rate_does_not(regression):
    """A user's own model and loss: least squares with plain SGD at 0.75, near its stability limit (0.9 overflows);
    the loss bursts above its floor (0.1) for runs of steps. At the suggested half, it is silent."""
    x, y = regression
    found = only(train_linear(hm.monitor(optax.sgd(0.75), history=STEPS), x, y, 0.75), "train.oscillation")
    assert found.evidence["suggested_lr"] == 0.375 and found.evidence["loss"] > 0.15
    calm = train_linear(hm.monitor(optax.sgd(0.375), history=STEPS), x, y, 0.375)
    assert not [f for f in calm.findings() if f.id in TRENDS]


def test_a_linear_model_warmed_up_past_its_limit_overflows_and_diverges(regression):
    """The finite steps before the overflow already show the loss blowing up from its lowest: both findings, the
    divergence with the LR to use."""
    x, y = regression
    schedule = optax.linear_schedule(0.0, 2.0, 400)
    watch = train_linear(hm.monitor(optax.sgd(schedule), history=STEPS), x, y, schedule)
    by_id = {f.id: f for f in watch.findings()}
    assert {"train.nonfinite", "train.divergence"} <= set(by_id)
    e = by_id["train.divergence"].evidence
    assert e["step"] < e["final_step"] < by_id["train.nonfinite"].evidence["step"]
    assert e["suggested_lr"] == pytest.approx(0.1 * float(schedule(e["step"])))


def test_the_learning_rate_is_read_per_step_from_a_schedule():
    steps = np.arange(0, 300, 7)
    warm = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 50, 300)
    np.testing.assert_allclose(hm.learning_rates(warm, steps), [float(warm(i)) for i in steps], rtol=1e-4)

    def scalar_only(step):  # a schedule written for one step at a time
        return 1e-3 if step < 100 else 1e-4

    np.testing.assert_allclose(hm.learning_rates(scalar_only, steps), np.where(steps < 100, 1e-3, 1e-4))
    assert hm.learning_rates(None, steps) is None
    np.testing.assert_array_equal(hm.learning_rates(3e-4, steps), np.full(steps.shape, 3e-4))
