"""What the model is asked to predict: the :class:`Task` every check reads instead of assuming ``(batch, classes)``.

Read off the data (:func:`infer`):

* **classification** (``num_classes`` given, integer targets): per example, targets ``(N,)`` and outputs
  ``(B, C)``; per position, targets ``(N, T)`` (or ``(N, H, W)``: segmentation) and outputs ``(B, T, C)``.
  Negative targets are ignored (padding; PyTorch's ``ignore_index=-100`` convention works).
* **language modelling**: per-position classification whose integer inputs ``(N, T)`` are the targets shifted by
  one (``y[:, :-1] == x[:, 1:]``), or declared with ``causal: true`` in the data mapping: outputs at position ``t``
  must not depend on inputs after ``t`` (``model.causal_leakage``), ``num_classes`` is the vocabulary size.
* **regression** (no ``num_classes``): float targets of any shape; outputs of the targets' shape (``(B, 1)`` or
  ``(B,)`` for one target per example).

Inputs keep their kind: integer inputs (token ids) stay integers, and are never judged as feature scales.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

# A language model's targets agree with its shifted inputs at (almost) every real position.
NEXT_TOKEN_AGREEMENT = 0.9


@dataclasses.dataclass(frozen=True)
class Task:
    num_classes: int | None  # None: regression
    target_shape: tuple[int, ...]  # one example's target as training reads it: () per example, (T,) per position
    integer_inputs: bool = False
    causal: bool = False  # a next-token language model
    pad_token: int | None = None  # inputs equal to it are padding (data key ``pad_token``)

    @property
    def classification(self) -> bool:
        return self.num_classes is not None

    @property
    def per_position(self) -> bool:
        return self.classification and len(self.target_shape) > 0

    @property
    def kind(self) -> str:
        if not self.classification:
            return "regression"
        if self.causal:
            return "language_model"
        return "per_position_classification" if self.per_position else "classification"

    @property
    def num_outputs(self) -> int:
        """What a factory's ``num_outputs`` is: classes (or vocabulary size), else values per example."""
        return int(self.num_classes) if self.classification else max(1, math.prod(self.target_shape))

    def output_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Accepted output shapes for a batch, the first the one to ask for."""
        if self.classification:
            return [(batch, *self.target_shape, int(self.num_classes))]
        if not self.target_shape:
            return [(batch, 1), (batch,)]
        return [(batch, *self.target_shape), (batch, math.prod(self.target_shape))]

    def describe(self) -> str:
        if self.kind == "language_model":
            return f"next-token language model, vocabulary {self.num_classes}, sequences of {self.target_shape[0]}"
        if self.per_position:
            return f"per-position classification, {self.num_classes} classes over {self.target_shape}"
        if self.classification:
            return f"classification, {self.num_classes} classes"
        return f"regression, targets of shape {self.target_shape or '()'}"


def valid(targets):
    """Positions that count: negative class targets are padding."""
    return targets >= 0


def accuracy(outputs, targets):
    """Mean accuracy over real positions (traced; classification only)."""
    mask = valid(targets)
    hits = (jnp.argmax(outputs, -1) == targets) & mask
    return jnp.sum(hits) / jnp.maximum(jnp.sum(mask), 1)


def infer(x_train: np.ndarray, y_train: np.ndarray, num_classes: int | None, *, causal: bool | None = None,
          pad_token: int | None = None) -> Task:
    """The task the arrays describe (labels already as training reads them: see ``Dataset.training_arrays``)."""
    integer_inputs = x_train.dtype.kind in "iu"
    target_shape = tuple(y_train.shape[1:])
    if causal is None:
        causal = bool(num_classes is not None and integer_inputs and y_train.ndim == 2
                      and x_train.shape == y_train.shape and looks_shifted(x_train, y_train))
    return Task(num_classes, target_shape, integer_inputs, bool(causal), pad_token)


def looks_shifted(x: np.ndarray, y: np.ndarray) -> bool:
    """``y[:, t] == x[:, t + 1]`` at almost every real position: next-token targets."""
    if x.shape[1] < 2:
        return False
    head, tail = y[:, :-1], x[:, 1:]
    real = head >= 0
    if not real.any():
        return False
    return float(np.mean(head[real] == tail[real])) >= NEXT_TOKEN_AGREEMENT
