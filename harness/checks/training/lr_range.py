"""The learning-rate range test: which learning rate suits the user's training run, and is the configured one in
the range where this model learns?

Technique: Leslie Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017, section 3.3, the
"LR range test"), popularised as fastai's ``lr_find``; the seeds' "Learning Rate Finder" (seeds 000/001) and
"loss explodes -> too high, barely moves -> too low" table (seeds 001/002).

One vmapped program (one request through ``ctx.train``, so one compile, merged across a collapsed sweep) trains,
for ``min(horizon, grid_steps)`` steps:

* the classic **ramp**: one member whose LR grows exponentially from ``min_lr`` to ``max_lr`` over the run. Its
  training loss, smoothed by a bias-corrected EMA and cut where it exceeds 4x its best (fastai, Smith), gives
  fastai's ``valley`` and torch-lr-finder's steepest-descent readings (:mod:`.curves`), shown beside ours;
* a **grid** of ``grid_size`` constant LRs log-spaced over the same span, whose final validation loss measures
  directly what the ramp only hints at. Its members cycle through ``GRID_SEEDS`` seeds (init and batch order);
* the **configured** optimizer LR, and an **untrained** member (LR 0) whose validation loss is the starting level.

**The horizon.** The best constant LR depends on how long one trains: short runs favour larger rates
(short-horizon bias, Wu et al. 2018, "Understanding Short-Horizon Bias in Stochastic Meta-Optimization"), so a
200-step test suggested rates 1.13-1.23x worse than the best for a 500-step run. The test is asked for the user's
own length: ``train.steps``, or ``train.epochs`` x training examples / batch size, else the suite's budget
(``diagnostics.seeds.steps``, 500), and every finding says which. Up to ``grid_steps`` (500) the grid trains the
horizon itself, so its best *is* the answer; a longer horizon costs no more: the grid trains ``grid_steps`` steps,
evaluated at five points of its run, and the trend of its best LR over them, ``lr* ~ t^b`` with b fitted and kept
in [-1, 0], carries the suggestion to the horizon (:func:`extrapolation_slope`, where the bounds and the power law
are argued). The configured LR is judged for the horizon as well: see :func:`judge_configured` (a small LR that
learns slowly is at most a warning, an error only when it does not learn within the horizon).

What the harness suggests, and why: **the grid's best, read through windows of neighbouring seeds**. The mean of
``GRID_SEEDS`` neighbouring members (one per seed) estimates the loss expected at that LR, and its minimum, refined
between grid points by a parabola in log LR, is the suggestion. With one seed for the whole grid (the rule before)
that seed's own luck picked the LR: on wine and breast_cancer (45 and 142 validation examples) different seeds'
best LRs differ by 3x. fastai's valley is reported only on a tie (``VALLEY_TOLERANCE``): it reads a ramp whose
every point carries the state left by earlier LRs, and on wine it sits at 5e-3 where the grid shows overfitting.

The usable range, read from the grid (``p(lr)`` = the fraction of the best log-improvement over the untrained
loss that ``lr`` achieved):

* lowest LR that learns: validation loss clearly below the untrained level (by the noise margin);
* usable low end: the lowest LR in the best LR's run with ``p >= 0.1`` — the low side is lenient because a short
  test understates what a small LR reaches in a full run (short-horizon bias again): "too low" means the loss
  barely moves;
* usable high end: the highest LR in that run keeping ``p >= 0.5``: a short run flatters high LRs, never low ones,
  so an LR that already lost half the log-improvement here is too high for any budget;
* divergence point: the first LR above the best whose member goes non-finite or ends no better than it started.

Noise: "clearly below" and "within noise" use two seed-to-seed standard deviations of the validation loss when the
seeds diagnostic ran first (``ctx.shared["seed_spread"]``, over the seed runs that trained: a configuration that
blows up has no noise floor: with ``optim.lr=3`` the blown-up runs' spread, a standard deviation of 22 to 140 on
a loss of 2.4, made this test "cannot judge" exactly when a learning rate was needed), else ``relative_margin`` of
the untrained loss. 2%: on the
reference and regression jobs two seed-to-seed standard deviations of the validation loss (Adam 1e-3, 200 steps,
3 seeds) are 0.9% of the untrained loss; the tiny wine and breast_cancer validation sets (45 and 142 examples) are
noisier (4-6%), which is where the seeds diagnostic's measured spread takes over.

How well this suggests (``scripts/lr_quality.py``: validation loss at the suggested LR over held-out seeds,
divided by the best of a fine grid of fixed LRs, beside fastai's valley and the steepest slope), for horizons past
``grid_steps`` too, and what ``grid_steps`` costs: README, "Diagnosis quality", LR suggestions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from harness.checks.base import Outcome, Plot
from harness.checks.training import curves
from harness.engine.table import Request
from harness.engine.core import Hparams
from harness.engine.driver import SweepResult
from harness.errors import HarnessError
from harness.findings import Finding, error, info, warning

NAME = "lr_range"
# Thresholds on p(lr), the fraction of the best log-improvement an LR achieves (see module docstring).
LOW_PROGRESS = 0.1  # below this a lower LR "barely moves" (seeds 001/002): too low
HIGH_PROGRESS = 0.5  # above the best LR, losing half of the log-improvement is too high
# A configured run whose smoothed training loss peaks above this multiple of its initial loss exploded (the same
# 4x that stops fastai's and Smith's ramp).
EXPLODE_FACTOR = 4.0
# The ramp's valley is reported only when the grid cannot tell it from its best (a tie: both memorized their data
# to a loss of 0, say), as the safer of equals. Any looser tolerance costs what it allows: with the grid trained
# for the user's horizon, its best is a direct measurement of the quantity the user cares about, and a tolerance
# of 1.1 (this module's rule before) put the suggestion up to 10% worse on purpose (scripts/lr_quality.py).
VALLEY_TOLERANCE = 1.0
# The grid's members cycle through this many seeds (init and batch order: seed, seed+1, seed+2, seed, ...), and the
# grid is read through windows of as many neighbouring LRs, so every window holds one run of each seed: one seed's
# luck (a good or bad init, an easy batch order) weighs on every window alike instead of picking the best LR. One
# seed for the whole grid let that seed's own optimum stand for the job's. Replayed on recorded 500-step runs and
# scored on held-out seeds, one seed vs interleaved: wine 1.12x vs 1.01x the best, breast_cancer 1.09x vs 1.01x,
# regression 1.05x vs 1.04x, digits 1.03x vs 1.07x (its noise is 6%), at the same cost. Windows of 5, 6 or 9
# were no better overall (wider ones average across wine's narrow optimum).
GRID_SEEDS = 3
# Evaluations over the grid's run when the horizon is longer than the grid trains: at 1/5, 2/5, ... of it; the
# best LR at each gives the trend that is extrapolated to the horizon (see extrapolation_slope()).
CHECKPOINTS = 5
# The extrapolation's exponent b in lr*(t) ~ t^b is kept in [-1, 0]: -1 is the small-LR limit, where training
# follows gradient flow and depends on lr x t only, so the best LR cannot fall faster than 1/t; 0 is a best LR
# set by stability, which more steps do not move; a best LR that grew over the measured run is not extrapolated
# upward (never suggest a rate the grid did not see work).
SLOPE_RANGE = (-1.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Settings:
    min_lr: float = 1e-5
    max_lr: float = 1.0
    grid_size: int = 32
    grid_steps: int = 500
    ema_beta: float = 0.98
    stop_factor: float = 4.0
    relative_margin: float = 0.02
    horizon: int | None = None  # the user's training steps (train.steps)
    horizon_epochs: float | None = None  # or epochs (train.epochs)
    default_horizon: int = 500  # neither given: the suite's budget (diagnostics.seeds.steps)
    refine: bool = True  # a second round of fresh seeds at the LRs around the grid's best (:func:`refinement`)
    refine_span: int = 3  # ... that many grid points on each side of it

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
        if self.refine_span < 1:
            raise HarnessError(f"must be at least 1, got {self.refine_span}", key=f"{key}.refine_span")
        for name in ("horizon", "horizon_epochs", "default_horizon"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise HarnessError(f"must be positive, got {value}", key=f"{key}.{name}")


# --------------------------------------------------------------------------------------------------------------
# The horizon: how long the user trains.


@dataclasses.dataclass(frozen=True)
class Horizon:
    """The user's training length in optimizer steps (``steps``), where it came from, and how many steps the grid
    trains (``trained`` = min(steps, grid_steps), at least 20 for the ramp's rules)."""

    steps: int
    source: str  # "train.steps", "train.epochs" or "default"
    trained: int
    epochs: float | None = None

    @property
    def extrapolated(self) -> bool:
        return self.steps > self.trained

    def describe(self) -> str:
        if self.source == "train.steps":
            return f"your {self.steps:,}-step run (train.steps)"
        if self.source == "train.epochs":
            return f"your {self.steps:,}-step run (train.epochs={self.epochs:g})"
        return (f"a {self.steps:,}-step run (the suite's budget; set train.steps or train.epochs to your run's "
                f"length)")


def resolve_horizon(settings: Settings, num_train: int, batch_size: int) -> Horizon:
    """``train.steps``, else ``train.epochs`` x (training examples / batch size) steps (an epoch is that many
    minibatches; the engine draws them with replacement), else the suite's budget."""
    if settings.horizon is not None:
        steps, source = int(settings.horizon), "train.steps"
    elif settings.horizon_epochs is not None:
        steps = max(1, math.ceil(settings.horizon_epochs * num_train / max(batch_size, 1)))
        source = "train.epochs"
    else:
        steps, source = int(settings.default_horizon), "default"
    trained = min(max(steps, 20), settings.grid_steps)
    return Horizon(steps, source, trained, settings.horizon_epochs if source == "train.epochs" else None)


# --------------------------------------------------------------------------------------------------------------
# The members of the one program.


@dataclasses.dataclass(frozen=True)
class Plan:
    """Member layout: row 0 the ramp, rows 1..grid_size the grid, then the configured LR, then LR 0."""

    grid_lrs: np.ndarray
    configured_lr: float
    settings: Settings
    horizon: Horizon | None = None

    @property
    def grid_rows(self) -> slice:
        return slice(1, 1 + len(self.grid_lrs))

    @property
    def configured_row(self) -> int:
        return 1 + len(self.grid_lrs)

    @property
    def untrained_row(self) -> int:
        return 2 + len(self.grid_lrs)

    @property
    def steps(self) -> int:
        """How many steps every member trains."""
        return self.horizon.trained if self.horizon is not None else self.settings.grid_steps

    @property
    def eval_every(self) -> int:
        """Evaluations inside the run, only when the horizon is longer than the grid trains (extrapolation)."""
        if self.horizon is None or not self.horizon.extrapolated:
            return 0
        return max(self.steps // CHECKPOINTS, 1)

    def grid_seed_offsets(self) -> np.ndarray:
        return np.arange(len(self.grid_lrs)) % GRID_SEEDS

    def hparams(self, seed: int, weight_decay: float) -> Hparams:
        s = self.settings
        lr = np.concatenate([[s.min_lr], self.grid_lrs, [self.configured_lr, 0.0]])
        growth = np.zeros(len(lr))
        growth[0] = math.log(s.max_lr / s.min_lr)  # lr_t = min_lr * (max/min)^(t/(steps-1)): min_lr -> max_lr
        seeds = seed + np.concatenate([[0], self.grid_seed_offsets(), [0, 0]])
        return Hparams.make(lr=lr, lr_growth=growth, weight_decay=weight_decay, init_seed=seeds, data_seed=seeds)


def make_plan(settings: Settings, configured_lr: float, horizon: Horizon | None = None) -> Plan:
    grid = np.geomspace(settings.min_lr, settings.max_lr, settings.grid_size)
    return Plan(grid, float(configured_lr), settings, horizon)


def ramp_lrs(settings: Settings, steps: int | None = None) -> np.ndarray:
    """The ramp's LR at each of its ``steps`` (default ``grid_steps``) steps (what the engine computes in-graph)."""
    steps = settings.grid_steps if steps is None else steps
    t = np.arange(steps) / max(steps - 1, 1)
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
    smoothed: np.ndarray | None = None  # the window means the best is read from
    refined_lr: float | None = None  # the best LR between grid points (a parabola through the smoothed minimum)

    @property
    def best_lr(self) -> float | None:
        return None if self.best_index is None else float(self.lrs[self.best_index])

    @property
    def best_loss(self) -> float:
        if self.best_index is None:
            return float("nan")
        if self.smoothed is not None and np.isfinite(self.smoothed[self.best_index]):
            return float(self.smoothed[self.best_index])
        return float(self.val[self.best_index])

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


def window_mean(values, width: int = GRID_SEEDS) -> np.ndarray:
    """The mean of each run of ``width`` neighbouring grid members (centred; an even width leans low), inf where
    one of them went non-finite: with the seeds interleaved every window holds one member per seed, so it
    estimates the loss expected at that LR, averaged over seeds, which is what the user's run will see (an LR
    where one seed in three blows up is not a good LR). Windows cut by the grid's ends are inf: they would hold
    fewer seeds."""
    v = np.asarray(values, dtype=np.float64)
    out = np.full(len(v), np.inf)
    lo = (width - 1) // 2
    for i in range(len(v)):
        a, b = i - lo, i - lo + width
        if a < 0 or b > len(v):
            continue
        window = v[a:b]
        if np.isfinite(window).all():
            out[i] = window.mean()
    return out


def refine_minimum(lrs, smoothed, i: int) -> float:
    """The LR at the vertex of the parabola through the smoothed values at ``i`` and its neighbours, in log LR
    (the standard sub-grid refinement of a sampled minimum), kept within half a grid step of ``lrs[i]``; the grid
    point itself when the neighbours are missing or the three points are not convex."""
    lrs = np.asarray(lrs, dtype=np.float64)
    if not 0 < i < len(lrs) - 1 or not np.isfinite(smoothed[i - 1: i + 2]).all():
        return float(lrs[i])
    y0, y1, y2 = (float(x) for x in smoothed[i - 1: i + 2])
    curvature = y0 - 2 * y1 + y2
    if curvature <= 0:
        return float(lrs[i])
    offset = float(np.clip(0.5 * (y0 - y2) / curvature, -0.5, 0.5))  # in grid steps
    step = math.log(lrs[i + 1] / lrs[i])
    return float(lrs[i] * math.exp(offset * step))


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


def read_grid(lrs, val, diverged, untrained: float, margin: float, window: int = 1) -> GridReading:
    """The usable range and the best LR from the grid's final validation losses. ``window``: how many neighbouring
    members the best is read through (:func:`window_mean`; the grid's seed count). With 1 (one seed), the running
    median of three, so one noisy member can neither make nor move the minimum."""
    lrs = np.asarray(lrs, dtype=np.float64)
    val = np.where(np.asarray(diverged) | ~np.isfinite(val), np.inf, np.asarray(val, dtype=np.float64))
    learns = val < untrained - margin
    if not learns.any():
        nothing = np.full(len(lrs), -np.inf)
        return GridReading(lrs, val, untrained, margin, None, nothing, None, None, None, None)
    smooth = window_mean(val, window) if window > 1 else running_median3(val)
    # The best: the lowest window whose every member learns. Only when no window qualifies, a member whose window
    # holds nothing but learners and diverged members (a narrow band where some seeds already blow up) is a best.
    # A learner beside finite members that did not learn is not: on a flat landscape (labels with no signal) one
    # member in many passes the margin by chance, and reading it as the best invents a "best LR".
    def windowed(flags):
        return np.array([flags[max(0, i - (window - 1) // 2): i - (window - 1) // 2 + window].all()
                         if window > 1 else flags[i] for i in range(len(lrs))])

    whole = windowed(learns)
    candidates = np.where(whole & np.isfinite(smooth), smooth, np.inf)
    if not np.isfinite(candidates).any():
        smooth = running_median3(val)
        candidates = np.where(learns & windowed(learns | ~np.isfinite(val)), smooth, np.inf)
    if not np.isfinite(candidates).any():
        nothing = np.full(len(lrs), -np.inf)
        return GridReading(lrs, val, untrained, margin, None, nothing, None, None, None, None)
    best = int(np.argmin(candidates))
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
        smoothed=smooth, refined_lr=refine_minimum(lrs, candidates, best),
    )


@dataclasses.dataclass(frozen=True)
class Refinement:
    """The second round: fresh seeds at the grid's LRs around its best. ``grid_index[i]``: the grid point member i
    trained at; ``val``/``diverged``: its final validation loss and whether it went non-finite."""

    grid_index: np.ndarray
    val: np.ndarray
    diverged: np.ndarray

    @property
    def runs_per_lr(self) -> int:
        return int(np.bincount(self.grid_index).max()) if len(self.grid_index) else 0


def refinement_hparams(plan: Plan, reading: GridReading, seed: int, weight_decay: float, width: int | None = None
                       ) -> tuple[Hparams, np.ndarray] | None:
    """Members for the second round, or None when there is nothing to refine: the grid points within
    ``refine_span`` of the grid's best, cycled with fresh seeds (``seed + GRID_SEEDS`` on: the grid used the first
    ``GRID_SEEDS``) to as many members as the first round had (35 by default: 7 LRs x 5 seeds), rounded up to whole
    calls of ``width`` members, the call width of the program that trained the first round, which is reused."""
    s = plan.settings
    if not s.refine or not reading.learns_at_all:
        return None
    b = reading.best_index
    index = np.arange(max(0, b - s.refine_span), min(len(plan.grid_lrs), b + s.refine_span + 1))
    rows = len(plan.hparams(seed, weight_decay))
    if width:
        rows = -(-rows // width) * width
    k = np.arange(rows)
    where = index[k % len(index)]
    seeds = seed + GRID_SEEDS + k // len(index)
    return Hparams.make(lr=plan.grid_lrs[where], weight_decay=weight_decay, init_seed=seeds, data_seed=seeds), where


def refine_reading(reading: GridReading, refinement: Refinement) -> GridReading:
    """The best read again where the second round trained: each refined LR's mean over every run there (the grid's
    own member and the fresh seeds; inf if any went non-finite), averaged over three neighbouring LRs as the grid
    is, and refined between grid points. Elsewhere the grid's own reading stands (its usable range included).

    Why: one run's validation loss scatters by 40% on wine (45 validation examples); three runs per window put the
    grid's best 1.5-2.7x away from the best of 32 seeds, which a 500-step run pays for with 1.1x the loss. A second
    program of the same shape (no compile) puts its runs where the choice is made: 18 runs per window instead of 3
    (successive halving's idea, Jamieson & Talwalkar 2016: spend the budget on the candidates still in the race)."""
    nb = np.unique(refinement.grid_index)
    runs = []
    for i in nb:
        mine = refinement.val[refinement.grid_index == i]
        bad = refinement.diverged[refinement.grid_index == i] | ~np.isfinite(mine)
        values = np.concatenate([[reading.val[i]], np.where(bad, np.inf, mine)])
        runs.append(values.mean() if np.isfinite(values).all() else np.inf)
    per_lr = np.asarray(runs, np.float64)
    local = np.full(len(nb), np.inf)
    for j in range(1, len(nb) - 1):
        if nb[j + 1] - nb[j - 1] == 2 and np.isfinite(per_lr[j - 1: j + 2]).all():
            local[j] = per_lr[j - 1: j + 2].mean()
    if not np.isfinite(local).any():
        return reading
    j = int(np.argmin(local))
    smoothed = np.array(reading.smoothed if reading.smoothed is not None else reading.val, np.float64)
    smoothed[nb[np.isfinite(local)]] = local[np.isfinite(local)]
    return dataclasses.replace(reading, best_index=int(nb[j]), smoothed=smoothed,
                               refined_lr=refine_minimum(reading.lrs[nb], local, j))


def grid_loss_at(reading: GridReading, lr: float | None) -> float:
    """The grid's loss at ``lr`` as its best is read (the smoothed curve, else the raw one), interpolated linearly in
    log LR (NaN outside the grid)."""
    if lr is None or not (reading.lrs[0] <= lr <= reading.lrs[-1]):
        return float("nan")
    curve = reading.smoothed if reading.smoothed is not None else reading.val
    finite = np.isfinite(curve)
    if finite.sum() < 2:
        return float("nan")
    return float(np.interp(np.log(lr), np.log(reading.lrs[finite]), curve[finite]))


@dataclasses.dataclass(frozen=True)
class Suggestion:
    lr: float | None
    rule: str  # "valley" (the ramp's valley, tied with the grid's best), "grid_best", or "grid_best_extrapolated"
    grid_ratio_at_valley: float  # the grid's loss at the valley LR over the grid's best (NaN if unknown)
    measured_lr: float | None = None  # the suggestion for the grid's own length (before extrapolation)
    slope: float = 0.0  # b in lr*(t) ~ t^b, carrying measured_lr to the horizon (0: not extrapolated)
    horizon: int | None = None  # the run length it is for
    trained: int | None = None  # the steps the grid trained
    runs_near_best: int = 1  # runs at each LR around the best (1 + the second round's, :func:`refine_reading`)


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
    """The reported LR for the grid's own length: the grid's best, between grid points (:func:`refine_minimum`);
    fastai's valley only when the grid cannot tell it from that best (``VALLEY_TOLERANCE``), as the safer of
    equals. See the module docstring for why."""
    if not reading.learns_at_all:
        return Suggestion(None, "none", float("nan"))
    ratio = loss_ratio(grid_loss_at(reading, valley_lr), reading.best_loss, reading.untrained)
    if valley_lr is not None and ratio <= VALLEY_TOLERANCE:
        return Suggestion(float(valley_lr), "valley", ratio, measured_lr=float(valley_lr))
    best = reading.refined_lr if reading.refined_lr is not None else reading.best_lr
    return Suggestion(best, "grid_best", ratio, measured_lr=best)


def best_over_time(result: SweepResult, plan: Plan, margin: float) -> list[tuple[int, float]]:
    """The grid's best LR (refined between grid points) at each evaluation of its run: (step, LR) pairs, for the
    evaluations at which some LR learns. A member counts as diverged from the step it went non-finite."""
    rows = plan.grid_rows
    first_bad = np.asarray(result.first_nonfinite[rows])
    out = []
    for k, t in enumerate(np.asarray(result.eval_steps)):
        untrained = float(result.val_loss[plan.untrained_row, k])
        diverged = (first_bad >= 0) & (first_bad < t)
        reading = read_grid(plan.grid_lrs, result.val_loss[rows, k], diverged, untrained, margin, GRID_SEEDS)
        if reading.learns_at_all:
            out.append((int(t), float(reading.refined_lr)))
    return out


def extrapolation_slope(points: list[tuple[int, float]], trained: int) -> float:
    """The exponent b of ``lr*(t) ~ t^b``: a least-squares line through (log t, log lr*) over the evaluations after
    the first fifth of the grid's run (the first is still in the initial transient, where the best LR can move
    either way: on the regression job it rises from 100 to 200 steps, then stays), clipped to ``SLOPE_RANGE``.
    0 when fewer than two evaluations learned.

    Why a power law: the best constant LR falls with the training horizon (short-horizon bias, Wu et al. 2018),
    and measured across horizons it follows ``lr* ~ T^b`` (Bjorck et al. 2024, "Scaling Optimal LR Across Token
    Horizons"); the grid measures b on the user's own job instead of assuming it. On the small jobs here it
    ranges from about -1 (wine: the best run stops at a fixed amount of training, lr x t, because more overfits)
    to 0 (regression)."""
    late = [(t, lr) for t, lr in points if t > trained / CHECKPOINTS and lr > 0]
    if len(late) < 2:
        return 0.0
    t, lr = np.log([p[0] for p in late]), np.log([p[1] for p in late])
    if np.ptp(t) == 0:
        return 0.0
    slope = float(np.polyfit(t, lr, 1)[0])
    return float(np.clip(slope, *SLOPE_RANGE))


def for_horizon(suggestion: Suggestion, horizon: Horizon | None, slope: float) -> Suggestion:
    """The suggestion carried from the grid's length to the horizon: ``lr (horizon / trained)^b``."""
    if horizon is None:
        return suggestion
    if suggestion.lr is None or not horizon.extrapolated:
        return dataclasses.replace(suggestion, horizon=horizon.steps, trained=horizon.trained)
    lr = suggestion.lr * (horizon.steps / horizon.trained) ** slope
    rule = suggestion.rule + "_extrapolated" if slope != 0 else suggestion.rule
    return dataclasses.replace(suggestion, lr=float(lr), rule=rule, slope=slope, horizon=horizon.steps,
                               trained=horizon.trained)


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
    learns: bool  # within the steps the grid trained
    progress: float
    direction: str | None
    severity: str | None  # 'error', 'warning' or None
    factor: float  # how far outside the usable range (>= 1)
    start_loss: float = float("nan")  # first training loss
    peak_loss: float = float("nan")  # highest smoothed training loss
    equivalent_lr: float = float("nan")  # the LR that goes as far in the grid's steps as lr in the horizon's
    learns_within_horizon: bool = False
    overfits: bool = False  # validation did not improve, but the training loss fell: fits faster than generalizes


def judge_configured(reading: GridReading, lr: float, val: float, train_loss, diverged_at: int,
                     beta: float = 0.98, horizon: Horizon | None = None, fits_training: bool = False) -> Verdict:
    """Where the configured LR sits for the horizon. High: judged on the grid's run (a short run flatters high
    LRs, so one that blew up or lost half the improvement there is too high for any longer run). An error when it
    blew up, or when neither the validation nor the training loss improved; a run above the best LR whose
    training loss fell (``fits_training``) while its validation loss did not is a warning: training works as
    configured, it overfits within the horizon (a small language model at Adam 3e-3). Low: an *error* only when it
    does not learn within the horizon; learning slowly is at most a warning.

    When the horizon is longer than the grid's run, a small LR is judged by the LR that goes as far in the grid's
    steps: ``lr x horizon / trained``. Small steps follow gradient flow, whose progress depends on lr x t only
    (Li, Tai & E 2017, "Stochastic Modified Equations"; for Adam and RMSprop, Malladi et al. 2022, "On the SDEs
    and Scaling Rules for Adaptive Gradient Algorithms"), so 1e-4 for 10,000 steps goes about as far as 2e-3 for
    500. Above the best LR that stops holding, but there the LR learns anyway."""
    train_loss = np.asarray(train_loss, dtype=np.float64)
    finite = train_loss[np.isfinite(train_loss)]
    learns = bool(diverged_at < 0 and np.isfinite(val) and val < reading.untrained - reading.margin)
    progress = float(log_progress([val], reading.untrained, reading.best_loss)[0]) if reading.learns_at_all \
        else float("nan")
    start = float(finite[0]) if finite.size else float("nan")
    peak = float(np.nanmax(curves.ema(finite, 0.9))) if finite.size else float("nan")  # short EMA: a few steps
    exploded = bool(diverged_at >= 0 or (peak > EXPLODE_FACTOR * start and not progress >= HIGH_PROGRESS))
    scale = horizon.steps / horizon.trained if horizon is not None and horizon.extrapolated else 1.0
    equivalent = lr * scale
    within = learns or bool(reading.learns_at_all and scale > 1 and diverged_at < 0 and not exploded
                            and equivalent >= reading.lowest_learning_lr)
    direction, severity, factor = None, None, 1.0
    overfits = False
    if reading.learns_at_all:
        best = reading.best_lr
        if diverged_at >= 0 or exploded:
            direction, severity = "high", "error"
        elif not learns and lr > best:
            overfits = bool(fits_training)
            direction, severity = "high", "warning" if overfits else "error"
        elif not within:
            direction, severity = "low", "error"
        elif lr > reading.usable_high_lr:
            direction, severity = "high", "warning"
        elif equivalent < reading.usable_low_lr:
            direction, severity = "low", "warning"
        if direction == "high":
            factor = lr / reading.usable_high_lr
        elif direction == "low":
            factor = reading.usable_low_lr / equivalent
    elif diverged_at >= 0 or exploded:
        direction, severity = "high", "error"
    return Verdict(lr, float(val), int(diverged_at), exploded, learns, progress, direction, severity,
                   max(float(factor), 1.0), start, peak, float(equivalent), bool(within), overfits)


# A chain whose steps do not get through. Judged at the grid's highest LR that stayed finite, when no LR learns:
# its first step shorter than this fraction of plain SGD's (lr x |g|) -- SGD, momentum and clipping at a sane norm
# give 1 or a modest fraction, Adam lr x sqrt(params) -- AND the whole run moving the weights by less than
# ``STALLED_PATH`` (1%) of their norm (a huge gradient clipped to 1.0 still moves them: 500 steps of lr 1).
# Together they mean the optimizer, not the model or the data, keeps the weights where they started.
STALLED_SHRINK = 1e-2
STALLED_PATH = 1e-2


@dataclasses.dataclass(frozen=True)
class Stall:
    """How far the optimizer moved the weights at the grid's highest finite LR."""

    lr: float
    grad_norm: float  # |g| at the first step
    first_step: float  # |update| of the first step
    shrink: float  # first_step / (lr |g|): 1 for plain SGD
    path: float  # sum of |update| over the run / |params| at init
    steps: int


def stalled(result: SweepResult, plan: Plan) -> Stall | None:
    """The optimizer's steps at the grid's highest LR that stayed finite, when they are too small to move the
    weights (``STALLED_SHRINK`` and ``STALLED_PATH``); None otherwise, or when the engine did not record them."""
    if result.update_norm is None or result.param_norm is None:
        return None
    rows = np.arange(len(result.loss))[plan.grid_rows]
    finite = rows[~result.diverged[rows]]
    if not finite.size:
        return None
    i = int(finite[np.argmax(plan.grid_lrs[finite - rows[0]])])
    lr, g0, u = float(result.lr[i, 0]), float(result.grad_norm[i, 0]), np.asarray(result.update_norm[i], np.float64)
    p0 = float(result.param_norm[i, 0])
    if not (np.isfinite(g0) and g0 > 0 and lr > 0 and np.isfinite(p0) and p0 > 0 and np.isfinite(u[0])):
        return None  # no gradient to shrink (dead units, a detached output): the model checks name it
    shrink, path = float(u[0]) / (lr * g0), float(np.nansum(u)) / p0
    if shrink >= STALLED_SHRINK or path >= STALLED_PATH:
        return None
    return Stall(lr, g0, float(u[0]), shrink, path, int(np.isfinite(u).sum()))


def stall_finding(stall: Stall, configured_lr: float, clip_norm: float | None, evidence: dict) -> Finding:
    """The error for a chain whose steps do not get through, with the clip threshold named when it is the cap."""
    what = (f"the optimizer barely moves the weights: at lr {stall.lr:.3g}, the grid's highest, its first step was "
            f"{stall.first_step:.3g} long, {stall.shrink:.2g}x the plain gradient step lr x |g| = "
            f"{stall.lr * stall.grad_norm:.3g}, and {stall.steps} steps moved the weights by {stall.path:.2g} of their "
            f"norm. No learning rate learns because no step gets through, so optim.lr {configured_lr:.3g} is "
            f"effectively {stall.shrink:.2g}x smaller.")
    if clip_norm is not None and clip_norm < stall.grad_norm:
        fix = (f"optim.clip_norm={clip_norm:.3g} caps every step at lr x {clip_norm:.3g}, against a gradient norm of "
               f"{stall.grad_norm:.3g} at init: raise it (1.0 is usual; clip only the rare spikes) or remove it.")
    else:
        fix = ("Something in the optimizer chain scales the updates down (a clip by norm or value far below the "
               "gradient, a scale_by with a tiny factor, a mask): print the chain's update for one step and compare "
               "it with lr x gradient.")
    return error("train.learning_rate", what, fix, **evidence, stall_lr=stall.lr, stall_grad_norm=stall.grad_norm,
                 stall_first_step=stall.first_step, stall_shrink=stall.shrink, stall_path=stall.path,
                 clip_norm=clip_norm)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3g}"


def how_suggested(suggestion: Suggestion, grid_size: int) -> str:
    """Where the suggested LR comes from, in words."""
    trained = suggestion.trained
    if suggestion.rule.startswith("valley"):
        measured = "fastai's valley on the ramp, as good as the grid's best"
    else:
        measured = (f"the best of {grid_size} learning rates each trained {trained} steps, over {GRID_SEEDS} seeds"
                    if trained else f"the best of the grid's {grid_size} learning rates")
        if suggestion.runs_near_best > 1:
            measured += f" ({suggestion.runs_near_best} runs at each LR near the best)"
    if suggestion.rule.endswith("_extrapolated"):
        return (f"{measured} ({_fmt(suggestion.measured_lr)}), carried to {suggestion.horizon:,} steps along the "
                f"trend of the grid's best LR over its run, lr ~ steps^{suggestion.slope:.2f}")
    return measured


def findings_for(reading: GridReading, verdict: Verdict, ramp: RampReading, suggestion: Suggestion,
                 steps: int, horizon: Horizon | None = None, stall: Stall | None = None,
                 clip_norm: float | None = None) -> list:
    """The findings. ``steps``: how long every member trained; ``horizon``: the run the suggestion is for;
    ``stall``: when no LR learns, the optimizer's steps were too small to move the weights (:func:`stalled`)."""
    out = []
    grid_size = len(reading.lrs)
    said = how_suggested(suggestion, grid_size)
    run = horizon.describe() if horizon is not None else f"a {steps}-step run"
    usable = f"[{_fmt(reading.usable_low_lr)}, {_fmt(reading.usable_high_lr)}]"
    evidence = dict(configured_lr=verdict.lr, configured_val_loss=verdict.val, untrained_val_loss=reading.untrained,
                    best_lr=reading.best_lr, best_val_loss=reading.best_loss, suggested_lr=suggestion.lr,
                    suggestion_rule=suggestion.rule, measured_lr=suggestion.measured_lr,
                    lr_slope=suggestion.slope,
                    usable_low_lr=reading.usable_low_lr, usable_high_lr=reading.usable_high_lr,
                    lowest_learning_lr=reading.lowest_learning_lr, divergence_lr=reading.divergence_lr,
                    valley_lr=ramp.valley_lr, steepest_lr=ramp.steepest_lr, margin=reading.margin, steps=steps,
                    horizon_steps=horizon.steps if horizon is not None else steps,
                    horizon_source=horizon.source if horizon is not None else "grid")
    fix = f"Set optim.lr={_fmt(suggestion.lr)}: {said}, for {run}."
    if verdict.diverged_at >= 0 or verdict.exploded:
        how = (f"went non-finite at step {verdict.diverged_at}" if verdict.diverged_at >= 0 else
               f"blew up: the training loss jumped from {_fmt(verdict.start_loss)} to {_fmt(verdict.peak_loss)} "
               f"({_fmt(loss_ratio(verdict.peak_loss, verdict.start_loss, reading.untrained))}x) and the run ended "
               f"at validation loss "
               f"{_fmt(verdict.val)} (untrained: {_fmt(reading.untrained)})")
        lower = (f"Lower optim.lr: the range test suggests {_fmt(suggestion.lr)} for {run}." if suggestion.lr else
                 "Lower optim.lr.")
        out.append(error(
            "train.divergence",
            f"within {steps} steps, training at the configured learning rate {verdict.lr:.3g} {how}.",
            f"{lower} If it still diverges, add gradient clipping (optim.clip_norm=1.0) and check the loss for "
            f"log(0) or division by zero.",
            **evidence, first_nonfinite_step=verdict.diverged_at, start_loss=verdict.start_loss,
            peak_loss=verdict.peak_loss))
    if not reading.learns_at_all and stall is not None:
        out.append(stall_finding(stall, verdict.lr, clip_norm, evidence))
        return out
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
    longer = horizon is not None and horizon.extrapolated
    if verdict.direction == "high":
        blew_up = verdict.diverged_at >= 0 or verdict.exploded
        what = (f"the configured learning rate {verdict.lr:.3g} is too high: "
                + ("training at it blew up (see train.divergence)" if blew_up else
                   f"it reached validation loss {_fmt(verdict.val)} after {steps} steps, against "
                   f"{_fmt(reading.best_loss)} at the best LR {_fmt(reading.best_lr)}")
                + f"; it is {verdict.factor:.3g}x above the usable range {usable}")
        if verdict.overfits:
            what = (f"the configured learning rate {verdict.lr:.3g} is high for {run}: its training loss fell, but "
                    f"its validation loss ended at {_fmt(verdict.val)} after {steps} steps, against "
                    f"{_fmt(reading.best_loss)} at the best LR {_fmt(reading.best_lr)}: at this LR the model fits "
                    f"the training set faster than it generalizes; it is {verdict.factor:.3g}x above the usable "
                    f"range {usable}")
    elif verdict.severity == "error":
        what = (f"the configured learning rate {verdict.lr:.3g} is too low: it does not learn within {run}: the "
                f"validation loss barely moved ({_fmt(reading.untrained)} -> {_fmt(verdict.val)}) in {steps} steps")
        if longer:
            what += (f", and the whole run goes about as far as {_fmt(verdict.equivalent_lr)} does in {steps} "
                     f"steps (small steps depend on lr x steps only), which does not learn either")
        what += f"; it is {verdict.factor:.3g}x below the usable range {usable}"
    else:
        what = (f"the configured learning rate {verdict.lr:.3g} is low for {run}: it learns, but slowly: "
                + (f"the whole run goes about as far as {_fmt(verdict.equivalent_lr)} does in {steps} steps (small "
                   f"steps depend on lr x steps only), " if longer else
                   f"it reached validation loss {_fmt(verdict.val)} after {steps} steps, against "
                   f"{_fmt(reading.best_loss)} at the best LR {_fmt(reading.best_lr)}; ")
                + f"{verdict.factor:.3g}x below the usable range {usable}")
    make = error if verdict.severity == "error" else warning
    out.append(make("train.learning_rate", what + ".", fix,
                    **evidence, direction=verdict.direction, factor=verdict.factor, overfits=verdict.overfits,
                    equivalent_lr=verdict.equivalent_lr))
    return out


# --------------------------------------------------------------------------------------------------------------
# Plot and run.


def draw(path: str, reading: GridReading, ramp: RampReading, verdict: Verdict, suggestion: Suggestion):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    finite = np.isfinite(reading.val)
    ax.plot(reading.lrs[finite], reading.val[finite], "o", ms=3, alpha=0.6, label="grid: final validation loss")
    if reading.smoothed is not None:
        smooth = np.isfinite(reading.smoothed)
        ax.plot(reading.lrs[smooth], reading.smoothed[smooth], "-", color="C0",
                label="grid: mean of neighbouring seeds")
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
    ax.set_title(f"LR range test ({len(ramp.lrs)} steps per member" + (
        f"; suggestion for {suggestion.horizon:,} steps)" if suggestion.horizon else ")"))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyse(result: SweepResult, plan: Plan, shared: dict, refinement: Refinement | None = None
            ) -> tuple[RampReading, GridReading, Verdict, Suggestion]:
    """Everything the run reports, from the program's result and the second round's, if it ran (pure host work,
    reused by the quality script)."""
    s = plan.settings
    ramp = read_ramp(result.loss[0], ramp_lrs(s, result.loss.shape[1]), s.ema_beta, s.stop_factor)
    untrained = float(result.final_val_loss[plan.untrained_row])
    # Learning the label frequencies is not learning from the inputs: when the controls ran, an LR learns only
    # below what training on constant inputs reaches (with shuffled labels every LR only fits the prior, and a
    # nearly flat landscape must not call the configured LR "too high").
    constant = shared.get("constant_input_val_loss") if shared is not None else None
    if constant is not None and np.isfinite(constant):
        untrained = min(untrained, float(constant))
    margin, _ = noise_margin(shared, untrained, s.relative_margin)
    rows = plan.grid_rows
    window = GRID_SEEDS if len(set(plan.grid_seed_offsets())) > 1 else 1
    reading = read_grid(plan.grid_lrs, result.final_val_loss[rows], result.diverged[rows], untrained, margin, window)
    if refinement is not None and reading.learns_at_all:
        reading = refine_reading(reading, refinement)
    c = plan.configured_row
    # The training side: the configured run's loss on a fixed training subset against the untrained member's.
    train_c, train_0 = float(result.final_train_loss[c]), float(result.final_train_loss[plan.untrained_row])
    fits = bool(np.isfinite(train_c) and np.isfinite(train_0) and train_c < train_0 - margin)
    verdict = judge_configured(reading, plan.configured_lr, float(result.final_val_loss[c]), result.loss[c],
                               int(result.first_nonfinite[c]), horizon=plan.horizon, fits_training=fits)
    suggestion = suggest(reading, ramp.valley_lr)
    slope = 0.0
    if plan.horizon is not None and plan.horizon.extrapolated and suggestion.lr is not None:
        slope = extrapolation_slope(best_over_time(result, plan, margin), plan.horizon.trained)
    suggestion = for_horizon(suggestion, plan.horizon, slope)
    if refinement is not None and reading.learns_at_all:
        suggestion = dataclasses.replace(suggestion, runs_near_best=1 + refinement.runs_per_lr)
    return ramp, reading, verdict, suggestion


def train_request(ctx, settings: Settings, seed: int | None = None, horizon: Horizon | None = None
                  ) -> tuple[Plan, Request]:
    """The plan and the first round's request: for ``horizon`` (default: the settings' horizon for this job's
    data and batch size)."""
    if horizon is None:
        horizon = resolve_horizon(settings, len(ctx.arrays.x_train), ctx.batch_size)
    plan = make_plan(settings, ctx.optim.lr, horizon)
    seed = ctx.seed if seed is None else seed
    hparams = plan.hparams(seed, ctx.optim.weight_decay)
    follow_up = len(hparams) if settings.refine else 0  # the second round: as many members (refinement_hparams)
    return plan, Request(NAME, ctx.spec(plan.steps, eval_every=plan.eval_every), hparams, follow_up=follow_up)


def requests(ctx, settings: Settings) -> list[Request]:
    """What :func:`run` is about to train first (the pipeline merges it with the other diagnostics')."""
    return [train_request(ctx, settings)[1]]


def run_program(ctx, settings: Settings, seed: int | None = None, horizon: Horizon | None = None
                ) -> tuple[Plan, SweepResult]:
    """Train the first round (:func:`train_request`)."""
    plan, request = train_request(ctx, settings, seed, horizon)
    return plan, ctx.train(request.name, request.spec, request.hparams)


def run_refinement(ctx, plan: Plan, result: SweepResult, seed: int | None = None) -> Refinement | str | None:
    """The second round (:func:`refinement_hparams`), trained by the first round's program; None when the grid
    learns nothing or ``refine`` is off; why not, when ``budget=`` has no time left for it
    (:func:`harness.budget.out_of_time`)."""
    from harness import budget

    seed = ctx.seed if seed is None else seed
    reading = analyse(result, plan, ctx.shared)[1]
    made = refinement_hparams(plan, reading, seed, ctx.optim.weight_decay, result.program_width)
    if made is None:
        return None
    hparams, where = made
    late = budget.out_of_time(ctx, budget.Cost(len(hparams) * result.loss.shape[1], 0))
    if late is not None:
        return late
    second = ctx.train_like(result, f"{NAME}/refine", hparams)
    return Refinement(where, second.final_val_loss, second.diverged)


def run(ctx, settings: Settings) -> Outcome:
    plan, result = run_program(ctx, settings)
    refinement = run_refinement(ctx, plan, result)
    late = refinement if isinstance(refinement, str) else None
    refinement = None if late is not None else refinement
    ramp, reading, verdict, suggestion = analyse(result, plan, ctx.shared, refinement)
    _, margin_source = noise_margin(ctx.shared, reading.untrained, settings.relative_margin)
    steps = plan.steps
    stall = None if reading.learns_at_all else stalled(result, plan)
    findings = findings_for(reading, verdict, ramp, suggestion, steps, plan.horizon, stall,
                            getattr(ctx.optim, "clip_norm", None))
    metrics: dict[str, Any] = {
        f"{NAME}/suggested_lr": suggestion.lr,
        f"{NAME}/suggestion_rule": suggestion.rule,
        f"{NAME}/horizon_steps": plan.horizon.steps,
        f"{NAME}/horizon_source": plan.horizon.source,
        f"{NAME}/grid_steps": steps,
        f"{NAME}/measured_lr": suggestion.measured_lr,
        f"{NAME}/runs_near_best": suggestion.runs_near_best,
        f"{NAME}/lr_slope": suggestion.slope,
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
        f"{NAME}/configured_equivalent_lr": verdict.equivalent_lr,
    }
    if late is not None:
        metrics[f"{NAME}/second_round"] = late
    grid = plan.grid_rows
    members = [
        {"lr": float(lr), "seed": int(ctx.seed + k), "final_train_loss": float(tl), "final_val_loss": float(vl),
         "diverged": bool(d), "first_nonfinite_step": int(f)}
        for lr, k, tl, vl, d, f in zip(plan.grid_lrs, plan.grid_seed_offsets(), result.final_train_loss[grid],
                                       result.final_val_loss[grid], result.diverged[grid],
                                       result.first_nonfinite[grid])
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
