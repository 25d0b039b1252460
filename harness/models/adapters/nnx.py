"""Flax NNX modules (https://flax.readthedocs.io/en/latest/nnx_basics.html): split into a graph definition and
state once, merged inside every traced call.

``params`` are the ``nnx.Param`` leaves, ``state`` everything else (BatchNorm statistics, dropout RNG counters,
the built-in models' width masks). Training and inference modes are two graph definitions (``model.train()`` /
``model.eval()``); ``regularization=False`` also sets ``deterministic=True`` wherever a layer has that attribute.
A Linen module wrapped with ``nnx.bridge.ToNNX`` is an NNX module and goes through here too.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from harness.models import width_mask
from harness.models.adapters.base import Model, Variables, slash_path


def detect(obj) -> bool:
    return isinstance(obj, nnx.Module)


def _fresh(tree):
    """New Variable objects at the current trace level: NNX refuses to mutate a Variable created outside the
    trace that updates it (dropout's and ``ToNNX``'s RNG counters, BatchNorm statistics), e.g. inside a ``cond``."""
    return jax.tree.map(lambda a: a, tree)


def _embed_in_parameter_dtype(model: nnx.Module) -> None:
    """``nnx.Embed`` fixes its compute dtype when built (``dtype or param_dtype``: float32), unlike every other NNX
    layer (``dtype=None``: the inputs' and parameters' dtype). With its parameters cast for mixed precision
    (``precision=bfloat16``, :func:`harness.models.adapters.base.with_precision`) it would cast its table back to
    float32, and promote the whole model after it to float32; an Embed left at its default (``dtype`` equal to
    ``param_dtype``) computes in its table's dtype instead. A no-op for uncast parameters."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Embed) and module.dtype == module.param_dtype:
            dtype = module.embedding[...].dtype
            if dtype != module.dtype:
                module.dtype = dtype


def adapt(build: Callable[[jax.Array], nnx.Module]) -> Model:
    """``build(key) -> nnx.Module``, traceable (called inside jit and vmap)."""
    abstract = nnx.eval_shape(lambda: build(jax.random.key(0)))
    masked = width_mask.is_masked(abstract)
    train_def = nnx.split(abstract, nnx.Param, ...)[0]
    abstract.set_attributes(deterministic=True, raise_if_not_found=False)
    quiet_def = nnx.split(abstract, nnx.Param, ...)[0]
    abstract.eval()
    eval_def = nnx.split(abstract, nnx.Param, ...)[0]

    def init(key, x, member=None):
        del x  # an NNX module is built with its shapes
        # ``member``: the member's Hparams, which a width-masked model reads its live width from (FromMember).
        model = build(key) if member is None else build(key, member=member)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return Variables(params, rest)

    def apply_fn(params, state, x, key, train, regularization):
        del key  # NNX layers draw from the nnx.Rngs they were built with (their counters are in ``state``)
        graphdef = (train_def if regularization else quiet_def) if train else eval_def
        model = nnx.merge(graphdef, params, _fresh(state))
        _embed_in_parameter_dtype(model)
        outputs = model(x)
        return outputs, nnx.split(model, nnx.Param, ...)[2]

    return Model("nnx", init, apply_fn, slash_path, width_masked=masked)
