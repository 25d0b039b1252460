"""Detectors over a monitored run's statistics (:class:`Series`, host numpy): each names the step and the layer.

Thresholds are relative to the run's own history, so they hold for any model, loss scale and optimizer: a spike is
measured against the median and the median absolute deviation (MAD) of the preceding window, the robust location
and scale that a few outliers do not move (Hampel's filter, the rule behind robust outlier tests), and against the
highest value the run recorded before it.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from harness.findings import Finding, error, warning

WINDOW = 50  # steps of recent history a step is judged against
MIN_HISTORY = 20  # steps needed before a spike can be called
# A spike (train.grad_spike, train.loss_spike) is one step far outside what the run's own history makes plausible,
# judged twice.
# 1. Against the last WINDOW steps, on a log scale (minibatch gradient norms and losses are heavy-tailed): more than
#    SPIKE_Z robust standard deviations (1.4826 MAD of the window's logs) above the window's median log AND more than
#    GRAD_SPIKE_FACTOR / LOSS_SPIKE_FACTOR times the window's median. On 600-step runs this alone was silent (single
#    batches reach 8x the median gradient norm at a robust z under 4). On long runs it is not: late in training
#    most batches are fit to a loss near 0, the window's spread shrinks with them, and a batch holding one example
#    the model still gets wrong stands 2.2-88x above the median loss at a robust z of 5.1-7.2 (its gradient norm
#    13-106x, z 5.1-7.6). Healthy digits MLP runs (tests/test_monitor.py's; batch 32 and 128, seeds 0 and 1, 2000
#    and 5000 steps, batches drawn at random or shuffled per epoch): RMSProp 1e-3, SGD 0.1 and SGD 0.05 with
#    momentum were flagged in 15 of 60 runs, at 27 steps from 424 to 4344; Adam, and AdamW with a warm-up and
#    cosine decay, never. Runs memorizing 64 examples (3000 steps) fit every batch alike and were never flagged.
# 2. Against everything the run went through before: at least SPIKE_RECORD times the highest value recorded at any
#    earlier step (earlier spikes left out, so a repeated spike counts each time). A batch that stands out of a
#    quiet window is worth acting on only if it is a value the run has not survived before: the hard batches above
#    recur through a healthy run, each far below the loss and gradient the run started with, while under any ratio
#    to a median they are all outliers. On those 27 steps and one at batch 8 (138 healthy runs in all, batch 4 to
#    128, all silent now) the largest loss was 0.05 of the highest before it (0.34 at batch 8) and the largest
#    gradient norm 0.36; the 5000-step runs' last 3000 steps judged alone (as a fine-tuning run's, whose history
#    starts low): 0.70 and 0.78, 2.6x below SPIKE_RECORD. One corrupted batch (inputs x30, labels shifted by one
#    class) at step 1500 of the 20 2000-step settings: loss 149-310x and gradient norm 72-269x the highest
#    before it; its labels shifted alone: loss 5.1-11x (2.6x above SPIKE_RECORD), gradient 3.5-9.1x. Inputs x30 at
#    step 250 of 400 (correct labels): gradient norm 4.6-14x (2.3x above); its loss, 0.6-1.5x, does not pass: that
#    step is the gradient's finding.
SPIKE_Z = 5.0
GRAD_SPIKE_FACTOR = 10.0
LOSS_SPIKE_FACTOR = 2.0
SPIKE_RECORD = 2.0
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
    lr: np.ndarray | None = None  # (n,) the learning rate of each row's step, when known (Monitor(learning_rate=))
    # The loss of a model that ignores its inputs (the constant-input control; Monitor(baseline_loss=)), when known.
    baseline_loss: float | None = None


def _named(paths: list[str], index) -> list[str]:
    return [paths[i] for i in list(index)[:MAX_LAYERS_NAMED]]


def nonfinite(s: Series, where: str = "") -> Finding | None:
    """The first step whose gradient (or recorded loss) is non-finite, the layers whose gradients went non-finite
    there, and which came first: a non-finite loss (the forward pass or the loss) or a finite loss with a
    non-finite gradient (the backward pass). When training stayed finite, a non-finite validation loss is the same
    bug seen on held-out examples (a log(0) or a division the training batches happened not to reach), and the same
    error: with ``split="validation"`` in its evidence."""
    return _nonfinite_training(s, where) or _nonfinite_validation(s, where)


def _first_nonfinite_validation(s: Series) -> int | None:
    """The index of the first recorded validation loss that is NaN or inf."""
    if s.val_loss is None or not len(s.val_loss):
        return None
    bad = np.flatnonzero(~np.isfinite(np.asarray(s.val_loss, np.float64)))
    return int(bad[0]) if bad.size else None


def _nonfinite_validation(s: Series, where: str = "") -> Finding | None:
    i = _first_nonfinite_validation(s)
    if i is None:
        return None
    val = np.asarray(s.val_loss, np.float64)
    step = int(s.val_steps[i])
    evidence = dict(step=step, split="validation", loss=float(val[i]),
                    nonfinite_validations=int((~np.isfinite(val)).sum()), validations=int(val.size))
    if i:
        evidence.update(last_finite_step=int(s.val_steps[i - 1]), last_finite_loss=float(val[i - 1]))
    return error(
        "train.nonfinite",
        f"{where}the validation loss went non-finite at step {step} ({val[i]:g}) while training stayed finite "
        f"({evidence['nonfinite_validations']} of {val.size} validations non-finite)",
        "The loss or the forward pass overflows on held-out examples the training batches did not reach (log(0), "
        "a division by a zero target, an exp that overflows): make it numerically safe (log_softmax instead of "
        "log(softmax), clip before a log, guard divisions), then look for the examples that trigger it.",
        **evidence)


def _nonfinite_training(s: Series, where: str = "") -> Finding | None:
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


def spike_stats(x: np.ndarray, factor: float) -> dict:
    """The spike rule's quantities for one series (see the module constants): ``local``, the rows that stand out of
    the window before them (both local gates); for each of those, ``highest`` (the highest value recorded before it,
    spikes excluded), ``highest_row`` and ``record`` (its value over that); and ``spikes``, the rows whose record is
    at least :data:`SPIKE_RECORD`."""
    x = np.asarray(x, np.float64)
    n = x.size
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(x)
    logs[~np.isfinite(logs)] = np.nan
    local = np.zeros(0, int)
    if n > MIN_HISTORY:
        padded = np.concatenate([np.full(WINDOW, np.nan), logs])
        windows = np.lib.stride_tricks.sliding_window_view(padded, WINDOW)[:n]  # row t: logs[t - WINDOW:t]
        ok = np.isfinite(logs) & (np.sum(np.isfinite(windows), axis=1) >= MIN_HISTORY)
        ok[:MIN_HISTORY] = False
        rows = np.flatnonzero(ok)
        if rows.size:
            w = windows[rows]
            median = np.nanmedian(w, axis=1)
            spread = 1.4826 * np.nanmedian(np.abs(w - median[:, None]), axis=1)
            local = rows[logs[rows] - median > np.maximum(np.log(factor), SPIKE_Z * spread)]
    reference = np.where(np.isfinite(x), x, -np.inf)  # what the run had recorded, less the spikes found so far
    highest, highest_row, record, spikes = [], [], [], []
    for t in local:
        top = int(np.argmax(reference[:t]))
        ratio = x[t] / reference[top] if reference[top] > 0 else np.inf
        highest.append(float(reference[top]))
        highest_row.append(top)
        record.append(float(ratio))
        if ratio >= SPIKE_RECORD:
            spikes.append(int(t))
            reference[t] = -np.inf
    return dict(local=local, highest=np.asarray(highest), highest_row=np.asarray(highest_row, int),
                record=np.asarray(record), spikes=np.asarray(spikes, int))


def _first_spike(x: np.ndarray, factor: float) -> tuple[np.ndarray, int, float, int] | None:
    """The spikes' rows, and the first one's row, the highest value recorded before it and that value's row."""
    stats = spike_stats(x, factor)
    if stats["spikes"].size == 0:
        return None
    t = int(stats["spikes"][0])
    [i] = np.flatnonzero(stats["local"] == t)
    return stats["spikes"], t, float(stats["highest"][i]), int(stats["highest_row"][i])


