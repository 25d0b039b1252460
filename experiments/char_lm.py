"""A worked example for sequence models: a character-level transformer language model in Flax NNX, trained on text
that ships with every Python -- its own standard-library sources.

Run from this directory:

    harness --config-dir conf data=char_lm model=char_transformer

and the same model with its causal mask removed (a planted bug: every position can read the characters it is asked
to predict):

    harness --config-dir conf data=char_lm model=char_transformer_nomask

The model stage alone (seconds, where a full run trains a transformer several times on the CPU):

    harness --config-dir conf data=char_lm model=char_transformer_nomask 'diagnostics.run=[data,model]'

The data are next-token pairs (``y[:, t] == x[:, t + 1]``), so harness recognizes a language model and checks that
the output at position t does not depend on the inputs after t (``model.causal_leakage``); the mapping also says so
with ``causal: True``.
"""

from __future__ import annotations

import collections
import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# A fixed, sorted list of standard-library modules (about 216k characters in Python 3.11): the corpus, in order.
SOURCES = ("argparse.py", "dataclasses.py", "functools.py", "textwrap.py")
UNK = 0  # the id of every character outside the vocabulary


def read_corpus(sources=SOURCES) -> str:
    """The standard-library files' text, concatenated in the given order (files this Python lacks are skipped)."""
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in sources:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    if not texts:
        raise FileNotFoundError(f"none of {', '.join(sources)} found under {root}")
    return "\n".join(texts)


def make_data(num_train: int = 2000, num_val: int = 500, seq_len: int = 64, vocab_size: int = 96,
              sources=SOURCES):
    """Next-character pairs ``x_train, y_train, x_val, y_val`` of shape ``(N, seq_len)``.

    The vocabulary is the ``vocab_size - 1`` most frequent characters of the training text (ties by code point),
    ids 1 and up; any other character is ``UNK`` (0). Training windows are consecutive, non-overlapping windows
    from the start of the corpus, validation windows come from its end, so no text is in both. Deterministic: the
    same files give the same arrays.
    """
    text = read_corpus(tuple(sources))
    need = (num_train + num_val) * seq_len + 2
    if len(text) < need:
        raise ValueError(f"the corpus has {len(text)} characters; {num_train} + {num_val} windows of {seq_len} "
                         f"need {need}: add files to `sources` or ask for fewer windows")
    train_text = text[: num_train * seq_len + 1]
    val_text = text[len(text) - num_val * seq_len - 1:]
    counts = collections.Counter(train_text)
    chars = sorted(counts, key=lambda c: (-counts[c], c))[: vocab_size - 1]
    ids = {c: i + 1 for i, c in enumerate(chars)}

    def windows(part: str, n: int):
        tokens = np.array([ids.get(c, UNK) for c in part], np.int32)
        starts = np.arange(n) * seq_len
        index = starts[:, None] + np.arange(seq_len + 1)[None, :]
        w = tokens[index]
        return w[:, :-1], w[:, 1:]

    x_train, y_train = windows(train_text, num_train)
    x_val, y_val = windows(val_text, num_val)
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val,
            "num_classes": len(chars) + 1, "causal": True}


class Block(nnx.Module):
    """Pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x)) (Radford et al. 2019, GPT-2)."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, h, mask):
        h = h + self.attention(self.norm1(h), mask=mask)
        return h + self.down(jax.nn.gelu(self.up(self.norm2(h))))


class CharTransformer(nnx.Module):
    """Token and learned position embeddings, ``depth`` pre-LN blocks, a final LayerNorm and a linear head over
    the vocabulary: ``(batch, T)`` character ids -> ``(batch, T, vocabulary)`` next-character logits.

    ``causal=False`` is the planted bug of ``model=char_transformer_nomask``: no causal mask, so position t attends
    to every position, the next character (its target) included."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 64, depth: int = 2,
                 heads: int = 4, causal: bool = True):
        (seq_len,) = input_shape
        self.tokens = nnx.Embed(num_outputs, width, rngs=rngs)
        self.positions = nnx.Embed(seq_len, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_outputs, rngs=rngs)
        self.causal = causal

    def __call__(self, x):
        h = self.tokens(x) + self.positions(jnp.arange(x.shape[1]))
        mask = nnx.make_causal_mask(x) if self.causal else None  # (batch, 1, T, T): query t sees keys <= t
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))
