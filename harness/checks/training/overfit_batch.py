"""Overfit a single batch: can the model memorize a few examples when nothing stands in its way?

"The single most useful debugging technique" (seed 001, Level 3; seed 002's "Golden Rule"; Karpathy, "A Recipe for
Training Neural Networks", 2019: "overfit a single batch of only a few examples"). With regularization off
(dropout deterministic, weight decay 0), any model with enough capacity drives the loss on one fixed batch to about
zero; if it cannot, the loss, the gradient path, the labels or the learning rate is broken, and the way the curve
fails says which (seed 003: "if the loss increases, your loss might be ill-defined (flipped sign), learning rate too
high, numerical instabilities...").

The batch: ``batch_size`` examples chosen deterministically (class-stratified, in dataset order; independent of
``seed``), so the same request from many sweep points is one merged program. The engine trains its members on it
every step (``Hparams.fixed_batch``, the batch repeated to fill the run's batch size) and evaluates loss and
accuracy on it every ``eval_every`` steps (inside the training program: one compile).

Members of the one program (all on the same batch and init):

* the configured run: ``lr`` (default ``optim.lr``) with the configured optimizer;
* LR probes at ``probe_lr_factors`` x that LR: evidence to rank causes (if 100x the LR memorizes the batch, the LR
  is too low; if 0.1x does and 1x diverges, it is too high);
* the configured LR on all-zero inputs: if they give the same initial loss as the real batch (same init), the
  output ignores its input;
* LR 0: the untrained loss and accuracy on the batch (the baseline a sign-flipped loss falls below).

Pass: the batch loss goes under the target (0.01 for classification, seed 001's "< 0.01 working correctly"; 1% of
the batch's target variance for regression, i.e. R^2 >= 0.99), counted above the loss's own floor on the batch
(:func:`loss_floor`: 0 for plain cross-entropy, the smoothed targets' entropy for a label-smoothed one). A classification run that memorized the batch (100%
accuracy) and whose loss still falls geometrically fast enough to reach the target within twice the budget passes
with a note (the small CNN on digits_image at Adam 1e-3 ends at 0.017 with 100% accuracy, projected to reach 0.01
near step 584).

A failure is an ``error`` only when it means something is broken. The test's claim holds for a model *with enough
capacity*; a linear regression on noisy targets, two tanh units on XOR or a 4-unit classifier cannot memorize 32
arbitrary examples, and calling them broken is a false alarm. So a failed run is judged in two steps:

1. Curves that show a defect whatever the model's size (:func:`bug_evidence`): a flipped sign, non-finite values, a
   rising loss, no gradient at all, an output that ignores its input (its whole curve equals the zero-input
   member's), a configured LR under which the loss does not move while a probe LR moves it. Error.
2. Otherwise, what the model can fit (:class:`Capacity`, :func:`judge_capacity`; any model library, any loss): the
   rank of the Jacobian of the batch's outputs w.r.t. the parameters, at a perturbed init, against the batch's
   degrees of freedom (distinct examples x outputs, less one per softmax), which parameter count, a narrow layer and
   frozen parameters all bound; measured on the batch and on one twice its size, since "able" means past the
   interpolation threshold with room to spare. A model able to memorize that does not: error, as before. One
   that is not able because parameters receive no gradient (a stop_gradient), or in which some examples' outputs
   move with no parameter at all (a ReLU on a regression head): error, naming them. Otherwise a
   small model: ``info`` with the facts (parameters, degrees of freedom, rank, narrowest layer, the best loss a
   linear model reaches on the batch), or ``warning`` when it barely moved although a linear model gets far lower,
   or ends clearly above a linear probe trained the same way while being at least as flexible as a linear model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from harness import losses
from harness.checks.base import Outcome, Plot
from harness.checks.training import curves
from harness.engine import compile as programs
from harness.engine.table import Request
from harness.engine.core import Arrays, Hparams, TrainSpec, mean_loss
from harness.engine.driver import SweepResult
from harness.errors import HarnessError
from harness.findings import error, info, warning

NAME = "overfit_batch"
CLASSIFICATION_TARGET = 0.01  # seed 001: final loss "< 0.01: working correctly"
REGRESSION_TARGET_FRACTION = 0.01  # of the batch target variance: R^2 >= 0.99 on the batch
# The loss is "flat" when it fell less than this fraction of its initial value over the whole budget: 1e-7 with
# Adam moves the reference job's loss 0.2%, a healthy run 99.9%.
FLAT_FRACTION = 0.1
# "Rising": the late window's median above the early window's by 10% (Adam on a fixed batch at a sane LR is
# monotone up to spikes a median ignores), or a rebound to over 2x the lowest window median.
RISE_FACTOR = 1.1
REBOUND_FACTOR = 2.0
# A probe "did much better" when its final loss is under a tenth of the configured run's (or reached the target).
PROBE_BETTER = 0.1
# A memorized classification batch passes if its loss is on track to reach the target within this many budgets.
ON_TRACK_BUDGETS = 2.0
KNOWN_NONNEGATIVE_LOSSES = ("cross_entropy", "mse")


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 500
    batch_size: int = 32
    target_loss: float | None = None
    lr: float | None = None
    eval_every: int = 50
    probe_lr_factors: tuple[float, ...] = (0.01, 0.1, 10.0, 100.0)

    def validate(self, key: str):
        if self.steps < 20:
            raise HarnessError(f"must be at least 20, got {self.steps}", key=f"{key}.steps")
        if self.batch_size < 1:
            raise HarnessError(f"must be positive, got {self.batch_size}", key=f"{key}.batch_size")
        if self.target_loss is not None and not np.isfinite(self.target_loss):
            raise HarnessError(f"must be a finite number or null, got {self.target_loss}", key=f"{key}.target_loss")
        if self.lr is not None and not self.lr > 0:
            raise HarnessError(f"must be positive or null (null = optim.lr), got {self.lr}", key=f"{key}.lr")
        if not 1 <= self.eval_every <= self.steps:
            raise HarnessError(f"must be in [1, steps], got {self.eval_every}", key=f"{key}.eval_every")
        bad = [f for f in self.probe_lr_factors if not f > 0 or f == 1]
        if bad:
            raise HarnessError(f"factors must be positive and not 1, got {bad[0]}", key=f"{key}.probe_lr_factors")


# --------------------------------------------------------------------------------------------------------------
# The batch and the members.


def choose_batch(y, size: int, classification: bool) -> np.ndarray:
    """Indices of the batch: for classification, round-robin over the classes in dataset order (the first example of
    every class, then the second, ...), so every class present is represented; for regression and per-position
    labels (sequences, label maps: every example holds many classes) the first ``size``."""
    n = len(y)
    size = min(size, n)
    y = np.asarray(y)
    if not classification or y.ndim > 1:
        return np.arange(size)
    per_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    order = []
    for rank in range(max(len(p) for p in per_class)):
        order.extend(int(p[rank]) for p in per_class if rank < len(p))
        if len(order) >= size:
            break
    return np.asarray(order[:size])


def default_target(classification: bool, yb) -> float:
    if classification:
        return CLASSIFICATION_TARGET
    yb = np.asarray(yb, dtype=np.float64)
    # Several targets per example: the mean of each target's variance across the batch (what R^2 averages), not
    # the variance of all values pooled, which counts the targets' different means as signal.
    variance = float(np.var(yb)) if yb.ndim <= 1 else float(np.mean(np.var(yb, axis=0)))
    return REGRESSION_TARGET_FRACTION * variance if variance > 0 else 1e-6


@dataclasses.dataclass(frozen=True)
class Plan:
    lr: float
    probe_factors: tuple[float, ...]

    @property
    def probe_rows(self) -> range:
        return range(1, 1 + len(self.probe_factors))

    @property
    def zero_input_row(self) -> int:
        return 1 + len(self.probe_factors)

    @property
    def untrained_row(self) -> int:
        return 2 + len(self.probe_factors)

    def hparams(self, seed: int) -> Hparams:
        lrs = [self.lr] + [self.lr * f for f in self.probe_factors] + [self.lr, 0.0]
        scale = np.ones(len(lrs))
        scale[self.zero_input_row] = 0.0
        return Hparams.make(lr=lrs, weight_decay=0.0, init_seed=seed, data_seed=seed, input_scale=scale,
                            fixed_batch=1)


# --------------------------------------------------------------------------------------------------------------
# Reading one member's curve.


@dataclasses.dataclass
class Curve:
    loss: np.ndarray  # per step, NaN after going non-finite
    initial: float
    final: float  # median of the last few finite steps
    best: float
    steps_to_target: int | None
    first_nonfinite: int
    grad_norm0: float

    @property
    def diverged(self) -> bool:
        return self.first_nonfinite >= 0

    @property
    def reached(self) -> bool:
        return self.steps_to_target is not None


def read_curve(loss, target: float, first_nonfinite: int, grad_norm) -> Curve:
    loss = np.asarray(loss, dtype=np.float64)
    finite = loss[np.isfinite(loss)]
    n_tail = max(3, len(loss) // 50)
    return Curve(
        loss=loss,
        initial=float(finite[0]) if finite.size else float("nan"),
        final=float(np.median(finite[-n_tail:])) if finite.size else float("nan"),
        best=float(finite.min()) if finite.size else float("nan"),
        steps_to_target=curves.first_below(loss, target),
        first_nonfinite=int(first_nonfinite),
        grad_norm0=float(np.asarray(grad_norm)[0]),
    )


def rising(loss, target: float) -> dict | None:
    """Evidence that the loss rises (None if it does not): the late window's median above the early window's, or a
    rebound from the lowest window. Medians over windows, so Adam's occasional spike on a fixed batch is ignored;
    nothing below the target counts (a loss of 1e-5 wobbling to 1e-4 is memorized either way)."""
    loss = np.asarray(loss, dtype=np.float64)
    n = int(np.isfinite(loss).sum())
    if n < 20:
        return None
    early_w, late_w = max(5, n // 20), max(5, n // 10)
    early = curves.window_median(loss, 0, early_w)
    late = curves.window_median(loss, n - late_w, n)
    windows = [curves.window_median(loss, s, s + late_w) for s in range(0, n - late_w + 1, max(1, late_w // 2))]
    lowest = float(np.nanmin(windows))
    if not late > target:
        return None
    if late > early * RISE_FACTOR and late - early > 1e-6 * max(1.0, abs(early)):
        return dict(kind="net_rise", early_median=early, late_median=late, lowest_window_median=lowest)
    if lowest > 0 and late > REBOUND_FACTOR * lowest:
        return dict(kind="rebound", early_median=early, late_median=late, lowest_window_median=lowest)
    return None


def sign_flipped(curve: Curve, loss_name: str, classification: bool, final_acc: float, untrained_acc: float,
                 num_classes: int | None) -> str | None:
    """Why the loss's sign looks flipped (None if it does not): a loss that cannot be negative went negative; or
    the loss fell while the batch accuracy fell below both chance and the untrained model; or it fell without bound
    below zero. Minimizing a flipped loss maximizes the real one, so the model gets worse while the number falls."""
    if loss_name in KNOWN_NONNEGATIVE_LOSSES and curve.best < -1e-6:
        return f"the loss {loss_name} cannot be negative, yet it reached {curve.best:.3g}"
    fell = curve.final < curve.initial - 0.5 * abs(curve.initial)
    if classification and fell and np.isfinite(final_acc):
        chance = 1.0 / num_classes if num_classes else 0.5
        if final_acc < min(untrained_acc, chance):
            return (f"the loss fell ({curve.initial:.3g} -> {curve.final:.3g}) while the batch accuracy fell to "
                    f"{final_acc:.0%} (untrained {untrained_acc:.0%}, chance {chance:.0%})")
    if curve.final < 0 and curve.final < -10 * max(abs(curve.initial), 1e-3):
        return f"the loss falls without bound below zero ({curve.initial:.3g} -> {curve.final:.3g})"
    return None


# --------------------------------------------------------------------------------------------------------------
# Ranking causes from the evidence.


def failure_shape(curve: Curve, target: float) -> str:
    """'diverged', 'flat' (barely moved), 'slow' (still falling at the end) or 'stalled' (fell, then plateaued)."""
    if curve.diverged:
        return "diverged"
    scale = max(abs(curve.initial), 1e-12)
    if (curve.initial - curve.final) / scale < FLAT_FRACTION:
        return "flat"
    # Still falling geometrically fast enough to reach the target within 10x the steps taken so far: slow.
    n = int(np.isfinite(curve.loss).sum())
    projected = projected_steps(curve, target)
    return "slow" if np.isfinite(projected) and projected <= 11 * n else "stalled"


def probe_evidence(plan: Plan, probes: list[Curve], configured: Curve) -> tuple[dict | None, dict | None]:
    """The best higher-LR and lower-LR probes that did much better than the configured run."""
    configured_drop = configured.initial - configured.final

    def better(c: Curve) -> bool:
        if c.diverged:
            return False
        drop = c.initial - c.final
        # Reached the target, ended 10x lower, or (from a flat start) moved the loss 10x farther, by more than 1%
        # of its start (a fixed batch has no minibatch noise: 1% is far above float round-off).
        return (c.reached or c.final < PROBE_BETTER * configured.final
                or (drop > 0.01 * abs(c.initial) and drop > max(configured_drop, 0) / PROBE_BETTER))

    def describe(factor, c: Curve):
        return dict(factor=factor, lr=plan.lr * factor, final_loss=c.final, steps_to_target=c.steps_to_target)

    up = [(f, c) for f, c in zip(plan.probe_factors, probes) if f > 1 and better(c)]
    down = [(f, c) for f, c in zip(plan.probe_factors, probes) if f < 1 and better(c)]

    def pick(candidates):  # the fastest to the target, else the lowest final loss
        return describe(*min(candidates, key=lambda fc: (
            math.inf if fc[1].steps_to_target is None else fc[1].steps_to_target, fc[1].final)))

    return (pick(up) if up else None), (pick(down) if down else None)


def has_no_gradient(configured: Curve) -> bool:
    return configured.grad_norm0 < 1e-12 or not np.isfinite(configured.grad_norm0)


def ignores_its_input(configured: Curve, zero_input: Curve) -> bool:
    """Same init, same batch, same LR: a model whose output does not depend on its input trains exactly as it does
    on all-zero inputs, so both curves match from start to end. (Equal *initial* losses alone also come from a
    model whose input weights start at zero -- a zero-initialized linear model -- which then trains apart.)"""
    def close(a, b):
        return abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-6)

    return close(zero_input.initial, configured.initial) and close(zero_input.final, configured.final)


def bug_evidence(g: "Reading") -> list[str]:
    """What in the curves shows a defect whatever the model's size (a small model does none of these): a flipped
    sign, non-finite values, a loss that rises, no gradient at all, an output that ignores its input, or a
    configured LR under which the loss does not move while another LR moves it."""
    c, reasons = g.configured, []
    if g.flipped:
        reasons.append("sign_flipped")
    if c.diverged:
        reasons.append("diverged")
    if g.rise and g.rise["kind"] == "net_rise":
        reasons.append("rising")
    if has_no_gradient(c):
        reasons.append("no_gradient")
    if ignores_its_input(c, g.zero_input):
        reasons.append("ignores_input")
    if g.shape == "flat" and (g.higher or g.lower):
        reasons.append("learning_rate_does_not_move_the_loss")
    return reasons


def rank_causes(shape: str, configured: Curve, zero_input: Curve, higher: dict | None, lower: dict | None,
                probes: list[Curve], steps: int, target: float) -> list[str]:
    causes = []
    spike = float(np.nanmax(configured.loss[: max(5, len(configured.loss) // 10)]))
    if lower and spike > 1.5 * abs(configured.initial) and shape in ("flat", "stalled"):
        causes.append(f"the learning rate is too high: the loss jumped to {spike:.3g} in the first steps (from "
                      f"{configured.initial:.3g}) and then stalled, the signature of units killed by oversized "
                      f"updates; {lower['factor']:g}x the LR ({lower['lr']:.3g}) "
                      + (f"reached the target at step {lower['steps_to_target']}" if lower["steps_to_target"]
                         is not None else f"reached loss {lower['final_loss']:.3g}"))
    if higher:
        causes.append(f"the learning rate is too low: {higher['factor']:g}x it ({higher['lr']:.3g}) "
                      + (f"reached the target at step {higher['steps_to_target']}" if higher["steps_to_target"]
                         is not None else f"reached loss {higher['final_loss']:.3g}"))
    if lower and not any(c.startswith("the learning rate is too high") for c in causes):
        causes.append(f"the learning rate is too high: {lower['factor']:g}x it ({lower['lr']:.3g}) "
                      + (f"reached the target at step {lower['steps_to_target']}" if lower["steps_to_target"]
                         is not None else f"reached loss {lower['final_loss']:.3g}"))
    no_gradient = has_no_gradient(configured)
    ignores_input = ignores_its_input(configured, zero_input)
    if shape == "flat":
        if no_gradient:
            causes.append("no gradient reaches the parameters (gradient norm 0 at step 0): a stop_gradient, a "
                          "detached or zero-initialized path, or dead units")
        if ignores_input:
            causes.append(f"the output ignores its input: all-zero inputs give the same loss "
                          f"({zero_input.initial:.4g}) as the real batch")
        if all(p.diverged or (p.initial - p.final) < FLAT_FRACTION * abs(p.initial) for p in probes) \
                and not no_gradient:
            causes.append("every probe LR stayed flat too: dead units, a model disconnected from its output, or "
                          "a loss that does not depend on the outputs")
        if not (higher or lower):
            causes.append("labels that cannot be matched (wrong targets or loss for this output, e.g. probabilities "
                          "into a loss expecting logits)")
    elif shape == "diverged":
        if not lower:
            causes.append("numerics: a log(0), division by zero or overflow in the model or loss (every probe LR "
                          "below it diverged or failed as well)" if all(p.diverged or not p.reached for p in probes)
                          else "the learning rate is too high")
        causes.append("numerics: add an epsilon inside logs and divisions, or clip gradients")
    elif shape == "slow":
        if not higher:
            causes.append("the model is too small or the budget too short for this batch: the loss still falls")
        causes.append(f"the budget: {steps} steps are not enough at this rate")
    else:  # stalled
        if ignores_input:
            causes.append(f"the output ignores its input: all-zero inputs give the same loss "
                          f"({zero_input.initial:.4g}) as the real batch")
        causes.append("too little capacity, dead units (ReLU) or saturated activations: the loss plateaued at "
                      f"{configured.final:.3g}, above the target {target:.3g}")
        if not higher and not lower:
            causes.append("the learning rate (neither 0.01x nor 100x did much better)")
    # Deduplicate, keeping the evidence-backed order.
    return list(dict.fromkeys(causes))


# --------------------------------------------------------------------------------------------------------------
# Plot and run.


def draw(path: str, plan: Plan, curves_by_label: dict[str, np.ndarray], target: float, steps_to_target):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    all_values = np.concatenate([c[np.isfinite(c)] for c in curves_by_label.values()] + [np.array([target])])
    log_y = all_values.size > 0 and all_values.min() >= 0
    floor = min(target, 1e-8) / 10  # a loss of exactly 0 (float32 cross-entropy can reach it) plots at the floor
    for label, loss in curves_by_label.items():
        main = label.startswith("configured")
        ax.plot(np.arange(len(loss)), np.maximum(loss, floor) if log_y else loss, lw=2.0 if main else 0.9,
                alpha=1.0 if main else 0.6, ls="--" if "zero" in label else "-", label=label)
    main_curve = next(iter(curves_by_label.values()))
    main_finite = main_curve[np.isfinite(main_curve)]
    ax.axhline(target, color="crimson", ls=":", lw=1.2, label=f"target {target:.3g}")
    if steps_to_target is not None:
        ax.axvline(steps_to_target, color="green", ls=":", lw=1, label=f"reached at step {steps_to_target}")
    if log_y:
        ax.set_yscale("log")
        if main_finite.size:  # probes at 100x the LR may explode to 1e12: keep the configured run readable
            ax.set_ylim(top=10 * max(main_finite.max(), target))
    else:  # a sign-flipped loss goes negative
        ax.set_yscale("symlog", linthresh=max(target, 1e-6))
    ax.set_xlabel("step")
    ax.set_ylabel("loss on the batch")
    ax.set_title("Overfit one batch")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def batch_arrays(ctx, settings: Settings) -> tuple[Arrays, np.ndarray]:
    idx = choose_batch(ctx.arrays.y_train, settings.batch_size, ctx.problem.classification)
    xb, yb = ctx.arrays.x_train[idx], ctx.arrays.y_train[idx]
    return Arrays(xb, yb, xb, yb), idx


FLOOR_STEPS = 1000
FLOOR_PEAK_LR = 3.0  # cosine-decayed to 1e-3 of it: large steps reach far-off optima (unscaled regression
# targets, logits growing without bound), small ones settle on near ones (label smoothing) to float precision


def prefix_groups(x: np.ndarray) -> np.ndarray:
    """``(B, T)`` group ids of a batch of token sequences: positions ``(i, t)`` and ``(j, s)`` share a group exactly
    when their prefixes ``x[i, :t+1]`` and ``x[j, :s+1]`` are equal, i.e. when a causal model sees the same thing
    at both. Prefixes are keyed by two independent 64-bit polynomial hashes and their length (a collision between
    two prefixes of one batch is about 2^-128 likely)."""
    x = np.asarray(x).astype(np.int64)
    b, length = x.shape
    keys = np.empty((b, length, 3), np.uint64)
    h1, h2 = np.zeros(b, np.uint64), np.full(b, 0x9E3779B97F4A7C15, np.uint64)
    token = (x + 1).astype(np.uint64)  # + 1: a token 0 still changes the hash
    for t in range(length):
        h1 = h1 * np.uint64(0x100000001B3) + token[:, t]
        h2 = (h2 ^ token[:, t]) * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(t + 1)
        keys[:, t, 0], keys[:, t, 1], keys[:, t, 2] = h1, h2, t
    _, group = np.unique(keys.reshape(b * length, 3), axis=0, return_inverse=True)
    return group.reshape(b, length)


def input_groups(x: np.ndarray) -> np.ndarray:
    """``(B,)`` group ids: examples ``i`` and ``j`` share a group exactly when their inputs are equal."""
    rows = np.ascontiguousarray(np.asarray(x).reshape(len(x), -1))
    return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)


def conditional_entropy(groups: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    """The lowest mean built-in cross-entropy a causal model can reach on a batch: within each group of positions
    that see the same prefix (:func:`prefix_groups`) the model must predict one distribution, best the group's
    empirical distribution of targets, which leaves the group's entropy. Weighted as the built-in cross-entropy
    averages: each example's real positions (targets >= 0) share its weight equally, examples weigh the same (an
    all-padding example contributes 0)."""
    y = np.asarray(y, np.int64)
    real = y >= 0
    per_example = real.sum(axis=1, keepdims=True)
    weight = np.where(real, 1.0 / (len(y) * np.maximum(per_example, 1)), 0.0)
    key = groups.astype(np.int64) * num_classes + np.clip(y, 0, num_classes - 1)
    mass = np.bincount(key[real], weights=weight[real], minlength=(int(groups.max()) + 1) * num_classes)
    mass = mass.reshape(-1, num_classes)
    group_mass = mass.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(mass > 0, -mass * np.log(mass / group_mass), 0.0)
    return float(terms.sum())


def loss_floor(ctx, arrays: Arrays) -> tuple[float | None, str]:
    """The lowest mean loss *any* outputs reach on this batch, and how it was found: the loss minimized over the
    outputs themselves (free logits, Adam with a cosine-decayed step, from zeros), with no model in the way. Plain
    cross-entropy and squared error give about 0; a label-smoothed cross-entropy gives the entropy of its smoothed
    targets (0.20 for 4 classes at 0.05), which no model can go below, so memorizing means reaching that floor,
    not 0. None when the minimization does not settle (a loss unbounded below, such as a sign-flipped one, or
    outputs far from zero): then the usual target.

    A causal model (a next-token language model) cannot give two positions that see the same prefix different
    outputs, and a batch of text has such positions with different next tokens (the first token of many sequences
    is followed by many others): its floor is the conditional entropy of the targets given the prefix. For the
    built-in cross-entropy it is computed exactly (:func:`conditional_entropy`); for other losses the outputs are
    minimized tied within each prefix group (one free output per group).

    Duplicated inputs with conflicting targets are deliberately *not* tied here: a batch whose inputs collapsed to one
    value (a pipeline that zeroes its features) would then have the labels' entropy as its floor and pass, and the
    test exists to catch exactly that. They count once in the capacity judgement instead (:class:`Capacity`).
    """
    problem = ctx.problem
    xb, yb = np.asarray(arrays.x_train), np.asarray(arrays.y_train)
    model = problem.model
    outputs = jax.eval_shape(lambda x: model(*model.init(jax.random.key(0), x), x), xb)
    groups = None
    if (problem.task.causal and xb.ndim == 2 and yb.shape == xb.shape
            and tuple(outputs.shape[:2]) == xb.shape and len(outputs.shape) == 3):
        groups = prefix_groups(xb)
        if problem.loss_fn is losses.cross_entropy:
            return conditional_entropy(groups, yb, int(problem.task.num_classes)), "conditional_entropy"
    elif problem.loss_fn in (losses.cross_entropy, losses.mse):
        # Free outputs drive the built-in losses to 0 (logits growing without bound, outputs equal to the
        # targets): known without a program to minimize them.
        return 0.0, "built_in"

    def program(y, *tied):
        tx = optax.adam(optax.cosine_decay_schedule(FLOOR_PEAK_LR, FLOOR_STEPS, alpha=1e-3))
        if tied:  # one free output per prefix group, shared by the positions that see that prefix
            start = jnp.zeros((tied[0].size, *outputs.shape[2:]), outputs.dtype)
        else:
            start = jnp.zeros(outputs.shape, outputs.dtype)

        def step(carry, _):
            out, opt_state = carry
            loss, grad = jax.value_and_grad(lambda o: mean_loss(problem.loss_fn, o[tied[0]] if tied else o, y))(out)
            updates, opt_state = tx.update(grad, opt_state, out)
            return (optax.apply_updates(out, updates), opt_state), loss

        return jax.lax.scan(step, (start, tx.init(start)), None, length=FLOOR_STEPS)[1]

    args = (yb,) if groups is None else (yb, groups.astype(np.int32))
    kind = "free_outputs" if groups is None else "prefix_tied_outputs"
    try:
        found = np.asarray(programs.run(f"{NAME}/loss_floor", program, *args,
                                        static_key=(NAME, "loss_floor", problem, FLOOR_STEPS, kind)), np.float64)
    except Exception:  # noqa: BLE001 - a loss that only works on a model's outputs: keep the usual target
        return None, kind
    last, earlier = found[-1], found[-FLOOR_STEPS // 10]
    settled = np.isfinite(last) and abs(earlier - last) <= 1e-4 * max(1.0, abs(last))
    return (float(last) if settled else None), kind


# --------------------------------------------------------------------------------------------------------------
# Capacity: could this model memorize this batch at all?

# Outputs (examples x outputs per example) up to which the Jacobian's rank is computed; beyond, parameters are
# counted (an SVD of a 2048 x 1024 sketch takes about a second here).
RANK_MAX_ROWS = 1024
# "Able to memorize" means past the interpolation threshold with room to spare: able to fit a batch this many times
# larger. At the threshold itself (exactly as many directions as the batch needs: softmax regression on 32 digits)
# a fit exists but is ill-conditioned -- the condition number of random features diverges as their number reaches
# the number of examples (Marchenko-Pastur; the peak of double descent, Belkin et al., PNAS 2019) -- and Adam at
# 1e-3 ends 500 steps at 100% accuracy with the loss at 0.39, slow, not broken.
SLACK = 2
# Parameters are perturbed by this fraction of their scale before the Jacobian is taken, so its rank is the
# architecture's generic rank, not that of a special init (all-zero or symmetric layers, which training leaves).
PERTURBATION = 0.1
# "Clearly worse than a linear model": less than half of the improvement a linear correction trained the same way
# makes from the same untrained outputs.
LINEAR_SHARE = 0.5
LINEAR_MAX_PARAMS = 4_000_000  # a linear map from the flattened input to every output larger than this: no probe


@dataclasses.dataclass
class Capacity:
    """What the model can fit on this batch, independent of how training went.

    The rank of the Jacobian of the batch's outputs with respect to the parameters is the number of independent
    directions in which the parameters can move the outputs; memorizing arbitrary targets needs one per output
    number (less one per softmax over classes, which ignores a shift of all logits). A full-rank Jacobian is the
    condition under which gradient descent drives the training loss to zero (the neural tangent kernel on the batch
    is non-degenerate: Jacot et al., NeurIPS 2018; Du et al., ICLR 2019; Liu, Zhu & Belkin, ACHA 2022). Parameter
    count, a narrow layer and frozen parameters all bound this rank, and it is computed for any model from its
    apply function alone.
    """

    params: int
    outputs_per_example: int
    dof_per_example: int  # outputs per example, less one per softmax over classes
    distinct_examples: int
    batch_dof: int  # distinct examples x dof per example: what memorizing this batch must set
    jacobian_rank: int | None  # on this batch; None when not computed (see note)
    slack_examples: int  # the larger batch (SLACK x) on which the rank is also measured
    slack_dof: int
    slack_rank: int | None
    frozen: tuple[str, ...] = ()  # parameter leaves that receive no gradient from the outputs
    frozen_params: int = 0
    stuck_examples: int = 0  # examples of the batch whose outputs no parameter moves at all
    narrowest: dict | None = None  # the narrowest activation: {"layer", "function", "units"}
    linear_rank: int | None = None  # what a linear model's Jacobian reaches on this batch
    linear_loss: float | None = None  # the best loss a linear model reaches on this batch
    linear_probe: Curve | None = None  # the untrained model plus a linear map, trained like the model
    note: str | None = None

    @property
    def able(self) -> bool:
        """Able to memorize this batch with room to spare (SLACK): the rank covers twice the batch, or without a
        rank, the trainable parameters outnumber what twice the batch needs."""
        if self.slack_rank is not None:
            return self.slack_rank >= self.slack_dof
        return self.params - self.frozen_params >= self.slack_dof

    @property
    def frozen_explains(self) -> bool:
        """Frozen parameters are enough to make up what the model lacks (the directions missing from twice the
        batch): they, not the model's size, may be what keeps it from memorizing. (A bias before a BatchNorm gets
        no gradient either, by design; a few such parameters cannot make up a bottleneck's deficit.)"""
        if not self.frozen or self.able:
            return False
        reached = self.slack_rank if self.slack_rank is not None else self.params - self.frozen_params
        return self.frozen_params >= self.slack_dof - reached

    @property
    def as_flexible_as_linear(self) -> bool:
        """Whether the model moves the batch's outputs in at least as many directions as a linear model does: only
        then is a linear model a bar it should clear."""
        if self.linear_rank is None:
            return False
        rank = self.jacobian_rank if self.jacobian_rank is not None else self.params - self.frozen_params
        return rank >= self.linear_rank

    @property
    def max_examples(self) -> int:
        """About how many distinct examples the model can fit exactly."""
        rank = self.jacobian_rank if self.jacobian_rank is not None else self.params - self.frozen_params
        return int(rank // max(self.dof_per_example, 1))

    def evidence(self) -> dict[str, Any]:
        out = dict(params=self.params, batch_degrees_of_freedom=self.batch_dof,
                   distinct_examples=self.distinct_examples, outputs_per_example=self.outputs_per_example,
                   jacobian_rank=self.jacobian_rank, slack_examples=self.slack_examples,
                   slack_degrees_of_freedom=self.slack_dof, slack_jacobian_rank=self.slack_rank,
                   narrowest_layer=self.narrowest, frozen_parameters=self.frozen_params,
                   frozen_leaves=list(self.frozen), stuck_examples=self.stuck_examples,
                   linear_model_rank=self.linear_rank,
                   linear_model_loss=self.linear_loss, able_to_memorize=self.able)
        if self.linear_probe is not None:
            out.update(linear_probe_initial_loss=self.linear_probe.initial,
                       linear_probe_final_loss=self.linear_probe.final)
        if self.note:
            out["note"] = self.note
        return out

    def describe(self) -> str:
        """One sentence of capacity facts."""
        if self.jacobian_rank is not None:
            text = (f"its {self.params} parameters move the batch's outputs in {self.jacobian_rank} independent "
                    f"directions, of the {self.batch_dof} that memorizing {self.distinct_examples} examples x "
                    f"{self.dof_per_example} outputs needs (a batch of {self.slack_examples}: "
                    f"{self.slack_rank} of {self.slack_dof})")
        else:
            text = (f"it has {self.params} parameters for the {self.batch_dof} numbers that memorizing "
                    f"{self.distinct_examples} examples x {self.dof_per_example} outputs sets")
        if self.narrowest:
            text += (f"; its narrowest layer, {self.narrowest['layer']}, has {self.narrowest['units']} units per "
                     f"example")
        if self.frozen:
            text += (f"; {self.frozen_params} parameters ({', '.join(self.frozen[:3])}"
                     f"{', ...' if len(self.frozen) > 3 else ''}) receive no gradient")
        return text


def per_example_dof(outputs_shape: tuple[int, ...], classification: bool) -> tuple[int, int, bool]:
    """(outputs per example, what memorizing must set per example, whether logits are centered): a softmax over the
    last axis ignores a common shift of its logits, so C logits carry C - 1 degrees of freedom."""
    k = int(math.prod(outputs_shape[1:]))
    classes = int(outputs_shape[-1]) if len(outputs_shape) > 1 else 1
    if classification and classes > 1:
        return k, k - k // classes, True
    return k, k, False


def numerical_rank(a: np.ndarray) -> int | None:
    """The rank of ``a`` at numpy's ``matrix_rank`` tolerance for float32 data (largest singular value x largest
    dimension x machine epsilon; Press et al., Numerical Recipes, 3rd ed., section 2.6): structural zeros, which a
    bottleneck or a count of parameters makes, stay zero to round-off; None if ``a`` is not finite."""
    a = np.asarray(a, np.float64)
    if a.size == 0:
        return 0
    if not np.all(np.isfinite(a)):
        return None
    sv = np.linalg.svd(a, compute_uv=False)
    if sv[0] == 0:
        return 0
    return int(np.sum(sv > sv[0] * max(a.shape) * np.finfo(np.float32).eps))


def stuck_examples(sketch: np.ndarray, n: int) -> int:
    """Examples whose outputs no parameter moves (their rows of the Jacobian are zero, up to round-off against the
    largest example's): a healthy model of any size moves every example's output (an output bias alone does), so
    this is a ReLU or clip on the outputs, or units dead for those examples."""
    rows = np.abs(np.asarray(sketch, np.float64)).reshape(sketch.shape[0], n, -1).max(axis=(0, 2))
    if not np.all(np.isfinite(rows)) or rows.max(initial=0.0) == 0:
        return 0
    return int(np.sum(rows <= 1e-6 * rows.max()))


def _perturbed(params, key):
    """``params`` plus Gaussian noise of PERTURBATION x each leaf's RMS (the model's RMS for an all-zero leaf,
    0.01 if every parameter is zero): a generic point near the init (a relative perturbation alone would leave
    zero-initialized layers at zero)."""
    leaves, treedef = jax.tree.flatten(params)
    squares = [jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves]
    total = sum(leaf.size for leaf in leaves)
    model_rms = jnp.sqrt(sum(squares) / max(total, 1))
    fallback = jnp.where(model_rms > 0, model_rms, 1e-2)
    out = []
    for i, (leaf, square) in enumerate(zip(leaves, squares)):
        rms = jnp.sqrt(square / max(leaf.size, 1))
        scale = PERTURBATION * jnp.where(rms > 0, rms, fallback)
        noise = jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32)
        out.append(leaf + (scale * noise).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def jacobian_facts(ctx, x: np.ndarray, center: bool) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian sketch of the Jacobian of the outputs on ``x`` (flattened, example-major) with respect to the
    parameters at a perturbed init, ``(sketch columns, outputs)``, and each parameter leaf's largest gradient for a
    random cotangent (0 exactly: the leaf does not reach the outputs). The sketch ``J @ S``, ``S`` Gaussian with
    twice as many columns as ``J`` has rows (or the identity when there are fewer parameters), has the rank of ``J``
    and a condition number within a small factor of its own (Halko, Martinsson & Tropp, SIAM Review 2011), computed
    with forward-mode products only: memory of the sketch, not of ``J``."""
    problem = ctx.problem
    model = problem.model
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x[:1]), x)
    n_params = int(sum(leaf.size for leaf in jax.tree.leaves(shapes.params)))
    out_shape = jax.eval_shape(
        lambda x: model.apply(*model.init(jax.random.key(0), x[:1]), x, train=True, regularization=False)[0], x)
    rows = int(math.prod(out_shape.shape))
    columns = min(n_params, 2 * rows)
    exact = columns == n_params

    def program(x, seed):
        key = jax.random.key(seed)
        params, state = model.init(key, x[:1])
        params = _perturbed(params, jax.random.fold_in(key, 1))
        flat, unravel = ravel_pytree(params)

        def outputs_of(p):
            out = model.apply(p, state, x, train=True, regularization=False)[0]
            if center:
                out = out - jnp.mean(out, axis=-1, keepdims=True)
            return jnp.reshape(out, (-1,)).astype(jnp.float32)

        sketch_key = jax.random.fold_in(key, 2)

        def column(i):
            if exact:
                tangent = jax.nn.one_hot(i, n_params, dtype=flat.dtype)
            else:
                tangent = jax.random.normal(jax.random.fold_in(sketch_key, i), flat.shape, flat.dtype)
            return jax.jvp(lambda f: outputs_of(unravel(f)), (flat,), (tangent,))[1]

        sketch = jax.lax.map(column, jnp.arange(columns), batch_size=min(columns, 32))
        _, pullback = jax.vjp(outputs_of, params)
        cotangent = jax.random.normal(jax.random.fold_in(key, 3), (rows,), jnp.float32)
        grads = pullback(cotangent)[0]
        largest = jnp.stack([jnp.max(jnp.abs(g.astype(jnp.float32))) if g.size else jnp.float32(0)
                             for g in jax.tree.leaves(grads)])
        return sketch, largest

    sketch, largest = programs.run(f"{NAME}/capacity", program, x, np.int32(ctx.seed),
                                   static_key=(NAME, "capacity", problem, columns, center),
                                   opt_level=ctx.engine.opt_level)
    return np.asarray(sketch), np.asarray(largest)


def narrowest_layer(model, x: np.ndarray) -> dict | None:
    """The activation with the fewest numbers per example, read off the traced program
    (:func:`harness.checks.model.capture.record_activations`; any model library): the bottleneck every signal passes
    (None for a model without activation functions, such as a linear one)."""
    from harness.checks.model import capture

    found: list[tuple[str, str, tuple]] = []

    def traced(x):
        params, state = model.init(jax.random.key(0), x[:1])

        def apply(p, x):
            return model.apply(p, state, x, train=True, regularization=False)[0]

        out, acts = capture.record_activations(apply, params, x, name_path=model.name_path)
        found.extend((a.name, a.function, tuple(a.output.shape)) for a in acts)
        return out

    jax.eval_shape(traced, x)
    units = [(int(math.prod(shape[1:])), name, function) for name, function, shape in found
             if len(shape) >= 2 and shape[0] == len(x)]
    if not units:
        return None
    size, name, function = min(units, key=lambda u: u[0])
    return dict(layer=name, function=function, units=size)


def linear_probes(ctx, arrays: Arrays, lr: float, steps: int) -> tuple[float | None, Curve | None]:
    """Two linear references on the batch, with the user's own loss.

    * The best a linear model reaches (``x -> W x + b`` on the flattened, standardized inputs; a linear model
      reaches the same losses on raw inputs): Adam with a cosine-decayed step for FLOOR_STEPS steps, from the
      least-squares solution for regression targets (the optimum for squared error) or from zero; the lowest loss
      of the run (every iterate is a linear model).
    * A linear probe trained like the model: the model's own untrained outputs plus ``W x + b`` (from zero), with
      the configured optimizer and learning rate for the same number of steps. It starts at the model's untrained
      loss and differs from the model only in what it can represent; for a model that is itself linear it follows
      the model's own curve. A model at least as flexible as a linear one that ends clearly above it is not using
      what it has (saturated or dead units, an init or learning rate it cannot escape).

    ``(None, None)`` for token inputs (a linear map of token ids means nothing) and for maps too large."""
    from harness.optim import make_optimizer

    problem = ctx.problem
    model = problem.model
    xb, yb = np.asarray(arrays.x_train), np.asarray(arrays.y_train)
    if not np.issubdtype(xb.dtype, np.floating):
        return None, None
    out_shape = jax.eval_shape(
        lambda x: model.apply(*model.init(jax.random.key(0), x[:1]), x, train=True, regularization=False)[0], xb)
    b, d, k = len(xb), int(math.prod(xb.shape[1:])), int(math.prod(out_shape.shape[1:]))
    if d * k > LINEAR_MAX_PARAMS:
        return None, None
    flat = xb.reshape(b, d).astype(np.float64)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    standardized = np.where(std > 0, (flat - mean) / np.where(std > 0, std, 1.0), 0.0).astype(np.float32)
    w0, b0 = np.zeros((d, k), np.float32), np.zeros(k, np.float32)
    if not problem.classification and yb.size == b * k:
        design = np.concatenate([standardized, np.ones((b, 1), np.float32)], axis=1).astype(np.float64)
        solution = np.linalg.lstsq(design, yb.reshape(b, k).astype(np.float64), rcond=None)[0]
        if np.all(np.isfinite(solution)):
            w0, b0 = solution[:-1].astype(np.float32), solution[-1].astype(np.float32)

    def program(x, x_flat, x_std, y, lr, w0, b0, seed):
        params, state = model.init(jax.random.key(seed), x[:1])
        untrained = jax.lax.stop_gradient(model.apply(params, state, x, train=True, regularization=False)[0])

        def scan(loss_of, tx, start, length):
            def step(carry, _):
                p, opt_state = carry
                loss, grad = jax.value_and_grad(loss_of)(p)
                updates, opt_state = tx.update(grad, opt_state, p)
                return (optax.apply_updates(p, updates), opt_state), loss

            return jax.lax.scan(step, (start, tx.init(start)), None, length=length)[1]

        def best_loss(p):
            return mean_loss(problem.loss_fn, jnp.reshape(x_std @ p[0] + p[1], untrained.shape), y)

        def probe_loss(p):
            return mean_loss(problem.loss_fn, untrained + jnp.reshape(x_flat @ p[0] + p[1], untrained.shape), y)

        best = scan(best_loss, optax.adam(optax.cosine_decay_schedule(FLOOR_PEAK_LR, FLOOR_STEPS, alpha=1e-3)),
                    (w0, b0), FLOOR_STEPS)
        zeros = (jnp.zeros_like(w0), jnp.zeros_like(b0))
        probe = scan(probe_loss, make_optimizer(problem.optim, lr, 0.0), zeros, steps)
        return best, probe

    args = (xb, flat.astype(np.float32), standardized, yb, np.float32(lr), w0, b0, np.int32(ctx.seed))
    best, probe = programs.run(f"{NAME}/linear_probes", program, *args,
                               static_key=(NAME, "linear_probes", problem, steps, FLOOR_STEPS),
                               opt_level=ctx.engine.opt_level)
    best = np.asarray(best, np.float64)
    best = float(np.min(best[np.isfinite(best)])) if np.isfinite(best).any() else None
    probe = np.asarray(probe, np.float64)
    nonfinite = np.flatnonzero(~np.isfinite(probe))
    curve = read_curve(probe, -np.inf, int(nonfinite[0]) if nonfinite.size else -1, np.zeros(len(probe)))
    return best, (curve if np.isfinite(curve.initial) else None)


def linear_rank(x: np.ndarray, dof_per_example: int) -> int | None:
    """The rank a linear model's Jacobian reaches on the batch: that of ``[x, 1]`` (distinct rows) per output
    degree of freedom. None for token inputs."""
    if not np.issubdtype(np.asarray(x).dtype, np.floating):
        return None
    rows = np.unique(np.asarray(x, np.float64).reshape(len(x), -1), axis=0)
    design = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
    return int(np.linalg.matrix_rank(design)) * dof_per_example


def judge_capacity(ctx, settings: Settings, arrays: Arrays, lr: float, *, probes: bool) -> Capacity:
    """The capacity facts of the configured model on the overfit batch (and on a batch SLACK times larger, drawn the
    same way: the overfit batch is its prefix). ``probes``: also train the linear references."""
    problem = ctx.problem
    model = problem.model
    classification = problem.classification
    xb = np.asarray(arrays.x_train)
    n = len(xb)
    idx = choose_batch(ctx.arrays.y_train, SLACK * n, classification)
    x2 = np.asarray(ctx.arrays.x_train)[idx]
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x[:1]), xb)
    named = model.flat_params(shapes.params)
    n_params = int(sum(leaf.size for leaf in named.values()))
    out_shape = jax.eval_shape(
        lambda x: model.apply(*model.init(jax.random.key(0), x[:1]), x, train=True, regularization=False)[0], xb)
    k, dof, center = per_example_dof(tuple(out_shape.shape), classification)
    distinct, distinct2 = int(input_groups(xb).max()) + 1, int(input_groups(x2).max()) + 1
    cap = Capacity(params=n_params, outputs_per_example=k, dof_per_example=dof, distinct_examples=distinct,
                   batch_dof=distinct * dof, jacobian_rank=None, slack_examples=len(x2), slack_dof=distinct2 * dof,
                   slack_rank=None)
    if len(x2) * k > RANK_MAX_ROWS:
        cap.note = (f"the Jacobian's rank was not computed ({len(x2) * k} outputs, over {RANK_MAX_ROWS}): "
                    f"parameters counted instead")
    else:
        try:
            sketch, largest = jacobian_facts(ctx, x2, center)
            rows = n * k  # the overfit batch's outputs come first (example-major)
            cap.jacobian_rank = numerical_rank(sketch[:, :rows])
            cap.slack_rank = numerical_rank(sketch)
            cap.stuck_examples = stuck_examples(sketch[:, :rows], n)
            frozen = [(name, int(leaf.size)) for (name, leaf), g in zip(named.items(), largest)
                      if leaf.size and g == 0]
            cap.frozen = tuple(name for name, _ in frozen)
            cap.frozen_params = sum(size for _, size in frozen)
        except Exception as err:  # noqa: BLE001 - forward-mode autodiff unsupported (a custom_vjp): count instead
            cap.note = f"the Jacobian's rank could not be computed ({type(err).__name__}): parameters counted instead"
    try:
        cap.narrowest = narrowest_layer(model, xb)
    except Exception:  # noqa: BLE001 - evidence only
        cap.narrowest = None
    cap.linear_rank = linear_rank(xb, dof)
    if probes:
        cap.linear_loss, cap.linear_probe = _linear_references(ctx, arrays, lr, settings.steps)
    return cap


def _linear_references(ctx, arrays: Arrays, lr: float, steps: int) -> tuple[float | None, Curve | None]:
    try:
        return linear_probes(ctx, arrays, lr, steps)
    except Exception:  # noqa: BLE001 - a loss that only works on the model's own outputs: no linear reference
        return None, None


def train_request(ctx, settings: Settings) -> tuple[Plan, Arrays, TrainSpec, Hparams]:
    """The members and how they train: every step on the fixed batch (``Hparams.fixed_batch``; a program that
    also trains sampled members repeats it to fill their batch size, with the same loss, gradient and batch
    statistics). The evaluations of the batch every ``eval_every`` steps run inside the chunk
    (TrainSpec.batch_eval_every: the batch only, not the validation set): one program."""
    lr = settings.lr if settings.lr is not None else ctx.optim.lr
    plan = Plan(float(lr), tuple(settings.probe_lr_factors))
    _, index = batch_arrays(ctx, settings)
    n = batch_size = len(index)
    a = ctx.arrays
    arrays = Arrays(a.x_train, a.y_train, a.x_val, a.y_val, fixed_index=np.asarray(index, np.int32))
    spec = ctx.spec(settings.steps, fixed_batch=n, batch_size=batch_size, regularization=False,
                    batch_eval_every=settings.eval_every)
    return plan, arrays, spec, plan.hparams(ctx.seed)


def requests(ctx, settings: Settings) -> list[Request]:
    """What :func:`run` is about to train (the pipeline merges it with the other diagnostics')."""
    _, arrays, spec, hparams = train_request(ctx, settings)
    return [Request(NAME, spec, hparams, arrays)]


def run_program(ctx, settings: Settings) -> tuple[Plan, Arrays, SweepResult]:
    """The members trained; the fixed batch's own arrays (``Arrays(xb, yb, xb, yb)``) for the checks that read
    it directly (the loss floor, the capacity judgement)."""
    plan, arrays, spec, hparams = train_request(ctx, settings)
    return plan, batch_arrays(ctx, settings)[0], ctx.train(NAME, spec, hparams, arrays)


@dataclasses.dataclass
class Reading:
    """Everything the members' curves say, before any wording."""

    plan: Plan
    batch_size: int
    steps: int
    target: float
    classification: bool
    configured: Curve
    probes: list[Curve]
    zero_input: Curve
    untrained_loss: float
    final_acc: float  # batch accuracy at the end (NaN for regression)
    untrained_acc: float
    flipped: str | None  # why the loss's sign looks flipped
    rise: dict | None  # evidence of a rising loss
    passed: bool
    on_track: float | None  # projected step to target of a memorized-but-slow classification run
    shape: str | None  # how it failed, None when passed
    higher: dict | None  # a higher-LR probe that did much better
    lower: dict | None
    capacity: Capacity | None = None  # judged only for a failed run whose curves show no bug (judge_capacity)

    def evidence(self) -> dict[str, Any]:
        c = self.configured
        out: dict[str, Any] = dict(
            batch_size=self.batch_size, steps=self.steps, lr=self.plan.lr, target_loss=self.target,
            initial_loss=c.initial, final_loss=c.final, best_loss=c.best,
            steps_to_target=None if self.flipped else c.steps_to_target, untrained_loss=self.untrained_loss,
            first_nonfinite_step=c.first_nonfinite)
        if self.classification:
            out.update(final_batch_accuracy=self.final_acc, untrained_batch_accuracy=self.untrained_acc)
        if self.capacity is not None:
            out["capacity"] = self.capacity.evidence()
        return out


def projected_steps(curve: Curve, target: float) -> float:
    """The step at which the loss would reach the target at its current geometric rate (last fifth of the run)."""
    n = int(np.isfinite(curve.loss).sum())
    tail = np.arange(n - max(10, n // 5), n)
    return n + curves.steps_to_reach(curve.final, target, curves.log_slope(tail, curve.loss[tail]))


def read(plan: Plan, r: SweepResult, *, target: float, steps: int, batch_size: int, classification: bool,
         loss_name: str, num_classes: int | None) -> Reading:
    def curve(i):
        return read_curve(r.loss[i], target, r.first_nonfinite[i], r.grad_norm[i])

    configured = curve(0)
    probes = [curve(i) for i in plan.probe_rows]
    acc = r.batch_accuracy if classification else None
    final_acc = float(acc[0, -1]) if acc is not None else float("nan")
    untrained_acc = float(acc[plan.untrained_row, -1]) if acc is not None else float("nan")
    flipped = sign_flipped(configured, loss_name, classification, final_acc, untrained_acc, num_classes)
    passed = configured.reached and not flipped and not configured.diverged
    on_track = None
    if not passed and not flipped and not configured.diverged and classification and final_acc >= 1.0:
        projected = projected_steps(configured, target)
        if projected <= ON_TRACK_BUDGETS * steps:
            on_track, passed = float(projected), True
    higher, lower = probe_evidence(plan, probes, configured)
    shape = None if passed else ("sign_flipped" if flipped else failure_shape(configured, target))
    return Reading(plan, batch_size, steps, target, classification, configured, probes, curve(plan.zero_input_row),
                   float(r.batch_loss[plan.untrained_row, -1]), final_acc, untrained_acc, flipped,
                   None if flipped else rising(configured.loss, target), passed, on_track, shape, higher, lower)


def _lr_evidence(probe: dict) -> str:
    return (f"{probe['factor']:g}x the LR ({probe['lr']:.3g}) "
            + (f"reached the target at step {probe['steps_to_target']}" if probe["steps_to_target"] is not None
               else f"reached loss {probe['final_loss']:.3g}"))


def _fix_for(first_cause: str, g: Reading) -> str:
    """The concrete fix for the most likely cause (the LR a probe proved, when one did)."""
    if first_cause.startswith("the learning rate is too high") and g.lower:
        return f"Set optim.lr to about {g.lower['lr']:.3g} ({g.lower['factor']:g}x), which did much better."
    if first_cause.startswith("the learning rate is too low") and g.higher:
        return f"Set optim.lr to about {g.higher['lr']:.3g} ({g.higher['factor']:g}x), which did much better."
    if first_cause.startswith("no gradient"):
        return "Find where the gradient stops: look for stop_gradient, detached arrays or a zero-initialized layer."
    if "ignores its input" in first_cause:
        return "Check that the model's forward pass uses its input (a variable overwritten, a wrong argument)."
    if "sign is flipped" in first_cause:
        return "Negate the loss back so that lower is better."
    if "do not move with any parameter" in first_cause:
        return ("Remove the ReLU/clip from the output layer (a regression head outputs any real number), or find "
                "the units that are dead for those examples.")
    if "receive no gradient" in first_cause:
        return ("Find what stops the gradient to those parameters: a stop_gradient, a detached array, a layer built "
                "but never called. If they are frozen on purpose (a pretrained backbone), what still trains is too "
                "small to memorize the batch.")
    return "Fix the first cause."


def small_model_finding(g: Reading, cap: Capacity, evidence: dict):
    """A failed run of a model that cannot memorize the batch, with no bug in its curves: info, or a warning when
    it barely moved although something reaches lower, or ends clearly above a linear probe trained the same way
    while being at least as flexible as a linear model."""
    c, probe = g.configured, cap.linear_probe
    acc = f", batch accuracy {g.final_acc:.0%}" if g.classification else ""
    how = {"slow": ", still falling at the end", "stalled": ", where it plateaued", "flat": ""}.get(g.shape, "")
    ran = (f"on one batch of {g.batch_size} examples in {g.steps} steps its loss went from {c.initial:.3g} to "
           f"{c.final:.3g}{how}{acc} (target {g.target:.3g})")
    if cap.jacobian_rank is not None and cap.jacobian_rank >= cap.batch_dof:
        what = "a model at the edge of its capacity on this batch, able to fit it with no room to spare"
    else:
        what = "a model too small to memorize one batch"
    context = []
    if cap.linear_loss is not None:
        context.append(f"the best linear model reaches {cap.linear_loss:.3g} on this batch")
    if probe is not None:
        context.append(f"a linear correction to the untrained model, trained the same way, {probe.initial:.3g} -> "
                       f"{probe.final:.3g}")
    if g.higher is not None and g.higher["steps_to_target"] is not None:
        context.append(f"at {g.higher['factor']:g}x the LR ({g.higher['lr']:.3g}) it reached the target at step "
                       f"{g.higher['steps_to_target']}, slow at the configured LR rather than broken")
    context_text = f" For comparison: {'; '.join(context)}." if context else ""
    reachable = [v for v in (cap.linear_loss, probe.final if probe is not None else None)
                 if v is not None and np.isfinite(v)]
    facts = dict(**evidence, failure=g.shape, small_model=True)
    if g.shape == "flat" and reachable and c.initial - min(reachable) > FLAT_FRACTION * abs(c.initial):
        return warning(
            "train.overfit_batch",
            f"{what} ({cap.describe()}), but it barely learned at all: {ran}, "
            f"although a linear model gets to {min(reachable):.3g}.{context_text}",
            "Check the learning rate, the initialization, and dead (ReLU) or saturated (tanh/sigmoid) units "
            "(the model stage's findings): even a small model should improve on its untrained loss.",
            **facts)
    if (probe is not None and cap.as_flexible_as_linear and probe.final < probe.initial
            and c.final - probe.final > LINEAR_SHARE * (probe.initial - probe.final)):
        return warning(
            "train.overfit_batch",
            f"{what} ({cap.describe()}), and it does worse than a linear model: {ran}, while a linear correction "
            f"to the same untrained outputs, trained with the same optimizer and learning rate for as long, "
            f"reaches {probe.final:.3g}. It moves the batch's outputs in "
            f"at least as many directions as a linear model ({cap.linear_rank}), so it should not end above one."
            + context_text,
            "Look for saturated (tanh/sigmoid) or dead (ReLU) units, an initialization the optimizer cannot leave, "
            "or a learning rate that suits a linear model better (the model stage's findings; the LR range test).",
            **facts)
    return info(
        "train.overfit_batch",
        f"{what}: {cap.describe()}; {ran}.{context_text} This is what a model of this size does on arbitrary "
        f"examples, not a sign that training is broken.",
        "Nothing to fix if the size is deliberate. The overfit test finds bugs in models with room to memorize a "
        f"batch (this one fits about {cap.max_examples} examples exactly); the other diagnostics still apply.",
        **facts)


def findings_for(g: Reading) -> list:
    c, evidence, findings = g.configured, g.evidence(), []
    if g.flipped:
        findings.append(error(
            "train.loss_increasing",
            f"the loss's sign is flipped: {g.flipped}"
            + (f"; batch accuracy fell from {g.untrained_acc:.0%} untrained to {g.final_acc:.0%}"
               if g.classification and g.final_acc < g.untrained_acc else "")
            + ". Minimizing it makes the model worse on the very batch it trains on.",
            "Return the loss to minimize (e.g. +cross-entropy, not -cross-entropy); check the loss function's sign "
            "and that it is a per-example loss, not a score or log-likelihood to maximize.",
            **evidence))
    elif g.rise:
        severity = error if g.rise["kind"] == "net_rise" and not c.reached else warning
        what = ("rises: its median went from {early_median:.3g} over the first steps to {late_median:.3g} over the "
                "last" if g.rise["kind"] == "net_rise" else
                "rebounds: after falling to a median of {lowest_window_median:.3g} it climbed back to "
                "{late_median:.3g}")
        findings.append(severity(
            "train.loss_increasing",
            f"training on one fixed batch, the loss {what.format(**g.rise)} (lr {g.plan.lr:.3g}, {g.steps} steps).",
            "Lower the learning rate" + (f" ({_lr_evidence(g.lower)})" if g.lower else "")
            + "; check the loss's sign and numerics (log of 0, division by zero) and that inputs and labels are "
              "aligned.",
            **evidence, **g.rise))
    if c.diverged:
        findings.append(error(
            "train.divergence",
            f"training on one fixed batch went non-finite at step {c.first_nonfinite} (lr {g.plan.lr:.3g}; "
            f"last finite loss {c.final:.3g}).",
            "Lower the learning rate" + (f" ({_lr_evidence(g.lower)})" if g.lower else "")
            + "; if every LR diverges, look for log(0), division by zero or overflow in the model and loss, and "
              "consider gradient clipping (optim.clip_norm=1.0).",
            **evidence))
    cap = g.capacity
    if (not g.passed and cap is not None and not cap.able and not cap.frozen_explains and not cap.stuck_examples
            and not bug_evidence(g)):
        findings.append(small_model_finding(g, cap, evidence))
    elif not g.passed:
        causes = (["the loss's sign is flipped (see train.loss_increasing)"] if g.flipped else
                  rank_causes(g.shape, c, g.zero_input, g.higher, g.lower, g.probes, g.steps, g.target))
        if cap is not None and cap.stuck_examples:
            causes.insert(0, f"the outputs of {cap.stuck_examples} of the {g.batch_size} examples do not move with "
                             f"any parameter: a ReLU or clip on the model's output, or units dead for those examples")
        if cap is not None and cap.frozen and (cap.frozen_explains or cap.able):
            causes.insert(0, f"{cap.frozen_params} of the {cap.params} parameters receive no gradient from the "
                             f"outputs ({', '.join(cap.frozen[:3])}{', ...' if len(cap.frozen) > 3 else ''}): a "
                             f"stop_gradient, a detached or unused layer")
        seen = {
            "sign_flipped": "the loss fell only because its sign is flipped",
            "diverged": f"the loss went non-finite at step {c.first_nonfinite}",
            "flat": f"the loss stayed flat ({c.initial:.3g} -> {c.final:.3g})",
            "slow": f"the loss fell too slowly ({c.initial:.3g} -> {c.final:.3g})",
            "stalled": f"the loss fell then plateaued ({c.initial:.3g} -> {c.final:.3g})",
        }[g.shape]
        acc_text = f", batch accuracy {g.final_acc:.0%}" if g.classification else ""
        able_text = ""
        if cap is not None and cap.able:
            able_text = f" It has the capacity to: {cap.describe()}."
        elif cap is not None and cap.frozen_explains:
            able_text = f" It could have the capacity if all its parameters trained: {cap.describe()}."
        elif cap is not None and cap.stuck_examples:
            able_text = f" Whatever its size, some examples' outputs cannot move: {cap.describe()}."
        findings.append(error(
            "train.overfit_batch",
            f"the model could not memorize one batch of {g.batch_size} examples in {g.steps} steps with "
            f"regularization off: {seen}{acc_text}; target {g.target:.3g}.{able_text} Likely causes, most likely "
            "first: " + "; ".join(f"({i + 1}) {cause}" for i, cause in enumerate(causes)) + ".",
            _fix_for(causes[0], g) + " A model that cannot memorize one batch will not learn the data set; re-run "
            "`harness diagnostics.run=[overfit_batch]` after each change.",
            **evidence, failure=g.shape, causes=causes, probe_higher_lr=g.higher, probe_lower_lr=g.lower,
            zero_input_final_loss=g.zero_input.final))
    elif g.on_track is not None:
        findings.append(info(
            "train.overfit_batch",
            f"the model memorized the batch (100% accuracy) but its loss {c.final:.3g} is still above the target "
            f"{g.target:.3g} after {g.steps} steps; falling at its current rate it reaches the target near step "
            f"{g.on_track:.0f}.",
            "Nothing to fix; a higher learning rate or a longer budget (diagnostics.overfit_batch.steps) reaches "
            "the target.",
            **evidence, projected_steps_to_target=g.on_track))
    return findings


def run(ctx, settings: Settings) -> Outcome:
    plan, arrays, r = run_program(ctx, settings)
    classification = ctx.problem.classification
    floor, floor_kind = loss_floor(ctx, arrays)
    ctx.shared["loss_floor"] = floor
    target = settings.target_loss
    if target is None:  # the default target above the loss's own floor (label smoothing, say)
        target = default_target(classification, arrays.y_train) + max(floor or 0.0, 0.0)
    g = read(plan, r, target=target, steps=settings.steps, batch_size=len(arrays.x_train),
             classification=classification, loss_name=ctx.loss_name, num_classes=ctx.dataset.num_classes)
    if not g.passed and not bug_evidence(g):
        # Only a failure with no bug in its curves needs the capacity judgement; the linear references only when
        # the model turns out unable to memorize (what its finding compares against).
        g.capacity = judge_capacity(ctx, settings, arrays, plan.lr, probes=False)
        if not g.capacity.able and not g.capacity.frozen_explains and not g.capacity.stuck_examples:
            g.capacity.linear_loss, g.capacity.linear_probe = _linear_references(ctx, arrays, plan.lr, settings.steps)
    c = g.configured
    metrics = {
        f"{NAME}/passed": bool(g.passed),
        f"{NAME}/steps_to_target": None if g.flipped else c.steps_to_target,
        f"{NAME}/final_loss": c.final,
        f"{NAME}/initial_loss": c.initial,
        f"{NAME}/target_loss": target,
        f"{NAME}/loss_floor": floor,
        f"{NAME}/loss_floor_kind": floor_kind,
        f"{NAME}/lr": plan.lr,
        f"{NAME}/batch_size": g.batch_size,
        f"{NAME}/failure": g.shape or "none",
    }
    if g.capacity is not None:
        cap = g.capacity
        metrics.update({f"{NAME}/able_to_memorize": cap.able, f"{NAME}/params": cap.params,
                        f"{NAME}/batch_dof": cap.batch_dof, f"{NAME}/jacobian_rank": cap.jacobian_rank,
                        f"{NAME}/linear_model_loss": cap.linear_loss})
    if classification:
        metrics[f"{NAME}/final_batch_accuracy"] = g.final_acc
    labelled = {"configured": (plan.lr, c)}
    labelled.update({f"lr_x{f:g}": (plan.lr * f, p) for f, p in zip(plan.probe_factors, g.probes)})
    labelled["zero_input"] = (plan.lr, g.zero_input)
    series = {f"{NAME}/loss": c.loss.tolist(), f"{NAME}/eval_step": r.eval_steps.tolist()}
    series.update({f"{NAME}/loss/{k}": p.loss.tolist() for k, (_, p) in labelled.items() if k != "configured"})
    if classification:
        series[f"{NAME}/batch_accuracy"] = r.batch_accuracy[0].tolist()
    members = [{"member": k, "lr": lr, "input_scale": 0.0 if k == "zero_input" else 1.0, "final_loss": p.final,
                "steps_to_target": p.steps_to_target, "diverged": p.diverged} for k, (lr, p) in labelled.items()]
    plotted = {(f"configured (lr {plan.lr:.2g})" if k == "configured" else k): p.loss
               for k, (_, p) in labelled.items()}
    plot = Plot("loss_curve", "Overfit one batch: loss vs step",
                lambda path: draw(path, plan, plotted, target, c.steps_to_target))
    return Outcome(NAME, findings=findings_for(g), metrics=metrics, series=series, plots=[plot], members=members)