def grad_spike(s: Series, where: str = "") -> Finding | None:
    found = _first_spike(s.grad_norm, GRAD_SPIKE_FACTOR)
    if found is None:
        return None
    spikes, t, highest, highest_row = found
    before = s.layer_grad_norm[max(0, t - WINDOW):t]
    jump = s.layer_grad_norm[t] / np.maximum(np.nanmedian(before, axis=0), 1e-30)
    layer = int(np.nanargmax(jump))
    median = float(np.nanmedian(s.grad_norm[max(0, t - WINDOW):t]))
    return warning(
        "train.grad_spike",
        f"{where}gradient norm spiked at step {int(s.steps[t])}: {s.grad_norm[t]:.3g}, "
        f"{s.grad_norm[t] / median:.3g}x the median of the {min(t, WINDOW)} steps before and "
        f"{s.grad_norm[t] / highest:.3g}x the highest before it (step {int(s.steps[highest_row])}); largest jump in "
        f"{s.paths[layer]}",
        "One batch or one layer blew up the gradient. Gradient clipping (optax.clip_by_global_norm) bounds the "
        "damage; a lower learning rate or a warm-up prevents it; a repeated spike at the same layer points to that "
        "layer (a normalization over a tiny variance, an attention logit growing).",
        step=int(s.steps[t]), grad_norm=float(s.grad_norm[t]), median_before=median, highest_before=highest,
        highest_before_step=int(s.steps[highest_row]), layer=s.paths[layer], layer_jump=float(jump[layer]),
        spikes=int(spikes.size), spike_steps=[int(s.steps[i]) for i in spikes[:10]])


