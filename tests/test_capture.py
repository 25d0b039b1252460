"""capture: activations of pure functions from Flax NNX, Flax Linen, Equinox and Haiku, read off the jaxpr."""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harness.checks.model.capture import record_activations
from harness.models.adapters.base import slash_path as path_name

X = jax.random.normal(jax.random.key(1), (6, 3))


def check(fn, params, x, expected):
    """Recorded (name, function) pairs are ``expected``, outputs match a direct computation, fn's output is exact."""
    out, acts = record_activations(fn, params, x)
    assert [(a.name, a.function) for a in acts] == [(name, function) for name, function, _ in expected]
    for a, (_, _, direct) in zip(acts, expected):
        np.testing.assert_allclose(a.output, direct, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out, fn(params, x))
    return acts


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def nnx_model():
    model = NNXMLP(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return model, params, lambda p, x: nnx.merge(graphdef, p, rest)(x)


def test_nnx_mlp():
    model, params, fn = nnx_model()
    h0 = jax.nn.relu(model.layers[0](X))
    h1 = jax.nn.relu(model.layers[1](h0))
    acts = check(fn, params, X, [("layers/0", "relu", h0), ("layers/1", "relu", h1)])
    assert {a.kind for a in acts} == {"rectifier"}
    check(fn, nnx.to_pure_dict(params), X, [("layers/0", "relu", h0), ("layers/1", "relu", h1)])  # a plain dict


def test_linen_mlp():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(8)(x))
            x = nn.tanh(nn.Dense(8)(x))
            return nn.Dense(2)(x)

    variables = MLP().init(jax.random.key(0), X)
    p = variables["params"]
    h0 = jnp.tanh(nn.Dense(8).apply({"params": p["Dense_0"]}, X))
    h1 = jnp.tanh(nn.Dense(8).apply({"params": p["Dense_1"]}, h0))
    acts = check(MLP().apply, variables, X, [("params/Dense_0", "tanh", h0), ("params/Dense_1", "tanh", h1)])
    assert {a.kind for a in acts} == {"tanh"}


def test_equinox_mlp_vmapped_inside():
    model = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)  # noqa: E731
    h0 = jax.nn.relu(jax.vmap(model.layers[0])(X))
    h1 = jax.nn.relu(jax.vmap(model.layers[1])(h0))
    check(fn, params, X, [("layers/0", "relu", h0), ("layers/1", "relu", h1)])


def haiku_model():
    f = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([8, 8, 2])(x)))
    return f.init(jax.random.key(0), X), f.apply


def test_haiku_mlp():
    params, apply = haiku_model()
    lin = lambda name, x: x @ params[name]["w"] + params[name]["b"]  # noqa: E731
    h0 = jax.nn.relu(lin("mlp/~/linear_0", X))
    h1 = jax.nn.relu(lin("mlp/~/linear_1", h0))
    check(apply, params, X, [("mlp/~/linear_0", "relu", h0), ("mlp/~/linear_1", "relu", h1)])


