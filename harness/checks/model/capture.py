"""Activation capture read off the traced program: record every activation function's output of any pure JAX
function, whatever library built it.

Flax NNX (``nnx.merge(graphdef, params, rest)(x)``), Flax Linen (``model.apply``), Equinox
(``eqx.combine(params, static)(x)``) and Haiku (``hk.transform(f).apply``) models all end up as a pure function
``apply(params, x)``, and every pure function traces to the same thing: a jaxpr. So instead of per-library hooks
(swapping activation functions and module ``__call__``s by monkeypatching, which only ever worked for NNX),
:func:`record_activations` traces ``fn`` with ``jax.make_jaxpr`` and evaluates the jaxpr with a small interpreter
(what ``jax.core.eval_jaxpr`` does: bind each equation's primitive in order), keeping the outputs of the equations
that are activation functions. Binding the same primitives in the same order builds the same program, so the
result is identical to ``fn(params, *args)``, and it works on tracers (inside ``jax.jit``, ``jax.vmap``).

How activations appear in a jaxpr (jax 0.10; the same for all four libraries, which call ``jax.nn``):

* most ``jax.nn`` activations are ``@jax.jit`` functions: a ``jit`` equation with ``name="silu"`` (also elu,
  leaky_relu, softplus, mish, selu, celu, hard_tanh, hard_sigmoid, hard_silu, squareplus, soft_sign);
* ``relu`` and ``relu6`` are ``custom_jvp`` functions: a ``custom_jvp_call`` whose ``call_jaxpr`` is named after
  the function (``debug_info.func_name``);
* ``tanh`` (``jnp.tanh``, ``nn.tanh``) is the ``tanh`` primitive and ``sigmoid`` (``jit(inline=True)``) the
  ``logistic`` primitive;
* ``gelu`` is not jitted, its primitives are inlined: it is recognized by their sequence (approximate:
  ``integer_pow[y=3] mul add mul tanh add mul mul``; exact: ``mul neg mul erfc mul [copy]``) when their only
  non-constant input is the one ``x``.

``softmax=True`` also records ``jax.nn.softmax`` (kind ``"softmax"``; attention weights, a softmax head): inlined
by default (``reduce_max max broadcast_in_dim stop_gradient sub exp reduce_sum broadcast_in_dim div``), a
``custom_jvp_call`` named ``_softmax`` under ``jax_softmax_custom_jvp``. Off, nothing changes: the model checks'
per-layer statistics are about activation functions (``harness train`` with ``train.activations`` reads the
softmax's input, the attention logits).

Each activation is recorded with its input too (the pre-activation: the activation equation's data input, for
GELU the first primitive's), which the per-layer saturation rule reads (tanh and sigmoid inputs beyond +-5).

An activation is recorded as a whole and never descended into: the tanh of an approximate GELU or of mish, the
logistic of silu are not recorded again. Other call-like equations are walked into, so activations inside them are
found: a user's own ``jax.jit`` (re-jitted around the walk), ``jax.checkpoint`` (re-wrapped with its policy),
``custom_jvp`` / ``custom_vjp`` functions that are not activations and ``closed_call`` (inlined: their forward values
are the same, but the custom derivative rule is dropped when the recording itself is differentiated). Values
computed inside ``scan``, ``while`` and ``cond`` bodies cannot leave them, so those equations are bound as they are
and activations inside them (``nnx.scan`` over stacked layers, ``lax.cond`` branches) are not recorded.

Names: an activation is named after the layer whose output it consumes. Each parameter leaf of ``params``
(flattened with paths) labels its module: the parameter's path minus its own name (``layers/0/kernel`` ->
``layers/0``; Haiku ``mlp/~/linear_0/w`` -> ``mlp/~/linear_0``). The label flows along the dataflow: an equation
that consumes both data and a parameter labels its outputs with that parameter's module, any other equation passes
on the most recently assigned label of its data inputs; an activation takes its input's label. Without one (an
activation of the raw input) it is named ``<function>_<index>``; repeats get ``#2``, ``#3``, ... Activations of
values that do not depend on ``args`` (a gate ``sigmoid(param)``) and of scalars are not recorded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.extend.core import ClosedJaxpr, Literal
from jax.tree_util import GetAttrKey

from harness.models.adapters.base import slash_path

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
PRIMITIVES = {"tanh": "tanh", "logistic": "sigmoid"}  # activations that are a single primitive
GELU = (  # inlined jax.nn.gelu, longest first
    ("integer_pow", "mul", "add", "mul", "tanh", "add", "mul", "mul"),  # approximate=True
    ("mul", "neg", "mul", "erfc", "mul", "copy"),  # approximate=False
    ("mul", "neg", "mul", "erfc", "mul"),
)
# jax.nn.softmax, recorded only when asked (``record_activations(..., softmax=True)``) as kind "softmax": the
# model checks' statistics (dead, saturated, spread, growth across depth) are about activation functions, and a
# softmax is not one of them. With jax's default ``jax_softmax_custom_jvp=False`` it is inlined (this sequence;
# ``where=`` adds a select and is not recognized: Flax masks attention logits with ``jnp.where`` before the
# softmax instead); with the flag on it is a ``custom_jvp_call`` named ``_softmax``.
SOFTMAX = (("reduce_max", "max", "broadcast_in_dim", "stop_gradient", "sub", "exp", "reduce_sum",
            "broadcast_in_dim", "div"),)
SOFTMAX_CALLS = {"_softmax": "softmax"}
SOFTMAX_KIND = "softmax"
NAMED_CALLS = {"jit", "pjit", "custom_jvp_call", "custom_vjp_call"}  # may be an activation, by name
JITS = {"jit", "pjit"}
REMATS = {"remat2", "checkpoint", "remat"}
INLINED = {"closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}

Label = tuple | None  # ("param", module) | ("data", stamp, module or None) | None for constants


@dataclasses.dataclass
class Activation:
    """One recorded activation: where it was applied, which function, and its (traced) output."""

    name: str  # the module whose output it was applied to ("layers/0"), else "<function>_<index>"
    function: str  # "relu", "tanh", ...
    kind: str  # rectifier | tanh | sigmoid | smooth; softmax (only when recorded: ``softmax=True``)
    output: Any
    input: Any = None  # the pre-activation it was applied to (the activation equation's data input)


def module_path(path, name_path: Callable[[tuple], str] = slash_path) -> str:
    """The module a parameter belongs to: its path minus its own name, and minus the ``.value`` of an nnx
    Variable box (``layers/0/kernel/value`` -> ``layers/0``); the whole path for a top-level parameter. Spelled
    by ``name_path`` (the model family's own: ``layers/0``, ``layers[0]``)."""
    path = tuple(path)
    if len(path) > 1 and isinstance(path[-1], GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return name_path(path[:-1]) or name_path(path)


def record_activations(fn: Callable, params, *args, name_path: Callable[[tuple], str] = slash_path,
                       softmax: bool = False) -> tuple[Any, list[Activation]]:
    """Evaluate ``fn(params, *args)`` and also return every activation function's output, in call order.

    ``params`` is a pytree of arrays (an ``nnx.State``, Linen variables, an Equinox partition, Haiku params); it and
    ``args`` may be tracers. Call it inside the traced function that computes statistics of the outputs. Layers
    are named with ``name_path`` (a Model's own, ``harness.models.adapters.Model.name_path``). ``softmax=True``
    also records every ``jax.nn.softmax`` (kind ``"softmax"``, its input the logits: attention weights' and any
    other), in call order with the activations."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *args)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    values = [x for _, x in leaves] + jax.tree.leaves(args)
    assert len(values) == len(closed.jaxpr.invars), "fn's traced inputs do not match params and args"
    labels = [("param", module_path(path, name_path)) for path, _ in leaves] + [("data", 0, None)] * (len(values) - len(leaves))
    recorder = _Recorder(softmax=softmax)
    outs, _ = recorder.walk(closed.jaxpr, closed.consts, values, labels)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs), recorder.activations


def bind_equation(eqn, invals) -> list:
    """Evaluate one equation on ``invals`` (what ``jax.core.eval_jaxpr`` does for each)."""
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _inputs(eqn) -> list:
    return [v for v in eqn.invars if not isinstance(v, Literal)]


def called_jaxpr(eqn):
    """(jaxpr, consts) of a call-like equation that is walked into, else None."""
    if eqn.primitive.name not in JITS | REMATS | INLINED:
        return None
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if sub is None:
        return None
    return (sub.jaxpr, sub.consts) if isinstance(sub, ClosedJaxpr) else (sub, ())


def _activation(eqn, softmax: bool = False) -> str | None:
    """The jax.nn name of the activation function an equation is, if it is one (or ``"softmax"``, when asked)."""
    name = eqn.primitive.name
    if name in PRIMITIVES:
        return PRIMITIVES[name]
    if name not in NAMED_CALLS or len(eqn.outvars) != 1:
        return None
    function = eqn.params.get("name")
    if function is None:
        sub = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
        debug = getattr(getattr(sub, "jaxpr", sub), "debug_info", None)
        function = getattr(debug, "func_name", None)
    if softmax and function in SOFTMAX_CALLS:
        return SOFTMAX_CALLS[function]
    return function if function in ACTIVATION_KINDS else None


def _gelu_length(eqns, i: int, patterns=GELU) -> int:
    """Length of an inlined ``jax.nn.gelu`` (or other ``patterns``) starting at ``eqns[i]`` (0 if none): the
    primitives in order, all reading only the first one's input, each other's outputs and constants."""
    for pattern in patterns:
        run = eqns[i:i + len(pattern)]
        if tuple(e.primitive.name for e in run) != pattern or len(_inputs(run[0])) != 1:
            continue
        if pattern[0] == "integer_pow" and run[0].params.get("y") != 3:
            continue
        inside = set(_inputs(run[0]))
        for eqn in run:
            if not inside.issuperset(_inputs(eqn)):
                break
            inside.update(eqn.outvars)
        else:
            return len(pattern)
    return 0


def _inlined(eqns, i: int, softmax: bool = False) -> tuple[str | None, int]:
    """The inlined function (``"gelu"``, or ``"softmax"`` when asked) starting at ``eqns[i]`` and its length."""
    gelu = _gelu_length(eqns, i)
    if gelu:
        return "gelu", gelu
    length = _gelu_length(eqns, i, SOFTMAX) if softmax else 0
    return ("softmax", length) if length else (None, 0)


def _contains_activation(jaxpr, softmax: bool = False) -> bool:
    for i, eqn in enumerate(jaxpr.eqns):
        sub = called_jaxpr(eqn)
        if (_activation(eqn, softmax) or _inlined(jaxpr.eqns, i, softmax)[1]
                or (sub and _contains_activation(sub[0], softmax))):
            return True
    return False


@dataclasses.dataclass
class _Recorder:
    activations: list[Activation] = dataclasses.field(default_factory=list)
    stamp: int = 0  # orders the labels: the most recently assigned wins
    softmax: bool = False  # also record jax.nn.softmax (kind "softmax")

    def propagate(self, labels: list[Label]) -> Label:
        """An equation's output label from its inputs'."""
        modules = [label[1] for label in labels if label and label[0] == "param"]
        data = [label for label in labels if label and label[0] == "data"]
        if not data:  # a parameter transformed (cast, reshaped, ...) or a constant
            return ("param", modules[-1]) if modules else None
        if modules:  # data meets a parameter: the layer's output
            self.stamp += 1
            return ("data", self.stamp, modules[-1])
        return max(data, key=lambda label: label[1])

    def record(self, function: str, label: Label, output, input_) -> None:
        if not (label and label[0] == "data" and getattr(output, "ndim", 0) >= 1):
            return
        base = label[2] or f"{function}_{len(self.activations)}"
        taken = {a.name for a in self.activations}
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}#{n}"
        kind = SOFTMAX_KIND if function == "softmax" else ACTIVATION_KINDS[function]
        self.activations.append(Activation(name, function, kind, output, input_))

    def walk(self, jaxpr, consts, args, labels: list[Label], run: bool = True) -> tuple[list, list[Label]]:
        """Evaluate ``jaxpr`` (only propagate labels when not ``run``), recording activations."""
        env: dict = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        tags: dict = dict(zip(jaxpr.invars, labels))  # constants have no label
        read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
        tag = lambda v: None if v is None or isinstance(v, Literal) else tags.get(v)  # noqa: E731
        eqns, i = jaxpr.eqns, 0
        while i < len(eqns):
            function, length = _inlined(eqns, i, self.softmax)
            span = eqns[i:i + length] if length else [eqns[i]]
            function = function or _activation(eqns[i], self.softmax)
            for eqn in span:
                invals, inlabels = [read(v) for v in eqn.invars], [tag(v) for v in eqn.invars]
                if function is None and called_jaxpr(eqn) is not None:
                    outs, outlabels = self.call(eqn, invals, inlabels, run)
                else:
                    outs = bind_equation(eqn, invals) if run else [None] * len(eqn.outvars)
                    outlabels = [self.propagate(inlabels)] * len(eqn.outvars)
                env.update(zip(eqn.outvars, outs))
                tags.update(zip(eqn.outvars, outlabels))
            if function and run:
                first = next(iter(_inputs(span[0])), None)
                self.record(function, tag(first), env[span[-1].outvars[0]], None if first is None else read(first))
            i += len(span)
        return [read(v) for v in jaxpr.outvars], [tag(v) for v in jaxpr.outvars]

    def call(self, eqn, invals, labels: list[Label], run: bool) -> tuple[list, list[Label]]:
        """A call-like equation: walked into when it contains an activation (re-jitted / re-checkpointed, its
        activations returned as extra outputs), else bound as it is (and walked for labels only)."""
        jaxpr, consts = called_jaxpr(eqn)
        if not (run and _contains_activation(jaxpr, self.softmax)):
            outs = bind_equation(eqn, invals) if run else [None] * len(eqn.outvars)
            return outs, self.walk(jaxpr, consts, [None] * len(invals), labels, run=False)[1]
        found: dict[str, Any] = {}

        def inner(*xs):
            start = len(self.activations)
            outs, found["labels"] = self.walk(jaxpr, consts, xs, labels)
            found["recorded"] = self.activations[start:]
            del self.activations[start:]
            return outs, [(a.output, a.input) for a in found["recorded"]]

        name = eqn.primitive.name
        if name in JITS:
            inner.__name__ = eqn.params.get("name", "inner")
            inner = jax.jit(inner)
        elif name in REMATS:
            inner = jax.checkpoint(inner, prevent_cse=eqn.params.get("prevent_cse", True),
                                   policy=eqn.params.get("policy"))
        outs, outputs = inner(*invals)
        self.activations += [dataclasses.replace(a, output=o, input=i)
                             for a, (o, i) in zip(found["recorded"], outputs)]
        return list(outs), found["labels"]
