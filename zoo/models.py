"""Model factories of the zoo in the four JAX model libraries harness takes: Flax NNX, Flax Linen, Equinox and Haiku.

Each family has one MLP whose pieces a config can set (``init``, ``bias``, ``activation``, ``output``, ``detach``,
``batch_norm``, ``head_offset``), so every planted model bug is the one-line change a user makes, written in the
setup's YAML as the key that makes it (``output: softmax``, ``init: 1.0``, ``bias: -10.0``, ...). Sequence models:
tiny transformers for next-token language modelling (NNX, Linen, Equinox, Haiku) and per-position taggers (NNX,
Equinox), with their masks as config keys.

Factories follow harness's model contract: NNX ones take ``rngs, input_shape, num_outputs``, Equinox ones ``key,
input_shape, num_outputs`` and see one example at a time (harness vmaps them over the batch), Linen and Haiku ones
take ``num_outputs`` (and ``input_shape`` where needed) and return an unbound module / an ``hk.transform``.
"""

from __future__ import annotations

import math

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
from flax import nnx

# ----------------------------------------------------------------------------------------------------------------
# Pieces shared by every family


@jax.custom_vjp
def swish(x):
    """x * sigmoid(x) with a hand-written backward pass (a user's "memory-saving" activation): correct."""
    return x * jax.nn.sigmoid(x)


def _swish_fwd(x):
    return swish(x), x


def _swish_bwd(x, g):
    s = jax.nn.sigmoid(x)
    return (g * (s + x * s * (1.0 - s)),)


swish.defvjp(_swish_fwd, _swish_bwd)


@jax.custom_vjp
def swish_wrong(x):
    """The same activation whose backward pass forgets the product rule: d/dx [x sigmoid(x)] written as
    sigmoid(x). Forward values are right, so nothing looks wrong until the gradients are checked."""
    return x * jax.nn.sigmoid(x)


def _swish_wrong_fwd(x):
    return swish_wrong(x), x


def _swish_wrong_bwd(x, g):
    return (g * jax.nn.sigmoid(x),)  # the bug: the x * s * (1 - s) term is missing


swish_wrong.defvjp(_swish_wrong_fwd, _swish_wrong_bwd)

@jax.custom_vjp
def softplus_wrong(x):
    """log(1 + exp(x)) computed stably, with a hand-written backward pass that has the sign of the sigmoid's
    argument wrong: sigmoid(-x) instead of sigmoid(x)."""
    return jax.nn.softplus(x)


def _softplus_wrong_fwd(x):
    return softplus_wrong(x), x


def _softplus_wrong_bwd(x, g):
    return (g * jax.nn.sigmoid(-x),)  # the bug: d/dx softplus(x) = sigmoid(x)


softplus_wrong.defvjp(_softplus_wrong_fwd, _softplus_wrong_bwd)

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "gelu": jax.nn.gelu,
               "swish": swish, "swish_wrong": swish_wrong, "softplus": jax.nn.softplus,
               "softplus_wrong": softplus_wrong}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def initializer(init):
    """A ``jax.nn.initializers`` function from a config value: a name, or a number = N(0, number^2)."""
    if isinstance(init, (int, float)) and not isinstance(init, bool):
        return jax.nn.initializers.normal(float(init))
    named = {"he_normal": jax.nn.initializers.he_normal(), "glorot_normal": jax.nn.initializers.glorot_normal(),
             "lecun_normal": jax.nn.initializers.lecun_normal(), "zeros": jax.nn.initializers.zeros}
    if init not in named:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(named)} or a standard deviation")
    return named[init]


def haiku_initializer(init):
    if isinstance(init, (int, float)) and not isinstance(init, bool):
        return hk.initializers.RandomNormal(float(init))
    named = {"he_normal": hk.initializers.VarianceScaling(2.0, "fan_in", "truncated_normal"),
             "glorot_normal": hk.initializers.VarianceScaling(1.0, "fan_avg", "truncated_normal"),
             "lecun_normal": hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal"),
             "zeros": hk.initializers.Constant(0.0)}
    if init not in named:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(named)} or a standard deviation")
    return named[init]


def batch_normalize(h):
    """Hand-written batch normalization that always uses the statistics of the batch it is given, in training and
    at evaluation alike (no running averages): each example's output depends on the rest of its batch."""
    return (h - jnp.mean(h, axis=0)) / jnp.sqrt(jnp.var(h, axis=0) + 1e-5)