def test_under_jit_and_vmap_over_param_sets():
    params, apply = haiku_model()
    param_sets = jax.tree.map(lambda a: jnp.stack([a, 2 * a, -a]), params)
    names = []

    def recorded(p, x):
        out, acts = record_activations(apply, p, x)
        names[:] = [a.name for a in acts]
        return out, [a.output for a in acts]

    def direct(p, x):
        h0 = jax.nn.relu(x @ p["mlp/~/linear_0"]["w"] + p["mlp/~/linear_0"]["b"])
        return apply(p, x), [h0, jax.nn.relu(h0 @ p["mlp/~/linear_1"]["w"] + p["mlp/~/linear_1"]["b"])]

    out, outputs = jax.jit(jax.vmap(recorded, in_axes=(0, None)))(param_sets, X)
    assert names == ["mlp/~/linear_0", "mlp/~/linear_1"]
    assert out.shape == (3, 6, 2) and [o.shape for o in outputs] == [(3, 6, 8), (3, 6, 8)]
    np.testing.assert_allclose(out, jax.vmap(apply, in_axes=(0, None))(param_sets, X), rtol=1e-6, atol=1e-6)
    for o, d in zip(outputs, jax.vmap(direct, in_axes=(0, None))(param_sets, X)[1]):
        np.testing.assert_allclose(o, d, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(jax.jit(recorded)(params, X)[0], jax.jit(apply)(params, X))


def dense_params(*names):
    keys = jax.random.split(jax.random.key(2), len(names))
    return {n: {"w": jax.random.normal(k, (3, 4))} for n, k in zip(names, keys)}


def test_gelu_silu_sigmoid_recorded_once_each():
    params = dense_params("a", "b", "c", "d")

    def fn(p, x):
        ys = [jax.nn.gelu(x @ p["a"]["w"]), jax.nn.gelu(x @ p["b"]["w"], approximate=False),
              jax.nn.silu(x @ p["c"]["w"]), jax.nn.sigmoid(x @ p["d"]["w"])]
        return sum(ys)

    z = {n: X @ params[n]["w"] for n in params}
    acts = check(fn, params, X, [("a", "gelu", jax.nn.gelu(z["a"])),
                                 ("b", "gelu", jax.nn.gelu(z["b"], approximate=False)),
                                 ("c", "silu", jax.nn.silu(z["c"])), ("d", "sigmoid", jax.nn.sigmoid(z["d"]))])
    assert [a.kind for a in acts] == ["smooth", "smooth", "smooth", "sigmoid"]


def test_pre_activations_recorded_with_each_activation():
    """The input each activation was applied to (the per-layer saturation rule reads tanh/sigmoid inputs), also from
    inside a user's jit and for an inlined GELU."""
    params = dense_params("a", "b", "c")

    @jax.jit
    def block(w, x):
        return jnp.tanh(x @ w)

    def fn(p, x):
        return block(p["a"]["w"], x) + jax.nn.sigmoid(x @ p["b"]["w"]) + jax.nn.gelu(x @ p["c"]["w"])

    _, acts = record_activations(fn, params, X)
    assert [(a.name, a.function) for a in acts] == [("a", "tanh"), ("b", "sigmoid"), ("c", "gelu")]
    for a in acts:
        np.testing.assert_allclose(a.input, X @ params[a.name]["w"], rtol=1e-6, atol=1e-6)


def test_nested_jit_checkpoint_and_custom_vjp():
    params = dense_params("a", "b", "c", "d", "e")
    params["e"]["w"] = params["e"]["w"][:, :3]

    @jax.jit
    def linear(w, x):  # no activation inside: bound as it is, walked for names only
        return x @ w

    @jax.jit
    def block(w, x):  # one jaxpr, shared by both calls
        return jnp.tanh(x @ w)

    @jax.custom_vjp
    def clipped(x):
        return jax.nn.relu6(x)

    clipped.defvjp(lambda x: (clipped(x), None), lambda _, g: (g,))

    def fn(p, x):
        x = jax.nn.softplus(linear(p["e"]["w"], x))
        h = block(p["a"]["w"], x)
        h = block(p["b"]["w"], x) + h
        h = jax.checkpoint(lambda w, x: jax.nn.elu(x @ w))(p["c"]["w"], x) + h
        return clipped(x @ p["d"]["w"]) + h

    x = jax.nn.softplus(X @ params["e"]["w"])
    z = {n: x @ params[n]["w"] for n in params}
    check(fn, params, X, [("e", "softplus", x), ("a", "tanh", jnp.tanh(z["a"])), ("b", "tanh", jnp.tanh(z["b"])),
                          ("c", "elu", jax.nn.elu(z["c"])), ("d", "relu6", jax.nn.relu6(z["d"]))])


def test_names_repeats_raw_inputs_and_parameter_gates():
    params = {**dense_params("layer"), "gate": jnp.ones(4)}

    def fn(p, x):
        h = x @ p["layer"]["w"]
        return jax.nn.relu(h) + jax.nn.silu(h) * jax.nn.sigmoid(p["gate"]) + jnp.tanh(x).sum()

    h = X @ params["layer"]["w"]
    check(fn, params, X, [("layer", "relu", jax.nn.relu(h)), ("layer#2", "silu", jax.nn.silu(h)),
                          ("tanh_2", "tanh", jnp.tanh(X))])


def test_residual_takes_most_recent_layer():
    params = dense_params("a", "b")
    params["b"]["w"] = jnp.full((4, 4), 0.5)

    def fn(p, x):
        h = x @ p["a"]["w"]
        return jax.nn.relu(h @ p["b"]["w"] + h)

    h = X @ params["a"]["w"]
    check(fn, params, X, [("b", "relu", jax.nn.relu(h @ params["b"]["w"] + h))])


def test_no_activations():
    params = dense_params("a")
    out, acts = record_activations(lambda p, x: x @ p["a"]["w"], params, X)
    assert acts == []
    np.testing.assert_array_equal(out, X @ params["a"]["w"])


@pytest.mark.parametrize("path, name", [
    ((jax.tree_util.DictKey("layers"), jax.tree_util.SequenceKey(0), jax.tree_util.GetAttrKey("kernel")),
     "layers/0/kernel"),
    ((jax.tree_util.FlattenedIndexKey(2), jax.tree_util.DictKey("w")), "2/w"),
])
def test_path_name(path, name):
    assert path_name(path) == name
