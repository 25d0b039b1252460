"""Where a non-finite step started: replay it from the last finite state, one stage at a time.

The monitor says *which* step went non-finite and which parameter leaves' gradients did; replaying that step from
the state before it (eagerly, on the host's request, so every intermediate can be inspected) says *where* it
started, in the order the values are computed: the batch itself (the data), the forward pass layer by layer (each
activation function's output, read off the traced program by :func:`harness.checks.model.capture.record_activations`,
so it works for any model library), the model's outputs, the per-example loss (``log(0)``: which examples), the
gradient (the backward pass: which leaves), and finally the optimizer's update. The first stage that holds a
non-finite value is where to look (the seeds' decision tree for NaN: data, learning rate, precision, log(0)).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from harness.models.adapters.base import slash_path

MAX_NAMED = 5


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where the replayed step first held a non-finite value."""

    stage: str  # "inputs" | "targets" | "parameters" | "forward" | "outputs" | "loss" | "backward" | "update" | "none"
    where: str  # a layer path, the examples, or the leaves, in words
    detail: dict[str, Any]

    def describe(self) -> str:
        return {
            "inputs": f"the batch's inputs hold non-finite values ({self.where})",
            "targets": f"the batch's targets hold non-finite values ({self.where})",
            "parameters": f"the parameters themselves ({self.where}): an earlier update wrote non-finite values",
            "forward": f"the forward pass, first at {self.where}",
            "outputs": f"the model's outputs ({self.where}), with every activation before them finite",
            "loss": f"the loss: finite outputs gave a non-finite loss for {self.where} (a log(0), a division "
                    f"by zero or an overflow in the loss function)",
            "backward": f"the backward pass: a finite loss gave non-finite gradients in {self.where}",
            "update": f"the optimizer: finite gradients gave a non-finite update in {self.where}",
            "none": "nowhere on replay: the step is finite when recomputed from the last finite state (the failure "
                    "depends on something the replay does not reproduce, e.g. an op that is not deterministic)",
        }[self.stage]


def _nonfinite(x) -> int:
    x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):  # jnp's: numpy does not count bfloat16 as a float
        return 0
    return int(np.size(x) - np.count_nonzero(np.isfinite(x)))


def _examples(bad_rows: np.ndarray, total: int, of: str) -> str:
    rows = [int(i) for i in np.flatnonzero(bad_rows)[:MAX_NAMED]]
    return f"{int(bad_rows.sum())} of {total} examples ({of} rows {', '.join(map(str, rows))})"


def _leaves(tree, name_path) -> list[tuple[str, Any]]:
    return [(name_path(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def locate(apply: Callable, loss_fn: Callable, params, x, y, *, update: Callable | None = None,
           name_path: Callable[[tuple], str] = slash_path, rows_of: str = "batch") -> Origin:
    """Replay one step: ``apply(params, x) -> outputs`` (pure, inference or training mode as the step ran it),
    ``loss_fn(outputs, y)`` per example, and optionally ``update(grads) -> updates`` (the optimizer from the
    state before the step). Returns the first stage that holds a non-finite value. ``name_path`` spells the
    layers' paths (the model family's own, :attr:`harness.models.adapters.Model.name_path`); ``rows_of`` names
    what the rows of ``x`` are (the step's batch, a validation set)."""
    x, y = np.asarray(x), np.asarray(y)
    for stage, arr in (("inputs", x), ("targets", y)):
        if _nonfinite(arr):
            rows = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
            return Origin(stage, _examples(rows, arr.shape[0], rows_of), {"nonfinite_values": _nonfinite(arr)})

    bad = [(path, _nonfinite(p)) for path, p in _leaves(params, name_path) if _nonfinite(p)]
    if bad:
        return Origin("parameters", ", ".join(p for p, _ in bad[:MAX_NAMED]),
                      {"leaves": [p for p, _ in bad[:MAX_NAMED]], "leaves_nonfinite": len(bad)})

    from harness.checks.model.capture import record_activations

    try:
        outputs, activations = record_activations(apply, params, jnp.asarray(x), name_path=name_path)
    except Exception:  # noqa: BLE001 - a program the recorder cannot walk: judge the outputs alone
        outputs, activations = apply(params, jnp.asarray(x)), []
    for a in activations:
        # The layer's output (the activation's input) can overflow while a saturating activation hides it
        # (tanh(inf) = 1): either counts.
        before, after = _nonfinite(a.input) if a.input is not None else 0, _nonfinite(a.output)
        if before or after:
            what = (f"its output feeds {a.function} {before} non-finite values" if before else
                    f"{a.function} turned its finite output into {after} non-finite values")
            return Origin("forward", f"{a.name} ({what})",
                          {"layer": a.name, "function": a.function, "nonfinite_values": before or after,
                           "layer_output_finite": not before})
    if _nonfinite(outputs):
        return Origin("outputs", f"{_nonfinite(outputs)} non-finite values", {"nonfinite_values": _nonfinite(outputs)})

    per_example = np.asarray(loss_fn(outputs, jnp.asarray(y)))
    flat = per_example.reshape(per_example.shape[0], -1) if per_example.ndim else per_example.reshape(1, 1)
    bad_rows = ~np.isfinite(flat).all(axis=1)
    if bad_rows.any():
        return Origin("loss", _examples(bad_rows, flat.shape[0], rows_of),
                      {"examples": [int(i) for i in np.flatnonzero(bad_rows)[:MAX_NAMED]],
                       "nonfinite_examples": int(bad_rows.sum())})

    def mean_loss(p):
        return jnp.mean(loss_fn(apply(p, jnp.asarray(x)), jnp.asarray(y)))

    grads = jax.grad(mean_loss)(params)
    bad = [(path, _nonfinite(g)) for path, g in _leaves(grads, name_path) if _nonfinite(g)]
    if bad:
        return Origin("backward", ", ".join(p for p, _ in bad[:MAX_NAMED]),
                      {"leaves": [p for p, _ in bad[:MAX_NAMED]], "leaves_nonfinite": len(bad)})
    if update is not None:
        bad = [(path, _nonfinite(u)) for path, u in _leaves(update(grads), name_path) if _nonfinite(u)]
        if bad:
            return Origin("update", ", ".join(p for p, _ in bad[:MAX_NAMED]),
                          {"leaves": [p for p, _ in bad[:MAX_NAMED]], "leaves_nonfinite": len(bad)})
    return Origin("none", "", {})
