"""Activation capture: record every activation function's output during a forward pass, without the user changing
their model.

The seeds ask for activation statistics per layer (seed 003: "logging intermediate values will help detect
numerical instabilities"; dead ReLUs and saturated tanh/sigmoid units are the classic symptoms). Flax's own
facility, ``nnx.capture`` with ``sow``, needs the model to sow its activations; ``method_outputs`` records module
outputs (a Linear's pre-activation), not the functions applied between modules. So, for the duration of one trace:

* every known activation function (``jax.nn.relu``, ``tanh``, ``sigmoid``, ``gelu``, ... and their ``flax.nnx`` /
  ``jax.numpy`` aliases) is swapped, by identity, for a recording wrapper wherever a model can reach it: the
  namespaces ``jax.nn``, ``jax.numpy``, ``flax.nnx`` (and ``flax.linen`` when loaded), the globals of every module
  that defines one of the model's classes (``from jax.nn import relu``), and the model's own attributes
  (``self.activation = jax.nn.relu``, as the built-in models store it; ``functools.partial`` of one; items of a
  list such as ``nnx.Sequential``'s layers);
* every module class of the model gets a ``__call__`` wrapper that notes which module produced which array, so an
  activation applied to ``hidden/0``'s output is named ``hidden/0`` (else after the module that called it).

Everything is restored in a ``finally``. The wrappers record only for the thread that set up the capture and only
at that trace level (a function applied inside an inner ``nnx.scan`` or ``vmap`` body is not recorded: its values
cannot leave the inner trace); everywhere else they behave exactly like the function they wrap, so another thread
tracing another program in the meantime is not affected. A lock serializes captures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
from typing import Any, Callable, Iterator

import jax
from flax import nnx
from flax.nnx import tracers

# Activation functions by their jax.nn name, and what their outputs can tell: ``rectifier`` units are dead when
# exactly zero for every example; ``tanh`` / ``sigmoid`` units saturate at their asymptotes; ``smooth`` ones
# (GELU, SiLU, ELU, leaky ReLU, ...) have neither, and only their spread is recorded.
ACTIVATION_KINDS: dict[str, str] = {
    "relu": "rectifier",
    "relu6": "rectifier",
    "tanh": "tanh",
    "hard_tanh": "tanh",
    "sigmoid": "sigmoid",
    "hard_sigmoid": "sigmoid",
    "leaky_relu": "smooth",
    "elu": "smooth",
    "celu": "smooth",
    "selu": "smooth",
    "gelu": "smooth",
    "silu": "smooth",
    "softplus": "smooth",
    "mish": "smooth",
    "hard_silu": "smooth",
    "squareplus": "smooth",
    "soft_sign": "smooth",
}
# Where models find activation functions by name (patched by identity when loaded; nothing is imported).
NAMESPACES = ("jax.nn", "jax.numpy", "flax.nnx", "flax.nnx.nn.activations", "flax.linen", "flax.linen.activation")

_LOCK = threading.RLock()
_ACTIVE = threading.local()


@dataclasses.dataclass
class Activation:
    """One recorded activation: where it was applied, which function, and its (traced) output."""

    name: str  # the module whose output it was applied to ("hidden/0"), else "<calling module>/<function>"
    function: str  # "relu", "tanh", ...
    kind: str  # rectifier | tanh | sigmoid | smooth
    output: Any


@dataclasses.dataclass
class Recorder:
    paths: dict[int, str]  # id(module) -> its path in the model, "hidden/0"
    trace: Any  # the trace level values may be recorded at
    activations: list[Activation] = dataclasses.field(default_factory=list)
    module_outputs: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    stack: list[str] = dataclasses.field(default_factory=list)
    depth: int = 0  # > 0 inside a recorded activation: gelu calling tanh is one activation, not two

    def at_trace_level(self) -> bool:
        return self.trace.is_valid()

    def add(self, function: str, kind: str, x, out) -> None:
        if not (isinstance(out, jax.Array) and out.ndim >= 1 and self.at_trace_level()):
            return
        producer = next((path for path, o in reversed(self.module_outputs) if o is x), None)
        if producer is None:
            caller = self.stack[-1] if self.stack else ""
            producer = f"{caller}/{function}" if caller else function
        name, n = producer, 1
        taken = {a.name for a in self.activations}
        while name in taken:
            n += 1
            name = f"{producer}#{n}"
        self.activations.append(Activation(name, function, kind, out))


def _recorder() -> Recorder | None:
    return getattr(_ACTIVE, "recorder", None)


def known_activations() -> dict[int, tuple[Callable, str, str]]:
    """id(function) -> (function, name, kind) for the activation functions jax.nn has (aliases once)."""
    known: dict[int, tuple[Callable, str, str]] = {}
    for name, kind in ACTIVATION_KINDS.items():
        fn = getattr(jax.nn, name, None)
        if fn is not None and id(fn) not in known:
            known[id(fn)] = (fn, name, kind)
    return known


def recording_activation(fn: Callable, name: str, kind: str) -> Callable:
    """``fn``, recording its output when a capture is active in this thread (else exactly ``fn``)."""

    def wrapper(*args, **kwargs):
        rec = _recorder()
        if rec is None or rec.depth:
            return fn(*args, **kwargs)
        rec.depth += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            rec.depth -= 1
        rec.add(name, kind, args[0] if args else kwargs.get("x"), out)
        return out

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__wrapped__ = fn
    return wrapper


def recording_call(call: Callable) -> Callable:
    """A module class's ``__call__`` that notes which module produced which output while a capture is active."""

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        rec = _recorder()
        path = rec.paths.get(id(self)) if rec is not None else None
        if path is None:
            return call(self, *args, **kwargs)
        rec.stack.append(path)
        try:
            out = call(self, *args, **kwargs)
        finally:
            rec.stack.pop()
        if rec.at_trace_level():
            rec.module_outputs.append((path, out))
        return out

    return __call__


