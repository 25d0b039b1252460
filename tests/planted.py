"""Planted bugs: small Flax NNX models and loss functions with one known defect each, plus healthy variants that
must not be flagged. Every model factory has the harness's model signature ``f(*, rngs, input_shape, num_outputs,
**cfg)``, so a test selects one with ``replace_group("model", "planted.<name>")`` (``tests/`` is on the path) or
calls it directly. Losses are ``f(outputs, targets) -> per-example losses`` (``loss._partial_: true``).

Keep this a plain module of small models: other test files import it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class MLP(nnx.Module):
    """A plain ReLU MLP whose every piece can be swapped, so each planted bug below is a one-line difference."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 64, depth: int = 2,
                 activation=jax.nn.relu, kernel_init=nnx.initializers.he_normal(),
                 bias_init=nnx.initializers.zeros_init(), out_init=nnx.initializers.lecun_normal(),
                 out_features: int | None = None):
        sizes = [math.prod(input_shape)] + [width] * depth
        self.hidden = nnx.List([nnx.Linear(a, b, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])
        self.activation = activation
        self.out = nnx.Linear(sizes[-1], num_outputs if out_features is None else out_features,
                              kernel_init=out_init, rngs=rngs)

    def features(self, x):
        x = jnp.reshape(x, (x.shape[0], -1))
        for layer in self.hidden:
            x = self.activation(layer(x))
        return x

    def __call__(self, x):
        return self.out(self.features(x))


# ----------------------------------------------------------------------------------------------------------------
# model.forward


class ShapeMismatch(MLP):
    """The first layer is built for one input feature too many: the forward pass raises."""

    def __init__(self, *, rngs, input_shape, num_outputs, **kw):
        super().__init__(rngs=rngs, input_shape=(math.prod(input_shape) + 1,), num_outputs=num_outputs, **kw)


def off_by_one_head(*, rngs, input_shape, num_outputs, **kw):
    """The output layer has num_outputs - 1 units (a miscounted class list)."""
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, out_features=num_outputs - 1, **kw)


class PythonBranch(MLP):
    """Branches in Python on a value computed from the input: fine eagerly, fails under jax.jit."""

    def __call__(self, x):
        logits = super().__call__(x)
        if jnp.mean(logits) > 0:
            return logits
        return -logits


class LogOfNegative(MLP):
    """log of a quantity that is negative for most inputs: NaN outputs."""

    def __call__(self, x):
        return jnp.log(super().__call__(x) - 1.0)


def broadcasting_square_error(outputs, targets):
    """Squared error without reshaping: (batch, 1) outputs minus (batch,) targets broadcast to (batch, batch)."""
    return jnp.square(outputs - targets)


def raising_loss(outputs, targets):
    raise ValueError("this loss expects one-hot targets")


# ----------------------------------------------------------------------------------------------------------------
# model.output_range and model.initial_loss


class DoubleSoftmax(MLP):
    """Returns probabilities although the loss (cross-entropy on logits) applies its own softmax."""

    def __call__(self, x):
        return jax.nn.softmax(super().__call__(x), axis=-1)


def large_output_init(*, rngs, input_shape, num_outputs, **kw):
    """The output layer drawn from N(0, 1) instead of a fan-in scaled init: confident, wrong initial logits."""
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs,
               out_init=nnx.initializers.normal(1.0), **kw)


def negated_cross_entropy(logits, labels):
    """A sign flip: minimizing this maximizes the cross-entropy."""
    return -optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# ----------------------------------------------------------------------------------------------------------------
# model.gradient_flow


class DetachedFeatures(MLP):
    """A stop_gradient on the hidden features: no gradient reaches the hidden layers."""

    def __call__(self, x):
        return self.out(jax.lax.stop_gradient(self.features(x)))


class NormOfZero(MLP):
    """Adds the norm of a vector that is zero at init (sqrt at 0): finite outputs, NaN gradients."""

    def __init__(self, *, rngs, input_shape, num_outputs, **kw):
        super().__init__(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, **kw)
        self.offset = nnx.Param(jnp.zeros((num_outputs,)))

    def __call__(self, x):
        return super().__call__(x) + jnp.sqrt(jnp.sum(jnp.square(self.offset)))


# ----------------------------------------------------------------------------------------------------------------
# model.gradient_check


