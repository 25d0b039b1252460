"""Detectors over a monitored run's statistics (:class:`Series`, host numpy): each names the step and the layer.

Thresholds are relative to the run's own recent history, so they hold for any model, loss scale and optimizer:
a spike is measured against the median and the median absolute deviation (MAD) of the preceding window, the
robust location and scale that a few outliers do not move (Hampel's filter, the rule behind robust outlier tests).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from harness.findings import Finding, error, warning

WINDOW = 50  # steps of recent history a step is judged against
MIN_HISTORY = 20  # steps needed before a spike can be called
# A spike, on a log scale (minibatch gradient norms and losses are heavy-tailed, and late in training a loss near 0
# makes any ratio large): more than SPIKE_Z robust standard deviations (1.4826 MAD of the window's logs) above the
# window's median log AND more than a multiple of the window's median. On healthy digits runs (Adam, AdamW with a
# warm-up and cosine decay, SGD with momentum, RMSProp; README "Monitor") single batches reach 8x the median
# gradient norm at a robust z under 4, and no step passes both gates; one outlier batch (inputs x30) does.
SPIKE_Z = 5.0
GRAD_SPIKE_FACTOR = 10.0
LOSS_SPIKE_FACTOR = 2.0
# Update-to-parameter ratios (CS231n, "ratio of weights:updates": about 1e-3 is healthy): a layer whose median
# ratio over the last window exceeds this changes by more than a tenth of its norm per step.
FAST_RATIO = 0.1
MAX_LAYERS_NAMED = 5


@dataclasses.dataclass
class Series:
    """One run's statistics, one row per recorded step (``harness.monitor.stats``)."""

    steps: np.ndarray  # (n,) the monitor's step count of each row
    loss: np.ndarray  # (n,) NaN where not recorded
    loss_recorded: np.ndarray  # (n,) bool
    grad_norm: np.ndarray  # (n,)
    layer_grad_norm: np.ndarray  # (n, leaves)
    layer_param_norm: np.ndarray  # (n, leaves)
    layer_update_norm: np.ndarray  # (n, leaves)
    layer_nonfinite: np.ndarray  # (n, leaves)
    paths: list[str]
    val_steps: np.ndarray | None = None  # (v,) steps at which a validation loss was recorded (Monitor.validation)
    val_loss: np.ndarray | None = None  # (v,)


def _named(paths: list[str], index) -> list[str]:
    return [paths[i] for i in list(index)[:MAX_LAYERS_NAMED]]


def nonfinite(s: Series, where: str = "") -> Finding | None:
    """The first step whose gradient (or recorded loss) is non-finite, the layers whose gradients went non-finite
    there, and which came first: a non-finite loss (the forward pass or the loss) or a finite loss with a
    non-finite gradient (the backward pass)."""
    bad_grad = (s.layer_nonfinite > 0).any(axis=1) | ~np.isfinite(s.grad_norm)
    bad_loss = s.loss_recorded & ~np.isfinite(s.loss)
    bad = np.flatnonzero(bad_grad | bad_loss)
    if bad.size == 0:
        return None
    i = int(bad[0])
    step = int(s.steps[i])
    layers = np.flatnonzero(s.layer_nonfinite[i] > 0)
    finite_before = np.flatnonzero(s.loss_recorded[:i] & np.isfinite(s.loss[:i]))
    evidence = dict(step=step, layers=_named(s.paths, layers), layers_nonfinite=int(layers.size),
                    layers_total=len(s.paths))
    if s.loss_recorded[i]:
        evidence["loss"] = float(s.loss[i])
        evidence["stage"] = "forward pass or loss" if bad_loss[i] else "backward pass (the loss was finite)"
    if finite_before.size:
        evidence.update(last_finite_step=int(s.steps[finite_before[-1]]),
                        last_finite_loss=float(s.loss[finite_before[-1]]))
    window = s.grad_norm[max(0, i - WINDOW):i]
    window = window[np.isfinite(window)]
    if window.size >= 2:
        evidence["grad_norm_growth_before"] = float(window[-1] / max(np.median(window), 1e-30))
    stage = evidence.get("stage", "gradient")
    return error(
        "train.nonfinite",
        f"{where}training went non-finite at step {step} ({stage}); first non-finite gradients in "
        f"{', '.join(evidence['layers']) or 'no single layer (the whole gradient norm overflowed)'}",
        "If the loss went non-finite first, look for log(0), a division by zero or an overflow in the loss or the "
        "forward pass at that step's batch; if the loss was finite, in the backward pass of the layers named. A "
        "gradient norm that grew sharply before it points to a learning rate too high.",
        **evidence)


