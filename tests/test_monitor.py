"""The training monitor in a user's own loop (harness.monitor): the wrapped optimizer's updates are unchanged, the
statistics survive jit, lax.scan chunks and vmap, and each detector fires on its planted failure, naming the step
and the layer, and stays silent on healthy runs: a warm-up and a decaying learning rate, and 2000 steps whose late
batches stand out of a quiet window."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import harness.monitor as hm
from harness.data import builtin, dataset

BATCH = 64


@pytest.fixture(scope="module")
def digits():
    ds = dataset.from_mapping(builtin.digits())
    x, y, *_ = ds.training_arrays()
    return np.asarray(x, np.float32), np.asarray(y, np.int32)


def init_mlp(key, sizes=(64, 64, 64, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"dense{i}": {"kernel": jax.random.normal(k, (a, b)) * np.sqrt(2 / a), "bias": jnp.zeros(b)}
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def forward(params, x, cut=None):
    h = x
    for i in range(len(params)):
        layer = params[f"dense{i}"]
        if cut == i:  # planted: this layer's parameters are cut off from the loss
            layer = jax.lax.stop_gradient(layer)
        h = h @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def stable_ce(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def naive_ce(logits, y):  # planted: log of a probability that can underflow to exactly 0
    return -jnp.mean(jnp.log(jnp.take_along_axis(jax.nn.softmax(logits), y[:, None], axis=1)))


def batches(x, y, steps, seed=0, outlier_step=None, outlier_scale=1.0, corrupt_labels=False, batch=BATCH):
    """Random batches; ``outlier_step``'s inputs scaled by ``outlier_scale`` (and its labels shifted by one class
    with ``corrupt_labels``: a corrupted shard)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), (steps, batch))
    xs, ys = x[idx], y[idx]
    if outlier_step is not None:
        xs[outlier_step] *= outlier_scale
        if corrupt_labels:
            ys[outlier_step] = (ys[outlier_step] + 1) % 10
    return jnp.asarray(xs), jnp.asarray(ys)


def make_chunk(tx, loss=stable_ce, cut=None):
    """The user's own training loop: a jitted lax.scan over a chunk of batches."""

    @jax.jit
    def chunk(params, opt_state, xs, ys):
        def body(carry, batch):
            params, opt_state = carry
            value, grads = jax.value_and_grad(lambda p: loss(forward(p, batch[0], cut), batch[1]))(params)
            updates, opt_state = tx.update(grads, opt_state, params, value=value)
            return (optax.apply_updates(params, updates), opt_state), value

        return jax.lax.scan(body, (params, opt_state), (xs, ys))

    return chunk


def run(tx, x, y, steps=400, chunk=100, loss=stable_ce, cut=None, **batch_kwargs):
    """Train in chunks of ``chunk`` steps, reading the monitor between chunks (the way a scan-based loop would)."""
    params = init_mlp(jax.random.key(0))
    opt_state = tx.init(params)
    watch = hm.Monitor(params)
    xs, ys = batches(x, y, steps, **batch_kwargs)
    step_chunk = make_chunk(tx, loss, cut)
    for start in range(0, steps, chunk):
        (params, opt_state), _ = step_chunk(params, opt_state, xs[start:start + chunk], ys[start:start + chunk])
        watch.read(opt_state)
    return watch


def ids(watch):
    return [f.id for f in watch.findings()]


@pytest.mark.parametrize("update_norms", [False, True])
def test_updates_are_the_inner_optimizers_and_the_statistics_are_right(digits, update_norms):
    x, y = digits
    params = init_mlp(jax.random.key(0))
    xs, ys = batches(x, y, 30)
    plain, watched = optax.adam(1e-3), hm.monitor(optax.adam(1e-3), update_norms=update_norms)
    (p1, _), _ = make_chunk(plain)(params, plain.init(params), xs, ys)
    (p2, state), losses = make_chunk(watched)(params, watched.init(params), xs, ys)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)  # bitwise: the monitor only reads
    watch = hm.Monitor(params)
    assert watch.read(state) == 30 and watch.read(state) == 0
    [s] = watch.series()
    assert watch.paths == ["dense0/bias", "dense0/kernel", "dense1/bias", "dense1/kernel", "dense2/bias",
                           "dense2/kernel"]
    np.testing.assert_allclose(s.loss, losses, rtol=1e-6)
    grads = jax.grad(lambda p: stable_ce(forward(p, xs[0]), ys[0]))(params)
    np.testing.assert_allclose(s.layer_grad_norm[0], [np.linalg.norm(g) for g in jax.tree.leaves(grads)], rtol=1e-5)
    np.testing.assert_allclose(s.grad_norm[0], np.sqrt(np.sum(s.layer_grad_norm[0] ** 2)), rtol=1e-6)
    np.testing.assert_allclose(s.layer_param_norm[0], [np.linalg.norm(p) for p in jax.tree.leaves(params)],
                               rtol=1e-6)
    assert np.all(s.layer_nonfinite == 0)
    if not update_norms:  # not a default statistic: NaN, never a made-up value
        assert np.all(np.isnan(s.layer_update_norm))
        return
    # Adam's first step moves every entry by the LR (m/sqrt(v) = sign(g) when no gradient entry is 0).
    first = [np.linalg.norm(np.where(g != 0, 1e-3, 0.0)) for g in jax.tree.leaves(grads)]
    np.testing.assert_allclose(s.layer_update_norm[0], first, rtol=1e-3)


