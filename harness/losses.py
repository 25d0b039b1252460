"""Built-in per-example losses. A user loss is ``f(outputs, targets) -> per-example losses`` of shape (batch,).

Per-position targets (a sequence ``(B, T)``, a label map ``(B, H, W)``) reduce to one value per example too: the
mean over the example's real positions, negative targets being padding (see :mod:`harness.tasks`).

What a model should start at, for any loss (:func:`initial_loss_expectation`): the built-ins in closed form, any
other loss from the loss function itself, evaluated at the null prediction (:func:`null_prediction`: outputs that
say nothing about the input, in the space the model's outputs live in), as Karpathy's "verify loss @ init" asks
("A Recipe for Training Neural Networks", 2019); the overfit test's ``loss_floor`` minimizes the same function over
free outputs instead."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


# The null predictions: outputs that say nothing about the input, in each space a model's outputs can live in.
ZERO_LOGITS = "zero logits"
UNIFORM_PROBABILITIES = "uniform probabilities"
UNIFORM_LOG_PROBABILITIES = "uniform log-probabilities"
SIGMOID_OF_ZERO = "sigmoid of zero logits"
ZERO_OUTPUTS = "zero outputs"
TARGET_MEAN = "the target mean"
CONSTANT_MINIMUM = "the best constant output"
# A loss whose value at the null prediction is log C within this fraction behaves like cross-entropy: it is judged
# in nats (label smoothing keeps log C exactly; a focal or summed loss does not and is judged by ratio).
CROSS_ENTROPY_LIKE_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class NullPrediction:
    """What a model predicting nothing scores with this loss: the value, which null prediction gave it, and whether
    the loss behaves like cross-entropy there (its value is log C)."""

    value: float
    name: str
    cross_entropy_like: bool = False


def null_outputs(num_classes: int | None, shape: tuple[int, ...], dtype, targets) -> dict[str, Any]:
    """Null predictions shaped like the model's outputs ``shape`` (traceable). Classification: zero logits, uniform
    probabilities, uniform log-probabilities and the sigmoid of zero logits (0.5), along the last (class) axis.
    Regression: zero outputs and the targets' mean over the batch (per output value)."""
    if num_classes:
        c = shape[-1]
        return {ZERO_LOGITS: jnp.zeros(shape, dtype), UNIFORM_PROBABILITIES: jnp.full(shape, 1.0 / c, dtype),
                UNIFORM_LOG_PROBABILITIES: jnp.full(shape, -math.log(c), dtype),
                SIGMOID_OF_ZERO: jnp.full(shape, 0.5, dtype)}
    mean = jnp.reshape(jnp.mean(jnp.asarray(targets, jnp.float32), axis=0), shape[1:]).astype(dtype)
    return {ZERO_OUTPUTS: jnp.zeros(shape, dtype), TARGET_MEAN: jnp.broadcast_to(mean, shape)}


def null_losses(loss_fn, num_classes: int | None, shape: tuple[int, ...], dtype, targets) -> dict[str, Any]:
    """The mean loss of each null prediction on ``targets`` (traceable: the model stage computes them inside its
    init program, at no extra compile)."""
    return {name: jnp.mean(loss_fn(out, targets).astype(jnp.float32))
            for name, out in null_outputs(num_classes, shape, dtype, targets).items()}


def output_space(outputs, tolerance: float = 1e-3) -> str:
    """Where a classifier's outputs live, read off their values at init: softmax probabilities (in [0, 1], rows
    summing to 1), log-probabilities (at most 0, rows whose exp sums to 1), sigmoid outputs (strictly inside
    (0, 1)), else logits (unnormalized)."""
    out = np.asarray(outputs, np.float64)
    lo, hi = float(np.min(out)), float(np.max(out))
    c = out.shape[-1]
    if lo >= -tolerance and hi <= 1 + tolerance and np.all(np.abs(out.sum(-1) - 1) <= tolerance * max(1, c)):
        return UNIFORM_PROBABILITIES
    if hi <= tolerance:
        top = out.max(-1, keepdims=True)
        log_total = np.log(np.exp(out - top).sum(-1)) + top[..., 0]
        if np.all(np.abs(log_total) <= tolerance * max(1, c)):
            return UNIFORM_LOG_PROBABILITIES
    if lo > 0 and hi < 1:
        return SIGMOID_OF_ZERO
    return ZERO_LOGITS


