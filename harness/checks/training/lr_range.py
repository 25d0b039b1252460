"""The learning-rate range test: is the configured learning rate in the range where this model learns?

Technique: Leslie Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017, section 3.3, the
"LR range test"), popularised as fastai's ``lr_find``; the seeds' "Learning Rate Finder" (seeds 000/001) and
"loss explodes -> too high, barely moves -> too low" table (seeds 001/002).

One vmapped program (one request through ``ctx.train``, so one compile, merged across a collapsed sweep) trains:

* the classic **ramp**: one member whose LR grows exponentially from ``min_lr`` to ``max_lr`` over ``grid_steps``
  steps. Its training loss, smoothed by a bias-corrected EMA and cut where it exceeds 4x its best (fastai, Smith),
  gives fastai's ``valley`` and torch-lr-finder's steepest-descent suggestions (:mod:`.curves`);
* a **grid** of ``grid_size`` constant LRs log-spaced over the same span, each trained ``grid_steps`` steps from the
  same init and batch order, whose final validation loss measures directly what the ramp only hints at;
* the **configured** optimizer LR, and an **untrained** member (LR 0) whose validation loss is the starting level.

What the harness reports, and why: **the ramp's valley, checked by the grid**. fastai's valley is a good and
deliberately conservative reading of the ramp, but a ramp point's loss is the state left by every earlier LR
(each LR is visited for a step or two), so the ramp can mislead: on the small wine job its valley sits at 5e-3,
where the grid, which trains each LR for the whole budget and reads the outcome a user cares about (validation
loss), shows it already overfitting. So the valley is reported when the grid's loss there is within 10% of the
grid's best (``VALLEY_TOLERANCE``), otherwise the grid's best LR (the argmin of the grid's validation losses after
a running median of three neighbours, so one noisy member can neither make nor move the minimum). Measured
against the alternatives (basin centres, parabola fits, extrapolating each member's validation curve), this rule
was never worse than the valley and the best or tied-best in the geometric mean over jobs and horizons of 200 to
500 steps (scripts/lr_quality.py).

The usable range, read from the grid (``p(lr)`` = the fraction of the best log-improvement over the untrained
loss that ``lr`` achieved):

* lowest LR that learns: validation loss clearly below the untrained level (by the noise margin);
* usable low end: the lowest LR in the best LR's run with ``p >= 0.1`` — the low side is lenient because a short
  test understates what a small LR reaches in a full run (short-horizon bias, Wu et al. 2018, "Understanding
  Short-Horizon Bias in Stochastic Meta-Optimization"): "too low" means the loss barely moves;
* usable high end: the highest LR in that run keeping ``p >= 0.5``: a short run flatters high LRs, never low ones,
  so an LR that already lost half the log-improvement here is too high for any budget;
* divergence point: the first LR above the best whose member goes non-finite or ends no better than it started.

Noise: "clearly below" and "within noise" use two seed-to-seed standard deviations of the validation loss when the
seeds diagnostic ran first (``ctx.shared["seed_spread"]``), else ``relative_margin`` of the untrained loss. 2%:
on the reference and regression jobs two seed-to-seed standard deviations of the validation loss (Adam 1e-3, 200
steps, 3 seeds) are 0.9% of the untrained loss; the tiny wine and breast_cancer validation sets (45 and 142
examples) are noisier (4-6%), which is where the seeds diagnostic's measured spread takes over.

Measured quality (``scripts/lr_quality.py``, default settings, 2-core CPU): validation loss after training at each
rule's LR with the job's optimizer and batch size (mean of 3 seeds), divided by the best of 48 fixed LRs trained
the same way; mean over 3 ramp seeds. All rules read the same ramp. ``noise``: relative standard error of a 3-seed
mean near the optimum; smaller differences are seed luck.

=================  =======  =====  =====  ======  ========  =========
500 steps          best LR  noise  ours   valley  steepest  Lightning
=================  =======  =====  =====  ======  ========  =========
digits (ref. job)  0.020    10%    1.15x  1.12x   1.14x     32x
wine               1.9e-4   23%    1.36x  2.88x   1.45x     2.1x
regression         0.016    5%     1.24x  1.27x   1.69x     1064x
breast_cancer      1.1e-3   10%    1.09x  1.09x   1.10x     13492x
=================  =======  =====  =====  ======  ========  =========

=================  =======  =====  =====  ======  ========  =========
300 steps          best LR  noise  ours   valley  steepest  Lightning
=================  =======  =====  =====  ======  ========  =========
digits (ref. job)  0.020    7%     1.17x  1.31x   1.31x     34x
wine               3.1e-4   25%    1.19x  2.69x   1.24x     3.8x
regression         0.016    7%     1.14x  1.16x   1.88x     1018x
breast_cancer      1.1e-3   12%    1.02x  1.02x   1.24x     13310x
=================  =======  =====  =====  ======  ========  =========

Ours is never meaningfully worse than any rule (digits at 500 steps: 3% behind the valley, within the 10% noise),
ties the valley where the grid confirms it (breast_cancer), and avoids the valley's and steepest slope's large
misses (wine: the ramp is misled by fast overfitting; regression: steepest slope sits far down the curve).
Lightning's raw-curve steepest gradient lands on the divergence cliff, as the brief's reference numbers also show.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from harness.checks.base import Outcome, Plot
from harness.checks.training import curves
from harness.engine.train import Hparams, SweepResult
from harness.errors import HarnessError
from harness.findings import error, info, warning

NAME = "lr_range"
# Thresholds on p(lr), the fraction of the best log-improvement an LR achieves (see module docstring).
LOW_PROGRESS = 0.1  # below this a lower LR "barely moves" (seeds 001/002): too low
HIGH_PROGRESS = 0.5  # above the best LR, losing half of the log-improvement is too high
# A configured run whose smoothed training loss peaks above this multiple of its initial loss exploded (the same
# 4x that stops fastai's and Smith's ramp).
EXPLODE_FACTOR = 4.0
# The ramp's valley is reported when the grid's loss there is within this factor of the grid's best: a lower LR
# costing at most 10% at the test's horizon is the safer pick for a longer run (fastai's reason for the valley),
# while a larger gap means the ramp misled (it passes through each LR for a few steps only). Measured: 1.1-1.2
# give the same suggestions on every job in scripts/lr_quality.py.
VALLEY_TOLERANCE = 1.1


@dataclasses.dataclass(frozen=True)
class Settings:
    min_lr: float = 1e-5
    max_lr: float = 1.0
    grid_size: int = 32
    grid_steps: int = 200
    ema_beta: float = 0.98
    stop_factor: float = 4.0
    relative_margin: float = 0.02

    def validate(self, key: str):
        if not 0 < self.min_lr < self.max_lr:
            raise HarnessError(f"needs 0 < min_lr < max_lr, got min_lr={self.min_lr}, max_lr={self.max_lr}",
                               key=f"{key}.min_lr")
        if self.grid_size < 4:
            raise HarnessError(f"must be at least 4 to bracket a best LR, got {self.grid_size}",
                               key=f"{key}.grid_size")
        if self.grid_steps < 20:
            raise HarnessError(f"must be at least 20 (the ramp's rules skip its first 10% and last 5 points), got "
                               f"{self.grid_steps}", key=f"{key}.grid_steps")
        if not 0 <= self.ema_beta < 1:
            raise HarnessError(f"must be in [0, 1), got {self.ema_beta}", key=f"{key}.ema_beta")
        if self.stop_factor <= 1:
            raise HarnessError(f"must be above 1, got {self.stop_factor}", key=f"{key}.stop_factor")
        if not 0 < self.relative_margin < 1:
            raise HarnessError(f"must be in (0, 1), got {self.relative_margin}", key=f"{key}.relative_margin")


# --------------------------------------------------------------------------------------------------------------
# The members of the one program.


@dataclasses.dataclass(frozen=True)
class Plan:
    """Member layout: row 0 the ramp, rows 1..grid_size the grid, then the configured LR, then LR 0."""

    grid_lrs: np.ndarray
    configured_lr: float
    settings: Settings

    @property
    def grid_rows(self) -> slice:
        return slice(1, 1 + len(self.grid_lrs))

    @property
    def configured_row(self) -> int:
        return 1 + len(self.grid_lrs)

    @property
    def untrained_row(self) -> int:
        return 2 + len(self.grid_lrs)

    def hparams(self, seed: int, weight_decay: float) -> Hparams:
        s = self.settings
        lr = np.concatenate([[s.min_lr], self.grid_lrs, [self.configured_lr, 0.0]])
        growth = np.zeros(len(lr))
        growth[0] = math.log(s.max_lr / s.min_lr)  # lr_t = min_lr * (max/min)^(t/(steps-1)): min_lr -> max_lr
        return Hparams.make(lr=lr, lr_growth=growth, weight_decay=weight_decay, init_seed=seed, data_seed=seed)


def make_plan(settings: Settings, configured_lr: float) -> Plan:
    grid = np.geomspace(settings.min_lr, settings.max_lr, settings.grid_size)
    return Plan(grid, float(configured_lr), settings)


def ramp_lrs(settings: Settings) -> np.ndarray:
    """The ramp's LR at each step (what the engine computes in-graph)."""
    t = np.arange(settings.grid_steps) / max(settings.grid_steps - 1, 1)
    return settings.min_lr * (settings.max_lr / settings.min_lr) ** t