def test_a_healthy_run_with_warmup_and_decay_is_silent(digits):
    x, y = digits
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=50, decay_steps=600)
    assert ids(run(hm.monitor(optax.adamw(schedule)), x, y, steps=600)) == []
    assert ids(run(hm.monitor(optax.sgd(0.05, momentum=0.9)), x, y, steps=400)) == []


def test_log0_in_a_hand_written_loss_late_in_training_is_nonfinite_at_its_step(digits):
    """A corrupted batch at step 300 (inputs x1e4, labels wrong) drives the logits so far that the naive loss's
    softmax gives the labelled class exactly 0: log(0)."""
    x, y = digits
    corrupted = dict(outlier_step=300, outlier_scale=1e4, corrupt_labels=True)
    watch = run(hm.monitor(optax.adam(1e-3)), x, y, loss=naive_ce, **corrupted)
    [first] = watch.findings()
    assert first.id == "train.nonfinite" and first.severity.value == "error"
    assert first.evidence["step"] == 300 and first.evidence["stage"] == "forward pass or loss"
    assert first.evidence["last_finite_step"] == 299 and "step 300" in first.message
    # The stable loss on the same batches stays finite: the spike is all that is left to see.
    stable = run(hm.monitor(optax.adam(1e-3)), x, y, **corrupted)
    assert "train.nonfinite" not in ids(stable) and "train.loss_spike" in ids(stable)


def test_a_gradient_spike_names_its_step_and_layer(digits):
    x, y = digits
    watch = run(hm.monitor(optax.adam(1e-3)), x, y, outlier_step=250, outlier_scale=30.0)
    spike = next(f for f in watch.findings() if f.id == "train.grad_spike")
    assert spike.severity.value == "warning" and spike.evidence["step"] == 250
    assert spike.evidence["layer"] in watch.paths and spike.evidence["grad_norm"] > 5 * spike.evidence["median_before"]


# Healthy 2000-step runs on which the spike rule's local gates alone (50-step window, robust z > 5 on a log scale)
# called spikes: late in training most batches are fit to a loss near 0 and a batch holding one example the model
# still gets wrong stands 5-25x above the window's median loss (RMSProp at batch 128: also its gradient, 30x).
LONG_HEALTHY = {
    "rmsprop_batch128": (lambda: optax.rmsprop(1e-3), 128),  # loss at steps 1176 and 1685, gradient at 1685
    "rmsprop_batch32": (lambda: optax.rmsprop(1e-3), 32),  # loss at 1642, 1684, 1698
    "sgd_batch32": (lambda: optax.sgd(0.1), 32),  # loss at 1560, 1698
    "sgd_momentum_batch128": (lambda: optax.sgd(0.05, momentum=0.9), 128),  # loss at 424
}
LONG_STEPS = 2000


@pytest.mark.parametrize("name", list(LONG_HEALTHY))
def test_long_healthy_runs_are_silent_though_single_batches_stand_out_of_their_window(digits, name):
    """Those batches recur through a healthy run, each far below the highest loss and gradient the run recorded
    before it: no spike, and no finding of any detector."""
    x, y = digits
    make, batch = LONG_HEALTHY[name]
    watch = run(hm.monitor(make()), x, y, steps=LONG_STEPS, chunk=250, batch=batch)
    assert watch.findings() == []
    [s] = watch.series()
    loss = hm.detectors.spike_stats(s.loss, hm.detectors.LOSS_SPIKE_FACTOR)
    grad = hm.detectors.spike_stats(s.grad_norm, hm.detectors.GRAD_SPIKE_FACTOR)
    assert loss["local"].size  # the window alone would have called a spike: the false alarm this run covers
    assert loss["record"].max() < hm.detectors.SPIKE_RECORD / 10  # measured: at most 0.05 of the highest before
    if name == "rmsprop_batch128":
        # Measured: 0.063 on an AVX-512 machine, 0.33 on an AVX2 one (another rounding, another trajectory).
        assert grad["local"].size and grad["record"].max() < hm.detectors.SPIKE_RECORD / 4


