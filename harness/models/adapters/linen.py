"""Flax Linen modules (https://flax.readthedocs.io/en/latest/guides/flax_fundamentals/flax_basics.html): stateless
module objects, initialized from a real example batch.

``params`` is ``{"params": ...}`` (so paths read ``params/Dense_2/kernel``, as Linen's variables do), ``state`` the
other collections (``batch_stats``, ...), updated by ``apply(..., mutable=[...])`` in training mode. The training
mode reaches the module through the keyword its ``__call__`` takes (``train``, ``training``, ``is_training``,
``deterministic``, ``use_running_average``); dropout draws from the ``dropout`` RNG stream.
``regularization=False`` intercepts every ``nn.Dropout`` call (``nn.intercept_methods``) and returns its input,
so BatchNorm still trains on batch statistics.
"""

from __future__ import annotations

import contextlib
import inspect

import flax.linen as nn
import jax

from harness.models.adapters.base import Model, Variables, call_mode_kwargs, slash_path


def detect(obj) -> bool:
    return isinstance(obj, nn.Module)


def _mode_names(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(type(module).__call__).parameters)
    except (TypeError, ValueError):
        return set()


def _no_dropout(next_fun, args, kwargs, context):
    """``nn.Dropout`` returns its input unchanged, as a deterministic dropout does (its ``deterministic`` may be
    fixed at construction, so it cannot be passed at call time)."""
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
        return args[0] if args else kwargs["inputs"]
    return next_fun(*args, **kwargs)


def adapt(module: nn.Module, example_x) -> Model:
    names = _mode_names(module)

    def call(variables, x, train, regularization, key, mutable):
        kwargs = call_mode_kwargs(names, train, regularization)
        rngs = {"dropout": key} if train else None
        guard = nn.intercept_methods(_no_dropout) if train and not regularization else contextlib.nullcontext()
        with guard:
            return module.apply(variables, x, rngs=rngs, mutable=mutable, **kwargs)

    def init(key, x):
        params_key, dropout_key = jax.random.split(key)
        kwargs = call_mode_kwargs(names, False, False)
        variables = module.init({"params": params_key, "dropout": dropout_key}, x, **kwargs)
        variables = dict(variables)
        params = {"params": variables.pop("params", {})}
        return Variables(params, variables)

    def apply_fn(params, state, x, key, train, regularization):
        variables = {**params, **state}
        if train and state:
            outputs, updates = call(variables, x, train, regularization, key, list(state))
            return outputs, {**state, **updates}
        return call(variables, x, train, regularization, key, False), state

    return Model("linen", init, apply_fn, slash_path)