# Margins of the "confidently correct" logits: the right class this far above the others, so that a softmax leaves
# the others exp(-20) and exp(-40) of the mass. A loss that applies its own softmax to them scores ~0 at both.
CONFIDENT_MARGINS = (20.0, 40.0)


def confident_losses(loss_fn, num_classes: int | None, shape: tuple[int, ...], dtype, targets) -> dict[str, Any]:
    """The mean loss on ``targets`` of logits that are confidently correct, at each of ``CONFIDENT_MARGINS``
    (traceable; computed in the model stage's init program): the right class's logit ``m`` above zero elsewhere
    (``(..., C)`` outputs for integer labels of shape ``(...)``; padding labels, negative, get an all-zero row), or
    ``m (2y - 1)`` for one binary logit per label. Empty for regression or outputs of another shape. A loss that
    treats its input as logits goes to 0 along them, a label-smoothed one grows; one that levels off above 0
    squashes the logits before its log (:func:`harness.checks.model.forward.loss_saturation_findings`)."""
    if not num_classes:
        return {}
    y = jnp.asarray(targets)
    if tuple(shape[:-1]) == tuple(y.shape) and shape[-1] == num_classes and num_classes > 1:
        direction = jax.nn.one_hot(y.astype(jnp.int32), num_classes, dtype=dtype)
    elif num_classes == 2 and int(np.prod(shape)) == int(np.prod(y.shape)):
        direction = jnp.reshape(2.0 * y.astype(dtype) - 1.0, shape)
    else:
        return {}
    return {f"{m:g}": jnp.mean(loss_fn(m * direction, targets).astype(jnp.float32)) for m in CONFIDENT_MARGINS}


def null_prediction(loss_fn, num_classes: int | None, outputs, targets, values: dict[str, float] | None = None
                    ) -> NullPrediction | None:
    """The loss a model that predicts nothing gets, for any loss: its value at the null prediction of the space the
    model's outputs live in (:func:`output_space`).

    ``outputs``: the model's outputs at init, ``(inits, batch, ...)``; ``targets``: the batch's targets;
    ``values``: :func:`null_losses` if already computed. Classification: uniform probabilities for a model ending
    in a softmax, uniform log-probabilities for a log-softmax, 0.5 for a sigmoid; for logits the
    lower of zero logits and uniform probabilities (a loss on logits gives log C for both, softmax being shift
    invariant; a loss on probabilities is undefined or huge at zero). Regression: the higher of zero outputs
    (what a zero-mean init gives) and the target mean (a bias set to it, Karpathy's "init well"): both are good
    inits, and only an init worse than both is wrong; for squared error this is E[y^2], the built-in's
    expectation. A null prediction whose loss is not finite gives way to the other finite ones (the lowest);
    if none is finite, the loss minimized over a constant output (:func:`constant_minimum`). None if nothing
    is finite."""
    sample = np.asarray(outputs)
    if values is None:
        dtype = jax.dtypes.canonicalize_dtype(sample.dtype)  # float32 unless x64 is on, as the model computes
        values = jax.tree.map(float, jax.jit(lambda y: null_losses(loss_fn, num_classes, sample.shape[1:],
                                                                   dtype, y))(targets))
    finite = {k: float(v) for k, v in values.items() if np.isfinite(v)}
    if num_classes:
        space = output_space(sample)
        preferred = [ZERO_LOGITS, UNIFORM_PROBABILITIES] if space == ZERO_LOGITS else [space]
        chosen = [k for k in preferred if k in finite] or list(finite)
        name = min(chosen, key=finite.__getitem__) if chosen else None
    else:
        name = max(finite, key=finite.__getitem__) if finite else None
    if name is None:
        value = constant_minimum(loss_fn, bool(num_classes), sample, targets)
        if value is None:
            return None
        name, finite = CONSTANT_MINIMUM, {CONSTANT_MINIMUM: value}
    value = finite[name]
    log_c = math.log(num_classes) if num_classes and num_classes > 1 else None
    like = log_c is not None and abs(value - log_c) <= CROSS_ENTROPY_LIKE_TOLERANCE * log_c
    return NullPrediction(value, name, like)


