"""The model contract of harness/models/adapters/: how factories are called, which family a model is, parameter
paths in each family's own spelling, and the training / inference / no-regularization modes per family."""

from __future__ import annotations

import threading

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import families
from harness.errors import HarnessError
from harness.models.adapters import ModelFactory, call_factory
from harness.models.mlp import MLP

X = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)


def adapt(factory, framework="auto", **kwargs):
    return ModelFactory(factory, kwargs, (5,), 3, X, framework=framework, target="tests.factory").adapt()


def test_factories_get_the_key_their_signature_asks_for():
    seen = {}

    def eqx_style(key, in_size):
        seen["eqx"] = (key, in_size)

    def nnx_style(*, rngs, input_shape, num_outputs):
        seen["nnx"] = (type(rngs).__name__, input_shape, num_outputs)

    def keyless(num_outputs, width=3):
        seen["keyless"] = (num_outputs, width)

    def anything(**kwargs):
        seen["anything"] = sorted(kwargs)

    key = jax.random.key(1)
    call_factory(eqx_style, key, input_shape=(5,), num_outputs=3, kwargs=dict(in_size=5))
    call_factory(nnx_style, key, input_shape=(5,), num_outputs=3, kwargs={})
    call_factory(keyless, key, input_shape=(5,), num_outputs=3, kwargs=dict(width=4))
    call_factory(anything, key, input_shape=(5,), num_outputs=3, kwargs=dict(width=4))
    assert seen["eqx"] == (key, 5)  # no input_shape / num_outputs: equinox.nn.MLP does not take them
    assert seen["nnx"] == ("Rngs", (5,), 3)
    assert seen["keyless"] == (3, 4)
    assert seen["anything"] == ["input_shape", "num_outputs", "rngs", "width"]


@pytest.mark.parametrize("factory, family", [
    (MLP, "nnx"), (families.linen_mlp, "linen"), (families.equinox_mlp, "equinox"), (families.haiku_mlp, "haiku"),
    (families.linen_through_bridge, "nnx"), (families.equinox_batchnorm_mlp, "equinox"),
    (families.haiku_batchnorm_mlp, "haiku"),
])
def test_the_family_is_detected_and_the_model_runs_in_every_mode(factory, family):
    models = ModelFactory(factory, dict(width=8), (5,), 3, X)
    assert models.family() == family
    model = models.adapt()
    params, state = model.init(jax.random.key(0), X)
    for train, regularization in ((False, True), (True, True), (True, False)):
        out, _ = model.apply(params, state, X, key=jax.random.key(2), train=train, regularization=regularization)
        assert out.shape == (6, 3) and np.all(np.isfinite(out))


def test_parameter_paths_are_each_familys_own():
    def paths(factory, **kw):
        model = adapt(factory, **kw)
        return sorted(model.flat_params(jax.eval_shape(model.init, jax.random.key(0), X).params))

    assert "hidden/0/kernel" in paths(MLP, width=8)
    assert "params/Dense_0/kernel" in paths(families.linen_mlp, width=8)
    assert "layers[0].weight" in paths(families.equinox_mlp, width=8)
    assert "mlp/~/linear_0/w" in paths(families.haiku_mlp, width=8)


def test_an_unknown_kind_of_model_is_a_clear_error_naming_the_target():
    with pytest.raises(HarnessError) as err:
        adapt(lambda num_outputs: (lambda x: x))
    text = str(err.value)
    assert "model._target_" in text and "tests.factory" in text
    assert all(kind in text for kind in ("flax.nnx.Module", "flax.linen.Module", "equinox.Module", "haiku"))
    with pytest.raises(HarnessError, match="model.framework"):
        adapt(families.linen_mlp, framework="haiku", width=8)


def test_no_regularization_switches_dropout_off_but_keeps_batchnorm_training():
    """The overfit test trains with regularization off: dropout deterministic, BatchNorm still on batch statistics
    (Linen intercepts nn.Dropout; Equinox switches only its Dropout layers to inference)."""
    class LinenDropBN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
            return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))

    model = adapt(lambda num_outputs: LinenDropBN())
    params, state = model.init(jax.random.key(0), X)
    a, _ = model.apply(params, state, X, key=jax.random.key(1), train=True)
    b, _ = model.apply(params, state, X, key=jax.random.key(2), train=True)
    assert not np.allclose(a, b)  # dropout draws from the key
    c, new_state = model.apply(params, state, X, key=jax.random.key(1), train=True, regularization=False)
    d, _ = model.apply(params, state, X, key=jax.random.key(2), train=True, regularization=False)
    np.testing.assert_array_equal(c, d)
    assert not jax.tree.all(jax.tree.map(np.array_equal, new_state, state))  # batch statistics updated

    def eqx_dropout(key, num_outputs):
        return eqx.nn.Sequential([eqx.nn.Linear(5, 8, key=key), eqx.nn.Dropout(0.5), eqx.nn.Linear(8, 3, key=key)])

    model = adapt(eqx_dropout)
    params, state = model.init(jax.random.key(0), X)
    e, _ = model.apply(params, state, X, key=jax.random.key(1), train=True)
    f, _ = model.apply(params, state, X, key=jax.random.key(1), train=True, regularization=False)
    g, _ = model.apply(params, state, X, key=jax.random.key(3), train=True, regularization=False)
    assert not np.allclose(e, f)
    np.testing.assert_array_equal(f, g)


