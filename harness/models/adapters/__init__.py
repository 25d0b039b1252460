"""Any JAX model library behind one contract (:class:`~harness.models.adapters.base.Model`).

A model factory (``model._target_``) is called the documented way (:func:`call_factory`) and what it returns
decides the family (``model.framework=auto``, or named): a Flax NNX module, a Flax Linen module, an Equinox module
(or ``(module, state)``), or a Haiku transform. Each family has one adapter module here; a library is imported
only when the user's model comes from it, so the default install needs none but Flax.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from harness.errors import HarnessError
from harness.models.adapters.base import PRECISIONS, Model, Variables, convolves, with_precision

__all__ = ["FAMILIES", "PRECISIONS", "FromMember", "Model", "ModelFactory", "Variables", "call_factory",
           "with_precision"]

# family -> (the module whose presence in sys.modules makes the family possible, the adapter module)
FAMILIES: dict[str, tuple[str, str]] = {
    "nnx": ("flax.nnx", "harness.models.adapters.nnx"),
    "linen": ("flax.linen", "harness.models.adapters.linen"),
    "equinox": ("equinox", "harness.models.adapters.equinox"),
    "haiku": ("haiku", "harness.models.adapters.haiku"),
}
KINDS = ("a flax.nnx.Module", "a flax.linen.Module", "an equinox.Module (or (module, eqx.nn.State))",
         "a haiku transform (hk.transform / hk.transform_with_state)")


def _adapter(family: str):
    return importlib.import_module(FAMILIES[family][1])


def _parameters(factory: Callable) -> tuple[set[str], bool]:
    """The keyword names a factory takes, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return set(), True
    return set(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_factory(factory: Callable, key, *, input_shape, num_outputs, kwargs: dict[str, Any]):
    """The factory called the documented way: ``key=`` (a PRNG key) when its signature asks for ``key`` (Equinox
    style), else ``rngs=nnx.Rngs(key)`` when it takes ``rngs`` or ``**kwargs`` (NNX style), else no key (a Linen
    module or a Haiku transform is initialized by harness from a real batch); ``input_shape`` and
    ``num_outputs`` when it takes them (or ``**kwargs``), so a library's own class can be the ``_target_``."""
    names, var_kw = _parameters(factory)
    call = dict(kwargs)
    if "key" in names:
        call["key"] = key
    elif "rngs" in names or var_kw:
        from flax import nnx

        call["rngs"] = nnx.Rngs(key)
    for name, value in (("input_shape", tuple(input_shape)), ("num_outputs", num_outputs)):
        if name in names or var_kw:
            call.setdefault(name, value)
    return factory(**call)


def detect_family(obj) -> str | None:
    for family, (module, _) in FAMILIES.items():
        if module in sys.modules and _adapter(family).detect(obj):
            return family
    return None


@dataclasses.dataclass(frozen=True)
class FromMember:
    """A factory argument read inside the trace from the member being initialized: its hyperparameter ``field``
    (:class:`harness.engine.core.Hparams`; the capacity ladder's ``active_width=FromMember("width")``,
    harness.models.width_mask). ``default`` where no member is given (tracing the model's shapes)."""

    field: str
    default: Any = 0

    def resolve(self, member):
        return self.default if member is None else getattr(member, self.field)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelFactory:
    """The user's model factory with its config: ``adapt(**overrides)`` gives the :class:`Model` (the capacity
    ladder overrides the width key), ``build(key, **overrides)`` what the factory itself returns."""

    factory: Callable
    kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    num_outputs: int
    example_x: Any  # a small real batch (Linen and Haiku initialize from it)
    framework: str = "auto"
    target: str = "model._target_"
    precision: str = "float32"  # the config's ``precision``: every model adapted computes in it (base.with_precision)

    def build(self, key, member=None, **overrides):
        kwargs = {k: v.resolve(member) if isinstance(v, FromMember) else v
                  for k, v in {**self.kwargs, **overrides}.items()}
        return call_factory(self.factory, key, input_shape=self.input_shape, num_outputs=self.num_outputs,
                            kwargs=kwargs)

    def family(self, **overrides) -> str:
        return self._adapted(tuple(sorted(overrides.items())))[0]

    def adapt(self, **overrides) -> Model:
        return self._adapted(tuple(sorted(overrides.items())))[1]

    @functools.cache
    def _adapted(self, overrides: tuple) -> tuple[str, Model]:
        kwargs = dict(overrides)
        build = functools.partial(self.build, **kwargs)
        box = []

        def probe(key):
            box.append(build(key))
            return jnp.zeros(())

        jax.eval_shape(probe, jax.random.key(0))  # what the factory returns, without FLOPs
        family = detect_family(box[0])
        if family is None:
            raise HarnessError(
                f"{self.target} returned a {type(box[0]).__module__}.{type(box[0]).__qualname__}; a model factory "
                f"must return {', '.join(KINDS[:-1])} or {KINDS[-1]}", key="model._target_")
        if self.framework not in ("auto", family):
            raise HarnessError(f"is {self.framework!r}, but {self.target} returned a {family} model",
                               key="model.framework")
        adapter = _adapter(family)
        if family in ("nnx", "equinox"):  # built from a key, inside every trace: one init per sweep member
            model = adapter.adapt(build) if family == "nnx" else adapter.adapt(build, self.example_x)
        else:  # a Linen module or Haiku transform holds no arrays: built once
            model = adapter.adapt(build(jax.random.key(0)), self.example_x)
        model = with_precision(model, self.precision)
        return family, dataclasses.replace(model, find_convolutions=functools.partial(convolves, x=self.example_x))