@jax.custom_vjp
def _cross_entropy_wrong_backward(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _ce_forward(logits, labels):
    return _cross_entropy_wrong_backward(logits, labels), (logits, labels)


def _ce_backward(residuals, g):
    logits, labels = residuals
    # Bug: the derivative is softmax(logits) - onehot; the softmax term is forgotten.
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return (-onehot * g[:, None], None)


_cross_entropy_wrong_backward.defvjp(_ce_forward, _ce_backward)


def cross_entropy_wrong_backward(logits, labels):
    """Cross-entropy with a hand-written backward pass that forgets the softmax term."""
    return _cross_entropy_wrong_backward(logits, labels.astype(jnp.int32))


# ----------------------------------------------------------------------------------------------------------------
# model.batch_dependence


class ReshapeInsteadOfTranspose(MLP):
    """Goes feature-major and back with a reshape where a transpose was meant: examples get mixed."""

    def __call__(self, x):
        h = self.features(x)
        feature_major = jnp.reshape(h, (h.shape[1], h.shape[0]))  # meant: h.T
        return self.out(feature_major.T)


class SoftmaxOverBatch(MLP):
    """Normalizes the hidden features with a softmax over the batch axis instead of the feature axis."""

    def __call__(self, x):
        return self.out(jax.nn.softmax(self.features(x), axis=0) * x.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# model.dead_units and model.saturated_units


def negative_bias(*, rngs, input_shape, num_outputs, bias: float = -10.0, **kw):
    """Hidden biases initialized to a large negative constant: every ReLU is off for every example."""
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs,
               bias_init=nnx.initializers.constant(bias), **kw)


def saturated_tanh(*, rngs, input_shape, num_outputs, **kw):
    """tanh units with N(0, 1) weights: on unscaled inputs (pixels 0-16) nearly every unit sits at +-1."""
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, activation=jnp.tanh,
               kernel_init=nnx.initializers.normal(1.0), **kw)


def deep_sigmoid(*, rngs, input_shape, num_outputs, depth: int = 10, **kw):
    """Ten sigmoid layers (Glorot init): the gradient and the signal shrink ~4x per layer."""
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, depth=depth, activation=jax.nn.sigmoid,
               kernel_init=nnx.initializers.glorot_normal(), **kw)


# ----------------------------------------------------------------------------------------------------------------
# Healthy variants that must stay silent.


class ResidualBatchNorm(nnx.Module):
    """Residual blocks ``h + W2 relu(BN(W1 h))`` with the branch output ``W2`` zero-initialized (Goyal et al. 2017;
    Fixup, Zhang et al. 2019). Two things a checker must not flag: BatchNorm couples the examples of a batch in
    train mode (by design), and at the exact init ``W1`` gets a zero gradient (``W2 = 0``), also by design."""

    def __init__(self, *, rngs, input_shape, num_outputs, width: int = 64, blocks: int = 1):
        self.inp = nnx.Linear(math.prod(input_shape), width, rngs=rngs)
        self.branch_in = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(blocks)])
        self.norms = nnx.List([nnx.BatchNorm(width, rngs=rngs) for _ in range(blocks)])
        self.branch_out = nnx.List([nnx.Linear(width, width, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
                                    for _ in range(blocks)])
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.inp(jnp.reshape(x, (x.shape[0], -1))))
        for a, norm, b in zip(self.branch_in, self.norms, self.branch_out):
            h = h + b(nnx.relu(norm(a(h))))
        return self.out(h)


def sequential(*, rngs, input_shape, num_outputs, width: int = 64):
    """An nnx.Sequential holding its activations as items (captured without attributes to swap)."""
    return nnx.Sequential(
        lambda x: jnp.reshape(x, (x.shape[0], -1)),
        nnx.Linear(math.prod(input_shape), width, rngs=rngs), nnx.relu,
        nnx.Linear(width, width, rngs=rngs), nnx.gelu,
        nnx.Linear(width, num_outputs, rngs=rngs),
    )