def test_haiku_dropout_switch_is_per_thread():
    def factory(num_outputs):
        def forward(x, is_training: bool = True):
            h = hk.Linear(8)(x)
            h = hk.dropout(hk.next_rng_key(), 0.5, h) if is_training else h
            return hk.Linear(num_outputs)(h)

        return hk.transform(forward)

    model = adapt(factory)
    params, state = model.init(jax.random.key(0), X)
    quiet = [model.apply(params, state, X, key=jax.random.key(k), train=True, regularization=False)[0]
             for k in (1, 2)]
    np.testing.assert_array_equal(*quiet)
    results = {}
    worker = threading.Thread(target=lambda: results.update(
        out=[model.apply(params, state, X, key=jax.random.key(k), train=True)[0] for k in (1, 2)]))
    worker.start()
    worker.join()
    assert not np.allclose(*results["out"])


def test_equinox_models_run_per_example_or_on_whole_batches():
    per_example = adapt(families.equinox_mlp, width=8)

    class Batched(eqx.Module):
        w: jax.Array

        def __init__(self, key, num_outputs):
            self.w = jax.random.normal(key, (5, num_outputs))

        def __call__(self, x):
            return x @ self.w - jnp.mean(x @ self.w, axis=0)  # couples the batch: only runs batched

    batched = adapt(Batched)
    for model in (per_example, batched):
        params, state = model.init(jax.random.key(0), X)
        assert model(params, state, X).shape == (6, 3)


def test_equinox_batchnorm_state_updates_in_training_only():
    model = adapt(families.equinox_batchnorm_mlp, width=8)
    params, state = model.init(jax.random.key(0), X)
    _, trained = model.apply(params, state, X, key=jax.random.key(1), train=True)
    _, evaluated = model.apply(params, state, X, train=False)
    leaves = lambda s: jax.tree.leaves(s[1])  # noqa: E731
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(trained), leaves(state)))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(evaluated), leaves(state)))


def test_nnx_models_from_the_bridge_train_inside_control_flow():
    """nnx.bridge.ToNNX draws from its Rngs on every call; merged fresh in every trace, it runs inside lax.cond
    (the overfit test's in-scan evaluation), which used to raise TraceContextError."""
    model = adapt(families.linen_through_bridge, width=8)
    params, state = model.init(jax.random.key(0), X)

    @jax.jit
    def f(params, state):
        return jax.lax.cond(True, lambda: model(params, state, X), lambda: jnp.zeros((6, 3)))

    assert f(params, state).shape == (6, 3)
    assert isinstance(nnx.Rngs(0), nnx.Rngs)


# Convolutions a layer-type check would miss: a module calling jax.lax directly, a library convolution renamed or
# wrapped. On CPU their convolutions then run as matrix multiplications (harness.engine.convolution).


def _lax_conv(x, kernel):  # x: (batch, 5) as a 1-D signal of one channel
    y = jax.lax.conv_general_dilated(x[:, None, :], kernel, (1,), "SAME")
    return y.reshape(x.shape[0], -1)


class LinenRawConv(nn.Module):
    num_outputs: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 1, 3))
        return nn.Dense(self.num_outputs)(_lax_conv(x, kernel))


class EquinoxRawConv(eqx.Module):
    kernel: jax.Array
    head: eqx.nn.Linear

    def __init__(self, key, num_outputs: int):
        k1, k2 = jax.random.split(key)
        self.kernel = jax.random.normal(k1, (2, 1, 3)) * 0.3
        self.head = eqx.nn.Linear(10, num_outputs, key=k2)

    def __call__(self, x):  # one example
        return self.head(_lax_conv(x[None], self.kernel)[0])


class NnxWrappedConv(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, num_outputs: int):
        self.block = nnx.Sequential(nnx.Conv(1, 2, kernel_size=(3,), rngs=rngs))
        self.head = nnx.Linear(10, num_outputs, rngs=rngs)

    def __call__(self, x):
        return self.head(self.block(x[:, :, None]).reshape(x.shape[0], -1))


def haiku_renamed_conv(num_outputs: int):
    def forward(x):
        y = hk.Conv1D(2, 3, name="encoder")(x[:, :, None])
        return hk.Linear(num_outputs)(y.reshape(x.shape[0], -1))

    return hk.transform(forward)


@pytest.mark.parametrize("factory, convolves", [
    (LinenRawConv, True), (lambda key, num_outputs: EquinoxRawConv(key, num_outputs), True),
    (lambda *, rngs, num_outputs: NnxWrappedConv(rngs=rngs, num_outputs=num_outputs), True),
    (haiku_renamed_conv, True),
    (MLP, False), (families.linen_mlp, False), (families.equinox_mlp, False), (families.haiku_mlp, False),
])
def test_convolutions_are_found_in_the_program_whatever_the_layer(factory, convolves):
    model = ModelFactory(factory, {}, (5,), 3, X).adapt()
    assert model.convolutions is convolves
    out, _ = model.apply(*model.init(jax.random.key(0), X), X)
    assert out.shape == (6, 3)
