"""The forward pass at init: does it run, with the right shapes and finite values; are the outputs logits when the
loss wants logits; is the initial loss what a well-initialized model gives?

* ``model.forward`` (seed 001, "2.1 Forward Pass Verification"; seed 003: "invoke the forward pass on a small batch
  ... to make sure shapes are correct. Because of broadcasting rules, you can have silent failure"): the forward
  pass, the loss or the backward pass raises; outputs not of the task's shape (``Task.output_shapes``: (batch,
  num_classes), (batch, T, vocabulary) per position, the targets' shape for regression); per-example losses not of
  shape (batch,); non-finite outputs or losses. Blocks the training stages.
* ``model.output_range``: probabilities (rows in [0, 1] summing to 1, or all in [0, 1]) handed to a loss that
  applies its own softmax/sigmoid: "softmax applied twice" squashes the logits into [0, 1], the loss starts at
  almost exactly -log(1/C) (so the initial-loss check cannot see it) and the gradients are tiny. The same bug
  inside a user's loss (it softmaxes the logits, then calls a cross-entropy on logits): the loss levels off above 0
  along confidently correct logits (:func:`loss_saturation_findings`). And a regression head clamped by a ReLU or
  clip with targets beyond the clamp (:func:`clamped_output_findings`).
* ``model.initial_loss`` (Karpathy, "A Recipe for Training Neural Networks", 2019, "verify loss @ init" and "init
  well"; seed 003): the mean loss over ``init_seeds`` inits vs what a model predicting nothing gives: -log(1/C) for
  cross-entropy (uniform predictions), E[y^2] for squared error (outputs at zero), and for a user's own loss its
  value at the null prediction (:func:`harness.losses.null_prediction`: zero logits or uniform probabilities,
  whichever space the model's outputs live in; the higher of zero outputs and the target mean for regression).
  Judged in nats when the loss behaves like cross-entropy, as a ratio otherwise; an error when orders of magnitude
  off.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import jax
import numpy as np

from harness import losses
from harness.checks.model.programs import Probe
from harness.checks.model.settings import NAME, Settings
from harness.findings import Finding, error, warning
from harness.tasks import Task

# Losses that apply their own softmax/sigmoid and so expect unnormalized logits.
LOGIT_LOSSES = ("cross_entropy",)
LOGIT_LOSS_PREFIXES = ("softmax_cross_entropy", "sigmoid_binary_cross_entropy", "sigmoid_focal_loss")


def where_raised(err: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame outside JAX, Flax and the harness's own machinery: the
    line of the user's model or loss that raised."""
    internal = (f"{os.sep}site-packages{os.sep}", f"{os.sep}jax{os.sep}", f"{os.sep}flax{os.sep}",
                f"harness{os.sep}checks{os.sep}", f"harness{os.sep}engine{os.sep}")
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not any(s in f.filename for s in internal)]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}"


def first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line[:limit] + ("..." if len(line) > limit else "")


def probe_findings(probe: Probe, batch: int, task: Task) -> list[Finding]:
    """``model.forward`` errors an abstract trace finds: shapes first (a loss often raises because of them), then
    exceptions."""
    shape_findings = shape_problems(probe, batch, task)
    if shape_findings:
        return shape_findings
    if probe.error is not None:
        err = probe.error
        where = where_raised(err)
        suggestion = ("Call the model (and the loss) on two examples by hand, e.g. model(x_train[:2]), to see the "
                      "full traceback; check each layer's sizes against the input shape and num_outputs.")
        if isinstance(err, jax.errors.ConcretizationTypeError):  # TracerBoolConversionError and friends
            suggestion = ("The model branches in Python on a traced value (if/while/int() on an array): the harness "
                          "jit-compiles it, as training under jax.jit does. Use jnp.where, jax.lax.cond or "
                          "jax.lax.fori_loop instead.")
        return [error(
            f"{NAME}.forward",
            f"{probe.failed_stage[0].upper()}{probe.failed_stage[1:]} raised {type(err).__name__} on a batch of "
            f"{batch} examples: {first_line(err)}" + (f" (at {where})" if where else ""),
            suggestion,
            stage=probe.failed_stage, exception=type(err).__name__, detail=str(err)[:2000], location=where,
        )]
    return []


