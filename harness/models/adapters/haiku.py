"""Haiku transforms (https://dm-haiku.readthedocs.io/): ``hk.transform(f)`` or ``hk.transform_with_state(f)``,
initialized from a real example batch.

``params`` are Haiku's parameter dict (paths read ``mlp/~/linear_1/w``), ``state`` its state dict (BatchNorm
averages). The training mode reaches ``f`` through the keyword it takes (``is_training``, the Haiku convention, or
``train``/``training``); dropout draws from the ``rng`` argument. ``regularization=False`` makes ``hk.dropout``
return its input while the program is traced (a thread-local switch, so other threads tracing at the same time
are not affected).
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import haiku as hk

from harness.models.adapters.base import Model, Variables, call_mode_kwargs, slash_path

_QUIET = threading.local()


def detect(obj) -> bool:
    return isinstance(obj, (hk.Transformed, hk.TransformedWithState))


def _install_dropout_switch():
    """Wrap Haiku's dropout once with a thread-local off switch. ``hk.dropout`` has aliases bound at import time
    that a wrapper of the name cannot reach (``hk.nets.MLP`` calls its own module's copy, and so does a user's
    ``from haiku import dropout``), but every alias calls ``haiku._src.basic.dropout_impl``, looked up when called
    (Haiku separates it out for monkey patching): that is what is wrapped. Older Haikus without it get the names
    wrapped instead."""
    from haiku._src import basic

    name = "dropout_impl" if hasattr(basic, "dropout_impl") else "dropout"
    original = getattr(basic, name)
    if getattr(original, "_harness_switch", False):
        return

    def dropout(rng, rate, x, broadcast_dims=()):
        if getattr(_QUIET, "on", False):
            return x
        return original(rng, rate, x, broadcast_dims=broadcast_dims)

    dropout._harness_switch = True
    setattr(basic, name, dropout)
    if name == "dropout":
        hk.dropout = dropout


@contextlib.contextmanager
def _dropout_off():
    _install_dropout_switch()
    before = getattr(_QUIET, "on", False)
    _QUIET.on = True
    try:
        yield
    finally:
        _QUIET.on = before


def adapt(transformed, example_x) -> Model:
    try:  # the user's function's keywords (``is_training``), as the transform's apply shows them
        names = set(inspect.signature(transformed.apply).parameters)
    except (TypeError, ValueError):
        names = set()
    if isinstance(transformed, hk.Transformed):
        transformed = hk.with_empty_state(transformed)

    def init(key, x):
        params, state = transformed.init(key, x, **call_mode_kwargs(names, True, True))
        return Variables(params, state)

    def apply_fn(params, state, x, key, train, regularization):
        kwargs = call_mode_kwargs(names, train, regularization)
        guard = _dropout_off() if train and not regularization else contextlib.nullcontext()
        with guard:
            return transformed.apply(params, state, key, x, **kwargs)

    return Model("haiku", init, apply_fn, slash_path)
