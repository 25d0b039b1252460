"""Convolutions as matrix multiplications (im2col), for models harness trains on CPU.

XLA's CPU backend runs ``conv_general_dilated`` slowly where harness needs it: inside a ``lax.scan`` (about 30x
slower than the same step as a top-level program) and vmapped over members, where JAX folds the member axis into
feature groups (a grouped convolution). :func:`as_matmuls` rewrites a model's forward pass before it is
differentiated or vmapped: each convolution becomes a patch gather (a strided slice per kernel tap) and one
``dot_general``; differentiation then gives slices, pads and matrix multiplications, and vmap gives batched
matrix multiplications with the members as their batch, which XLA's CPU backend runs at matrix-multiplication speed
inside the scan. This is the im2col formulation of Chellapilla et al., "High Performance Convolutional Neural
Networks for Document Processing" (2006), as in Caffe.

It works on the traced program, so every model library (NNX, Linen, Equinox, Haiku, a bare ``lax.conv``) and
convolutions inside jitted sub-functions are covered; one inside a ``custom_vjp`` or a loop of the model's own
keeps XLA's convolution. :class:`harness.models.adapters.base.Model` applies it on the CPU backend to models whose
training step convolves; accelerators keep their convolution kernels.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import jax
import numpy as np
from jax import lax


def conv_as_matmul(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count, batch_group_count, precision=None, preferred_element_type=None, **_):
    """``lax.conv_general_dilated`` (the primitive's parameters) as strided slices and one ``dot_general``."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    spatial = len(lhs_spec) - 2
    # Canonical layouts: lhs (N, spatial..., C), rhs (spatial..., I, O).
    x = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    w = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    kernel = w.shape[:spatial]
    # Input dilation and padding in one pad (negative padding crops, as the convolution's does).
    zero = np.zeros((), x.dtype)
    x = lax.pad(x, zero, [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)), (0, 0, 0)])
    out_size = [(x.shape[1 + i] - (kernel[i] - 1) * rhs_dilation[i] - 1) // window_strides[i] + 1
                for i in range(spatial)]
    taps = []
    for tap in itertools.product(*(range(k) for k in kernel)):
        start = [0, *(t * d for t, d in zip(tap, rhs_dilation)), 0]
        limit = [x.shape[0], *(s + (n - 1) * st + 1 for s, n, st in zip(start[1:-1], out_size, window_strides)),
                 x.shape[-1]]
        taps.append(lax.slice(x, start, limit, (1, *window_strides, 1)))
    patches = lax.concatenate([lax.expand_dims(t, (spatial + 1,)) for t in taps], spatial + 1)  # (N, out.., K, C)
    n, channels = x.shape[0], x.shape[-1]
    k = len(taps)
    w = w.reshape(k, w.shape[-2], w.shape[-1])  # (K, I, O)
    out_features = w.shape[-1]
    dot = dict(precision=precision, preferred_element_type=preferred_element_type)
    if batch_group_count > 1:  # the batch splits into groups, each convolved with its slice of output features
        g = batch_group_count
        p = patches.reshape(g, n // g, *out_size, k, channels)
        wg = w.reshape(k, channels, g, out_features // g)
        out = lax.dot_general(p, wg, (((spatial + 2, spatial + 3), (0, 1)), ((0,), (2,))), **dot)
        # (G, N/G, out..., O/G) -> (N/G, out..., G, O/G)
        out = lax.transpose(out, (*range(1, spatial + 2), 0, spatial + 2))
    else:  # feature groups (1: a plain convolution): each group of input channels to its slice of outputs
        g = feature_group_count
        p = patches.reshape(n, *out_size, k, g, channels // g)
        wg = w.reshape(k, channels // g, g, out_features // g)
        out = lax.dot_general(p, wg, (((spatial + 1, spatial + 3), (0, 1)), ((spatial + 2,), (2,))), **dot)
        # (G, N, out..., O/G) -> (N, out..., G, O/G)
        out = lax.transpose(out, (*range(1, spatial + 2), 0, spatial + 2))
    out = out.reshape(*out.shape[:-2], out_features)  # (N', out..., O), canonical
    # To the requested layout: canonical axis j sits at out_spec's position for it.
    canonical = (out_spec[0], *out_spec[2:], out_spec[1])  # where each canonical axis goes
    return lax.transpose(out, tuple(int(np.argsort(canonical)[i]) for i in range(len(canonical))))


_INLINED = {"pjit", "jit", "closed_call", "core_call"}  # sub-programs evaluated through: their convolutions too


def _evaluate(jaxpr, consts, args) -> list:
    """``jaxpr`` evaluated with every convolution replaced by :func:`conv_as_matmul` (traced by the caller:
    the replacement is what gets differentiated, vmapped and compiled)."""
    from jax.extend.core import Literal

    from harness.checks.model.capture import bind_equation, called_jaxpr

    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            outs = [conv_as_matmul(*invals, **eqn.params)]
        elif name in _INLINED and called_jaxpr(eqn) is not None:
            outs = _evaluate(*called_jaxpr(eqn), invals)
        else:  # everything else as it is (a convolution inside a custom_vjp or a loop keeps XLA's own)
            outs = bind_equation(eqn, invals)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def as_matmuls(fn: Callable) -> Callable:
    """``fn`` (arrays in, arrays out) with the convolutions it runs written as matrix multiplications: traced once
    per call (inside the caller's trace), evaluated equation by equation with :func:`conv_as_matmul` in place of
    each ``conv_general_dilated``."""

    @functools.wraps(fn)
    def wrapped(*args):
        leaves, tree = jax.tree.flatten(args)
        # Only arrays are traced inputs: any other leaf (a Python number a model reads as a constant) stays static.
        traced = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray, np.generic))]

        def call(*xs):
            full = list(leaves)
            for i, x in zip(traced, xs):
                full[i] = x
            return fn(*jax.tree.unflatten(tree, full))

        inputs = [leaves[i] for i in traced]
        closed, out_shape = jax.make_jaxpr(call, return_shape=True)(*inputs)
        outs = _evaluate(closed.jaxpr, closed.consts, inputs)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped
