"""Batch dependence: does an example's output depend on the other examples of the batch?

Karpathy, "A Recipe for Training Neural Networks" (2019), "use backprop to chart dependencies", and seed 003: set
the loss to (a projection of) one example's output, back-propagate to the inputs, and check that only that
example's input gets a gradient. A ``reshape`` where a ``transpose`` was meant, a softmax or mean over the batch
axis, or a norm over the wrong axis mixes examples: the model then learns from its batch-mates and behaves
differently at batch size 1.

The model runs in eval mode (``model.eval()``): dropout off and BatchNorm on its running statistics. A BatchNorm in
train mode legitimately couples the examples of a batch (seed 003: "remove layers that do some batch-wise
normalization ... it is not a bug"); in eval mode it is a per-example affine map, so any remaining dependence is
a bug. The test is exact: without mixing, a zero cotangent on row ``j`` gives an exactly zero gradient there
(``batch_dependence_tolerance`` only absorbs arithmetic that is not bitwise exact).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harness.checks.model.settings import NAME, Settings
from harness.checks.model.noise import hash_uniform
from harness.findings import Finding, error, warning


def gradients_across_batch(forward_fn, x, rows, cotangent_seed):
    """For each checked row ``i``: max |d (c . out_i) / d x_i|, max over ``j != i`` of |d (c . out_i) / d x_j|,
    and how many other examples ``j`` get a nonzero gradient (``c`` a random projection of the outputs, so no
    dependence can cancel out in a plain sum). Integer inputs (token ids) have no gradient: they are checked by
    :func:`changes_across_batch` instead."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return changes_across_batch(forward_fn, x, rows)
    out, pullback = jax.vjp(forward_fn, x)
    n = x.shape[0]
    cotangents = hash_uniform((rows.shape[0],) + out.shape[1:], cotangent_seed, 0xBA7C).astype(out.dtype)

    def one(i, c):
        (gx,) = pullback(jnp.zeros_like(out).at[i].set(c))
        per_example = jnp.max(jnp.abs(gx.reshape(n, -1)), axis=1)
        others = jnp.arange(n) != i
        return (per_example[i], jnp.max(jnp.where(others, per_example, 0.0)),
                jnp.sum(others & (per_example > 0)))

    return jax.vmap(one)(rows, cotangents)


def loss_across_batch(loss_fn, out, y, rows) -> dict:
    """The same three quantities for the loss, per source: ``"outputs"``, ``d loss_i / d out_j``; ``"targets"``, how
    ``loss_i`` moves when example ``j``'s target is replaced by the next example's (by replacement, so integer
    labels are covered; one loss evaluation per example, no model). A per-example loss depends on its own example's
    outputs and targets only; a user loss that broadcasts ``(N, 1)`` outputs against ``(N,)`` targets and then
    reduces the wrong axis returns ``(N,)`` values that each compare one output with every target, and training
    fits the batch mean. A loss that returns one number for the batch (a mean) cannot be checked: zeros."""
    losses = loss_fn(out, y)
    zeros = jnp.zeros(rows.shape, jnp.float32)
    if losses.ndim == 0 or losses.shape[0] != out.shape[0]:
        none = (zeros, zeros, zeros.astype(jnp.int32))
        return {"outputs": none, "targets": none}
    _, pullback = jax.vjp(lambda o: loss_fn(o, y), out)
    n = out.shape[0]

    def split(per_example, i):
        others = jnp.arange(n) != i
        return (per_example[i], jnp.max(jnp.where(others, per_example, 0.0)),
                jnp.sum(others & (per_example > 0)).astype(jnp.int32))

    def through_outputs(i):
        (g,) = pullback(jnp.zeros_like(losses).at[i].set(1))
        return split(jnp.max(jnp.abs(g.reshape(n, -1)), axis=1).astype(jnp.float32), i)

    def target_changed(j):
        moved = loss_fn(out, y.at[j].set(y[(j + 1) % n]))
        return jnp.max(jnp.abs(moved - losses).reshape(n, -1), axis=1).astype(jnp.float32)[rows]

    effect = jax.lax.map(target_changed, jnp.arange(n)).T  # (rows, n): row i's loss change when target j changed
    return {"outputs": jax.vmap(through_outputs)(rows),
            "targets": jax.vmap(split)(effect, rows)}