# --------------------------------------------------------------------------------------------------------------
# The ramp.


@dataclasses.dataclass
class RampReading:
    lrs: np.ndarray  # per step
    raw: np.ndarray
    smoothed: np.ndarray
    stop: int  # usable prefix length (divergence stop)
    valley_lr: float | None
    steepest_lr: float | None
    min_lr: float | None  # LR at the smoothed curve's minimum


def read_ramp(raw_loss, lrs, beta: float = 0.98, stop_factor: float = 4.0) -> RampReading:
    """Smooth the ramp (bias-corrected EMA), cut it at divergence, apply fastai's valley (on fastai's window) and the
    steepest-descent rule (torch-lr-finder's skips)."""
    raw = np.asarray(raw_loss, dtype=np.float64)
    lrs = np.asarray(lrs, dtype=np.float64)
    smoothed = curves.ema(raw, beta)
    stop = curves.divergence_stop(smoothed, stop_factor)
    kept = smoothed[:stop]
    window = curves.fastai_window(stop, len(raw))
    v = curves.valley_index(kept[window])
    valley_lr = float(lrs[window][v]) if v is not None else None
    s = curves.steepest_index(kept, skip_start=10, skip_end=5)
    steepest_lr = float(lrs[s]) if s is not None else None
    min_lr = float(lrs[int(np.nanargmin(kept))]) if stop > 0 and np.isfinite(kept).any() else None
    return RampReading(lrs, raw, smoothed, stop, valley_lr, steepest_lr, min_lr)


