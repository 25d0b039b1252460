"""Host-side analysis of training curves: smoothing, robust windows, slopes, and the LR range test's rules.

Everything here is small, pure numpy on curves the compiled programs already returned (a few hundred points), so
it is unit-tested on hand-built curves with known answers. The LR-finder rules reproduce the published tools'
defaults so ``scripts/lr_quality.py`` can compare them on our own ramp:

* fastai ``lr_find`` (fastai/callback/schedule.py): a bias-corrected exponential moving average of the loss
  (``AvgSmoothLoss``, beta 0.98), a stop once the smoothed loss exceeds 4x its best, the first 10% and last 5
  points dropped, then the ``valley`` rule (the longest decreasing run, a point ~half-way into it).
* torch-lr-finder (davidtvs/pytorch-lr-finder): an EMA with ``smooth_f=0.05`` (no bias correction), a stop at
  5x the best loss, ``skip_start=10, skip_end=5``, then the steepest negative gradient (``np.gradient``).
* PyTorch Lightning ``Tuner.lr_find``: ``suggestion(skip_begin=10, skip_end=1)``, the steepest negative gradient
  of the recorded curve.
"""

from __future__ import annotations

import math

import numpy as np


# --------------------------------------------------------------------------------------------------------------
# Smoothing and stopping.


def ema(values, beta: float = 0.98, bias_correction: bool = True) -> np.ndarray:
    """Exponential moving average ``m_t = beta m_{t-1} + (1 - beta) x_t``; with bias correction divides by
    ``1 - beta^(t+1)`` as fastai's ``AvgSmoothLoss`` and Smith's original recipe do, so early points are not
    pulled toward zero. Non-finite inputs make every later point non-finite (the curve ended there)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    m = 0.0
    for t, x in enumerate(values):
        m = beta * m + (1.0 - beta) * x
        out[t] = m / (1.0 - beta ** (t + 1)) if bias_correction else m
    return out


def ema_unbiased_start(values, smooth_f: float = 0.05) -> np.ndarray:
    """torch-lr-finder's smoothing: the first point raw, then ``s_t = smooth_f x_t + (1 - smooth_f) s_{t-1}``."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    for t, x in enumerate(values):
        out[t] = x if t == 0 else smooth_f * x + (1.0 - smooth_f) * out[t - 1]
    return out


def divergence_stop(smoothed, factor: float = 4.0) -> int:
    """Length of the usable prefix of an LR ramp: it ends at the first point where the smoothed loss exceeds
    ``factor`` times the best smoothed loss so far, or is non-finite (fastai and Smith 2017 stop at 4x). The
    stopping point itself is excluded. Returns ``len(smoothed)`` if the ramp never diverged."""
    best = math.inf
    for t, s in enumerate(np.asarray(smoothed, dtype=np.float64)):
        if not np.isfinite(s) or (t > 0 and s > factor * best):
            return t
        best = min(best, s)
    return len(smoothed)


# --------------------------------------------------------------------------------------------------------------
# The published LR-finder rules. Each takes the curve the tool would have recorded and returns an index into it
# (or None when the curve is too short), so callers map it to a learning rate.


def steepest_index(losses, skip_start: int = 10, skip_end: int = 5) -> int | None:
    """torch-lr-finder / Lightning: the point of steepest descent, ``argmin(np.gradient(losses))`` after dropping
    ``skip_start`` points at the start and ``skip_end`` at the end (gradient per point; points are log-spaced in
    LR, so this is the slope in log LR). Non-finite points are dropped as Lightning does."""
    losses = np.asarray(losses, dtype=np.float64)
    stop = len(losses) - skip_end if skip_end else len(losses)
    window = np.arange(skip_start, max(skip_start, stop))
    window = window[np.isfinite(losses[window])] if window.size else window
    if window.size < 2:
        return None
    return int(window[np.argmin(np.gradient(losses[window]))])


def valley_index(losses) -> int | None:
    """fastai's ``valley`` rule (Zachary Mueller, fastai 2.4): the longest strictly decreasing subsequence of the
    curve marks the valley; suggest the point ``int(n/3) + int(n/6)`` into it (about half-way down), where the
    loss still falls fast but well before the bottom, which sits close to divergence."""
    losses = [float(x) for x in losses]
    n = len(losses)
    if n < 2:
        return None
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return int(max_start + int(sections) + int(sections / 2))


def fastai_window(n_recorded: int, num_it: int) -> slice:
    """fastai's ``lr_find`` drops the first ``num_it // 10`` points and the last 5 before suggesting."""
    return slice(num_it // 10, max(num_it // 10, n_recorded - 5))


# --------------------------------------------------------------------------------------------------------------
# Robust summaries of a training curve (the overfit test).


def window_median(values, start: int, stop: int) -> float:
    """Median of the finite values in ``values[start:stop]`` (NaN if none): robust to a single spike."""
    window = np.asarray(values, dtype=np.float64)[start:stop]
    window = window[np.isfinite(window)]
    return float(np.median(window)) if window.size else float("nan")


def first_below(values, threshold: float) -> int | None:
    """First index whose value is below ``threshold`` (None if never)."""
    hits = np.flatnonzero(np.asarray(values, dtype=np.float64) < threshold)
    return int(hits[0]) if hits.size else None


def log_slope(steps, values) -> float:
    """Least-squares slope of ``log(values)`` against ``steps`` (per step; negative when falling), on the finite
    positive points. A loss that falls geometrically has a constant log slope, so this extrapolates honestly."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) & (values > 0)
    if ok.sum() < 3:
        return float("nan")
    return float(np.polyfit(steps[ok], np.log(values[ok]), 1)[0])


def steps_to_reach(current: float, target: float, slope: float) -> float:
    """Further steps until ``current`` falls to ``target`` at a constant log slope (inf if not falling, or if the
    target is 0 or below: a geometric fall never gets there)."""
    if not (current > target):
        return 0.0
    if not np.isfinite(slope) or slope >= 0 or not target > 0:
        return math.inf
    return math.log(target / current) / slope
