"""Equinox modules (https://docs.kidger.site/equinox/): models are pytrees, built from a PRNG key.

``params`` are the module's floating-point arrays (``eqx.partition(model, eqx.is_inexact_array)``, so paths read
``layers[2].weight``), ``state`` its other arrays plus the ``eqx.nn.State`` of stateful layers (BatchNorm). A
factory may return the module, or ``(module, state)`` as ``eqx.nn.make_with_state`` does; a module holding state
indices without a state gets ``eqx.nn.State(module)``.

Equinox layers take one example: the model is vmapped over the batch (``axis_name="batch"``, the name
``eqx.nn.BatchNorm`` is built with), with one dropout key per example when its ``__call__`` takes ``key``. A
model that only runs on whole batches is called on the batch as it is. Inference mode is
``eqx.nn.inference_mode``; ``regularization=False`` switches only the ``eqx.nn.Dropout`` layers off.
"""

from __future__ import annotations

import inspect
from typing import Callable

import equinox as eqx
import jax
import numpy as np

from harness.models.adapters.base import Model, Variables, attribute_path, contains_leaf_type

BATCH_AXIS = "batch"


def _pickle_missing_by_name():
    """Every Equinox module's treedef holds Equinox's ``MISSING`` sentinel, which pickle copies into a new object
    that Equinox's unflatten no longer recognizes (``TypeError: '_Missing' object is not subscriptable``): a
    program whose outputs hold a module, stored by the traced-program cache (harness.engine.exported pickles the
    output treedef), crashed in the next process. Pickled by name, it comes back as the singleton itself."""
    try:
        from equinox._module import _flatten
    except ImportError:  # another Equinox layout: nothing to fix here
        return
    missing = getattr(_flatten, "MISSING", None)
    if missing is not None and "__reduce__" not in vars(type(missing)):
        type(missing).__reduce__ = lambda self: "MISSING"


_pickle_missing_by_name()


def detect(obj) -> bool:
    if isinstance(obj, tuple) and len(obj) == 2:
        return isinstance(obj[0], eqx.Module) and isinstance(obj[1], eqx.nn.State)
    return isinstance(obj, eqx.Module)


def _split(built):
    """(module, eqx.nn.State or None) from what the factory returned."""
    if isinstance(built, tuple):
        return built
    if contains_leaf_type(built, (eqx.nn.StateIndex,)):
        return eqx.nn.delete_init_state(built), eqx.nn.State(built)
    return built, None


def _is_array(a) -> bool:
    return isinstance(a, (jax.Array, jax.ShapeDtypeStruct, np.ndarray))


def _dropout_off(model):
    is_dropout = lambda m: isinstance(m, eqx.nn.Dropout)  # noqa: E731
    return jax.tree_util.tree_map(lambda m: eqx.nn.inference_mode(m) if is_dropout(m) else m, model,
                                  is_leaf=is_dropout)


def adapt(build: Callable[[jax.Array], object], example_x) -> Model:
    """``build(key)`` -> a module or ``(module, state)``, traceable."""
    abstract, abstract_state = _split(eqx.filter_eval_shape(build, jax.random.key(0)))
    static = eqx.partition(abstract, _is_array)[1]
    stateful = abstract_state is not None
    try:
        takes_key = "key" in inspect.signature(type(abstract).__call__).parameters
    except (TypeError, ValueError):
        takes_key = False

    def call(model, eqx_state, x, key, per_example):
        def one(xi, ki):
            kwargs = {"key": ki} if takes_key else {}
            return model(xi, eqx_state, **kwargs) if stateful else (model(xi, **kwargs), None)

        if not per_example:
            return one(x, key)
        keys = jax.random.split(key, x.shape[0])
        return jax.vmap(one, axis_name=BATCH_AXIS, out_axes=(0, None))(x, keys)

    def init(key, x):
        del x
        model, eqx_state = _split(build(key))
        arrays = eqx.filter(model, eqx.is_array)
        params = eqx.filter(arrays, eqx.is_inexact_array)
        buffers = eqx.filter(arrays, lambda a: not eqx.is_inexact_array(a))
        return Variables(params, (buffers, eqx_state))

    def combine(params, state, train, regularization):
        buffers, eqx_state = state
        # A fresh copy: an eqx.nn.State may be read once only, and harness evaluates one state several times.
        eqx_state = jax.tree_util.tree_map(lambda a: a, eqx_state)
        model = eqx.combine(params, buffers, static)
        if not train:
            model = eqx.nn.inference_mode(model)
        elif not regularization:
            model = _dropout_off(model)
        return model, eqx_state

    def runs(per_example: bool) -> bool:
        def trace(key, x):
            params, state = init(key, x)
            model, eqx_state = combine(params, state, False, False)
            return call(model, eqx_state, x, key, per_example)[0]

        try:
            eqx.filter_eval_shape(trace, jax.random.key(0), example_x)
            return True
        except Exception:  # noqa: BLE001 -- a model that fails both ways is reported by the model checks
            return False

    per_example = runs(True) or not runs(False)

    def apply_fn(params, state, x, key, train, regularization):
        model, eqx_state = combine(params, state, train, regularization)
        outputs, new_state = call(model, eqx_state, x, key, per_example)
        return outputs, (state[0], new_state if stateful else None)

    return Model("equinox", init, apply_fn, attribute_path)
