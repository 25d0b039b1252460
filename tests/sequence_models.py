"""Tiny sequence models and data for the sequence checks (tests/test_sequence_checks.py): correct causal and
padding-masked transformers in three libraries, and the planted mask bugs around them. Importable from a
composed config as ``model._target_=sequence_models.nnx_transformer`` (pytest puts tests/ on the path)."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB, LENGTH, PAD = 10, 12, 0


# ----------------------------------------------------------------------------------------------------------------
# Data


def lm_data(num_train: int = 96, num_val: int = 32, vocab: int = VOCAB, length: int = LENGTH, seed: int = 0):
    """Next-token pairs from a noisy counting sequence (token t+1 = token t + 1 mod V, sometimes random)."""
    rng = np.random.default_rng(seed)
    n = num_train + num_val
    steps = np.where(rng.random((n, length)) < 0.2, rng.integers(0, vocab, (n, length)), 1)
    seq = (rng.integers(0, vocab, (n, 1)) + np.cumsum(np.concatenate([np.zeros((n, 1), int), steps], 1), 1)) % vocab
    x, y = seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)
    return {"x_train": x[:num_train], "y_train": y[:num_train], "x_val": x[num_train:], "y_val": y[num_train:],
            "num_classes": vocab}


def padded_tokens(n: int, *, side: str = "right", vocab: int = VOCAB, length: int = LENGTH, seed: int = 0):
    """``(n, T)`` tokens in ``1 .. V-1`` with ``PAD`` (0) on one side: real lengths 3 .. T-2."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab, (n, length)).astype(np.int32)
    lengths = rng.integers(3, length - 1, n)
    for i, real in enumerate(lengths):
        if side == "right":
            x[i, real:] = PAD
        else:
            x[i, : length - real] = PAD
    return x


def tagging_data(num_train: int = 96, num_val: int = 32, seed: int = 0):
    """Right-padded token sequences tagged per position (class = token parity; -100 at the padding), pad token 0."""
    x = padded_tokens(num_train + num_val, seed=seed)
    y = np.where(x == PAD, -100, x % 2).astype(np.int32)
    return {"x_train": x[:num_train], "y_train": y[:num_train], "x_val": x[num_train:], "y_val": y[num_train:],
            "num_classes": 2, "pad_token": PAD, "causal": False}


# ----------------------------------------------------------------------------------------------------------------
# Masks


def causal_mask(x, mask: str):
    """``[batch, 1, query, key]`` attention masks: correct, absent and the planted bugs."""
    t = x.shape[1]
    if mask == "causal":
        return nnx.make_causal_mask(x)
    if mask == "none":
        return None
    if mask == "off_by_one":  # query t also sees key t + 1
        return jnp.tril(jnp.ones((t, t), bool), k=1)[None, None]
    if mask == "wrong_axis":  # the causal mask transposed: query t sees keys >= t
        return jnp.triu(jnp.ones((t, t), bool))[None, None]
    raise ValueError(mask)


def padding_mask(x, pad_mask: str, pad_token: int):
    real = x != pad_token
    if pad_mask == "none":
        return None
    if pad_mask == "keys":  # correct: real queries see real keys (and padded queries nothing)
        return nnx.make_attention_mask(real, real)
    if pad_mask == "queries":  # planted: the mask on the query axis, every key visible to real queries
        return jnp.broadcast_to(real[:, None, :, None], (x.shape[0], 1, x.shape[1], x.shape[1]))
    raise ValueError(pad_mask)


# ----------------------------------------------------------------------------------------------------------------
# Flax NNX