def loss_spike(s: Series, where: str = "") -> Finding | None:
    if not s.loss_recorded.any():
        return None
    loss = np.where(s.loss_recorded, s.loss, np.nan)
    found = _first_spike(loss, LOSS_SPIKE_FACTOR)
    if found is None:
        return None
    spikes, t, highest, highest_row = found
    window = loss[max(0, t - WINDOW):t]
    median = float(np.nanmedian(window))
    after = loss[t + 1:t + 1 + WINDOW]
    recovered = np.flatnonzero(after <= 1.1 * median)
    evidence = dict(step=int(s.steps[t]), loss=float(loss[t]), median_before=median, highest_before=highest,
                    highest_before_step=int(s.steps[highest_row]), spikes=int(spikes.size),
                    spike_steps=[int(s.steps[i]) for i in spikes[:10]])
    tail = ""
    if recovered.size:
        evidence["recovered_after_steps"] = int(recovered[0]) + 1
        tail = f"; back to its level {int(recovered[0]) + 1} steps later"
    return warning(
        "train.loss_spike",
        f"{where}loss spiked at step {int(s.steps[t])}: {loss[t]:.4g}, {loss[t] / median:.3g}x the median of the "
        f"{min(t, WINDOW)} steps before and {loss[t] / highest:.3g}x the highest before it ({highest:.4g} at step "
        f"{int(s.steps[highest_row])}){tail}",
        "A loss spike is a step that moved the weights too far (a learning rate near the edge of stability, an "
        "outlier batch). Look at that step's batch; clip gradients or lower the learning rate if it repeats.",
        **evidence)


def update_ratio(s: Series, where: str = "") -> Finding | None:
    """Layers that do not learn (update exactly zero over the last window, or without update norms a parameter
    norm that did not change: frozen, or receiving no gradient) or learn far too fast (median update/parameter ratio
    above :data:`FAST_RATIO`, when update norms were recorded), judged over the last window."""
    if len(s.steps) < MIN_HISTORY:
        return None
    last = slice(max(0, len(s.steps) - WINDOW), None)
    update, param, grad = s.layer_update_norm[last], s.layer_param_norm[last], s.layer_grad_norm[last]
    # Without update norms (harness.monitor.monitor's default), a leaf whose parameter norm is bitwise the same at
    # every step of the window did not change: the norm of unchanged parameters is computed the same way each step,
    # and any update (or one below float resolution, which leaves the parameters as they were) shows in it.
    known = np.all(np.isfinite(update), axis=0)
    still = np.where(known, np.all(update == 0, axis=0), np.all(param == param[:1], axis=0))
    changed = np.where(known, np.any(update > 0, axis=0), np.any(param != param[:1], axis=0))
    frozen, moving = np.flatnonzero(still), np.flatnonzero(changed)
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
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no update norms recorded
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