def shape_problems(probe: Probe, batch: int, task: Task) -> list[Finding]:
    findings = []
    if probe.output is None:
        return findings
    shape = tuple(probe.output.shape)
    # A single regression output as (batch,) is accepted: the squared error reshapes targets to the outputs.
    accepted = task.output_shapes(batch)
    expected = accepted[0]
    if shape not in accepted:
        what = ("vocabulary size" if task.causal else "num_classes") if task.classification else "target dimensions"
        findings.append(error(
            f"{NAME}.forward",
            f"The model's output has shape {shape} for a batch of {batch}; expected {expected} for this task "
            f"({task.describe()}; {what} = {task.num_outputs}).",
            "Make the last layer output num_outputs features per example (per position for sequence targets) and "
            "keep the batch axis first; broadcasting a wrong shape against the targets fails silently in many "
            "losses.",
            output_shape=list(shape), expected_shape=list(expected),
        ))
    loss_shape = tuple(probe.loss.shape) if probe.loss is not None else None
    if loss_shape is not None and loss_shape not in ((batch,), ()):
        findings.append(error(
            f"{NAME}.forward",
            f"The loss returned shape {loss_shape} for a batch of {batch}; a loss must return one value per example, "
            f"shape ({batch},).",
            "A (batch, batch) or (batch, k) result usually comes from broadcasting outputs of shape (batch, 1) "
            "against targets of shape (batch,): reshape one to match the other, and reduce over output dimensions "
            "only.",
            loss_shape=list(loss_shape), expected_shape=[batch],
        ))
    return findings


def finite_findings(outputs: np.ndarray, per_example: np.ndarray) -> list[Finding]:
    bad_out = ~np.isfinite(outputs)
    if bad_out.any():
        seeds = np.flatnonzero(bad_out.reshape(len(outputs), -1).any(axis=1)).tolist()
        examples = int(bad_out.reshape(len(outputs), outputs.shape[1], -1).any(axis=2).sum())
        return [error(
            f"{NAME}.forward",
            f"The model's outputs at init are non-finite (NaN/inf) for {examples} example-inits of "
            f"{outputs.shape[0] * outputs.shape[1]} ({bad_out.sum()} values; inits {seeds}).",
            "Look for log/sqrt/division of values that can be zero or negative, an overflowing exp, or an init "
            "scale so large that activations overflow float32.",
            nonfinite_values=int(bad_out.sum()), inits=seeds,
        )]
    bad_loss = ~np.isfinite(per_example)
    if bad_loss.any():
        return [error(
            f"{NAME}.forward",
            f"The loss at init is non-finite for {int(bad_loss.sum())} of {bad_loss.size} example-inits although the "
            f"model's outputs are finite.",
            "The loss takes a log/sqrt/division of something that can be zero or negative (e.g. log of a "
            "probability that underflowed to 0): compute it from logits with a stable function "
            "(optax.softmax_cross_entropy_with_integer_labels, jax.nn.log_softmax).",
            nonfinite_losses=int(bad_loss.sum()),
        )]
    return []


def expects_logits(loss_name: str) -> bool:
    return loss_name in LOGIT_LOSSES or loss_name.startswith(LOGIT_LOSS_PREFIXES)