def finish(out, output: str):
    """The model's last step: ``logits`` (none), or one of the planted mistakes."""
    if output == "logits":
        return out
    if output == "softmax":  # probabilities, handed to a loss that applies its own softmax
        return jax.nn.softmax(out, axis=-1)
    if output == "relu":  # a ReLU after the regression head: negative targets out of reach
        return jax.nn.relu(out)
    if output == "log":  # "log-scale predictions" as the log of a linear output that can be negative
        return jnp.log(out)
    raise ValueError(f"unknown output {output!r}; choose logits, softmax, relu or log")


# ----------------------------------------------------------------------------------------------------------------
# Flax NNX


class MLP(nnx.Module):
    """``depth`` hidden layers of ``width`` units and a linear head.

    ``init``: hidden kernels (name or standard deviation), ``bias``: hidden biases' initial value, ``head_init``:
    the head's kernel, ``detach``: stop_gradient on the features before the head, ``batch_norm``: hand-written
    batch normalization after each hidden layer, ``head_offset``: added to the head's number of outputs,
    ``output``: see :func:`finish`."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 64, depth: int = 2,
                 activation: str = "relu", init="he_normal", bias: float = 0.0, head_init="lecun_normal",
                 output: str = "logits", detach: bool = False, batch_norm: bool = False, head_offset: int = 0):
        sizes = [math.prod(input_shape)] + [int(width)] * int(depth)
        self.hidden = nnx.List([nnx.Linear(a, b, kernel_init=initializer(init),
                                           bias_init=nnx.initializers.constant(bias), rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], num_outputs + head_offset, kernel_init=initializer(head_init), rngs=rngs)
        self.activation, self.output = activation, output
        self.detach, self.batch_norm = detach, batch_norm

    def __call__(self, x):
        h = x.reshape((x.shape[0], -1))
        act = activation_fn(self.activation)
        for layer in self.hidden:
            h = layer(h)
            if self.batch_norm:
                h = batch_normalize(h)
            h = act(h)
        if self.detach:
            h = jax.lax.stop_gradient(h)  # the bug: "freeze the feature extractor" left in
        return finish(self.head(h), self.output)


class Linear(nnx.Module):
    """A linear model (logistic / softmax / linear regression): no hidden layer, so no width to vary."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, init="lecun_normal"):
        self.layer = nnx.Linear(math.prod(input_shape), num_outputs, kernel_init=initializer(init), rngs=rngs)

    def __call__(self, x):
        return self.layer(x.reshape((x.shape[0], -1)))


class NNXBlock(nnx.Module):
    """Pre-LN transformer block (attention, then an MLP), the mask given by the caller."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, h, mask):
        h = h + self.attention(self.norm1(h), mask=mask)
        return h + self.down(jax.nn.gelu(self.up(self.norm2(h))))


def attention_mask(x, mask: str, pad_token: int | None = None):
    """``(batch, 1, T, T)`` boolean masks (query, key): ``causal`` (query t sees keys <= t), ``none``,
    ``causal_k1`` (``jnp.tril(..., k=1)``: an off-by-one, each query also sees the next key), ``triu`` (the
    transpose: each query sees the *later* keys), ``padding`` (no key that is padding), ``causal_padding``."""
    t = x.shape[1]
    ones = jnp.ones((t, t), bool)
    if mask == "none":
        return None
    if mask in ("causal", "causal_padding"):
        m = jnp.tril(ones)
    elif mask == "causal_k1":
        m = jnp.tril(ones, k=1)
    elif mask == "triu":
        m = jnp.triu(ones)
    elif mask == "padding":
        m = ones
    else:
        raise ValueError(f"unknown mask {mask!r}")
    m = jnp.broadcast_to(m, (x.shape[0], 1, t, t))
    if mask in ("padding", "causal_padding"):
        keys = (x != pad_token)[:, None, None, :]
        m = m & keys
    return m


class Transformer(nnx.Module):
    """Token and learned position embeddings, ``depth`` pre-LN blocks, a final LayerNorm and a linear head:
    ``(batch, T)`` token ids -> ``(batch, T, num_outputs)``. ``mask``: see :func:`attention_mask` (``causal`` for
    a language model, ``padding`` for a bidirectional tagger of padded sequences)."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 32, depth: int = 1,
                 heads: int = 2, vocab_size: int | None = None, mask: str = "causal", pad_token: int = 0):
        (seq_len,) = input_shape
        vocab = vocab_size or num_outputs
        self.tokens = nnx.Embed(vocab, width, rngs=rngs)
        self.positions = nnx.Embed(seq_len, width, rngs=rngs)
        self.blocks = nnx.List([NNXBlock(width, heads, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_outputs, rngs=rngs)
        self.mask, self.pad_token = mask, pad_token

    def __call__(self, x):
        h = self.tokens(x) + self.positions(jnp.arange(x.shape[1]))
        mask = attention_mask(x, self.mask, self.pad_token)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))