def _spikes(x: np.ndarray, factor: float) -> np.ndarray:
    """Indices of spikes in ``x`` against the preceding window (see the module constants)."""
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(x)
    for t in range(MIN_HISTORY, len(x)):
        window = logs[max(0, t - WINDOW):t]
        window = window[np.isfinite(window)]
        if window.size < MIN_HISTORY or not np.isfinite(logs[t]):
            continue
        median = np.median(window)
        spread = 1.4826 * np.median(np.abs(window - median))
        if logs[t] - median > max(np.log(factor), SPIKE_Z * spread):
            out.append(t)
    return np.asarray(out, int)


def grad_spike(s: Series, where: str = "") -> Finding | None:
    spikes = _spikes(s.grad_norm, GRAD_SPIKE_FACTOR)
    if spikes.size == 0:
        return None
    t = int(spikes[0])
    before = s.layer_grad_norm[max(0, t - WINDOW):t]
    jump = s.layer_grad_norm[t] / np.maximum(np.nanmedian(before, axis=0), 1e-30)
    layer = int(np.nanargmax(jump))
    median = float(np.median(s.grad_norm[max(0, t - WINDOW):t]))
    return warning(
        "train.grad_spike",
        f"{where}gradient norm spiked at step {int(s.steps[t])}: {s.grad_norm[t]:.3g}, "
        f"{s.grad_norm[t] / median:.0f}x the median of the {min(t, WINDOW)} steps before; largest jump in "
        f"{s.paths[layer]}",
        "One batch or one layer blew up the gradient. Gradient clipping (optax.clip_by_global_norm) bounds the "
        "damage; a lower learning rate or a warm-up prevents it; a repeated spike at the same layer points to that "
        "layer (a normalization over a tiny variance, an attention logit growing).",
        step=int(s.steps[t]), grad_norm=float(s.grad_norm[t]), median_before=median, layer=s.paths[layer],
        layer_jump=float(jump[layer]), spikes=int(spikes.size),
        spike_steps=[int(s.steps[i]) for i in spikes[:10]])


def loss_spike(s: Series, where: str = "") -> Finding | None:
    if not s.loss_recorded.any():
        return None
    loss = np.where(s.loss_recorded, s.loss, np.nan)
    spikes = _spikes(loss, LOSS_SPIKE_FACTOR)
    if spikes.size == 0:
        return None
    t = int(spikes[0])
    window = loss[max(0, t - WINDOW):t]
    median = float(np.nanmedian(window))
    after = loss[t + 1:t + 1 + WINDOW]
    recovered = np.flatnonzero(after <= 1.1 * median)
    evidence = dict(step=int(s.steps[t]), loss=float(loss[t]), median_before=median, spikes=int(spikes.size),
                    spike_steps=[int(s.steps[i]) for i in spikes[:10]])
    tail = ""
    if recovered.size:
        evidence["recovered_after_steps"] = int(recovered[0]) + 1
        tail = f"; back to its level {int(recovered[0]) + 1} steps later"
    return warning(
        "train.loss_spike",
        f"{where}loss spiked at step {int(s.steps[t])}: {loss[t]:.4g}, {loss[t] / median:.1f}x the median of the "
        f"{min(t, WINDOW)} steps before{tail}",
        "A loss spike is a step that moved the weights too far (a learning rate near the edge of stability, an "
        "outlier batch). Look at that step's batch; clip gradients or lower the learning rate if it repeats.",
        **evidence)


