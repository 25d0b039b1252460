"""The one model contract every diagnostic and the engine use, whatever library the model was written in.

A :class:`Model` is a pair of pure functions, the shape init2winit, laplax and KFAC-JAX give their models:

* ``init(key, x) -> Variables(params, state)`` -- ``x`` an example batch (Linen and Haiku size their layers from
  it); traceable, so each member of a vmapped sweep draws its own init from its own key;
* ``apply(params, state, x, *, key, train, regularization) -> (outputs, new_state)`` -- ``params`` the trainable
  leaves (what gradients, norms and optimizers see), ``state`` everything else the forward pass reads or updates
  (BatchNorm statistics, Equinox ``nn.State``, Haiku state, NNX RNG counters), ``key`` the dropout stream,
  ``train`` the library's training mode (dropout on, BatchNorm on batch statistics) and ``regularization=False``
  training mode with dropout off (the overfit-one-batch test).

``precision`` (the config's top-level ``precision`` key) is applied here, once, around every family's
``apply_fn`` (:func:`with_precision`): with ``bfloat16`` the trainable parameters and floating inputs are cast to
bfloat16 inside ``apply`` and the floating outputs back to float32, so the parameters the optimizer updates stay
float32 (master weights), the loss is computed in float32, and every program that calls the model (the checklist's
training diagnostics, ``harness train``) computes in bfloat16.

One adapter module per family (:mod:`.nnx`, :mod:`.linen`, :mod:`.equinox`, :mod:`.haiku`) turns what a model
factory returned into a Model; nothing outside ``harness/models/adapters/`` names a model library.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PRECISIONS = ("float32", "bfloat16")  # the config's ``precision``: the dtype a Model computes in


class Variables(NamedTuple):
    params: Any  # trainable leaves
    state: Any  # non-trainable leaves the forward pass reads or updates


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model of any family behind the pure contract (see the module docstring)."""

    family: str  # "nnx" | "linen" | "equinox" | "haiku"
    init: Callable[[jax.Array, jax.Array], Variables]
    apply_fn: Callable[..., tuple[Any, Any]]  # (params, state, x, key, train, regularization)
    name_path: Callable[[tuple], str]  # a parameter's tree path in the family's own spelling
    # Finds whether its training step convolves (:func:`convolves`, given the model), asked once, when first
    # needed (tracing the model costs 0.1 s or more; the capacity ladder's rungs that are only counted never ask).
    find_convolutions: Callable[["Model"], bool] | None = None
    width_masked: bool = False  # built width-masked (harness.models.width_mask): capacity's masked ladder
    precision: str = "float32"  # the dtype it computes in (PRECISIONS); parameters and state stay as stored

    @functools.cached_property
    def convolutions(self) -> bool:
        """Its training step convolves: on CPU, apply runs its convolutions as matrix multiplications
        (harness.engine.convolution)."""
        return self.find_convolutions is not None and self.find_convolutions(self)

    @property
    def convolves_on_cpu(self) -> bool:
        """Its convolutions run as matrix multiplications here, and a member-step costs more than on an
        accelerator by far (the built-in CNN: about 9 ms on two CPU cores)."""
        return jax.default_backend() == "cpu" and self.convolutions  # elsewhere, never traced for this

    def apply(self, params, state, x, *, key=None, train: bool = False, regularization: bool = True):
        if key is None:
            key = jax.random.key(0)
        apply_fn = self.apply_fn
        if self.convolves_on_cpu:
            from harness.engine.convolution import as_matmuls

            def apply_fn(params, state, x, key, train, regularization, apply_fn=self.apply_fn):
                return as_matmuls(lambda *a: apply_fn(*a, train, regularization))(params, state, x, key)
        if self.precision == "float32":
            return apply_fn(params, state, x, key, train, regularization and train)
        return _apply_in(jnp.dtype(self.precision), apply_fn, params, state, x, key, train,
                         regularization and train)

    def __call__(self, params, state, x):
        """Outputs in inference mode (no dropout, BatchNorm on running statistics)."""
        return self.apply(params, state, x)[0]

    def flat_params(self, params) -> dict[str, Any]:
        """``{"layers/0/kernel": leaf}``: parameters (or gradients, or anything shaped like them) by path."""
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        return {self.name_path(path): leaf for path, leaf in leaves}