# Trends of the training loss (divergence, oscillation, plateau) are judged on the recorded finite losses, through a
# running median over SMOOTH steps (centred): minibatch noise and single outlier batches (loss_spike's job) do not
# move a median. A trend needs MIN_TREND recorded losses (four smoothing windows); the stretch an oscillation or a
# plateau is judged over is the last third of the run, at least TREND_STEPS steps. The numbers quoted below were
# measured on tests/test_monitor_trends.py's runs with seeds 0-4 (the tests run two): 600 steps of the digits MLP or
# of a linear regression; healthy: Adam 1e-3, AdamW with a linear warm-up and cosine decay, SGD with momentum 0.05.
SMOOTH = 25
MIN_TREND = 100
TREND_STEPS = 150
# Divergence: the loss ends (the median of the last WINDOW steps: at least half of them that high, so it stays up)
# at least DIVERGE_FACTOR times its lowest point (the minimum of the running median, before the last window) AND has
# given back at least DIVERGE_LOST of what it had gained from its start to there: it blew back up, towards or past
# where it started. An LR too high does this once it passes where training turns unstable (during or after a
# warm-up, say): the loss climbs back, a ReLU network's to the label prior's entropy, a linear model's to overflow.
# Both gates: late in a healthy run a loss near 0 can double from one window to the next (a tiny fraction of its
# gain), and a run that never learned can give back "all" of a gain that was noise (by a few percent of its level).
# Healthy runs: at most 1.6x and 0.6% given back; warm-ups of SGD with momentum to 0.5-2 and of Adam to 0.2:
# 3.2-9.5x and 37-122%.
DIVERGE_FACTOR = 2.0
DIVERGE_LOST = 0.25
# The LR suggested after a divergence: a tenth of the LR in effect at the loss's lowest point. fastai's lr_find
# "minimum" suggestion (fastai/callback/schedule.py, SuggestionMethod.Minimum: the LR at the minimum loss / 10),
# after Smith's LR range test (Smith 2017, section 3.3): a rate below where the loss starts to blow up.
DIVERGE_LR_FRACTION = 0.1
# Oscillation: an LR at the edge of stability (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically
# Occurs at the Edge of Stability"): the parameters bounce across a valley whose sharpness is about 2/lr, and the
# loss rises and falls with them over runs of steps. With minibatches drawn independently, the loss's deviations from
# its running median are independent from one step to the next (lag-1 autocorrelation about 0, however large they
# are); swings that last several steps make it positive. Healthy runs: at most 0.11; plain SGD at 1.0 on the MLP and
# at 0.7-0.8 on a linear regression (it overflows at 0.9): 0.54-0.86. Plain SGD somewhat below its limit shows it too
# (0.39-0.57) while it still descends, so the loss must also have stopped falling: over the stretch, its running median
# reaches no new low more than OSC_GAIN below the lowest before it (healthy runs: 18-73% lower, those SGD runs
# 78-80% lower; the planted ones at most 9% lower: the lowest point of a swinging loss is its quiet spells) -- and
# not be climbing (the median of the stretch's second half under twice its first half's: that is a divergence).
OSC_AUTOCORR = 0.4
OSC_GAIN = 0.25
# Halving the LR takes lr x sharpness from about 2 (the edge) to about 1, the fastest stable step on a quadratic.
OSC_LR_FRACTION = 0.5
# Plateau with a learning rate too low: over the last stretch the loss fell by less than PLATEAU_GAIN (the median of
# its second half against its first half's) and is still above PLATEAU_CONVERGED of where it started (a run that
# converged is not on a plateau to fix), while the parameters move by less than TINY_RATIO of their norm per step.
# CS231n ("ratio of weights:updates"): about 1e-3 is usual, and a hundred times lower is an LR too low for the
# weights' scale (healthy runs at a constant LR: 7e-4 or more, 1e-4 once SGD has converged over 2000 steps; Adam at
# 1e-6: 3.2-3.5e-6). The ratio is the update norm over the parameter norm of the leaves that did not start at zero: a
# leaf grown from zero (a bias) moves about 1/steps of its norm whatever the LR, and a model whose every leaf started
# at zero is not judged. The LR must not have been decayed: its value (or, unknown, the update ratio's) at the end is
# at least PLATEAU_DECAYED of its peak; a schedule that decays the LR to about 0 ends with tiny updates on purpose
# (cosine decay: 0.005 of its peak). A loss that stalls high with updates of the usual size is not called: without a
# reference for "high" (a fine-tuning run starts near its floor; a dataset's floor is unknown) it would not say what
# to fix.
PLATEAU_GAIN = 0.1
PLATEAU_CONVERGED = 0.1
TINY_RATIO = 1e-5
PLATEAU_DECAYED = 0.1
# And the gradient of those leaves is still at least PLATEAU_GRAD of its median over the first WINDOW steps:
# parameters that barely moved have about the gradient they started with (Adam at 1e-6: 0.96-0.99 of it), while a
# network that an LR too high killed (dead ReLUs, the loss stuck at the label prior's entropy) has tiny updates
# because its gradient vanished (0 to 1e-9 of it).
PLATEAU_GRAD = 0.1
# The LR suggested for a plateau scales the LR at the end by USUAL_RATIO / the measured ratio: for SGD and Adam alike
# the update, so the ratio, is proportional to the LR.
USUAL_RATIO = 1e-3