# ----------------------------------------------------------------------------------------------------------------
# Flax Linen


class LinenMLP(nn.Module):
    num_outputs: int
    width: int = 64
    depth: int = 2
    activation: str = "relu"
    hidden_init: object = "he_normal"  # not `init`: that is nn.Module.init
    bias: float = 0.0
    output: str = "logits"
    detach: bool = False

    @nn.compact
    def __call__(self, x):
        h = x.reshape((x.shape[0], -1))
        for _ in range(self.depth):
            h = nn.Dense(self.width, kernel_init=initializer(self.hidden_init),
                         bias_init=nn.initializers.constant(self.bias))(h)
            h = activation_fn(self.activation)(h)
        if self.detach:
            h = jax.lax.stop_gradient(h)
        return finish(nn.Dense(self.num_outputs)(h), self.output)


def linen_mlp(num_outputs: int, width: int = 64, depth: int = 2, activation: str = "relu", init="he_normal",
              bias: float = 0.0, output: str = "logits", detach: bool = False):
    return LinenMLP(num_outputs, width, depth, activation, init, bias, output, detach)


class LinenTransformer(nn.Module):
    num_outputs: int
    width: int = 32
    heads: int = 2
    mask: str = "causal"

    @nn.compact
    def __call__(self, x):
        h = nn.Embed(self.num_outputs, self.width)(x)
        h = h + self.param("positions", nn.initializers.normal(0.02), (x.shape[1], self.width))
        attention = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.width)
        h = h + attention(nn.LayerNorm()(h), mask=attention_mask(x, self.mask))
        h = h + nn.Dense(self.width)(jax.nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(h))))
        return nn.Dense(self.num_outputs)(nn.LayerNorm()(h))


def linen_transformer(num_outputs: int, width: int = 32, heads: int = 2, mask: str = "causal"):
    return LinenTransformer(num_outputs, width, heads, mask)


# ----------------------------------------------------------------------------------------------------------------
# Equinox (one example at a time)


def _eqx_linear(key, n_in: int, n_out: int, init=None, bias: float | None = None) -> eqx.nn.Linear:
    """``eqx.nn.Linear`` with its own init unless ``init`` names another one (Equinox weights are (out, in))."""
    k1, k2 = jax.random.split(key)
    layer = eqx.nn.Linear(n_in, n_out, key=k1)
    if init is not None:
        layer = eqx.tree_at(lambda l: l.weight, layer, initializer(init)(k2, (n_in, n_out), jnp.float32).T)
    if bias is not None:
        layer = eqx.tree_at(lambda l: l.bias, layer, jnp.full((n_out,), bias, jnp.float32))
    return layer


class EquinoxMLP(eqx.Module):
    layers: tuple
    head: eqx.nn.Linear
    activation: str = eqx.field(static=True)

    def __init__(self, key, input_shape, num_outputs: int, width: int = 64, depth: int = 2,
                 activation: str = "relu", init=None, bias: float | None = None):
        sizes = [math.prod(input_shape)] + [int(width)] * int(depth)
        keys = jax.random.split(key, len(sizes))
        self.layers = tuple(_eqx_linear(k, a, b, init, bias) for k, a, b in zip(keys[:-1], sizes[:-1], sizes[1:]))
        self.head = eqx.nn.Linear(sizes[-1], num_outputs, key=keys[-1])
        self.activation = activation

    def __call__(self, x):
        h = x.reshape(-1)
        for layer in self.layers:
            h = activation_fn(self.activation)(layer(h))
        return self.head(h)


def equinox_mlp(key, input_shape, num_outputs: int, width: int = 64, depth: int = 2, activation: str = "relu",
                init=None, bias: float | None = None):
    """An Equinox MLP; ``init=None`` keeps Equinox's own (uniform, fan-in scaled) init."""
    return EquinoxMLP(key, input_shape, num_outputs, width, depth, activation, init, bias)