def update_ratio(s: Series, where: str = "") -> Finding | None:
    """Layers that do not learn (update exactly zero over the last window: frozen, or receiving no gradient) or
    learn far too fast (median update/parameter ratio above :data:`FAST_RATIO`), judged over the last window."""
    if len(s.steps) < MIN_HISTORY:
        return None
    last = slice(max(0, len(s.steps) - WINDOW), None)
    update, param, grad = s.layer_update_norm[last], s.layer_param_norm[last], s.layer_grad_norm[last]
    frozen = np.flatnonzero(np.all(update == 0, axis=0))
    moving = np.flatnonzero(np.any(update > 0, axis=0))
    if frozen.size and moving.size:
        no_grad = [i for i in frozen if np.all(grad[:, i] == 0)]
        masked = [i for i in frozen if i not in no_grad]
        parts = []
        if no_grad:
            parts.append(f"{', '.join(_named(s.paths, no_grad))} receive no gradient")
        if masked:
            parts.append(f"{', '.join(_named(s.paths, masked))} get gradients the optimizer never applies")
        return warning(
            "train.update_ratio",
            f"{where}{len(frozen)} of {len(s.paths)} parameter leaves did not change over the last "
            f"{update.shape[0]} steps (to step {int(s.steps[-1])}): {'; '.join(parts)}",
            "If you did not freeze them on purpose: a leaf with no gradient is cut off from the loss (a "
            "stop_gradient, an unused branch, a detached path); a leaf with gradients but no updates is masked "
            "by the optimizer (optax.multi_transform / set_to_zero, a zero learning rate for its group).",
            frozen=_named(s.paths, frozen), no_gradient=_named(s.paths, no_grad),
            not_applied=_named(s.paths, masked), step=int(s.steps[-1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.nanmedian(np.where(param > 0, update / param, np.nan), axis=0)
    fast = np.flatnonzero(ratio > FAST_RATIO)
    if fast.size:
        worst = int(fast[np.argmax(ratio[fast])])
        return warning(
            "train.update_ratio",
            f"{where}{', '.join(_named(s.paths, fast))} change by more than {FAST_RATIO:.0%} of their norm per "
            f"step (median over the last {update.shape[0]} steps to step {int(s.steps[-1])}; {s.paths[worst]}: "
            f"{ratio[worst]:.2g}); about 1e-3 is usual",
            "Lower the learning rate for these layers (or all), or check their scale: a tiny parameter norm (a "
            "near-zero init) makes any update large relative to it.",
            layers=_named(s.paths, fast), ratio=float(ratio[worst]), step=int(s.steps[-1]))
    return None


# Overfitting: the validation loss, smoothed over OVERFIT_SMOOTH evaluations, ends more than OVERFIT_RISE above its
# minimum, and the evaluation before the last is above it by half that (a rise, not one noisy evaluation), while
# the training loss kept falling.
OVERFIT_SMOOTH = 3
OVERFIT_RISE = 0.1
MIN_EVALUATIONS = 5


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Running median of ``k`` (ends: what is there)."""
    return np.asarray([np.median(x[max(0, i - k // 2):i + k // 2 + 1]) for i in range(len(x))])


def overfitting(s: Series, where: str = "") -> Finding | None:
    """Validation loss rising while the training loss falls, and the step where it turned (seeds 000/001: "val
    loss going up while train loss goes down: overfitting")."""
    if s.val_loss is None or len(s.val_loss) < MIN_EVALUATIONS or not s.loss_recorded.any():
        return None
    val = _smooth(np.asarray(s.val_loss, float), OVERFIT_SMOOTH)
    best = int(np.nanargmin(val))
    if best >= len(val) - 2:
        return None
    floor = val[best]
    if not (val[-1] > floor * (1 + OVERFIT_RISE) and val[-2] > floor * (1 + OVERFIT_RISE / 2)):
        return None
    recorded = s.loss_recorded & np.isfinite(s.loss)
    steps, loss = s.steps[recorded], s.loss[recorded]
    turn = int(s.val_steps[best])

    def train_near(step):  # the median training loss over the WINDOW steps up to ``step``
        near = loss[(steps <= step) & (steps > step - WINDOW)]
        return float(np.median(near)) if near.size else float("nan")

    at_turn, at_end = train_near(turn), train_near(int(steps[-1]))
    if not at_end < at_turn:
        return None  # both rising: not overfitting (the loss spike and divergence detectors speak to that)
    return warning(
        "train.overfitting",
        f"{where}the model overfits from step {turn}: validation loss {floor:.4g} there, {val[-1]:.4g} at step "
        f"{int(s.val_steps[-1])} ({val[-1] / floor - 1:+.0%}), while the training loss kept falling "
        f"({at_turn:.4g} to {at_end:.4g})",
        "Stop at the turn (early stopping, or keep the checkpoint of that step); more data or augmentation, "
        "regularization (weight decay, dropout) or a smaller model move the turn later.",
        step=turn, best_val_loss=float(floor), final_val_loss=float(val[-1]),
        final_step=int(s.val_steps[-1]), train_loss_at_turn=at_turn, final_train_loss=at_end)


DETECTORS = (nonfinite, grad_spike, loss_spike, update_ratio, overfitting)


def detect(s: Series, where: str = "") -> list[Finding]:
    """Every detector's finding on one run. After the first non-finite step the statistics say nothing more, so
    the other detectors judge the steps before it."""
    first = nonfinite(s, where)
    if first is not None:
        cut = int(np.searchsorted(s.steps, first.evidence["step"]))
        keep = None if s.val_steps is None else np.asarray(s.val_steps) < first.evidence["step"]
        s = dataclasses.replace(
            s, **{f.name: getattr(s, f.name)[:cut] for f in dataclasses.fields(Series)
                  if f.name not in ("paths", "val_steps", "val_loss")},
            val_steps=None if keep is None else s.val_steps[keep], val_loss=None if keep is None else s.val_loss[keep])
    found = [first] + [d(s, where) for d in DETECTORS[1:]] if len(s.steps) else [first]
    return [f for f in found if f is not None]