@pytest.mark.parametrize("inputs", [30.0, 1.0])
def test_a_late_outlier_batch_is_a_spike_at_its_step(digits, inputs):
    """The first healthy run above with one corrupted batch at step 1500 (labels shifted by one class, inputs x30
    or intact): both spikes at that step, the only ones, and nothing else. The labels alone give a loss 9.6x and a
    gradient norm 6.9x the highest the run had recorded (inputs x30: 281x and 200x)."""
    x, y = digits
    make, batch = LONG_HEALTHY["rmsprop_batch128"]
    watch = run(hm.monitor(make()), x, y, steps=LONG_STEPS, chunk=250, batch=batch, outlier_step=1500,
                outlier_scale=inputs, corrupt_labels=True)
    found = {f.id: f for f in watch.findings()}
    assert set(found) == {"train.loss_spike", "train.grad_spike"}
    for f in found.values():
        assert f.evidence["step"] == 1500 and f.evidence["spikes"] == 1 and "step 1500" in f.message
    loss, grad = found["train.loss_spike"].evidence, found["train.grad_spike"].evidence
    assert loss["loss"] > 4 * loss["highest_before"] and grad["grad_norm"] > 3 * grad["highest_before"]
    assert loss["highest_before_step"] < 1500 and "the highest before it" in found["train.loss_spike"].message


def test_a_spike_is_judged_against_the_highest_value_before_it_and_repeats_count():
    """On recorded statistics: a quiet loss near 0 after a start at 2; a step at 100x the window's median but below
    the start is no spike; two steps at 3x the start are two spikes (the first left out of the second's
    reference)."""
    steps = 400
    loss = np.concatenate([np.linspace(2.0, 0.01, 100), np.full(steps - 100, 0.01)])
    loss *= np.exp(np.random.default_rng(0).normal(0, 0.1, steps))
    loss[200] = 1.0  # 100x the median: the window alone calls it
    n = 2
    series = hm.Series(np.arange(steps), loss, np.ones(steps, bool), np.ones(steps), np.ones((steps, n)),
                       np.ones((steps, n)), np.full((steps, n), 1e-3), np.zeros((steps, n), int), ["a", "b"])
    stats = hm.detectors.spike_stats(loss, hm.detectors.LOSS_SPIKE_FACTOR)
    assert 200 in stats["local"] and hm.detectors.detect(series) == []
    loss[250] = loss[320] = 3 * loss[:100].max()
    [spike] = hm.detectors.detect(series)
    assert spike.id == "train.loss_spike" and spike.evidence["spike_steps"] == [250, 320]
    assert spike.evidence["highest_before_step"] < 100


def test_a_validation_overflow_is_judged_with_training_first_and_hides_no_overfitting():
    """On recorded statistics: the validation loss falls, then is inf at every evaluation after step 250 (steps
    299, 349, 399). Training finite: one train.nonfinite on the validation split at step 299, and the inf
    validations raise no overfitting.
    Training going NaN later (step 300): the training's own finding, at its step, and still no overfitting."""
    steps, n = 400, 2
    loss = np.linspace(2.0, 0.5, steps) * np.exp(np.random.default_rng(0).normal(0, 0.02, steps))

    def series(train_loss, grad_norm):
        val_steps = np.arange(49, steps, 50)
        val = np.where(val_steps >= 250, np.inf, np.linspace(2.0, 0.6, val_steps.size))
        return hm.Series(np.arange(steps), train_loss, np.ones(steps, bool), grad_norm, np.ones((steps, n)),
                         np.ones((steps, n)), np.full((steps, n), 1e-3), np.zeros((steps, n), int), ["a", "b"],
                         val_steps=val_steps, val_loss=val)

    [found] = hm.detectors.detect(series(loss, np.ones(steps)))
    assert found.id == "train.nonfinite" and found.evidence["split"] == "validation"
    assert found.evidence["step"] == 299 and found.evidence["last_finite_step"] == 249
    assert found.evidence["nonfinite_validations"] == 3 and found.evidence["validations"] == 8
    late_nan, grad = loss.copy(), np.ones(steps)
    late_nan[350:] = grad[350:] = np.nan
    [found] = hm.detectors.detect(series(late_nan, grad))
    assert found.id == "train.nonfinite" and "split" not in found.evidence and found.evidence["step"] == 350