def changes_across_batch(forward_fn, x, rows):
    """The same three quantities for integer inputs, by replacement instead of differentiation: example ``j``'s
    input is replaced by the next example's (valid token ids, whatever the vocabulary), one example at a time
    (``lax.map``: one forward pass of the batch in memory at once), and ``|out_i(changed) - out_i|`` stands for the
    gradient. Without mixing, another example's change leaves ``out_i`` exactly unchanged."""
    out = forward_fn(x)
    n = x.shape[0]

    def changed(j):
        moved = x.at[j].set(x[(j + 1) % n])
        delta = jnp.abs(forward_fn(moved) - out).astype(jnp.float32)
        return jnp.max(delta[rows].reshape(rows.shape[0], -1), axis=1)  # (rows,): how out_i moved

    effect = jax.lax.map(changed, jnp.arange(n)).T  # (rows, n): row i's change when example j changed
    own = effect[jnp.arange(rows.shape[0]), rows]
    others = jnp.arange(n)[None, :] != rows[:, None]
    return (own, jnp.max(jnp.where(others, effect, 0.0), axis=1), jnp.sum(others & (effect > 0), axis=1))


def checked_rows(batch: int, count: int) -> np.ndarray:
    """Rows spread over the batch, first and last included (a mixing bug may spare some rows)."""
    return np.unique(np.linspace(0, batch - 1, min(count, batch)).round().astype(np.int32))


def judge(own: np.ndarray, cross: np.ndarray, leaking: np.ndarray, rows: np.ndarray, batch: int,
          settings: Settings) -> tuple[list[Finding], dict[str, Any]]:
    own, cross = np.asarray(own, np.float64), np.asarray(cross, np.float64)
    if not (np.all(np.isfinite(own)) and np.all(np.isfinite(cross))):
        return [], {}  # non-finite gradients are model.gradient_flow's finding
    scale = float(own.max())
    leak = float(cross.max())
    metrics = {f"{NAME}/batch_dependence/cross_gradient": leak, f"{NAME}/batch_dependence/own_gradient": scale}
    if leak == 0 or leak <= settings.batch_dependence_tolerance * scale:
        return [], metrics
    ratio = leak / scale if scale > 0 else float("inf")
    worst = int(np.argmax(cross))
    return [error(
        f"{NAME}.batch_dependence",
        f"Examples are mixed across the batch: the output of example {int(rows[worst])} depends on the inputs of "
        f"{int(leaking[worst])} other examples of the batch of {batch} (a nonzero gradient, or for integer inputs a "
        f"change when theirs change; largest cross-example effect {leak:.3g}, {ratio:.3g}x its own input's), with "
        f"the model in eval mode.",
        "An operation mixes the batch axis: a reshape where a transpose/swapaxes was meant, a softmax, mean, sum or "
        "norm over axis 0 instead of the feature axis, or a layer that normalizes over the batch in eval mode. "
        "(BatchNorm in train mode couples examples by design; this check runs in eval mode so it is not flagged.)",
        rows_checked=rows.tolist(), other_examples_affected=leaking.tolist(), cross_gradient=cross.tolist(),
        own_gradient=own.tolist(), mode="eval", tolerance=settings.batch_dependence_tolerance,
    )], metrics


def judge_loss(mixing: dict, rows: np.ndarray, batch: int, settings: Settings) -> list[Finding]:
    """``model.batch_dependence`` for the loss: example ``i``'s loss changes with example ``j``'s outputs. A
    warning, not an error: a contrastive loss (in-batch negatives) compares examples by design. When the mixing
    is a bug, training fails, and :mod:`harness.causes` makes this warning the error that explains it."""
    for source, (own, cross, leaking) in mixing.items():
        own, cross = np.asarray(own, np.float64), np.asarray(cross, np.float64)
        if not (np.all(np.isfinite(own)) and np.all(np.isfinite(cross))):
            continue
        scale, leak = float(own.max()), float(cross.max())
        if leak == 0 or leak <= settings.batch_dependence_tolerance * scale:
            continue
        return [_loss_mixing(source, own, cross, np.asarray(leaking), rows, batch, scale, leak)]
    return []


def _loss_mixing(source, own, cross, leaking, rows, batch, scale, leak) -> Finding:
    worst = int(np.argmax(cross))
    what = "outputs" if source == "outputs" else "targets"
    return warning(
        f"{NAME}.batch_dependence",
        f"The loss mixes examples: the loss of example {int(rows[worst])} depends on the {what} of "
        f"{int(leaking[worst])} other examples of the batch of {batch} (largest effect {leak:.3g}, "
        f"{leak / scale if scale > 0 else float('inf'):.3g}x that of its own {what}).",
        "A per-example loss must compare each example's outputs with its own targets only: check the shapes inside "
        "the loss (outputs (N, 1) minus targets (N,) broadcasts to (N, N); squeeze the outputs or reshape the "
        "targets) and the axis of every mean or sum in it. A contrastive loss (in-batch negatives) mixes examples "
        "by design: then nothing is wrong.",
        rows_checked=rows.tolist(), other_examples_affected=np.asarray(leaking).tolist(),
        cross_effect=cross.tolist(), own_effect=own.tolist(), source=f"loss ({what})",
    )
