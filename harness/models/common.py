"""Pieces shared by the built-in models: activations and initializers looked up by name."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from harness.errors import HarnessError

ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jax.nn.tanh,
    "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu,
    "identity": lambda x: x,
}

INITIALIZERS: dict[str, Callable] = {
    # He et al. 2015 for ReLU-family units; Glorot & Bengio 2010 for tanh/sigmoid; LeCun for SELU-like.
    "he_normal": nnx.initializers.he_normal(),
    "he_uniform": nnx.initializers.he_uniform(),
    "glorot_normal": nnx.initializers.glorot_normal(),
    "glorot_uniform": nnx.initializers.glorot_uniform(),
    "lecun_normal": nnx.initializers.lecun_normal(),
    # Planted-bug initializers, useful to see what the checks say about them.
    "zeros": nnx.initializers.zeros_init(),
    "normal_1": nnx.initializers.normal(1.0),
}


def lookup(table: dict[str, Callable], name: str, key: str) -> Callable:
    if name not in table:
        raise HarnessError(f"unknown value {name!r}; choose one of {', '.join(sorted(table))}", key=key)
    return table[name]
