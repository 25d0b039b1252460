"""The reference job's model (an MLP, ``depth`` hidden layers of ``width`` ReLU units) written in each of the four
JAX model libraries, as a user would write it, plus planted bugs around them. Importable from CLI subprocesses as
``model._target_=families.linen_mlp`` (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import math

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
from flax import nnx


# ----------------------------------------------------------------------------------------------------------------
# Flax NNX (the reference MLP itself is the built-in harness.models.mlp.MLP)


class NNXMLP(nnx.Module):
    """The reference MLP as a user writes it in NNX (no width masking: the capacity ladder trains each width as its
    own program, as for the other libraries)."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 128, depth: int = 2):
        sizes = [math.prod(input_shape)] + [width] * depth
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(sizes[-1], num_outputs, rngs=rngs)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.out(x)


class NNXBatchNormMLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 64):
        self.first = nnx.Linear(math.prod(input_shape), width, rngs=rngs)
        self.norm = nnx.BatchNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        x = self.first(x.reshape((x.shape[0], -1)))
        return self.head(nnx.relu(self.norm(x)))


def nnx_batchnorm_mlp(*, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 64):
    return NNXBatchNormMLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, width=width)


# ----------------------------------------------------------------------------------------------------------------
# Flax Linen


class LinenMLP(nn.Module):
    num_outputs: int
    width: int = 128
    depth: int = 2
    dropout: float = 0.0
    softmax: bool = False  # planted bug: probabilities handed to a logits loss

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_outputs)(x)
        return nn.softmax(x) if self.softmax else x


def linen_mlp(num_outputs: int, width: int = 128, depth: int = 2, dropout: float = 0.0, softmax: bool = False):
    return LinenMLP(num_outputs, width, depth, dropout, softmax)


class LinenBatchNormMLP(nn.Module):
    num_outputs: int
    width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.width)(x.reshape((x.shape[0], -1)))
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(self.num_outputs)(x)


def linen_batchnorm_mlp(num_outputs: int, width: int = 64):
    return LinenBatchNormMLP(num_outputs, width)


class LinenDeadMLP(nn.Module):
    """Planted bug: the second hidden layer's bias starts at ``bias`` (-100): every one of its ReLUs is dead."""

    num_outputs: int
    width: int = 64
    bias: float = -100.0

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x.reshape((x.shape[0], -1))))
        x = nn.relu(nn.Dense(self.width, bias_init=nn.initializers.constant(self.bias))(x))
        return nn.Dense(self.num_outputs)(x)


def linen_dead_mlp(num_outputs: int, width: int = 64, bias: float = -100.0):
    return LinenDeadMLP(num_outputs, width, bias)


def linen_through_bridge(rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 128, depth: int = 2):
    """A Linen module wrapped as NNX with Flax's own bridge."""
    model = nnx.bridge.ToNNX(LinenMLP(num_outputs, width, depth), rngs=rngs)
    nnx.bridge.lazy_init(model, jnp.zeros((1, *input_shape)))
    return model


# ----------------------------------------------------------------------------------------------------------------
# Equinox


def equinox_mlp(key, input_shape, num_outputs: int, width: int = 128, depth: int = 2):
    return eqx.nn.MLP(math.prod(input_shape), num_outputs, width, depth, activation=jax.nn.relu, key=key)


class EquinoxBatchNormMLP(eqx.Module):
    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key, input_shape, num_outputs: int, width: int = 64):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(math.prod(input_shape), width, key=k1)
        self.norm = eqx.nn.BatchNorm(width, axis_name="batch", mode="batch")
        self.head = eqx.nn.Linear(width, num_outputs, key=k2)

    def __call__(self, x, state):
        x, state = self.norm(jax.nn.relu(self.first(x.reshape(-1))), state)
        return self.head(x), state


def equinox_batchnorm_mlp(key, input_shape, num_outputs: int, width: int = 64):
    return eqx.nn.make_with_state(EquinoxBatchNormMLP)(key, input_shape, num_outputs, width)


class EquinoxDropoutMLP(eqx.Module):
    """``eqx.nn.MLP``'s layers with ``eqx.nn.Dropout`` after each hidden layer (drawing from the call's ``key``)."""

    layers: tuple[eqx.nn.Linear, ...]
    dropout: eqx.nn.Dropout

    def __init__(self, key, input_shape, num_outputs: int, width: int = 128, depth: int = 2, rate: float = 0.5):
        sizes = [math.prod(input_shape)] + [width] * depth + [num_outputs]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys))
        self.dropout = eqx.nn.Dropout(rate)

    def __call__(self, x, *, key=None):
        x = x.reshape(-1)
        keys = [None] * len(self.layers) if key is None else list(jax.random.split(key, len(self.layers)))
        for layer, k in zip(self.layers[:-1], keys):
            x = self.dropout(jax.nn.relu(layer(x)), key=k)
        return self.layers[-1](x)