@pytest.mark.parametrize("update_norms", [False, True])  # from the parameter norms / from the update norms
def test_frozen_layers_are_named_with_why(digits, update_norms):
    x, y = digits
    labels = {f"dense{i}": {"kernel": "freeze" if i == 1 else "train", "bias": "train"} for i in range(3)}
    masked = hm.monitor(optax.multi_transform({"train": optax.adam(1e-3), "freeze": optax.set_to_zero()}, labels),
                        update_norms=update_norms)
    [finding] = run(masked, x, y, steps=200).findings()
    assert finding.id == "train.update_ratio" and finding.evidence["not_applied"] == ["dense1/kernel"]
    cut = hm.monitor(optax.adam(1e-3), update_norms=update_norms)
    [cut] = run(cut, x, y, steps=200, cut=2).findings()  # stop_gradient on dense2
    assert cut.evidence["no_gradient"] == ["dense2/bias", "dense2/kernel"] and "receive no gradient" in cut.message


def test_a_layer_learning_far_too_fast_is_named():
    """Judged on recorded statistics: on the digits MLP even plain SGD at 10 on one layer stays near 1e-2 (the
    loss falls, and the gradient with it), so sustained ratios above 0.1 are rare and worth naming."""
    n, steps = 3, np.arange(60)
    param = np.ones((60, n))
    update = np.tile([1e-3, 0.5, 2e-3], (60, 1))
    series = hm.Series(steps, np.linspace(2, 1, 60), np.ones(60, bool), np.ones(60), np.ones((60, n)), param,
                       update, np.zeros((60, n), int), ["a", "b", "c"])
    [finding] = hm.detectors.detect(series)
    assert finding.id == "train.update_ratio" and finding.evidence["layers"] == ["b"]
    assert finding.evidence["ratio"] == pytest.approx(0.5)
    series.layer_update_norm = np.full((60, n), 1e-3)
    assert hm.detectors.detect(series) == []


def test_vmapped_members_are_read_as_runs_of_their_own(digits):
    x, y = digits
    tx = hm.monitor(optax.adam(1e-3))
    xs, ys = batches(x, y, 300)
    scale = jnp.ones((2, 300, 1, 1)).at[1, 200].set(1e4)  # member 1 meets the outlier batch at step 200
    params = jax.vmap(init_mlp)(jax.random.split(jax.random.key(0), 2))
    states = jax.vmap(tx.init)(params)
    chunk = make_chunk(tx, naive_ce)
    (params, states), _ = jax.vmap(chunk, in_axes=(0, 0, 0, None))(params, states, xs * scale, ys)
    watch = hm.Monitor(jax.tree.map(lambda a: a[0], params))
    watch.read(states)
    assert len(watch.series()) == 2
    [finding] = watch.findings()
    assert finding.id == "train.nonfinite" and finding.message.startswith("member 1: ")
    assert finding.evidence["step"] == 200


def test_steps_overwritten_before_a_read_are_reported(digits):
    x, y = digits
    tx = hm.monitor(optax.adam(1e-3), history=16)
    params = init_mlp(jax.random.key(0))
    xs, ys = batches(x, y, 40, outlier_step=39, outlier_scale=1e4)
    (params, state), _ = make_chunk(tx, naive_ce)(params, tx.init(params), xs, ys)
    watch = hm.Monitor(params)
    assert watch.read(state) == 16 and watch.lost == [(0, 24)]
    [finding] = watch.findings()
    assert finding.evidence["step"] == 39 and finding.evidence["steps_not_read"] == [[0, 24]]
    with pytest.raises(ValueError, match="harness.monitor.monitor"):
        hm.Monitor().read(optax.adam(1e-3).init(params))


def val_loss_fn(params, x, y):
    return float(stable_ce(forward(params, x), y))


def test_overfitting_names_the_step_where_validation_turned(digits):
    """64 training examples, a 256-wide MLP, 1500 steps: it memorizes them and the validation loss turns up; on the
    whole training set the same run is silent."""
    x, y = digits
    x_val, y_val = jnp.asarray(x[1000:]), jnp.asarray(y[1000:])

    def watched(n_train, steps=1500):
        tx = hm.monitor(optax.adam(1e-3))
        params = init_mlp(jax.random.key(0), (64, 256, 256, 10))
        opt_state = tx.init(params)
        watch = hm.Monitor(params)
        xs, ys = batches(x[:n_train], y[:n_train], steps)
        chunk = make_chunk(tx)
        for start in range(0, steps, 100):
            (params, opt_state), _ = chunk(params, opt_state, xs[start:start + 100], ys[start:start + 100])
            watch.read(opt_state)
            watch.validation(val_loss_fn(params, x_val, y_val))
        return watch

    small = watched(64)
    [finding] = [f for f in small.findings() if f.id == "train.overfitting"]
    assert finding.severity.value == "warning" and finding.evidence["step"] < 1400
    assert finding.evidence["final_val_loss"] > 1.1 * finding.evidence["best_val_loss"]
    assert finding.evidence["final_train_loss"] < finding.evidence["train_loss_at_turn"]
    assert "overfitting" not in " ".join(ids(watched(1000, steps=600)))