def output_range_findings(outputs: np.ndarray, loss_name: str, classification: bool,
                          settings: Settings) -> tuple[list[Finding], dict[str, Any]]:
    """Probabilities handed to a logits loss, judged over every init (one init with logits in [0, 1] by chance
    is not enough: all of them must be)."""
    lo, hi = float(np.min(outputs)), float(np.max(outputs))
    metrics = {f"{NAME}/output_min": lo, f"{NAME}/output_max": hi}
    # (inits, batch, classes) per example; (inits, batch, positions..., classes) per position.
    if not (classification and expects_logits(loss_name)) or outputs.ndim < 3:
        return [], metrics
    tol = settings.probability_tolerance
    row_sums = outputs.sum(axis=-1)
    softmax = lo >= -tol and hi <= 1 + tol and bool(np.all(np.abs(row_sums - 1) <= tol * max(1, outputs.shape[-1])))
    # A sigmoid's outputs are strictly inside (0, 1) and vary; all-zero logits (a zero-initialized head, dead
    # features) are valid logits, not probabilities.
    sigmoid = lo > tol and hi < 1 and bool(np.all(outputs.std(axis=1) > 0))
    if not (softmax or sigmoid):
        return [], metrics
    what = ("rows in [0, 1] that sum to 1: a softmax" if softmax else "every value in (0, 1): a sigmoid")
    return [error(
        f"{NAME}.output_range",
        f"The model outputs probabilities ({what}) but the loss {loss_name!r} expects logits and applies its own "
        f"softmax: the softmax is applied twice (outputs in [{lo:.3g}, {hi:.3g}] at every init).",
        "Remove the final softmax/sigmoid from the model and feed raw logits to the loss (apply softmax only to "
        "read off probabilities), or use a loss that takes probabilities.",
        output_min=lo, output_max=hi, row_sum_max_deviation=float(np.max(np.abs(row_sums - 1))),
        looks_like="softmax" if softmax else "sigmoid", loss=loss_name,
    )], metrics


def loss_saturation_findings(confident: dict[str, float], null: losses.NullPrediction | None, space: str,
                             loss_name: str) -> list[Finding]:
    """"Softmax applied twice" inside the loss: the model outputs logits, but the loss squashes them (a softmax or
    sigmoid) before a log that expects logits, so no output scores below a floor well above zero and the gradients
    shrink as the model grows confident. Seen along confidently correct logits (:func:`losses.confident_losses`):
    a loss on logits goes to 0 there (cross-entropy, focal), a label-smoothed one grows (it penalizes confidence);
    this one levels off. The rule: the loss at margins 20 and 40 is the same within 1% (levelled off, not
    decreasing) and above 1% of the null prediction's loss (the overfit test's own target for cross-entropy: 0.01
    against log C), while below it (confidence helps, so the labels are read the right way round)."""
    if space != losses.ZERO_LOGITS or null is None or not null.value > 0 or len(confident) < 2:
        return []
    margins = sorted(confident, key=float)
    low, high = float(confident[margins[0]]), float(confident[margins[-1]])
    if not (np.isfinite(low) and np.isfinite(high)):
        return []
    levelled = abs(high - low) <= 0.01 * abs(low)
    if not (levelled and 0.01 * null.value < high < null.value):
        return []
    return [error(
        f"{NAME}.output_range",
        f"The loss {loss_name!r} squashes the model's logits before its own log: confidently correct logits (the "
        f"right class {margins[0]} and {margins[-1]} above the others) both score {high:.3g}, "
        f"{high / null.value:.0%} of the {null.value:.3g} of {null.name}, and no output can score lower. A softmax "
        "or sigmoid is applied twice (inside the loss, then by a loss that expects logits): the loss can never "
        "approach 0 and its gradients shrink as the model grows confident.",
        "Hand the raw logits to the cross-entropy (optax.softmax_cross_entropy_with_integer_labels applies its own "
        "softmax); if the loss must take probabilities, use -log(p[label]) on them instead.",
        loss=loss_name, confident_losses={m: float(confident[m]) for m in margins}, null_loss=null.value,
        null_prediction=null.name, floor_fraction=high / null.value,
    )]


