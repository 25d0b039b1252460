"""Built-in per-example losses. A user loss is ``f(outputs, targets) -> per-example losses`` of shape (batch,)."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def cross_entropy(logits, labels):
    """Softmax cross-entropy on integer class labels; expects logits (unnormalized), not probabilities."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def mse(outputs, targets):
    """Squared error averaged over output dimensions; targets of shape (batch,) match outputs of shape (batch, 1)."""
    targets = jnp.reshape(targets, outputs.shape).astype(outputs.dtype)
    return jnp.mean(jnp.square(outputs - targets), axis=tuple(range(1, outputs.ndim)))


def auto(num_classes: int | None):
    """The loss the data calls for: cross-entropy with class labels, squared error for regression targets."""
    return cross_entropy if num_classes else mse


def expected_initial_loss(loss_fn, num_classes: int | None, y_train) -> float | None:
    """What a well-initialized model should start at: -log(1/C) for cross-entropy, Var(y) for MSE (outputs ~ 0 give
    E[y^2]; a model whose output bias starts at the mean gives Var(y)). None for losses we know nothing about."""
    import numpy as np

    if loss_fn is cross_entropy and num_classes:
        return float(np.log(num_classes))
    if loss_fn is mse:
        y = np.asarray(y_train, dtype=np.float64)
        return float(np.mean(np.square(y)))
    return None
