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


# ----------------------------------------------------------------------------------------------------------------
# Haiku


def haiku_mlp(num_outputs: int, width: int = 128, depth: int = 2):
    def forward(x):
        return hk.nets.MLP([width] * depth + [num_outputs])(x.reshape((x.shape[0], -1)))

    return hk.transform(forward)


def haiku_batchnorm_mlp(num_outputs: int, width: int = 64):
    def forward(x, is_training: bool):
        x = hk.Linear(width)(x.reshape((x.shape[0], -1)))
        x = hk.BatchNorm(True, True, 0.9)(jax.nn.relu(x), is_training)
        return hk.Linear(num_outputs)(x)

    return hk.transform_with_state(forward)
