"""In-graph statistics of a training run, recorded by the optimizer itself.

:func:`monitor` wraps the user's optax transformation (optax's own wrapper pattern, like ``optax.MultiSteps`` or
``optax.apply_if_finite``): its state carries ring buffers of the last ``history`` steps' statistics, per parameter
leaf in the tree's flattening order. So the statistics are computed inside the user's compiled step, under ``jit``,
``vmap`` (a leading member axis on every buffer) and sharding alike, without a host round trip per step: the host
reads the buffers between steps or after a chunk of steps (:class:`harness.monitor.Monitor`), as long as it reads
at least every ``history`` steps.

What is recorded per step, the quantities the seeds' checklists monitor (seeds 000-002; CS231n, "Babysitting the
learning process": the update-to-weight ratio per layer): the loss (when the step passes ``value=loss``, optax's
extra-argument convention), the global gradient norm, and per leaf the gradient and parameter norms and whether its
gradient holds a non-finite entry; with ``update_norms=True``, per leaf the update norm too (the update/parameter
ratio).

Why the update norms are not a default statistic: reducing the updates keeps XLA from fusing the wrapped optimizer's
update into ``optax.apply_updates`` (the updates are written out and read back), which on CPU costs more than every
other statistic together (measured in ``scripts/bench.py --only monitor``). Sampling them every k-th step under
``lax.cond`` costs as much again: the conditional's operands (the gradients, the optimizer state) are copied.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from harness.models.adapters.base import nodes_of_type

DEFAULT_HISTORY = 256


class MonitorState(NamedTuple):
    inner: Any  # the wrapped transformation's state
    count: jax.Array  # steps recorded so far; step ``count - 1`` is at index ``(count - 1) % history``
    loss: jax.Array  # (history,) the ``value`` the step passed
    loss_recorded: jax.Array  # (history,) whether it passed one
    grad_norm: jax.Array  # (history,) of the whole gradient
    layer_grad_norm: jax.Array  # (history, leaves)
    layer_param_norm: jax.Array  # (history, leaves) before the step
    layer_update_norm: jax.Array  # (history, leaves)
    layer_nonfinite: jax.Array  # (history, leaves) 1 where the leaf's gradient holds a non-finite entry


def _norm(x) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return jnp.sqrt(jnp.sum(x * x))


def _leaf_norms(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.stack([_norm(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.float32)


def monitor(inner: optax.GradientTransformation, history: int = DEFAULT_HISTORY, *, update_norms: bool = False
            ) -> optax.GradientTransformationExtraArgs:
    """``inner`` with per-step statistics in its state (see the module docstring). Its updates are exactly
    ``inner``'s; pass ``value=loss`` to ``update`` to record the loss too. ``update_norms``: record each leaf's
    update norm as well (NaN otherwise), which the plateau detector (an LR too low, with a suggested value) and the
    too-fast half of the update-ratio detector need."""
    if history < 1:
        raise ValueError(f"history must be at least 1, got {history}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        leaves = len(jax.tree.leaves(params))

        def nan(*shape):
            return jnp.full(shape, jnp.nan, jnp.float32)

        return MonitorState(inner.init(params), jnp.zeros((), jnp.int32), nan(history),
                            jnp.zeros((history,), bool), nan(history),
                            nan(history, leaves), nan(history, leaves), nan(history, leaves),
                            jnp.zeros((history, leaves), jnp.int32))

    def update_fn(updates, state: MonitorState, params=None, **extra_args):
        grads = updates
        new_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        layer_grad = _leaf_norms(grads)
        layer_update = _leaf_norms(new_updates) if update_norms else jnp.full(layer_grad.shape, jnp.nan)
        layer_param = jnp.full(layer_grad.shape, jnp.nan) if params is None else _leaf_norms(params)
        # A leaf holds a non-finite gradient entry exactly when its norm is non-finite (or the sum of squares
        # overflowed, past 1e19 per entry): no extra pass over the gradient.
        nonfinite = (~jnp.isfinite(layer_grad)).astype(jnp.int32)
        value = extra_args.get("value")
        loss = jnp.nan if value is None else jnp.asarray(value, jnp.float32).reshape(())
        i = state.count % history
        return new_updates, MonitorState(
            inner_state, state.count + 1, state.loss.at[i].set(loss),
            state.loss_recorded.at[i].set(value is not None),
            state.grad_norm.at[i].set(jnp.sqrt(jnp.sum(layer_grad * layer_grad))),
            state.layer_grad_norm.at[i].set(layer_grad), state.layer_param_norm.at[i].set(layer_param),
            state.layer_update_norm.at[i].set(layer_update), state.layer_nonfinite.at[i].set(nonfinite))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state) -> MonitorState | None:
    """The :class:`MonitorState` in an optimizer state (the monitor may be wrapped in a chain, or
    ``inject_hyperparams``); None when there is none."""
    found = nodes_of_type(opt_state, (MonitorState,))
    return found[0] if found else None