# --------------------------------------------------------------------------------------------------------------
# The grid.


@dataclasses.dataclass
class GridReading:
    lrs: np.ndarray
    val: np.ndarray  # final validation loss; inf for members that went non-finite
    untrained: float
    margin: float
    best_index: int | None
    progress: np.ndarray  # p(lr), fraction of the best log-improvement
    lowest_learning_lr: float | None
    usable_low_lr: float | None
    usable_high_lr: float | None
    divergence_lr: float | None

    @property
    def best_lr(self) -> float | None:
        return None if self.best_index is None else float(self.lrs[self.best_index])

    @property
    def best_loss(self) -> float:
        return float("nan") if self.best_index is None else float(self.val[self.best_index])

    @property
    def learns_at_all(self) -> bool:
        return self.best_index is not None


def running_median3(values) -> np.ndarray:
    """Median of each point and its two neighbours (ends use the two available): one noisy grid member cannot
    make or move the minimum."""
    v = np.asarray(values, dtype=np.float64)
    out = v.copy()
    for i in range(len(v)):
        window = v[max(0, i - 1): i + 2]
        out[i] = np.median(window) if np.isfinite(window).all() else v[i]
    return out


# Losses below this fraction of the untrained loss are at float32's resolution of it: a loss that reaches exactly
# 0 (a memorized batch, a deterministic sequence) counts as this, so no ratio or logarithm divides by 0.
LOSS_RESOLUTION = 1e-6


