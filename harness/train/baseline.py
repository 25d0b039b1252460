"""The loss of a model that ignores its inputs: the reference the underfitting detector judges a run against.

The checklist's constant-input control measures it by training the model on all-zero inputs
(:mod:`harness.checks.training.controls`); when that did not run, ``harness train`` fits one constant output to the
training targets with the run's own loss (the best prediction without inputs: the label prior's log-probabilities
for a cross-entropy, the targets' mean for a squared error, whatever a user-written loss makes of it), which takes a
few hundred cheap steps instead of a training run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from harness.engine.core import Problem, mean_loss

STEPS = 300
MAX_EXAMPLES = 8192


def from_controls(outcomes) -> float | None:
    """The constant-input control's validation loss, when the checklist's controls ran (``train.checks``)."""
    for o in outcomes:
        value = o.metrics.get("controls/val_loss/constant_input") if o.name == "controls" else None
        if value is not None and jnp.isfinite(value):
            return float(value)
    return None


def make_fit(problem: Problem, output_example: Any):
    """``fit(y) -> loss``: the lowest mean loss of one constant output (shaped like one example's output) over the
    targets ``y``, by Adam from zero."""
    shape, dtype = output_example.shape[1:], output_example.dtype
    tx = optax.adam(0.1)

    def fit(y):
        def loss(c):
            return mean_loss(problem.loss_fn, jnp.broadcast_to(c, (y.shape[0], *shape)).astype(dtype), y)

        def step(state, _):
            c, opt = state
            value, grad = jax.value_and_grad(loss)(c)
            updates, opt = tx.update(grad, opt, c)
            return (optax.apply_updates(c, updates), opt), value

        c0 = jnp.zeros(shape, jnp.float32)
        (c, _), values = jax.lax.scan(step, (c0, tx.init(c0)), None, length=STEPS)
        return jnp.minimum(jnp.min(values), loss(c))

    return fit