def float32_compute(*, rngs, input_shape, num_outputs, width: int = 64):
    """Layers with an explicit dtype=float32: the model computes in float32 even on float64 inputs."""
    model = MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, width=width)
    sizes = [math.prod(input_shape), width, width]
    model.hidden = nnx.List([nnx.Linear(a, b, dtype=jnp.float32, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    model.out = nnx.Linear(width, num_outputs, dtype=jnp.float32, rngs=rngs)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Issue 10 (part 5): init pathologies across depth, user-written losses and zero init, each beside its healthy twin.


def deep_he_relu(*, rngs, input_shape, num_outputs, depth: int = 20, **kw):
    """Healthy: 20 ReLU layers with He init (He et al. 2015): the activations' scale is kept across depth."""
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, depth=depth, **kw)


def exploding_relu(*, rngs, input_shape, num_outputs, depth: int = 20, std: float = 0.3, **kw):
    """20 ReLU layers with N(0, 0.3^2) kernels: 1.7x He's sqrt(2 / 64) per layer, so the activations grow ~1.7x
    per layer (0.4 -> ~1e4 over 20 layers) and the loss at init is in the thousands."""
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, depth=depth,
               kernel_init=nnx.initializers.normal(std), **kw)


def lecun_tanh(*, rngs, input_shape, num_outputs, depth: int = 10, **kw):
    """Healthy: 10 tanh layers with LeCun init (LeCun et al., "Efficient BackProp", 1998)."""
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, depth=depth, activation=jnp.tanh,
               kernel_init=nnx.initializers.lecun_normal(), **kw)


def wide_tanh(*, rngs, input_shape, num_outputs, width: int = 128, **kw):
    """tanh with N(0, 1) kernels on scaled inputs: pre-activations of std ~10 in the second layer, so most of
    them sit beyond +-5 (the flat tails), yet no unit is pinned for 90% of the examples (the signs vary)."""
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, width=width, activation=jnp.tanh,
               kernel_init=nnx.initializers.normal(1.0), **kw)


class SoftmaxHead(MLP):
    """Healthy with a loss on probabilities: the model ends in a softmax (LeCun output layer: near uniform)."""

    def __call__(self, x):
        return jax.nn.softmax(super().__call__(x), axis=-1)


def softmax_large_output_init(*, rngs, input_shape, num_outputs, **kw):
    """:class:`SoftmaxHead` with an N(0, 1) output layer: confident, wrong initial probabilities."""
    return SoftmaxHead(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs,
                       out_init=nnx.initializers.normal(1.0), **kw)


def my_ce(logits, y):
    """A user's hand-written cross-entropy on logits (harness knows nothing about it)."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None].astype(jnp.int32), 1)[:, 0]


def my_probability_nll(probabilities, y):
    """A user's negative log-likelihood on probabilities (the model ends in a softmax), clipped like Keras'."""
    picked = jnp.take_along_axis(probabilities, y[:, None].astype(jnp.int32), 1)[:, 0]
    return -jnp.log(jnp.clip(picked, 1e-7, 1.0))


def softmax_then_cross_entropy(logits, y):
    """"Softmax applied twice" inside the loss: probabilities handed to a cross-entropy that applies its own."""
    return optax.softmax_cross_entropy_with_integer_labels(jax.nn.softmax(logits), y.astype(jnp.int32))


def label_smoothed_cross_entropy(logits, y, smoothing=0.1):
    """Healthy: a user's label-smoothed cross-entropy (its loss grows, not levels off, with confidence)."""
    targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


class ReluHead(MLP):
    """A regression head ending in a ReLU: targets below 0 out of reach."""

    def __call__(self, x):
        return jax.nn.relu(super().__call__(x))


def my_mse(outputs, targets):
    """A user's hand-written squared error."""
    return jnp.mean(jnp.square(outputs - jnp.reshape(targets, outputs.shape)), axis=-1)


def zero_linear(*, rngs, input_shape, num_outputs):
    """Healthy: softmax regression with a zero-initialized kernel and bias (zero init only fails to break the
    symmetry of hidden units; a linear model has none)."""
    return nnx.Linear(math.prod(input_shape), num_outputs, kernel_init=nnx.initializers.zeros_init(),
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def zero_mlp(*, rngs, input_shape, num_outputs, activation=jnp.tanh, **kw):
    """Zero init with hidden layers: every hidden unit computes the same value (0) and gets the same (zero)
    gradient, so the hidden kernels never learn; only the output bias does."""
    zeros = nnx.initializers.zeros_init()
    return MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, activation=activation,
               kernel_init=zeros, out_init=zeros, **kw)


def broadcast_mean_square_error(outputs, targets):
    """The broadcast of ``broadcasting_square_error``, then a mean over the last axis meant for output dimensions:
    shape ``(batch,)``, so nothing fails, but each example's loss compares its output with every target."""
    return jnp.mean(jnp.square(outputs - targets), axis=-1)