def log_progress(val, untrained: float, best: float) -> np.ndarray:
    """p = log(untrained / val) / log(untrained / best): 1 at the best LR, 0 at the untrained level, negative when
    worse than untrained. On a log scale because losses such as cross-entropy fall geometrically, so the last factor
    of two matters as much as the first. Losses are floored at ``LOSS_RESOLUTION`` x the untrained loss (a loss of
    exactly 0 is as good as the float32 resolution, not infinitely better); losses that can be negative, or an
    untrained loss that is not above the best, have no log scale: then p is linear, (untrained - val) /
    (untrained - best)."""
    val = np.asarray(val, dtype=np.float64)
    finite = np.isfinite(val)
    if untrained > 0 and best >= 0 and best < untrained and np.all(val[finite] >= 0):
        floor = LOSS_RESOLUTION * untrained
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.log(untrained / np.maximum(val, floor)) / math.log(untrained / max(best, floor))
        return np.where(finite, p, -np.inf)
    if not untrained > best:
        return np.where(finite & (val <= best), 1.0, -np.inf)
    return np.where(finite, (untrained - val) / (untrained - best), -np.inf)


def read_grid(lrs, val, diverged, untrained: float, margin: float) -> GridReading:
    lrs = np.asarray(lrs, dtype=np.float64)
    val = np.where(np.asarray(diverged) | ~np.isfinite(val), np.inf, np.asarray(val, dtype=np.float64))
    learns = val < untrained - margin
    if not learns.any():
        nothing = np.full(len(lrs), -np.inf)
        return GridReading(lrs, val, untrained, margin, None, nothing, None, None, None, None)
    smooth = running_median3(val)
    best = int(np.argmin(np.where(learns, smooth, np.inf)))
    p = log_progress(val, untrained, float(smooth[best]))
    # The usable run is contiguous around the best: walk out from it while the thresholds hold.
    lo = best
    while lo > 0 and p[lo - 1] >= LOW_PROGRESS:
        lo -= 1
    hi = best
    while hi < len(lrs) - 1 and p[hi + 1] >= HIGH_PROGRESS:
        hi += 1
    above = np.flatnonzero((np.arange(len(lrs)) > best) & ~learns)
    divergence = float(lrs[above[0]]) if above.size else None
    return GridReading(
        lrs=lrs, val=val, untrained=untrained, margin=margin, best_index=best, progress=p,
        lowest_learning_lr=float(lrs[np.argmax(learns)]),
        usable_low_lr=float(lrs[lo]), usable_high_lr=float(lrs[hi]), divergence_lr=divergence,
    )


def grid_loss_at(reading: GridReading, lr: float | None) -> float:
    """The grid's validation loss at ``lr``, interpolated linearly in log LR (NaN outside the grid)."""
    if lr is None or not (reading.lrs[0] <= lr <= reading.lrs[-1]):
        return float("nan")
    finite = np.isfinite(reading.val)
    if finite.sum() < 2:
        return float("nan")
    return float(np.interp(np.log(lr), np.log(reading.lrs[finite]), reading.val[finite]))


@dataclasses.dataclass(frozen=True)
class Suggestion:
    lr: float | None
    rule: str  # "valley" (the ramp's valley, confirmed by the grid) or "grid_best"
    grid_ratio_at_valley: float  # the grid's loss at the valley LR over the grid's best (NaN if unknown)


def loss_ratio(loss: float, best: float, untrained: float) -> float:
    """``loss / best``, with both floored at ``LOSS_RESOLUTION`` x the untrained loss when they are not negative:
    a best loss of exactly 0 (the grid memorized its data) makes every other loss infinitely worse otherwise, and
    a division by it fails. NaN when either is NaN; for negative losses the plain ratio."""
    loss, best = float(loss), float(best)
    if math.isnan(loss) or not math.isfinite(best):
        return float("nan")
    if loss >= 0 and best >= 0:
        floor = LOSS_RESOLUTION * abs(untrained) if np.isfinite(untrained) and untrained != 0 else 1e-30
        return max(loss, floor) / max(best, floor)
    return loss / best if best != 0 else float("nan")


def suggest(reading: GridReading, valley_lr: float | None) -> Suggestion:
    """The reported LR: fastai's valley when the grid confirms it (its loss at the valley LR within
    VALLEY_TOLERANCE of the grid's best), else the grid's best LR. See the module docstring for why."""
    if not reading.learns_at_all:
        return Suggestion(None, "none", float("nan"))
    ratio = loss_ratio(grid_loss_at(reading, valley_lr), reading.best_loss, reading.untrained)
    if valley_lr is not None and ratio <= VALLEY_TOLERANCE:
        return Suggestion(float(valley_lr), "valley", ratio)
    return Suggestion(reading.best_lr, "grid_best", ratio)


