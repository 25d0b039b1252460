"""Convolutions as matrix multiplications (harness.engine.convolution): the same values and gradients as XLA's own
convolution for every parameter the primitive takes (strides, padding, input and kernel dilation, layouts, feature
and batch groups: the last two are what vmap and the kernel's gradient of a grouped convolution produce), with no
convolution left in the program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from harness.engine.convolution import as_matmuls

CASES = [
    ((2, 8, 8, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"), dict(window_strides=(1, 1), padding="SAME")),
    ((2, 9, 7, 3), (3, 2, 3, 4), ("NHWC", "HWIO", "NHWC"), dict(window_strides=(2, 1), padding="VALID")),
    ((2, 3, 9, 9), (4, 3, 3, 3), ("NCHW", "OIHW", "NCHW"),
     dict(window_strides=(2, 2), padding=((1, 2), (0, 1)), rhs_dilation=(2, 1))),
    ((2, 10, 6), (5, 6, 3), ("NWC", "WIO", "NWC"), dict(window_strides=(1,), padding="SAME", rhs_dilation=(2,))),
    ((2, 8, 8, 4), (3, 3, 2, 6), ("NHWC", "HWIO", "NHWC"),
     dict(window_strides=(1, 1), padding="SAME", feature_group_count=2)),
    ((2, 8, 8, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NCHW"),
     dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=(2, 1))),
    ((4, 8, 8, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"),
     dict(window_strides=(1, 1), padding="SAME", batch_group_count=2)),
]


@pytest.mark.parametrize("lhs_shape, rhs_shape, layout, params", CASES)
def test_the_same_convolution_its_gradients_and_its_vmap(lhs_shape, rhs_shape, layout, params):
    k1, k2 = jax.random.split(jax.random.key(0))
    lhs, rhs = jax.random.normal(k1, lhs_shape), jax.random.normal(k2, rhs_shape)

    def conv(a, b):
        return lax.conv_general_dilated(a, b, dimension_numbers=layout, **params)

    def grads(conv):
        return jax.grad(lambda a, b: jnp.sum(jnp.sin(conv(a, b))), argnums=(0, 1))

    ours = as_matmuls(conv)
    members = (jnp.stack([lhs, 0.5 * lhs, -lhs]), jnp.stack([rhs, 2 * rhs, rhs]))
    for native, rewritten, args in [(conv, ours, (lhs, rhs)), (grads(conv), grads(ours), (lhs, rhs)),
                                    (jax.vmap(grads(conv)), jax.vmap(grads(ours)), members)]:
        assert "conv_general_dilated" not in str(jax.make_jaxpr(rewritten)(*args))
        for got, want in zip(jax.tree.leaves(jax.jit(rewritten)(*args)), jax.tree.leaves(jax.jit(native)(*args))):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_convolutions_inside_jitted_sub_functions_are_rewritten_and_the_rest_is_untouched():
    inner = jax.jit(lambda x, w: jax.nn.relu(lax.conv_general_dilated(x, w, (1,), "SAME")))
    fn = as_matmuls(lambda x, w: {"y": inner(x, w).sum(axis=-1), "n": jnp.tanh(x).mean()})
    x, w = jnp.ones((2, 3, 7)), jnp.full((4, 3, 3), 0.1)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(fn)(x, w))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 fn(x, w), {"y": inner(x, w).sum(axis=-1), "n": jnp.tanh(x).mean()})


def test_leaves_that_are_not_arrays_stay_static_and_tracers_are_traced():
    fn = as_matmuls(lambda x, settings: x * settings["scale"] if settings["scale"] > 1 else -x)  # a Python branch
    np.testing.assert_array_equal(fn(jnp.ones(3), {"scale": 2.0}), 2 * np.ones(3))
    np.testing.assert_array_equal(jax.jit(lambda x: fn(x, {"scale": 0.5}))(jnp.ones(3)), -np.ones(3))