class NNXTransformer(nnx.Module):
    """One pre-LN block: embeddings + learned positions, ``nnx.MultiHeadAttention``, an MLP, a linear head."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 16, heads: int = 2,
                 vocab: int = VOCAB, mask: str = "causal", pad_mask: str = "none", pad_token: int = PAD):
        length = input_shape[0]
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.position = nnx.Embed(length, width, rngs=rngs)
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)
        self.head = nnx.Linear(width, num_outputs, rngs=rngs)
        self.mask, self.pad_mask, self.pad_token = mask, pad_mask, pad_token

    def __call__(self, x):
        h = self.embed(x) + self.position(jnp.arange(x.shape[1]))
        mask = nnx.combine_masks(causal_mask(x, self.mask), padding_mask(x, self.pad_mask, self.pad_token))
        h = h + self.attention(self.norm1(h), mask=mask)
        h = h + self.down(jax.nn.gelu(self.up(self.norm2(h))))
        return self.head(h)


def nnx_transformer(*, rngs, input_shape, num_outputs, **kwargs):
    return NNXTransformer(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, **kwargs)


class LateLeak(nnx.Module):
    """Planted: correct up to position ``start - 1``; from ``start`` on each output also reads the next token."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 16, vocab: int = VOCAB,
                 start: int = 5):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.head = nnx.Linear(width, num_outputs, rngs=rngs)
        self.start = start

    def __call__(self, x):
        h = self.embed(x)
        ahead = jnp.concatenate([h[:, 1:], jnp.zeros_like(h[:, :1])], axis=1)
        late = (jnp.arange(x.shape[1]) >= self.start)[None, :, None]
        return self.head(h + jnp.where(late, ahead, 0.0))


def late_leak(*, rngs, input_shape, num_outputs, start: int = 5):
    return LateLeak(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, start=start)


class NNXUnembedded(nnx.Module):
    """Token ids used as numbers (no lookup table): ``x * w`` per position, then a causal cumulative sum."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 8):
        self.scale = nnx.Param(jax.random.normal(rngs.params(), (width,)))
        self.head = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        h = x.astype(jnp.float32)[..., None] * self.scale[...]
        return self.head(jnp.cumsum(h, axis=1))


def nnx_unembedded(*, rngs, input_shape, num_outputs):
    return NNXUnembedded(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs)


# ----------------------------------------------------------------------------------------------------------------
# Flax Linen


class LinenTransformer(nn.Module):
    """``nn.MultiHeadDotProductAttention`` (self-attention) with ``nn.make_causal_mask``; ``one_hot=True`` embeds by
    a Dense layer on one-hot tokens (a ``dot_general`` lookup instead of a ``gather``)."""

    num_outputs: int
    width: int = 16
    heads: int = 2
    vocab: int = VOCAB
    causal: bool = True
    pad_mask: str = "none"
    one_hot: bool = False

    @nn.compact
    def __call__(self, x):
        if self.one_hot:
            h = nn.Dense(self.width, use_bias=False)(jax.nn.one_hot(x, self.vocab))
        else:
            h = nn.Embed(self.vocab, self.width)(x)
        h = h + self.param("position", nn.initializers.normal(0.02), (x.shape[1], self.width))
        mask = nn.make_causal_mask(x) if self.causal else None
        mask = nn.combine_masks(mask, padding_mask(x, self.pad_mask, PAD))
        attention = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.width)
        h = h + attention(nn.LayerNorm()(h), mask=mask)
        return nn.Dense(self.num_outputs)(nn.LayerNorm()(h))


def linen_transformer(num_outputs: int, causal: bool = True, pad_mask: str = "none", one_hot: bool = False):
    return LinenTransformer(num_outputs, causal=causal, pad_mask=pad_mask, one_hot=one_hot)


# ----------------------------------------------------------------------------------------------------------------
# Equinox (one example at a time: harness vmaps it over the batch)


class EquinoxTransformer(eqx.Module):
    embed: eqx.nn.Embedding
    position: jax.Array
    attention: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear
    causal: bool = eqx.field(static=True)

    def __init__(self, key, input_shape, num_outputs: int, width: int = 16, heads: int = 2, vocab: int = VOCAB,
                 causal: bool = True):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab, width, key=k1)
        self.position = 0.02 * jax.random.normal(k2, (input_shape[0], width))
        self.attention = eqx.nn.MultiheadAttention(heads, width, key=k3)
        self.head = eqx.nn.Linear(width, num_outputs, key=k4)
        self.causal = causal

    def __call__(self, x):
        h = jax.vmap(self.embed)(x) + self.position
        t = x.shape[0]
        mask = jnp.tril(jnp.ones((t, t), bool)) if self.causal else None
        h = h + self.attention(h, h, h, mask=mask)
        return jax.vmap(self.head)(h)


def equinox_transformer(key, input_shape, num_outputs: int, causal: bool = True):
    return EquinoxTransformer(key, input_shape, num_outputs, causal=causal)