def noise_margin(shared: dict, untrained: float, relative_margin: float) -> tuple[float, str]:
    """Two seed-to-seed standard deviations of the validation loss when the seeds diagnostic measured them, else
    a documented fraction of the untrained loss."""
    spread = shared.get("seed_spread") if shared else None
    if spread and np.isfinite(spread.get("val_loss_std", np.nan)):
        return max(2.0 * float(spread["val_loss_std"]), 1e-6 * abs(untrained)), "seed_spread"
    return relative_margin * abs(untrained), "relative"


# --------------------------------------------------------------------------------------------------------------
# The configured LR.


@dataclasses.dataclass
class Verdict:
    """How the configured run went and where its LR sits: ``direction`` is 'high', 'low' or None."""

    lr: float
    val: float
    diverged_at: int  # first non-finite step, -1 if never
    exploded: bool  # smoothed training loss peaked above EXPLODE_FACTOR x its start and did not recover
    learns: bool
    progress: float
    direction: str | None
    severity: str | None  # 'error', 'warning' or None
    factor: float  # how far outside the usable range (>= 1)
    start_loss: float = float("nan")  # first training loss
    peak_loss: float = float("nan")  # highest smoothed training loss


def judge_configured(reading: GridReading, lr: float, val: float, train_loss, diverged_at: int,
                     beta: float = 0.98) -> Verdict:
    train_loss = np.asarray(train_loss, dtype=np.float64)
    finite = train_loss[np.isfinite(train_loss)]
    learns = bool(diverged_at < 0 and np.isfinite(val) and val < reading.untrained - reading.margin)
    progress = float(log_progress([val], reading.untrained, reading.best_loss)[0]) if reading.learns_at_all \
        else float("nan")
    start = float(finite[0]) if finite.size else float("nan")
    peak = float(np.nanmax(curves.ema(finite, 0.9))) if finite.size else float("nan")  # short EMA: a few steps
    exploded = bool(diverged_at >= 0 or (peak > EXPLODE_FACTOR * start and not progress >= HIGH_PROGRESS))
    direction, severity, factor = None, None, 1.0
    if reading.learns_at_all:
        best = reading.best_lr
        if diverged_at >= 0 or exploded or (not learns and lr > best):
            direction, severity = "high", "error"
        elif not learns:
            direction, severity = "low", "error"
        elif lr > reading.usable_high_lr:
            direction, severity = "high", "warning"
        elif lr < reading.usable_low_lr:
            direction, severity = "low", "warning"
        if direction == "high":
            factor = lr / reading.usable_high_lr
        elif direction == "low":
            factor = reading.usable_low_lr / lr
    elif diverged_at >= 0 or exploded:
        direction, severity = "high", "error"
    return Verdict(lr, float(val), int(diverged_at), exploded, learns, progress, direction, severity,
                   max(float(factor), 1.0), start, peak)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3g}"


