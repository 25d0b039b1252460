"""Built-in per-example losses. A user loss is ``f(outputs, targets) -> per-example losses`` of shape (batch,).

Per-position targets (a sequence ``(B, T)``, a label map ``(B, H, W)``) reduce to one value per example too: the
mean over the example's real positions, negative targets being padding (see :mod:`harness.tasks`)."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def cross_entropy(logits, labels):
    """Softmax cross-entropy on integer class labels; expects logits (unnormalized), not probabilities.

    Per example: logits ``(B, C)``, labels ``(B,)``. Per position: logits ``(B, T, C)`` (or ``(B, H, W, C)``),
    labels ``(B, T)``; positions whose label is negative (padding) are ignored, each example's loss is the mean
    over its real positions, and an example made only of padding contributes 0."""
    labels = labels.astype(jnp.int32)
    if labels.ndim <= 1:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    real = labels >= 0
    per_position = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(real, labels, 0))
    axes = tuple(range(1, labels.ndim))
    total = jnp.sum(jnp.where(real, per_position, 0.0), axis=axes)
    return total / jnp.maximum(jnp.sum(real, axis=axes), 1).astype(total.dtype)


def mse(outputs, targets):
    """Squared error averaged over output dimensions, for targets of any shape: targets of shape (batch,) match
    outputs of shape (batch, 1), targets (batch, H, W) outputs (batch, H, W) or flattened (batch, H * W)."""
    targets = jnp.reshape(targets, outputs.shape).astype(outputs.dtype)
    return jnp.mean(jnp.square(outputs - targets), axis=tuple(range(1, outputs.ndim)))


def auto(num_classes: int | None):
    """The loss the data calls for: cross-entropy with class labels, squared error for regression targets."""
    return cross_entropy if num_classes else mse


def expected_initial_loss(loss_fn, num_classes: int | None, y_train) -> float | None:
    """What a well-initialized model should start at: -log(1/C) for cross-entropy, per example or per position (a
    language model starts at log V, V the vocabulary size), E[y^2] for MSE (outputs ~ 0; a model whose output bias
    starts at the mean gives Var(y)), over every target value. None for losses we know nothing about."""
    import numpy as np

    if loss_fn is cross_entropy and num_classes:
        return float(np.log(num_classes))
    if loss_fn is mse:
        y = np.asarray(y_train, dtype=np.float64)
        return float(np.mean(np.square(y)))
    return None