class _Patches:
    """Attribute swaps, undone in reverse order."""

    def __init__(self):
        self.undo: list[Callable[[], None]] = []

    def setattr(self, obj, name: str, value) -> None:
        """Swap ``obj.name`` (a class or module attribute, or an instance's own attribute). Instances are written
        through ``vars()``: an nnx Module refuses ``setattr`` from another trace level than the one it was
        created at, and a function attribute is static data nnx does not track anyway."""
        missing = object()
        namespace = obj.__dict__ if isinstance(obj, type) else vars(obj)
        old = namespace.get(name, missing)

        def restore():
            if isinstance(obj, type):
                if old is missing:
                    delattr(obj, name)
                else:
                    setattr(obj, name, old)
            elif old is missing:
                vars(obj).pop(name, None)
            else:
                vars(obj)[name] = old

        if isinstance(obj, type):
            setattr(obj, name, value)
        else:
            vars(obj)[name] = value
        self.undo.append(restore)

    def setitem(self, container, index, value) -> None:
        old = container[index]
        container[index] = value
        self.undo.append(lambda: container.__setitem__(index, old))

    def try_setitem(self, container, index, value) -> None:
        try:
            self.setitem(container, index, value)
        except Exception:  # noqa: BLE001 -- a container that refuses (another trace level): not recorded
            pass

    def restore(self) -> None:
        while self.undo:
            try:
                self.undo.pop()()
            except Exception:  # noqa: BLE001 -- restore the rest whatever one restore does
                pass


def _replacement(value, wrappers: dict[int, Callable]):
    """The recording version of ``value`` if it is a known activation (or a ``functools.partial`` of one)."""
    try:
        if id(value) in wrappers:
            return wrappers[id(value)]
        if isinstance(value, functools.partial) and id(value.func) in wrappers:
            return functools.partial(wrappers[id(value.func)], *value.args, **value.keywords)
    except TypeError:
        return None
    return None


def _instance_call(cls: type) -> Callable | None:
    """The ``__call__`` instances of ``cls`` use (None for modules that are not callable, e.g. ``nnx.List``);
    ``cls.__call__`` itself would fall back to the metaclass's, which constructs instances."""
    for klass in cls.__mro__:
        if klass is not object and "__call__" in vars(klass):
            return vars(klass)["__call__"]
    return None


def _patch_namespace(patches: _Patches, namespace, wrappers: dict[int, Callable]) -> None:
    for attr, value in list(vars(namespace).items()):
        new = _replacement(value, wrappers)
        if new is not None:
            patches.setattr(namespace, attr, new)


def _patch_module_attributes(patches: _Patches, module: nnx.Module, wrappers: dict[int, Callable]) -> None:
    for attr, value in list(vars(module).items()):
        new = _replacement(value, wrappers)
        if new is not None:
            patches.setattr(module, attr, new)
        elif isinstance(value, (list, nnx.List)):
            for i in range(len(value)):
                new = _replacement(value[i], wrappers)
                if new is not None:
                    patches.try_setitem(value, i, new)


@contextlib.contextmanager
def recording(model: nnx.Module) -> Iterator[Recorder]:
    """Record the activations of ``model``'s forward passes run inside the block (call inside the traced function
    that builds or merges ``model``; compute statistics of ``recorder.activations`` before leaving that trace)."""
    modules = [(("/".join(map(str, path))), m) for path, m in nnx.iter_modules(model)]
    recorder = Recorder(paths={id(m): path for path, m in modules}, trace=tracers.TraceState())
    known = known_activations()
    wrappers = {key: recording_activation(fn, name, kind) for key, (fn, name, kind) in known.items()}
    classes = list(dict.fromkeys(type(m) for _, m in modules))
    with _LOCK:
        patches = _Patches()
        try:
            for name in NAMESPACES:
                if name in sys.modules:
                    _patch_namespace(patches, sys.modules[name], wrappers)
            for cls in classes:
                defining = sys.modules.get(cls.__module__)
                if defining is not None and defining.__name__ not in NAMESPACES:
                    _patch_namespace(patches, defining, wrappers)
            calls = {cls: _instance_call(cls) for cls in classes}  # resolved before any patch: no double wrapping
            for cls, call in calls.items():
                if call is not None:
                    patches.setattr(cls, "__call__", recording_call(call))
            for _, m in modules:
                _patch_module_attributes(patches, m, wrappers)
            _ACTIVE.recorder = recorder
            yield recorder
        finally:
            _ACTIVE.recorder = None
            patches.restore()