def with_precision(model: Model, precision: str) -> Model:
    """``model`` computing in ``precision`` (one of :data:`PRECISIONS`): the same init and parameters, its
    ``apply`` cast as :func:`_apply_in` says."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return model if model.precision == precision else dataclasses.replace(model, precision=precision)


def cast_floating(tree, dtype):
    """The floating-point leaves of ``tree`` cast to ``dtype``; integer leaves (token ids, step counters), booleans
    and PRNG keys as they are."""

    def cast(a):
        kind = getattr(a, "dtype", None)
        if kind is None or not jnp.issubdtype(kind, jnp.floating) or kind == dtype:
            return a
        return jnp.asarray(a).astype(dtype)

    return jax.tree.map(cast, tree)


def _apply_in(dtype, apply_fn, params, state, x, key, train, regularization):
    """Mixed precision around one family's ``apply_fn``: the parameters (float32 master weights) and floating
    inputs cast to ``dtype`` for the forward pass (the cast is differentiable: gradients reach the float32
    parameters as float32), the floating outputs cast back to float32 before the loss.

    The non-trainable state (BatchNorm's running statistics) goes in as stored, float32, and comes back in its own
    dtypes: running averages updated in bfloat16 would stop moving once the update falls under bfloat16's spacing,
    an artefact no real mixed-precision setup has (jmp and Flax keep BatchNorm's statistics in float32). So a
    layer that combines its float32 state with activations computes in float32 by JAX's type promotion, as does
    anything mixing a float32 constant the model makes itself (a sinusoidal position table) into its activations;
    a model that wants those layers in bfloat16 too sets its layers' own ``dtype=``."""
    outputs, new_state = apply_fn(cast_floating(params, dtype), state, cast_floating(x, dtype), key, train,
                                  regularization)
    outputs = cast_floating(outputs, jnp.float32)
    try:
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype) if (
            hasattr(new, "dtype") and hasattr(old, "dtype") and jnp.issubdtype(old.dtype, jnp.floating)
            and new.dtype != old.dtype) else new, new_state, state)
    except (ValueError, TypeError):  # a state whose structure the forward pass changes: returned as it is
        pass
    return outputs, new_state


def convolves(model: Model, x) -> bool:
    """Whether the model's training-mode forward pass runs a convolution: any ``conv_general_dilated`` in its
    jaxpr, sub-programs included (tracing only, no FLOPs). Read off the program rather than the layer types, so a
    library's own convolution layers, a user's module calling ``jax.lax.conv`` and a convolution wrapped in
    another module are all found, in every family."""
    from jax.extend.core import subjaxprs

    def forward(key, x):  # through apply_fn: Model.apply asks for the answer this computes
        params, state = model.init(key, x)
        return model.apply_fn(params, state, x, key, True, True)[0]

    def found(jaxpr) -> bool:
        return any(eqn.primitive.name == "conv_general_dilated" for eqn in jaxpr.eqns) or any(
            found(sub) for sub in subjaxprs(jaxpr))

    try:
        return found(jax.make_jaxpr(forward)(jax.random.key(0), x).jaxpr)
    except Exception:  # noqa: BLE001 -- the model checks report a model that does not run
        return False


def slash_path(path) -> str:
    """``layers/0/kernel``: dict keys, attributes and indices joined by ``/`` (NNX, Linen, Haiku); NNX's trailing
    ``.value`` of a Variable is dropped."""
    parts = []
    for p in path:
        part = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(part))
    if parts and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts.pop()
    return "/".join(parts)


def attribute_path(path) -> str:
    """``layers[2].weight``: Python's own spelling (Equinox modules are dataclasses)."""
    return jax.tree_util.keystr(tuple(path)).lstrip(".")


def nodes_of_type(tree, types: tuple[type, ...]) -> list:
    """The nodes of ``tree`` (modules and states included) that are instances of ``types``, outermost first."""
    found = []

    def visit(node):
        if isinstance(node, types):
            found.append(node)
            return True
        return False

    jax.tree_util.tree_flatten(tree, is_leaf=visit)
    return found


def contains_leaf_type(tree, types: tuple[type, ...]) -> bool:
    """True when any node of ``tree`` (modules included) is an instance of ``types``."""
    return bool(nodes_of_type(tree, types))


def call_mode_kwargs(signature_names: set[str], train: bool, regularization: bool) -> dict[str, bool]:
    """The training-mode keyword a model's call takes, by the names libraries and users use for it (``train``,
    ``training``, ``is_training``; ``deterministic`` means dropout off; ``use_running_average`` is BatchNorm's)."""
    out = {}
    for name in ("train", "training", "is_training"):
        if name in signature_names:
            out[name] = train
    if "deterministic" in signature_names:
        out["deterministic"] = not regularization
    if "use_running_average" in signature_names:
        out["use_running_average"] = not train
    return out
