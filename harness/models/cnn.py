"""A small convolutional network for image-shaped inputs (H, W, C): conv blocks, global average pool, dense head."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from harness.errors import HarnessError
from harness.models import width_mask
from harness.models.common import ACTIVATIONS, INITIALIZERS, lookup


class CNN(nnx.Module):
    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        input_shape: tuple[int, ...],
        num_outputs: int,
        width: int = 32,
        depth: int = 2,
        kernel_size: int = 3,
        activation: str = "relu",
        init: str = "he_normal",
        active_width=None,  # capacity ladder: live channels (may be traced), see harness/models/width_mask.py
    ):
        if len(input_shape) != 3:
            raise HarnessError(
                f"the cnn model needs image inputs of shape (height, width, channels), got one example of shape "
                f"{tuple(input_shape)}; use data=digits_image or model=mlp",
                key="model",
            )
        self.activation = lookup(ACTIVATIONS, activation, "model.activation")
        kernel_init = lookup(INITIALIZERS, init, "model.init")
        channels = [input_shape[-1]] + [int(width)] * int(depth)
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (kernel_size, kernel_size), kernel_init=kernel_init, rngs=rngs)
                for a, b in zip(channels[:-1], channels[1:])
            ]
        )
        self.head = nnx.Linear(channels[-1], num_outputs, kernel_init=nnx.initializers.lecun_normal(), rngs=rngs)
        masked = active_width is not None
        self.width_mask = width_mask.mask_stack(self.convs, self.head, active_width, init) if masked else None

    def __call__(self, x):
        for conv in self.convs:
            x = self.activation(conv(x))
            if self.width_mask is not None:
                x = x * self.width_mask[...]
        x = jnp.mean(x, axis=(1, 2))  # global average pool keeps the head independent of the image size
        return self.head(x)