def _losses(s: Series) -> tuple[np.ndarray, np.ndarray]:
    """The rows and values of the recorded, finite losses."""
    keep = s.loss_recorded & np.isfinite(s.loss)
    return np.flatnonzero(keep), np.asarray(s.loss[keep], np.float64)


def _running_median(x: np.ndarray, k: int = SMOOTH) -> np.ndarray:
    """Centred running median of ``k`` (ends: what is there)."""
    half = k // 2
    padded = np.pad(np.asarray(x, np.float64), half, constant_values=np.nan)
    return np.nanmedian(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)


def _halves(x: np.ndarray) -> tuple[float, float]:
    half = x.size // 2
    return float(np.median(x[:half])), float(np.median(x[half:]))


def _lr(s: Series, row: int) -> float | None:
    return None if s.lr is None else float(s.lr[row])


def _fmt(x: float) -> str:
    return f"{x:.2g}"


def trend_stats(s: Series) -> dict | None:
    """The quantities the divergence and oscillation rules judge (see the module constants), and which fired; None
    with fewer than MIN_TREND recorded losses."""
    rows, loss = _losses(s)
    if loss.size < MIN_TREND:
        return None
    smooth = _running_median(loss)
    # Divergence.
    turn = int(np.argmin(smooth))
    start, low, end = float(smooth[0]), float(smooth[turn]), float(np.median(loss[-WINDOW:]))
    gained, rise = start - low, end - low
    lost = rise / gained if gained > 0 else float("inf") if rise > 0 else 0.0
    factor = end / low if low > 0 else float("inf") if gained > 0 and rise > 0 else 1.0
    # Oscillation, over the last stretch.
    first = max(0, loss.size - max(TREND_STEPS, loss.size // 3))
    residual = (loss - smooth)[first:]
    residual = residual - residual.mean()
    energy = float(np.sum(residual * residual))
    autocorr = float(np.sum(residual[:-1] * residual[1:]) / energy) if energy > 0 else 0.0
    # How far below its lowest before the stretch the loss went within it (a run too short to have a before: as if
    # it kept falling).
    before = float(np.min(smooth[:first])) if first else float("nan")
    within = float(np.min(smooth[first:]))
    new_low = (before - within) / abs(before) if before != 0 and first else float("inf")
    first_half, second_half = _halves(loss[first:])
    climbing = second_half > first_half + abs(first_half)
    oscillating = autocorr > OSC_AUTOCORR and new_low < OSC_GAIN and not climbing
    level = float(np.median(loss[first:]))
    # A swinging loss whose last window sits high is a divergence only if the whole stretch sits that high.
    diverged = (turn < loss.size - WINDOW and factor >= DIVERGE_FACTOR and lost >= DIVERGE_LOST
                and (not oscillating or level >= DIVERGE_FACTOR * low))
    return dict(diverged=bool(diverged), oscillating=bool(oscillating and not diverged), turn_row=int(rows[turn]),
                first_row=int(rows[first]), last_row=int(rows[-1]), start=start, low=low, end=end, lost=float(lost),
                factor=float(factor), autocorr=autocorr, new_low=new_low, level=level,
                deviation=float(1.4826 * np.median(np.abs(residual - np.median(residual)))))


def divergence(s: Series, where: str = "") -> Finding | None:
    """The loss blew back up after its lowest point and stays up: the step where it turned, the LR there, and a
    tenth of it to use (see :data:`DIVERGE_LOST`)."""
    t = trend_stats(s)
    if t is None or not t["diverged"]:
        return None
    step, last = int(s.steps[t["turn_row"]]), int(s.steps[t["last_row"]])
    lr = _lr(s, t["turn_row"])
    suggested = lr * DIVERGE_LR_FRACTION if lr else None
    back = (f"above where it started ({t['start']:.4g})" if t["end"] >= t["start"] else
            f"{t['lost']:.0%} of the way back to where it started ({t['start']:.4g})")
    at_lr = "" if lr is None else f" (learning rate {_fmt(lr)} there)"
    fix = (f"Lower the learning rate to about {_fmt(suggested)}, a tenth of the {_fmt(lr)} in effect where the loss "
           f"turned (fastai's lr_find rule: a tenth of the LR at the loss's minimum)" if suggested else
           "Lower the learning rate (pass learning_rate= to harness.monitor.Monitor for a value to use)")
    return error(
        "train.divergence",
        f"{where}training diverged: the loss (running median of {SMOOTH} steps) was lowest at step {step}, "
        f"{t['low']:.4g}{at_lr}, and is {t['end']:.4g} at step {last}: {t['factor']:.3g}x that, {back}",
        f"{fix}. With a warm-up, its peak is too high: cap it below the LR at the turn. Gradient clipping "
        "(optax.clip_by_global_norm) bounds single steps but does not make a too-high rate stable.",
        step=step, loss_at_turn=t["low"], final_step=last, final_loss=t["end"], start_loss=t["start"],
        lost_fraction=t["lost"], lr_at_turn=lr, final_lr=_lr(s, t["last_row"]), suggested_lr=suggested)


def oscillation(s: Series, where: str = "") -> Finding | None:
    """The loss swings over runs of steps without falling or diverging: an LR at the edge of stability (see
    :data:`OSC_AUTOCORR`)."""
    t = trend_stats(s)
    if t is None or not t["oscillating"]:
        return None
    first, last = int(s.steps[t["first_row"]]), int(s.steps[t["last_row"]])
    lr = _lr(s, t["last_row"])
    suggested = lr * OSC_LR_FRACTION if lr else None
    fix = (f"Lower the learning rate to about {_fmt(suggested)}, half the {_fmt(lr)} in effect" if suggested
           else "Lower the learning rate, to about half (pass learning_rate= to harness.monitor.Monitor for a value)")
    return warning(
        "train.oscillation",
        f"{where}the loss oscillates from step {first} to step {last} without falling: it swings over runs of "
        f"steps around {t['level']:.4g} (lag-1 autocorrelation of its deviations from its running median "
        f"{t['autocorr']:.2f}; independent minibatches give about 0), "
        + (f"its lowest there {t['new_low']:.0%} below its lowest before" if t["new_low"] > 0 else
           "never below its lowest before"),
        f"{fix}: the parameters bounce across the loss's valley instead of descending it (an LR at the edge of "
        "stability). A schedule that decays the LR gets there later in the run.",
        step=first, final_step=last, autocorrelation=t["autocorr"], loss=t["level"], deviation=t["deviation"],
        new_low=t["new_low"], lr=lr, suggested_lr=suggested)


def _update_ratio(s: Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the update norm over the parameter norm of the leaves that did not start at zero, and their gradient
    norm; and those leaves."""
    live = np.flatnonzero(np.nan_to_num(s.layer_param_norm[0]) > 0)

    def norm(x):
        return np.sqrt(np.sum(np.square(x[:, live], dtype=np.float64), axis=1))

    update, param = norm(s.layer_update_norm), norm(s.layer_param_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(param > 0, update / param, np.nan), norm(s.layer_grad_norm), live


def plateau_stats(s: Series) -> dict | None:
    """The quantities the plateau rule judges (see :data:`TINY_RATIO`); None with too few recorded losses or no leaf
    that started away from zero."""
    rows, loss = _losses(s)
    if loss.size < MIN_TREND:
        return None
    ratio, grad, live = _update_ratio(s)
    if live.size == 0:
        return None
    first = max(0, loss.size - max(TREND_STEPS, loss.size // 3))
    stretch = rows[first:]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: a leaf whose norm is 0 throughout
        median_ratio = float(np.nanmedian(ratio[stretch]))
        grad_kept = float(np.nanmedian(grad[stretch]) / np.nanmedian(grad[:WINDOW]))
        layers = np.nanmedian(s.layer_update_norm[stretch] / s.layer_param_norm[stretch], axis=0)
    if s.lr is not None:
        peak, now = float(np.max(s.lr)), float(np.median(s.lr[stretch[-WINDOW:]]))
    else:
        finite = ratio[np.isfinite(ratio)]
        peak = float(np.max(_running_median(finite))) if finite.size else float("nan")
        now = float(np.median(finite[-WINDOW:])) if finite.size else float("nan")
    kept = now / peak if peak > 0 else float("nan")
    first_half, second_half = _halves(loss[first:])
    gain = (first_half - second_half) / abs(first_half) if first_half != 0 else 0.0
    level, start = float(np.median(loss[-WINDOW:])), float(_running_median(loss)[0])
    fired = bool(gain < PLATEAU_GAIN and median_ratio < TINY_RATIO and grad_kept >= PLATEAU_GRAD
                 and kept >= PLATEAU_DECAYED and level > PLATEAU_CONVERGED * start)
    return dict(fired=fired, gain=gain, ratio=median_ratio, grad_kept=grad_kept, lr_kept=kept, level=level,
                start=start, first_row=int(rows[first]), last_row=int(rows[-1]),
                layers=[int(i) for i in live[np.argsort(layers[live])] if layers[i] < TINY_RATIO])


def plateau(s: Series, where: str = "") -> Finding | None:
    """The loss stopped improving while the parameters barely move and the LR was not decayed: an LR too low (see
    :data:`TINY_RATIO`)."""
    p = plateau_stats(s)
    if p is None or not p["fired"]:
        return None
    first, last = int(s.steps[p["first_row"]]), int(s.steps[p["last_row"]])
    lr = _lr(s, p["last_row"])
    factor = USUAL_RATIO / p["ratio"] if p["ratio"] > 0 else None
    suggested = None if lr is None or factor is None else lr * factor
    if suggested is not None:
        fix = f"Raise the learning rate to about {_fmt(suggested)}, {factor:.0f}x the {_fmt(lr)} in effect"
    elif factor is not None:
        fix = (f"Raise the learning rate, about {factor:.0f}x (pass learning_rate= to harness.monitor.Monitor for a "
               "value)")
    else:
        fix = "Raise the learning rate"
    return warning(
        "train.plateau",
        f"{where}the loss is on a plateau from step {first} to step {last}: {p['level']:.4g}, "
        f"{p['level'] / p['start']:.0%} of where it started ({-p['gain']:+.1%} over the stretch), while each step "
        f"moves the parameters by {p['ratio']:.1g} of their norm (about 1e-3 is usual): the learning rate is too low",
        f"{fix}, to bring the update-to-parameter ratio to about {USUAL_RATIO:g} (CS231n). If it is low on purpose "
        "(fine-tuning), the plateau is its cost.",
        step=first, final_step=last, loss=p["level"], start_loss=p["start"], gain=p["gain"],
        update_ratio=p["ratio"], layers=_named(s.paths, p["layers"]), lr=lr, lr_factor=factor,
        suggested_lr=suggested)


# Underfitting, relative to the loss a model that ignores its inputs reaches (the checklist's constant-input
# control, seeds 000-002: "compare against a baseline that ignores the input"; harness train fits a constant output
# to the training labels when the control did not run): after at least MIN_UNDERFIT_STEPS steps, the training loss
# (median of the last WINDOW steps) and the last validation loss both still within UNDERFIT_FRACTION of it, so the
# run learned (almost) nothing from its inputs. A relative gap below which "healthy but hard" is not plausible: a
# task with any signal a model can use moves the training loss further than that (a model fits its own training
# set), so a run that does not is stuck, too small or starved of signal. Without a baseline it is not judged.
UNDERFIT_FRACTION = 0.1
MIN_UNDERFIT_STEPS = 100


def underfitting(s: Series, where: str = "") -> Finding | None:
    """Training and validation loss both still near the no-input baseline at the end of the run."""
    base = s.baseline_loss
    steps, loss = _losses(s)
    if base is None or not np.isfinite(base) or base <= 0 or steps.size < MIN_UNDERFIT_STEPS:
        return None
    train = float(np.median(loss[-WINDOW:]))
    val = None
    if s.val_loss is not None and len(s.val_loss):
        val = float(np.asarray(s.val_loss, float)[-1])
    if train < (1 - UNDERFIT_FRACTION) * base or (val is not None and val < (1 - UNDERFIT_FRACTION) * base):
        return None
    closed = 1 - train / base
    val_text = f" and validation loss {val:.4g}" if val is not None else ""
    return warning(
        "train.underfitting",
        f"{where}the model underfits: after {int(steps[-1]) + 1} steps its training loss {train:.4g}{val_text} "
        f"are within {UNDERFIT_FRACTION:.0%} of {base:.4g}, the loss of a model that ignores its inputs (it closed "
        f"{closed:.0%} of that gap): it learned almost nothing from the inputs",
        "Look at the other findings first (a plateau or divergence names the learning rate). Otherwise: a "
        "learning rate or a run too small for the task, a model too small (capacity), too much regularization, or "
        "inputs that carry little signal about the targets (the checklist's controls tell which: `harness "
        "diagnostics.run=[controls,capacity]`).",
        step=int(steps[-1]), train_loss=train, val_loss=val, baseline_loss=float(base), gap_closed=closed)


DETECTORS = (nonfinite, grad_spike, loss_spike, update_ratio, overfitting, divergence, oscillation, plateau,
             underfitting)


def detect(s: Series, where: str = "") -> list[Finding]:
    """Every detector's finding on one run. After the first non-finite step the statistics say nothing more, so
    the other detectors judge the steps before it."""
    first = nonfinite(s, where)
    if first is not None and first.evidence.get("split") == "validation":
        # Training is judged whole; the validation detectors see the evaluations before the first non-finite one.
        cut = _first_nonfinite_validation(s)
        s = dataclasses.replace(s, val_steps=s.val_steps[:cut], val_loss=s.val_loss[:cut])
    elif first is not None:
        cut = int(np.searchsorted(s.steps, first.evidence["step"]))
        keep = None if s.val_steps is None else np.asarray(s.val_steps) < first.evidence["step"]
        held_out = _first_nonfinite_validation(s)
        if held_out is not None:
            keep[held_out:] = False  # a held-out overflow before training's: the validations are judged to it
        s = dataclasses.replace(
            s, **{f.name: getattr(s, f.name)[:cut] for f in dataclasses.fields(Series)
                  if f.name not in ("paths", "val_steps", "val_loss", "baseline_loss")
                  and getattr(s, f.name) is not None},
            val_steps=None if keep is None else s.val_steps[keep], val_loss=None if keep is None else s.val_loss[keep])
    found = [first] + [d(s, where) for d in DETECTORS[1:]] if len(s.steps) else [first]
    return [f for f in found if f is not None]