def findings_for(reading: GridReading, verdict: Verdict, ramp: RampReading, suggestion: Suggestion,
                 steps: int) -> list:
    out = []
    said = ("the ramp's valley, confirmed by the grid" if suggestion.rule == "valley" else
            f"the grid's best; the ramp's valley {_fmt(ramp.valley_lr)} did "
            f"{_fmt(suggestion.grid_ratio_at_valley)}x worse on the grid")
    usable = f"[{_fmt(reading.usable_low_lr)}, {_fmt(reading.usable_high_lr)}]"
    evidence = dict(configured_lr=verdict.lr, configured_val_loss=verdict.val, untrained_val_loss=reading.untrained,
                    best_lr=reading.best_lr, best_val_loss=reading.best_loss, suggested_lr=suggestion.lr,
                    suggestion_rule=suggestion.rule,
                    usable_low_lr=reading.usable_low_lr, usable_high_lr=reading.usable_high_lr,
                    lowest_learning_lr=reading.lowest_learning_lr, divergence_lr=reading.divergence_lr,
                    valley_lr=ramp.valley_lr, steepest_lr=ramp.steepest_lr, margin=reading.margin, steps=steps)
    if verdict.diverged_at >= 0 or verdict.exploded:
        how = (f"went non-finite at step {verdict.diverged_at}" if verdict.diverged_at >= 0 else
               f"blew up: the training loss jumped from {_fmt(verdict.start_loss)} to {_fmt(verdict.peak_loss)} "
               f"({_fmt(loss_ratio(verdict.peak_loss, verdict.start_loss, reading.untrained))}x) and the run ended "
               f"at validation loss "
               f"{_fmt(verdict.val)} (untrained: {_fmt(reading.untrained)})")
        out.append(error(
            "train.divergence",
            f"within {steps} steps, training at the configured learning rate {verdict.lr:.3g} {how}.",
            f"Lower optim.lr (the range test suggests {_fmt(suggestion.lr)}); if it still diverges, add gradient "
            f"clipping (optim.clip_norm=1.0) and check the loss for log(0) or division by zero.",
            **evidence, first_nonfinite_step=verdict.diverged_at, start_loss=verdict.start_loss,
            peak_loss=verdict.peak_loss))
    if not reading.learns_at_all:
        out.append(info(
            "train.learning_rate",
            f"no learning rate in [{reading.lrs[0]:.3g}, {reading.lrs[-1]:.3g}] brought the validation loss clearly "
            f"below its untrained level {_fmt(reading.untrained)} in {steps} steps, so the range test cannot judge "
            f"optim.lr {verdict.lr:.3g}.",
            "The problem is not the learning rate: fix the data and model findings first (overfit_batch, controls).",
            **evidence))
        return out
    if verdict.direction is None:
        return out
    if verdict.direction == "high":
        blew_up = verdict.diverged_at >= 0 or verdict.exploded
        what = (f"the configured learning rate {verdict.lr:.3g} is too high: "
                + ("training at it blew up (see train.divergence)" if blew_up else
                   f"it reached validation loss {_fmt(verdict.val)} after {steps} steps, against "
                   f"{_fmt(reading.best_loss)} at the best LR {_fmt(reading.best_lr)}")
                + f"; it is {verdict.factor:.3g}x above the usable range {usable}")
    else:
        what = (f"the configured learning rate {verdict.lr:.3g} is too low: "
                + (f"the validation loss barely moved ({_fmt(reading.untrained)} -> {_fmt(verdict.val)}) in {steps} "
                   f"steps" if not verdict.learns else
                   f"it reached validation loss {_fmt(verdict.val)} after {steps} steps, against "
                   f"{_fmt(reading.best_loss)} at the best LR {_fmt(reading.best_lr)}")
                + f"; it is {verdict.factor:.3g}x below the usable range {usable}")
    make = error if verdict.severity == "error" else warning
    out.append(make("train.learning_rate", what + ".",
                    f"Set optim.lr={_fmt(suggestion.lr)} ({said}).",
                    **evidence, direction=verdict.direction, factor=verdict.factor))
    return out


# --------------------------------------------------------------------------------------------------------------
# Plot and run.