def equinox_dead_mlp(key, input_shape, num_outputs: int, width: int = 64, bias: float = -100.0):
    """``eqx.nn.MLP`` as shipped, with a planted bug: its second hidden layer's bias set to ``bias`` (all dead)."""
    mlp = eqx.nn.MLP(math.prod(input_shape), num_outputs, width, 2, activation=jax.nn.relu, key=key)
    return eqx.tree_at(lambda m: m.layers[1].bias, mlp, jnp.full((width,), bias))


class Softmaxed(eqx.Module):
    """Planted bug around any Equinox model: probabilities out, handed to a logits loss."""

    model: eqx.Module

    def __call__(self, x):
        return jax.nn.softmax(self.model(x))


class EquinoxCNN(eqx.Module):
    """A small CNN from equinox.nn layers, for (H, W, C) images (Equinox convolutions take (C, H, W))."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key, input_shape, num_outputs: int, channels: int = 8):
        k1, k2, k3 = jax.random.split(key, 3)
        h, w, c = input_shape
        self.conv1 = eqx.nn.Conv2d(c, channels, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=k2)
        self.head = eqx.nn.Linear(channels * h * w, num_outputs, key=k3)

    def __call__(self, x):
        x = jnp.transpose(x, (2, 0, 1))
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.head(x.reshape(-1))


def equinox_softmax_cnn(key, input_shape, num_outputs: int, channels: int = 8):
    """Planted bug around the Equinox CNN: a softmax at its end, handed to a logits loss."""
    return Softmaxed(EquinoxCNN(key, input_shape, num_outputs, channels))


# ----------------------------------------------------------------------------------------------------------------
# Haiku


def haiku_mlp(num_outputs: int, width: int = 128, depth: int = 2, softmax: bool = False):
    """``hk.nets.MLP`` as shipped; ``softmax=True`` is a planted bug (probabilities handed to a logits loss)."""

    def forward(x):
        out = hk.nets.MLP([width] * depth + [num_outputs])(x.reshape((x.shape[0], -1)))
        return jax.nn.softmax(out) if softmax else out

    return hk.transform(forward)


def haiku_dropout_mlp(num_outputs: int, width: int = 128, depth: int = 2, rate: float = 0.5):
    """``hk.nets.MLP`` with its own dropout, on in training (``is_training``, Haiku's convention)."""

    def forward(x, is_training: bool):
        mlp = hk.nets.MLP([width] * depth + [num_outputs])
        x = x.reshape((x.shape[0], -1))
        return mlp(x, dropout_rate=rate, rng=hk.next_rng_key()) if is_training else mlp(x)

    return hk.transform(forward)


def haiku_dead_mlp(num_outputs: int, width: int = 64, bias: float = -100.0):
    """Planted bug: the second hidden layer's bias starts at ``bias`` (every ReLU dead)."""

    def forward(x):
        x = jax.nn.relu(hk.Linear(width, name="linear_0")(x.reshape((x.shape[0], -1))))
        x = jax.nn.relu(hk.Linear(width, b_init=hk.initializers.Constant(bias), name="linear_1")(x))
        return hk.Linear(num_outputs, name="linear_2")(x)

    return hk.transform(forward)


def haiku_batchnorm_mlp(num_outputs: int, width: int = 64):
    def forward(x, is_training: bool):
        x = hk.Linear(width)(x.reshape((x.shape[0], -1)))
        x = hk.BatchNorm(True, True, 0.9)(jax.nn.relu(x), is_training)
        return hk.Linear(num_outputs)(x)

    return hk.transform_with_state(forward)


# ----------------------------------------------------------------------------------------------------------------
# Data bugs to plant around any of them


def misaligned_digits(seed: int = 123):
    """digits with the training labels permuted relative to the inputs (a join on the wrong key): no signal."""
    import numpy as np

    from harness.data import builtin

    d = builtin.digits()
    d["y_train"] = d["y_train"][np.random.default_rng(seed).permutation(len(d["y_train"]))]
    return d


def one_based_label_digits():
    """digits with labels 1..10 (a 1-based class list) while ``num_classes`` says 10: label 10 is out of range."""
    from harness.data import builtin

    d = builtin.digits()
    d["y_train"], d["y_val"] = d["y_train"] + 1, d["y_val"] + 1
    return d
