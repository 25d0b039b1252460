"""A multilayer perceptron: ``depth`` hidden layers of ``width`` units.

The reference job's model is ``MLP(width=128, depth=2)`` on 64 digit pixels: 64-128-128-10 with ReLU.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from harness.models import width_mask
from harness.models.common import ACTIVATIONS, INITIALIZERS, lookup


class MLP(nnx.Module):
    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        input_shape: tuple[int, ...],
        num_outputs: int,
        width: int = 128,
        depth: int = 2,
        activation: str = "relu",
        init: str = "he_normal",
        dropout: float = 0.0,
        active_width=None,  # capacity ladder: live hidden units (may be traced), see harness/models/width_mask.py
    ):
        self.activation = lookup(ACTIVATIONS, activation, "model.activation")
        kernel_init = lookup(INITIALIZERS, init, "model.init")
        sizes = [math.prod(input_shape)] + [int(width)] * int(depth)
        self.hidden = nnx.List(
            [nnx.Linear(a, b, kernel_init=kernel_init, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        # The output layer keeps a fan-in-scaled (LeCun) init whatever the hidden init: initial logits near zero
        # give the expected initial loss -log(1/C) (Karpathy, "A Recipe for Training Neural Networks").
        self.out = nnx.Linear(sizes[-1], num_outputs, kernel_init=nnx.initializers.lecun_normal(), rngs=rngs)
        masked = active_width is not None
        self.width_mask = width_mask.mask_stack(self.hidden, self.out, active_width, init) if masked else None

    def __call__(self, x):
        x = jnp.reshape(x, (x.shape[0], -1))
        for layer in self.hidden:
            x = self.activation(layer(x))
            if self.width_mask is not None:
                x = x * self.width_mask[...]
            if self.dropout is not None:
                x = self.dropout(x)
        return self.out(x)