def clamped_output_findings(outputs: np.ndarray, y_train: np.ndarray, classification: bool,
                            settings: Settings) -> list[Finding]:
    """A regression head clamped by a ReLU or clip, with targets beyond the clamp. Outputs that take exactly the
    same extreme value for many examples, at most inits, sit against a bound (continuous outputs do not tie);
    targets beyond that bound cannot be reached, and while pinned those outputs get no gradient at all. Silent
    when every target is within reach (a ReLU head on counts or prices is a design, not a bug)."""
    if classification or outputs.ndim < 2 or outputs.shape[1] < 2:
        return []
    per_init = np.asarray(outputs, np.float64).reshape(outputs.shape[0], -1)
    targets = np.asarray(y_train, np.float64).ravel()
    targets = targets[np.isfinite(targets)]
    if not targets.size:
        return []
    for side, extreme, beyond in (("below", np.min, np.less), ("above", np.max, np.greater)):
        bounds = extreme(per_init, axis=1)
        ties = np.sum(per_init == bounds[:, None], axis=1)
        pinned_inits = (ties >= 2) & (ties >= settings.pinned_output_fraction * per_init.shape[1])
        # A clamp is the same value whatever the init, and shows at most inits (at one, the head's pre-activations
        # may all fall on the open side); duplicated examples tie too, but at a value that moves with the init.
        if pinned_inits.sum() < min(2, len(per_init)) or np.ptp(bounds[pinned_inits]) != 0:
            continue
        bound = float(bounds[pinned_inits][0])
        pinned = ties[pinned_inits] / per_init.shape[1]
        out_of_reach = float(np.mean(beyond(targets, bound)))
        if out_of_reach < settings.unreachable_target_fraction:
            continue
        return [error(
            f"{NAME}.output_range",
            f"The model's outputs are clamped at {bound:.4g}: {np.mean(pinned):.0%} of them are exactly {bound:.4g} at "
            f"{len(pinned)} of {len(per_init)} inits (a ReLU or clip on the output layer), but {out_of_reach:.0%} of "
            f"the training targets lie {side} it. Those targets cannot be reached, and outputs pinned at the bound get no gradient.",
            "Remove the ReLU/clip from the regression head (a linear output reaches any real number), or transform "
            "the targets into the range the output can take.",
            bound=bound, side=side, pinned_fraction=float(np.mean(pinned)), unreachable_target_fraction=out_of_reach,
        )]
    return []


