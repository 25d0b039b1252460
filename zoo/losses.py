"""Losses as users write them, for ``loss._target_: zoo.losses.<name>`` with ``_partial_: true``.

harness's contract: ``f(outputs, targets) -> per-example losses`` of shape ``(batch,)``. The correct ones first,
then the planted mistakes, each a line a user writes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# ----------------------------------------------------------------------------------------------------------------
# Correct


def cross_entropy(logits, labels):
    """Softmax cross-entropy on integer labels, per example: optax's stable one."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def mse(outputs, targets):
    """Squared error per example, outputs reshaped to the targets' shape first."""
    outputs = outputs.reshape(targets.shape).astype(jnp.float32)
    err = jnp.square(outputs - targets)
    return err if err.ndim == 1 else jnp.mean(err.reshape(err.shape[0], -1), axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Planted mistakes


def log_likelihood(logits, labels):
    """The log-likelihood of the labels, meant as a loss: the minus sign is missing, so minimizing it drives the
    predicted probability of every true class to zero."""
    log_probs = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[:, None], axis=1)[:, 0]


def summed_cross_entropy(logits, labels):
    """Cross-entropy summed over the batch (``reduction='sum'``): one scalar, the batch size times the mean, so
    every step is ``batch_size`` times larger than the learning rate was chosen for."""
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32)))


def broadcast_square_error(outputs, targets):
    """Squared error of ``(batch, 1)`` outputs against ``(batch,)`` targets without reshaping: ``(batch, batch)``,
    every output compared with every target."""
    return jnp.square(outputs - targets)


def broadcast_mse(outputs, targets):
    """The same broadcast, then a mean over the last axis meant for output dimensions: shape ``(batch,)``, so
    nothing fails, but each example's loss is its prediction against *every* target of the batch and the model can
    only learn the batch mean."""
    return jnp.mean(jnp.square(outputs - targets), axis=-1)


def cross_entropy_of_probabilities(logits, labels):
    """The model outputs logits, the loss softmaxes them "to get probabilities" and hands those to a cross-entropy
    that applies its own softmax: softmax twice, a loss squashed into a narrow band."""
    probs = jax.nn.softmax(logits)
    return optax.softmax_cross_entropy_with_integer_labels(probs, labels.astype(jnp.int32))


def naive_binary_cross_entropy(logits, labels):
    """Binary cross-entropy written out by hand from two logits: ``p = sigmoid(margin)``, then
    ``-(y log p + (1 - y) log(1 - p))``. Once a margin passes ~17, ``p`` is exactly 1.0 in float32 and
    ``0 * log(0)`` is NaN: fine at init, NaN once the model becomes confident."""
    p = jax.nn.sigmoid(logits[:, 1] - logits[:, 0])
    y = labels.astype(jnp.float32)
    return -(y * jnp.log(p) + (1.0 - y) * jnp.log(1.0 - p))