def draw(path: str, reading: GridReading, ramp: RampReading, verdict: Verdict, suggestion: Suggestion):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    finite = np.isfinite(reading.val)
    ax.plot(reading.lrs[finite], reading.val[finite], "o-", ms=3, label="grid: final validation loss")
    if (~finite).any():
        ymax = np.nanmax(reading.val[finite]) if finite.any() else 1.0
        ax.plot(reading.lrs[~finite], np.full((~finite).sum(), ymax), "x", color="crimson", label="grid: non-finite")
    stop = ramp.stop
    ax.plot(ramp.lrs[:stop], ramp.smoothed[:stop], "-", color="gray", alpha=0.8, label="ramp: smoothed train loss")
    ax.axhline(reading.untrained, color="gray", ls=":", lw=1, label="untrained")
    if reading.usable_low_lr is not None:
        ax.axvspan(reading.usable_low_lr, reading.usable_high_lr, color="green", alpha=0.08, label="usable range")
    marks = [(f"suggested ({suggestion.rule})", suggestion.lr, "green", "-"),
             ("valley", ramp.valley_lr, "purple", "--"),
             ("steepest", ramp.steepest_lr, "orange", "--"), ("configured", verdict.lr, "black", "-.")]
    for label, lr, color, ls in marks:
        if lr is not None and np.isfinite(lr):
            ax.axvline(lr, color=color, ls=ls, lw=1.2, label=f"{label} {lr:.2g}")
    values = np.concatenate([reading.val[finite], ramp.smoothed[:stop]])
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0:
        ax.set_yscale("log")
        ax.set_ylim(values.min() * 0.8, min(values.max(), 4 * reading.untrained) * 1.3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyse(result: SweepResult, plan: Plan, shared: dict
            ) -> tuple[RampReading, GridReading, Verdict, Suggestion]:
    """Everything the run reports, from the one program's result (pure host work, reused by the quality script)."""
    s = plan.settings
    ramp = read_ramp(result.loss[0], ramp_lrs(s), s.ema_beta, s.stop_factor)
    untrained = float(result.final_val_loss[plan.untrained_row])
    margin, _ = noise_margin(shared, untrained, s.relative_margin)
    rows = plan.grid_rows
    reading = read_grid(plan.grid_lrs, result.final_val_loss[rows], result.diverged[rows], untrained, margin)
    c = plan.configured_row
    verdict = judge_configured(reading, plan.configured_lr, float(result.final_val_loss[c]), result.loss[c],
                               int(result.first_nonfinite[c]))
    return ramp, reading, verdict, suggest(reading, ramp.valley_lr)


def run_program(ctx, settings: Settings, seed: int | None = None) -> tuple[Plan, SweepResult]:
    plan = make_plan(settings, ctx.optim.lr)
    seed = ctx.seed if seed is None else seed
    hparams = plan.hparams(seed, ctx.optim.weight_decay)
    return plan, ctx.train(NAME, ctx.spec(settings.grid_steps), hparams)


def run(ctx, settings: Settings) -> Outcome:
    plan, result = run_program(ctx, settings)
    ramp, reading, verdict, suggestion = analyse(result, plan, ctx.shared)
    _, margin_source = noise_margin(ctx.shared, reading.untrained, settings.relative_margin)
    steps = settings.grid_steps
    findings = findings_for(reading, verdict, ramp, suggestion, steps)
    metrics: dict[str, Any] = {
        f"{NAME}/suggested_lr": suggestion.lr,
        f"{NAME}/suggestion_rule": suggestion.rule,
        f"{NAME}/best_lr": reading.best_lr,
        f"{NAME}/best_val_loss": reading.best_loss,
        f"{NAME}/lowest_learning_lr": reading.lowest_learning_lr,
        f"{NAME}/usable_low_lr": reading.usable_low_lr,
        f"{NAME}/usable_high_lr": reading.usable_high_lr,
        f"{NAME}/divergence_lr": reading.divergence_lr,
        f"{NAME}/valley_lr": ramp.valley_lr,
        f"{NAME}/steepest_lr": ramp.steepest_lr,
        f"{NAME}/ramp_stop_lr": float(ramp.lrs[min(ramp.stop, len(ramp.lrs) - 1)]),
        f"{NAME}/grid_ratio_at_valley": suggestion.grid_ratio_at_valley,
        f"{NAME}/untrained_val_loss": reading.untrained,
        f"{NAME}/margin": reading.margin,
        f"{NAME}/margin_source": margin_source,
        f"{NAME}/configured_lr": verdict.lr,
        f"{NAME}/configured_val_loss": verdict.val,
        f"{NAME}/configured_progress": verdict.progress,
        f"{NAME}/configured_direction": verdict.direction or "ok",
    }
    grid = plan.grid_rows
    members = [
        {"lr": float(lr), "final_train_loss": float(tl), "final_val_loss": float(vl), "diverged": bool(d),
         "first_nonfinite_step": int(f)}
        for lr, tl, vl, d, f in zip(plan.grid_lrs, result.final_train_loss[grid], result.final_val_loss[grid],
                                    result.diverged[grid], result.first_nonfinite[grid])
    ]
    series = {
        f"{NAME}/ramp_lr": ramp.lrs.tolist(),
        f"{NAME}/ramp_loss": ramp.raw.tolist(),
        f"{NAME}/ramp_smoothed_loss": ramp.smoothed.tolist(),
        f"{NAME}/grid_lr": plan.grid_lrs.tolist(),
        f"{NAME}/grid_val_loss": result.final_val_loss[grid].tolist(),
        f"{NAME}/configured_loss": result.loss[plan.configured_row].tolist(),
    }
    plot = Plot("loss_vs_lr", "LR range test: loss vs learning rate",
                lambda path: draw(path, reading, ramp, verdict, suggestion))
    return Outcome(NAME, findings=findings, metrics=metrics, series=series, plots=[plot], members=members)
