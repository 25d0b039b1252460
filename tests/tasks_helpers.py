"""Data and model factories for the task-shape tests (``tests/test_tasks.py``): a next-token language model, a
per-position tagger, dense (segmentation) labels and multi-output regression, each small enough to train in
seconds on a CPU. Reachable as ``data._target_=tasks_helpers.<fn>`` (pytest and :func:`helpers.run_cli` put
``tests/`` on the path)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB = 12
LENGTH = 16


def _split(x, y, n_val: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:n_val], order[n_val:]
    return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val]}


def progressions(vocab: int = VOCAB, length: int = LENGTH, n_val: int = 32, seed: int = 0, bad_token: int = -1):
    """Next-token language modelling on arithmetic progressions mod ``vocab``: ``x_t = x_0 + s t`` for every start
    ``x_0`` and step ``s`` in 1..vocab-1 (each sequence once, so validation never repeats training), inputs the
    first ``length`` tokens, targets the same sequence shifted by one. The first target is ambiguous (the start
    does not tell the step); from the second position on the two last tokens fix the rest. ``bad_token >= 0``
    plants the id ``vocab + bad_token`` (out of range) into one training target."""
    starts, steps = np.meshgrid(np.arange(vocab), np.arange(1, vocab), indexing="ij")
    t = np.arange(length + 1)
    seq = (starts.reshape(-1, 1) + steps.reshape(-1, 1) * t) % vocab
    x, y = seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)
    out = _split(x, y, n_val, seed)
    if bad_token >= 0:
        out["y_train"] = out["y_train"].copy()
        out["y_train"][3, 5] = vocab + bad_token
    return {**out, "num_classes": vocab}


def tagging(vocab: int = VOCAB, length: int = LENGTH, tags: int = 3, n_train: int = 160, n_val: int = 40,
            seed: int = 0):
    """Per-position classification (not causal): random tokens, each tagged ``token % tags``; the last positions of
    some sequences are padding (input token 0, target -1)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    x = rng.integers(1, vocab, size=(n, length)).astype(np.int32)
    y = (x % tags).astype(np.int32)
    pad = rng.integers(0, length // 4, size=n)
    mask = np.arange(length) >= length - pad[:, None]
    x[mask], y[mask] = 0, -1
    return {**_split(x, y, n_val, seed), "num_classes": tags, "pad_token": 0}


def segmentation(n_train: int = 96, n_val: int = 32, size: int = 6, classes: int = 3, seed: int = 0):
    """Dense labels (N, H, W): random pixel classes, each pixel's intensity (N, H, W, 1) near its class's level."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=(n_train + n_val, size, size)).astype(np.int32)
    x = ((y - (classes - 1) / 2) + 0.1 * rng.normal(size=y.shape))[..., None].astype(np.float32)
    return {**_split(x, y, n_val, seed), "num_classes": classes}


def multi_regression(n_train: int = 128, n_val: int = 32, features: int = 6, outputs: int = 3, seed: int = 0):
    """Regression with three targets per example, ``(N, 3)``, a noisy linear map of standardized inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_val, features)).astype(np.float32)
    w = rng.normal(size=(features, outputs)) / np.sqrt(features)
    y = (x @ w + 0.05 * rng.normal(size=(len(x), outputs))).astype(np.float32)
    return _split(x, y, n_val, seed)


class TinyCausalLM(nnx.Module):
    """Token ids (B, T) -> logits (B, T, num_outputs). Causal: position t sees its own token, the previous one and
    the running mean of the embeddings up to t (and its position), never a later token."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, vocab: int | None = None, width: int = 32):
        length = int(input_shape[0])
        self.embed = nnx.Embed(vocab or num_outputs, width, rngs=rngs)
        self.position = nnx.Embed(length, 3 * width, rngs=rngs)
        self.hidden = nnx.Linear(3 * width, 2 * width, rngs=rngs)
        self.out = nnx.Linear(2 * width, num_outputs, kernel_init=nnx.initializers.normal(0.01), rngs=rngs)

    def __call__(self, x):
        e = self.embed(x)
        previous = jnp.pad(e[:, :-1], ((0, 0), (1, 0), (0, 0)))
        running = jnp.cumsum(e, axis=1) / jnp.arange(1, e.shape[1] + 1, dtype=e.dtype)[:, None]
        h = jnp.concatenate([e, previous, running], axis=-1) + self.position(jnp.arange(e.shape[1]))
        return self.out(nnx.relu(self.hidden(h)))


class PixelClassifier(nnx.Module):
    """(B, H, W, 1) -> (B, H, W, classes), pixel by pixel (a 1x1 convolution as Dense layers)."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 16):
        self.hidden = nnx.Linear(int(input_shape[-1]), width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def token_cross_entropy(logits, targets):
    """A user's own per-position loss (the built-in's arithmetic, but not the built-in: harness knows nothing about
    it): mean cross-entropy over the real positions of each example."""
    import optax

    real = targets >= 0
    per_position = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(real, targets, 0))
    return jnp.sum(jnp.where(real, per_position, 0.0), axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1)