class EquinoxTransformer(eqx.Module):
    """One pre-LN attention block for one sequence ``(T,)`` -> ``(T, num_outputs)``; ``mask`` causal or none."""

    embed: eqx.nn.Embedding
    positions: jax.Array
    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    mask: str = eqx.field(static=True)

    def __init__(self, key, input_shape, num_outputs: int, width: int = 32, heads: int = 2, mask: str = "causal"):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(num_outputs, width, key=k1)
        self.positions = 0.02 * jax.random.normal(k2, (input_shape[0], width))
        self.norm1 = eqx.nn.LayerNorm(width)
        self.attention = eqx.nn.MultiheadAttention(heads, width, key=k3)
        self.norm2 = eqx.nn.LayerNorm(width)
        self.head = eqx.nn.Linear(width, num_outputs, key=k4)
        self.mask = mask

    def __call__(self, x):
        h = jax.vmap(self.embed)(x) + self.positions
        m = attention_mask(x[None], self.mask)
        n = jax.vmap(self.norm1)(h)
        h = h + self.attention(n, n, n, mask=None if m is None else m[0, 0])
        return jax.vmap(self.head)(jax.vmap(self.norm2)(h))


def equinox_transformer(key, input_shape, num_outputs: int, width: int = 32, heads: int = 2, mask: str = "causal"):
    return EquinoxTransformer(key, input_shape, num_outputs, width, heads, mask)


class EquinoxTagger(eqx.Module):
    """A bidirectional tagger for one padded sequence: embedding, attention over the real tokens, a linear head.
    ``channels_first=True`` is the planted bug: it returns ``(num_classes, T)`` (a Conv1d habit) instead of
    ``(T, num_classes)``."""

    embed: eqx.nn.Embedding
    positions: jax.Array
    attention: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear
    pad_token: int = eqx.field(static=True)
    channels_first: bool = eqx.field(static=True)

    def __init__(self, key, input_shape, num_outputs: int, vocab_size: int = 20, width: int = 32, heads: int = 2,
                 pad_token: int = 0, channels_first: bool = False):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab_size, width, key=k1)
        self.positions = 0.02 * jax.random.normal(k2, (input_shape[0], width))
        self.attention = eqx.nn.MultiheadAttention(heads, width, key=k3)
        self.head = eqx.nn.Linear(width, num_outputs, key=k4)
        self.pad_token, self.channels_first = pad_token, channels_first

    def __call__(self, x):
        h = jax.vmap(self.embed)(x) + self.positions
        keys = jnp.broadcast_to((x != self.pad_token)[None, :], (x.shape[0], x.shape[0]))
        h = h + self.attention(h, h, h, mask=keys)
        out = jax.vmap(self.head)(h)
        return out.T if self.channels_first else out


def equinox_tagger(key, input_shape, num_outputs: int, vocab_size: int = 20, width: int = 32, heads: int = 2,
                   pad_token: int = 0, channels_first: bool = False):
    return EquinoxTagger(key, input_shape, num_outputs, vocab_size, width, heads, pad_token, channels_first)


# ----------------------------------------------------------------------------------------------------------------
# Haiku


def haiku_mlp(num_outputs: int, width: int = 64, depth: int = 2, activation: str = "relu", init="he_normal",
              bias: float = 0.0, output: str = "logits", batch_norm: bool = False, dropout: float = 0.0):
    """An MLP as an ``hk.transform``; ``dropout`` between hidden layers in training (``is_training``)."""

    def forward(x, is_training: bool = False):
        h = x.reshape((x.shape[0], -1))
        for _ in range(depth):
            h = hk.Linear(width, w_init=haiku_initializer(init), b_init=hk.initializers.Constant(bias))(h)
            if batch_norm:
                h = batch_normalize(h)
            h = activation_fn(activation)(h)
            if dropout and is_training:
                h = hk.dropout(hk.next_rng_key(), dropout, h)
        return finish(hk.Linear(num_outputs)(h), output)

    return hk.transform(forward)


def haiku_transformer(num_outputs: int, width: int = 32, heads: int = 2, mask: str = "causal"):
    """A one-block causal transformer as an ``hk.transform``; ``mask`` from :func:`attention_mask`."""

    def forward(x):
        h = hk.Embed(num_outputs, width)(x)
        h = h + hk.get_parameter("positions", (x.shape[1], width), init=hk.initializers.RandomNormal(0.02))
        n = hk.LayerNorm(-1, create_scale=True, create_offset=True)(h)
        attention = hk.MultiHeadAttention(heads, width // heads, w_init=hk.initializers.VarianceScaling(1.0),
                                          model_size=width)
        h = h + attention(n, n, n, mask=attention_mask(x, mask))
        h = h + hk.Linear(width)(jax.nn.gelu(hk.Linear(2 * width)(hk.LayerNorm(-1, True, True)(h))))
        return hk.Linear(num_outputs)(hk.LayerNorm(-1, True, True)(h))

    return hk.transform(forward)