CONSTANT_STEPS = 300


def constant_minimum(loss_fn, classification: bool, outputs, targets) -> float | None:
    """The lowest mean loss of one constant output (the same prediction for every example; per class, or per output
    value for regression), for losses undefined at every null prediction. Adam from the model's own mean output at
    init (where the loss is finite), cosine-decayed; the lowest finite value seen. None if none is finite."""
    outputs = np.asarray(outputs, np.float32)  # (inits, batch, ...)
    batch_shape = outputs.shape[1:]
    axes = tuple(range(outputs.ndim - 1)) if classification else (0, 1)
    start = outputs.mean(axis=axes)  # (classes,) or the per-example output shape
    scale = float(max(1.0, np.sqrt(np.mean(np.square(start)))))
    tx = optax.adam(optax.cosine_decay_schedule(0.05 * scale, CONSTANT_STEPS, alpha=1e-2))

    def mean_loss(c, y):
        return jnp.mean(loss_fn(jnp.broadcast_to(c, batch_shape), y))

    @jax.jit
    def run(c, y):
        def step(carry, _):
            c, state = carry
            loss, grad = jax.value_and_grad(mean_loss)(c, y)
            grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
            updates, state = tx.update(grad, state, c)
            return (optax.apply_updates(c, updates), state), loss

        return jax.lax.scan(step, (c, tx.init(c)), None, length=CONSTANT_STEPS)[1]

    try:
        found = np.asarray(run(jnp.asarray(start), targets), np.float64)
    except Exception:  # noqa: BLE001 -- a loss that only works on a model's own outputs: no expectation
        return None
    found = found[np.isfinite(found)]
    return float(found.min()) if found.size else None


def initial_loss_expectation(loss_fn, num_classes: int | None, y_train, outputs=None, targets=None,
                             values: dict[str, float] | None = None) -> NullPrediction | None:
    """What a well-initialized model should start at, and from which null prediction. Built-in losses in closed
    form: -log(1/C) for cross-entropy, per example or per position (a language model starts at log V, V the
    vocabulary size), E[y^2] over every training target for MSE (outputs ~ 0; a model whose output bias starts at
    the mean gives Var(y)). Any other loss from the loss function itself, given the model's ``outputs`` at init
    (``(inits, batch, ...)``) and the batch's ``targets`` (default ``y_train``): :func:`null_prediction`
    (``values``: its :func:`null_losses` if computed already). None when it cannot be known."""
    if loss_fn is cross_entropy and num_classes:
        return NullPrediction(float(np.log(num_classes)), "uniform predictions", True)
    if loss_fn is mse:
        y = np.asarray(y_train, dtype=np.float64)
        return NullPrediction(float(np.mean(np.square(y))), "outputs at zero")
    if outputs is None:
        return None
    return null_prediction(loss_fn, num_classes, outputs, y_train if targets is None else targets, values or None)


def expected_initial_loss(loss_fn, num_classes: int | None, y_train, outputs=None, targets=None) -> float | None:
    """The value of :func:`initial_loss_expectation`, for the model's ``outputs`` of one init (``(batch, ...)``)."""
    found = initial_loss_expectation(loss_fn, num_classes, y_train,
                                     None if outputs is None else np.asarray(outputs)[None], targets)
    return None if found is None else found.value
