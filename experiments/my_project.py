"""A worked example of bringing your own data, model and loss to harness.

Run from this directory (harness puts the current directory on the Python path, so `my_project` imports):

    harness --config-dir conf data=mine model=mine loss=mine

and a deliberately broken variant, to see what the report says about it:

    harness --config-dir conf data=mine model=mine_softmax loss=mine

The three contracts (see the README):
- data: a callable returning a mapping of numpy arrays x_train, y_train, x_val, y_val (+ num_classes for
  classification; leave it out for regression);
- model: a callable called as f(rngs=nnx.Rngs(...), input_shape=<one example's shape>, num_outputs=<int>, **config)
  returning a flax.nnx.Module mapping a batch to (batch, num_outputs);
- loss: a callable f(outputs, targets) -> per-example losses, configured with `_partial_: true`.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx


def make_data(num_examples: int = 2000, num_features: int = 20, num_classes: int = 4, seed: int = 0):
    """Gaussian clusters in `num_features` dimensions, standardized with training statistics, split 75/25."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.5, size=(num_classes, num_features))
    y = rng.integers(0, num_classes, size=num_examples)
    x = centers[y] + rng.normal(0, 1.0, size=(num_examples, num_features))
    n_train = int(0.75 * num_examples)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0)
    x = ((x - mean) / std).astype(np.float32)
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train:], "y_val": y[n_train:],
            "num_classes": num_classes}


class ResidualMLP(nnx.Module):
    """Pre-norm residual MLP blocks (LayerNorm -> Linear -> GELU -> Linear, added back), then a linear head."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 64, blocks: int = 2,
                 softmax_output: bool = False):
        self.embed = nnx.Linear(int(np.prod(input_shape)), width, rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(blocks)])
        self.ups = nnx.List([nnx.Linear(width, 2 * width, rngs=rngs) for _ in range(blocks)])
        self.downs = nnx.List([nnx.Linear(2 * width, width, rngs=rngs) for _ in range(blocks)])
        self.head = nnx.Linear(width, num_outputs, rngs=rngs)
        self.softmax_output = softmax_output  # the planted bug of model=mine_softmax

    def __call__(self, x):
        h = self.embed(x.reshape(x.shape[0], -1))
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            h = h + down(jax.nn.gelu(up(norm(h))))
        out = self.head(h)
        return jax.nn.softmax(out) if self.softmax_output else out


def smoothed_cross_entropy(logits, labels, smoothing: float = 0.05):
    """Cross-entropy against label-smoothed targets (Szegedy et al. 2016), one loss per example."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)