def initial_loss_findings(per_example: np.ndarray, loss_fn, num_classes: int | None, y: np.ndarray,
                          y_train: np.ndarray, settings: Settings, *, outputs: np.ndarray | None = None,
                          null_values: dict[str, Any] | None = None) -> tuple[list[Finding], dict[str, Any]]:
    """How far the loss at init is from what a model predicting nothing gives (:func:`losses.initial_loss_expectation`:
    closed form for the built-in losses; for any other loss, the user's loss at the null prediction of the space
    the model's ``outputs`` live in, on the batch's targets ``y``; ``null_values`` precomputed in the init program).

    A loss that behaves like cross-entropy (its null value is log C) is judged by its excess in nats: logits of
    scale s add about s^2 / 2 nats whatever C, while a ratio to log(C) would be twice as strict for 2 classes as for
    4. Measured on the healthy builtins (MLPs and the CNN, 4 inits): at most 0.37 nats (breast_cancer), 0.13 on
    digits; an N(0, 1) output layer of width 64 adds ~3.9. Any other loss with a positive null value (squared
    error: E[y^2], the loss of zero outputs; the targets' scale cancels) is judged by its ratio to it: at most 1.73
    on the healthy regression (an output with about the targets' variance), ~20 with an N(0, 1) output layer. A
    null value of 0 or below (a sign-flipped loss) gives no scale: reported, not judged.

    Severity: a warning for a confidently wrong init (the optimizer spends its first steps undoing it; Adam does,
    plain SGD may not); an error from ``initial_loss_error_ratio`` (100x) the null value, for any loss: orders of
    magnitude mean the forward pass's scale itself is broken (a deep ReLU net with too large an init gives a loss
    of 1e4-1e6 where uniform predictions give 2.3), and the first gradients are that far off too.
    """
    per_init = per_example.reshape(len(per_example), -1).mean(axis=1)
    observed = float(per_init.mean())
    metrics: dict[str, Any] = {f"{NAME}/initial_loss": observed}
    # On the checked batch, where the observed loss is measured (E[y^2] of the batch for squared error).
    null = losses.initial_loss_expectation(loss_fn, num_classes, y, outputs, y, null_values)
    if null is None or not np.isfinite(observed):
        return [], metrics  # nothing finite is known about this loss: the value is reported, not judged
    expected = null.value
    metrics[f"{NAME}/expected_initial_loss"] = expected
    if expected <= 0:
        return [], metrics  # no scale to judge against (a sign-flipped loss: the training checks name it)
    ratio = observed / expected
    metrics[f"{NAME}/initial_loss_ratio"] = ratio
    evidence = dict(initial_loss=observed, expected=expected, ratio=ratio, per_init=per_init.tolist(),
                    null_prediction=null.name, cross_entropy_like=null.cross_entropy_like,
                    error_ratio=settings.initial_loss_error_ratio)
    if null.cross_entropy_like:
        excess = observed - expected
        if excess <= settings.max_initial_loss_excess and ratio < settings.initial_loss_error_ratio:
            return [], metrics
        how_far = f"{excess:.4g} nats above the -log(1/{num_classes}) = {expected:.4g} of {null.name}"
        evidence.update(excess_nats=excess, threshold_nats=settings.max_initial_loss_excess)
        suggestion = ("Initialize the output layer with a small scale (fan-in scaled like LeCun/Glorot, or zeros) "
                      "so the initial logits are near zero and the predictions near uniform (Karpathy: 'init well').")
        labels = np.asarray(y_train, np.int64).ravel()
        labels = labels[(labels >= 0) & (labels < num_classes)]  # padding (negative) is not a class
        prior = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
        if prior.min() > 0 and prior.max() / prior.min() >= 3:
            suggestion += (f" The classes are imbalanced (frequencies {prior.min():.2g} to {prior.max():.2g}): set the "
                           "output bias to log(class frequency) so the model starts at the prior.")
    else:
        if ratio <= settings.max_initial_loss_ratio:
            return [], metrics
        what = "E[y^2] = " if loss_fn is losses.mse else ""
        how_far = f"{ratio:.3g}x the {what}{expected:.4g} of {null.name}"
        evidence.update(threshold_ratio=settings.max_initial_loss_ratio)
        if num_classes:
            suggestion = ("Initialize the output layer with a small scale (fan-in scaled, or zeros) so the initial "
                          f"outputs are near {null.name} (Karpathy: 'init well').")
        else:
            suggestion = ("Initialize the output layer with a small scale (fan-in scaled, or zeros) so the initial "
                          "predictions are near zero, and set the output bias to the target mean (or standardize the "
                          "targets) (Karpathy: 'init well').")
    if ratio >= settings.initial_loss_error_ratio:
        return [error(
            f"{NAME}.initial_loss",
            f"The loss at init is {observed:.4g}, {ratio:.3g}x the {expected:.4g} of {null.name} (mean over "
            f"{len(per_init)} inits): orders of magnitude off, so the scale of the forward pass itself is broken, "
            f"and the first gradients are off by as much.",
            "Look at the init of every layer, not only the output layer: a fixed standard deviation instead of a "
            "fan-in scaled init (He for ReLU, Glorot/LeCun for tanh) multiplies the activations at every layer "
            "(model.exploding_activations names the layer where the growth starts); then initialize the output "
            "layer small (Karpathy: 'init well').", **evidence,
        )], metrics
    return [warning(
        f"{NAME}.initial_loss",
        f"The loss at init is {observed:.4g}, {how_far} (mean over {len(per_init)} inits): the initial predictions "
        f"are confidently wrong, and the first steps of training are spent undoing the init.",
        suggestion, **evidence,
    )], metrics
