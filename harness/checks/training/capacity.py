"""The capacity ladder: is the configured model too small for the task?

Seed 003: "Fit a simple, low capacity model ... then increase the model's capacity ... The loss should decrease";
seeds 000/001: underfitting is "both train and val loss high -> increase capacity". The configured model is trained
at a ladder of widths (the model config's ``width_key``; depths too when ``depths`` is set) for the same budget as
the other diagnostics, and its final training and validation losses are compared with the larger rungs'.
``train.capacity`` (warning) when a larger model reaches a lower loss on *both* the training and the validation set
by a clear margin: the configured model underfits, and capacity, not data or optimization, is what limits it (a
larger model that only fits the training set better is overfitting, not evidence of too little capacity). When
even the ladder's largest rung is still improving and has not fit the training set, the finding says so. The
margin is ``min_improvement`` of the untrained loss (5%: far above the seed-to-seed scatter of the healthy
reference job's final losses, under 0.5% of it) and at least ``margin_std`` seed-to-seed standard deviations.

The default ladder doubles up to ``max(2 x configured width, 64)`` over six rungs (8...256 for the reference
width 128), always includes the configured width and at least one larger rung.

**Early decisions.** The configured rung is the seed runs (the configured job from seeds ``seed, seed+1, ...`` for
the same steps), which the seeds diagnostic trains anyway. A finding needs a larger rung lower by the margin on
the training loss, so when the configured model is already within that margin of the lowest loss any model can
reach (0 for the built-in losses; the loss floor overfit one batch found for any other), no larger rung is
trained: it could not win. Smaller rungs only say which size would suffice; models without masking train them
from the smallest up and stop at the first that fits (seed 003: start small, increase capacity). On the healthy
reference job the ladder then trains 8...64 as rows of the member table instead of 8...256 in two programs.

**Few programs for the whole ladder.** Every width is a different program shape, so a ladder costs a compile per
rung unless the rungs share one. The built-in models support *width masking* (:mod:`harness.models.width_mask`):
built at the ladder's largest width with a traced number of live units (each member's ``Hparams.width``) and an
initialization rescaled to the live fans, a masked rung trains like the real small model, and all rungs become
members of one vmapped program. Masking wastes FLOPs on the masked units (every rung costs its program's widest),
which the saved compiles repay when small models run faster than they compile, as here; for conv models whose run
time dominates, set ``masking: false``. The smaller rungs join the member table (:func:`table_rungs`): masked at
the configured size, whose width-0 members are the configured model itself, so the table trains the seed runs,
controls, LR grid and the smaller rungs as one program and the ladder usually compiles nothing. A convolutional
model's member-step costs more than a compile (the built-in CNN's: about 40x the reference MLP's), so there they
train at the widest of them instead. Since a dense layer's FLOPs grow with the width squared, larger rungs are split into ``mask_bands``
(default 2) width bands by halving from the top (:func:`width_bands`). Models without masking support train one
program per rung (each rung's seeds are members of its program).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import weakref
from typing import Any

import jax
import numpy as np

from harness import losses
from harness.checks.base import Context, Outcome, Plot, require_at_least
from harness.checks.training import seeds
from harness.checks.training.seeds import headline_first
from harness.engine.core import Hparams, Problem
from harness.engine.driver import SweepResult, train_members
from harness.engine.table import Request
from harness.errors import HarnessError
from harness.findings import warning
from harness.models.adapters import FromMember

AUTO_RUNGS = 6
AUTO_MIN_TOP = 64


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 500
    widths: tuple[int, ...] | None = None
    width_key: str = "width"
    depths: tuple[int, ...] | None = None
    depth_key: str = "depth"
    seeds_per_rung: int = 1
    masking: bool = True
    mask_bands: int = 2
    min_improvement: float = 0.05
    margin_std: float = 3.0
    fit_fraction: float = 0.5

    def validate(self, key: str):
        require_at_least(self, key, "steps", 1)
        for name in ("widths", "depths"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise HarnessError(f"must be a non-empty list of positive integers, got {list(values)}",
                                   key=f"{key}.{name}")
        require_at_least(self, key, "seeds_per_rung", 1)
        require_at_least(self, key, "mask_bands", 1)
        for name in ("min_improvement", "margin_std", "fit_fraction"):
            if getattr(self, name) < 0:
                raise HarnessError(f"must be zero or more, got {getattr(self, name)}", key=f"{key}.{name}")


# ---------------------------------------------------------------------------------------------------------------
# The ladder.


@dataclasses.dataclass(frozen=True)
class Rung:
    overrides: tuple[tuple[str, int], ...]  # model config overrides, e.g. (("width", 16),)
    params: int

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.overrides)

    def get(self, key: str) -> int | None:
        return dict(self.overrides).get(key)


def ladder_widths(configured: int, widths: tuple[int, ...] | None) -> list[int]:
    """The widths to train: ``widths`` or the default doubling ladder, plus the configured width and at least one
    width above it (the question is whether a larger model does better)."""
    if widths is None:
        top = max(2 * configured, AUTO_MIN_TOP)
        widths = tuple(max(1, top // 2**k) for k in range(AUTO_RUNGS - 1, -1, -1))
    chosen = sorted(set(widths) | {configured})
    if chosen[-1] <= configured:
        chosen.append(2 * configured)
    return chosen


def count_params(ctx: Context, overrides: dict[str, int]) -> int:
    """Trainable parameters of the model with ``overrides``, from shapes only (no FLOPs)."""
    x = ctx.arrays.x_train[:1]
    return _count_params(ctx.models, tuple(sorted(overrides.items())), x.shape[1:], x.dtype)


@functools.lru_cache(maxsize=256)
def _count_params(models, overrides: tuple, example_shape: tuple, dtype) -> int:
    # Cached: the ladder's rungs are counted each time its requests are asked for (the budget's estimate, the
    # member table, the run), and tracing a module's construction costs 0.1-0.2 s per rung even without FLOPs.
    model = models.adapt(**dict(overrides))
    variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *example_shape), dtype))
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(variables.params)))


def build_rungs(ctx: Context, settings: Settings, configured: dict[str, int]) -> tuple[list[Rung], list[str]]:
    """Rungs that build (with their parameter counts), and a note for each that does not."""
    widths = ladder_widths(configured[settings.width_key], settings.widths)
    depths: list[int | None] = [None]
    if settings.depths is not None:
        depths = sorted(set(settings.depths) | {configured[settings.depth_key]})
    rungs, failures = [], []
    for d in depths:
        for w in widths:
            overrides = {settings.width_key: w, **({settings.depth_key: d} if d is not None else {})}
            try:
                rungs.append(Rung(tuple(overrides.items()), count_params(ctx, overrides)))
            except Exception as err:  # a user model may reject some sizes (e.g. heads must divide the width)
                failures.append(f"{overrides}: {type(err).__name__}: {str(err)[:120]}")
    return rungs, failures


# Problems derived from the run's Problem, cached on it: a second run (or a collapsed multirun's points, which
# share the Problem) gets the same objects, hence the same compiled programs and merged requests. Locked: a
# collapsed multirun's points call this from their threads at the same time.
_DERIVED: "weakref.WeakKeyDictionary[Problem, dict]" = weakref.WeakKeyDictionary()
_DERIVED_LOCK = threading.Lock()


def _derived(base: Problem, key, make) -> Problem | None:
    with _DERIVED_LOCK:
        cache = _DERIVED.setdefault(base, {})
        if key not in cache:
            cache[key] = make()
        return cache[key]


def rung_problem(ctx: Context, overrides: tuple[tuple[str, int], ...]) -> Problem:
    """The model at one rung's size: its own program."""
    base = ctx.problem
    return _derived(base, ("rung", overrides), lambda: Problem(
        ctx.models.adapt(**dict(overrides)), base.loss_fn, base.optim, base.task,
        fingerprint=None if base.fingerprint is None else (base.fingerprint, "rung", overrides)))


MEMBER_WIDTH = FromMember("width")  # the masked model's live width: each member's Hparams.width


def masked_problem(ctx: Context, width_key: str, full_width: int, fixed: tuple[tuple[str, int], ...]
                   ) -> Problem | None:
    """One Problem for every width up to ``full_width`` (a width-masked model; each member's width is its
    ``Hparams.width``), or None when the model does not support masking (see harness.models.width_mask)."""
    base = ctx.problem

    def make():
        try:
            model = ctx.models.adapt(**dict(fixed), **{width_key: full_width}, active_width=MEMBER_WIDTH)
        except Exception:  # noqa: BLE001 -- the factory takes no active_width (or width_mask.MaskingUnsupported)
            return None
        if not model.width_masked:
            return None
        # At the configured size its width-0 members are the configured model itself (every unit live, every
        # init factor 1), so the member table may train the run's requests with it.
        configured = all(ctx.model_config.get(k) == v for k, v in (*fixed, (width_key, full_width)))
        covers = base if configured else None
        return Problem(model, base.loss_fn, base.optim, base.task,
                       fingerprint=None if base.fingerprint is None else (base.fingerprint, "masked", width_key,
                                                                           full_width, fixed), covers=covers)

    return _derived(base, ("masked", width_key, full_width, fixed), make)


def rung_hparams(ctx: Context, settings: Settings, rungs: int, widths=None) -> Hparams:
    """The members of ``rungs`` rungs, ``seeds_per_rung`` each (seeds ``seed, seed+1, ...``), at ``widths`` (one per
    rung) of a width-masked model, or as built."""
    member_seeds = np.tile(ctx.seed + np.arange(settings.seeds_per_rung), rungs)
    width = 0 if widths is None else np.repeat(np.asarray(widths), settings.seeds_per_rung)
    return Hparams.make(lr=ctx.optim.lr, weight_decay=ctx.optim.weight_decay, init_seed=member_seeds,
                        data_seed=member_seeds, width=width)


def table_rungs(ctx: Context, settings: Settings, rungs: list[Rung], configured: Rung
                ) -> tuple[Problem, list[Rung]] | None:
    """The smaller rungs the member table trains (announced by :func:`requests`), and the problem it trains them
    with: the width-masked model at the configured size, whose width-0 members are the configured model itself,
    so the table's other rows train with it too and the ladder needs no program of its own. A small rung then
    costs a configured member's FLOPs instead of a quarter of them, which a compile saved repays when the model
    trains in one scan (README "Performance" has the reference job's figures). On CPU a convolutional model's
    member-step costs far more than that compile, and the smaller rungs train at the widest of them instead; on an
    accelerator they join the table (on an H200 the built-in CNN's ladder compiled for 10-13 s to train for
    0.4 s). None when masking does not apply, or there is no member table (a collapsed multirun's trainer merges
    requests across sweep points instead)."""
    if not settings.masking or ctx.problem.model.convolves_on_cpu or ctx.train_fn is not train_members:
        return None

    def others(rung: Rung):
        return tuple((k, v) for k, v in rung.overrides if k != settings.width_key)

    fixed = others(configured)
    smaller = sorted((r for r in rungs if r.params < configured.params and others(r) == fixed),
                     key=lambda r: r.params)
    if not smaller:
        return None
    problem = masked_problem(ctx, settings.width_key, configured.get(settings.width_key), fixed)
    if problem is None or problem.covers is None:
        return None
    return problem, smaller


def requests(ctx: Context, settings: Settings) -> list[Request]:
    """The smaller rungs, for the member table (:func:`table_rungs`); nothing when they train on their own."""
    configured, _ = configured_size(ctx, settings)
    if configured is None:
        return []
    rungs, _ = build_rungs(ctx, settings, configured)
    configured_rung = next((r for r in rungs if dict(r.overrides) == configured), None)
    table = None if configured_rung is None else table_rungs(ctx, settings, rungs, configured_rung)
    if table is None:
        return []
    problem, smaller = table
    hp = rung_hparams(ctx, settings, len(smaller), [r.get(settings.width_key) for r in smaller])
    return [Request("capacity", ctx.spec(settings.steps), hp, problem=problem)]


def by_fixed(settings: Settings, rungs: list[Rung]) -> dict[tuple, list[Rung]]:
    """``rungs`` grouped by their overrides other than the width (one group per depth of a depth ladder): a group
    differs only in width, which masking can train as one program."""
    groups: dict[tuple, list[Rung]] = {}
    for rung in rungs:
        groups.setdefault(tuple((k, v) for k, v in rung.overrides if k != settings.width_key), []).append(rung)
    return groups


def own_programs(ctx: Context, settings: Settings) -> int:
    """The training programs the smaller rungs compile of their own, for the budget's estimate
    (:func:`harness.budget.cost`): none when they are rows of the member table, one per masked group, else one
    per rung (they stop at the first that suffices, which is not known in advance: counted in full)."""
    configured, _ = configured_size(ctx, settings)
    if configured is None:
        return 0
    rungs, _ = build_rungs(ctx, settings, configured)
    configured_rung = next((r for r in rungs if dict(r.overrides) == configured), None)
    if configured_rung is None or table_rungs(ctx, settings, rungs, configured_rung) is not None:
        return 0
    count = 0
    for fixed, smaller in by_fixed(settings, [r for r in rungs if r.params < configured_rung.params]).items():
        widest = max(r.get(settings.width_key) for r in smaller)
        masked = settings.masking and masked_problem(ctx, settings.width_key, widest, fixed) is not None
        count += 1 if masked else len(smaller)
    return count


# ---------------------------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class RungResult:
    rung: Rung
    train_loss: np.ndarray  # (seeds,)
    val_loss: np.ndarray
    val_accuracy: np.ndarray | None
    initial_loss: np.ndarray  # first minibatch loss


def _rung_result(rung: Rung, result: SweepResult, rows) -> RungResult:
    acc = result.val_accuracy[rows, -1] if result.val_accuracy is not None else None
    return RungResult(rung, result.final_train_loss[rows], result.final_val_loss[rows], acc, result.loss[rows, 0])


def width_bands(widths: list[int], bands: int) -> list[list[int]]:
    """Widths split into at most ``bands`` masked programs by halving from the top: (max/2, max], (max/4, max/2],
    ..., and everything narrower in the last band. A masked member costs its band's widest model, and a dense
    layer's FLOPs grow with the square of the width, so the widest rung alone costs as much as all the narrower
    ones masked at half its width: two bands cut the default ladder's FLOPs 2.4x for one more compile."""
    widths = sorted(widths)
    out: list[list[int]] = []
    top = widths[-1]
    for k in range(bands):
        last = k == bands - 1
        band = [w for w in widths if w * 2 ** (k + 1) > top or last]
        widths = [w for w in widths if w not in band]
        if band:
            out.append(band)
        if not widths:
            break
    return out[::-1]


def margins(reference: float, settings: Settings, noise: dict[str, Any] | None) -> tuple[float, float]:
    """How much lower a larger rung's (training, validation) loss must be to count: ``min_improvement`` of the
    untrained loss, and at least ``margin_std`` seed-to-seed standard deviations."""
    noise = noise or {}
    floor = settings.min_improvement * abs(reference)
    return (max(floor, settings.margin_std * _finite_or_zero(noise.get("train_loss_std"))),
            max(floor, settings.margin_std * _finite_or_zero(noise.get("val_loss_std"))))


def loss_lower_bound(ctx: Context) -> float | None:
    """The lowest training loss any model can reach: 0 for the built-in losses (cross-entropy, squared error),
    else the floor overfit one batch found by minimizing the loss over free outputs (label smoothing's entropy, say);
    None when unknown (not computed, or a loss unbounded below)."""
    if ctx.problem.loss_fn in (losses.cross_entropy, losses.mse):
        return 0.0
    floor = ctx.shared.get("loss_floor")
    return float(floor) if floor is not None and np.isfinite(floor) else None


def configured_result(ctx: Context, settings: Settings, configured: Rung) -> tuple[RungResult, bool]:
    """The configured rung: the seed runs (:func:`seeds.real_runs`: the configured job trained from seeds ``seed,
    seed+1, ...``), which the seeds diagnostic has trained already in a full run; all of them, a better estimate
    than ``seeds_per_rung`` for free. Trained here when the seed runs had other steps (a budget shortened them) or
    are fewer than ``seeds_per_rung``. Returns the result and whether it came from the seed runs."""
    spread = ctx.shared.get("seed_spread")
    if spread is None or spread["spec"].steps == settings.steps:
        runs = seeds.real_runs(ctx, settings.steps)
        if len(runs.hparams) >= settings.seeds_per_rung:
            return _rung_result(configured, runs, slice(None)), True
    member_seeds = ctx.seed + np.arange(settings.seeds_per_rung)
    hp = Hparams.make(lr=ctx.optim.lr, weight_decay=ctx.optim.weight_decay, init_seed=member_seeds,
                      data_seed=member_seeds)
    return _rung_result(configured, ctx.train("capacity/configured", ctx.spec(settings.steps), hp), slice(None)), False


@dataclasses.dataclass
class Ladder:
    results: list[RungResult]  # the rungs trained, in the ladder's order (the configured one included)
    programs: int  # training programs the ladder itself ran (the configured rung's seed runs not counted)
    masked: bool
    skipped: list[Rung]  # rungs not trained because their outcome was decided
    decisions: list[str]  # why, in words


def train_ladder(ctx: Context, settings: Settings, rungs: list[Rung], configured: Rung) -> Ladder:
    """Train the rungs whose outcome is not decided yet, masked groups (rungs that differ only in width) as few
    programs as width bands allow.

    Early decisions (a finding needs a larger rung below the configured one by the margins on *both* splits):
    when the configured model's training loss is already within the training margin of the lowest loss any model
    can reach (:func:`loss_lower_bound`), no larger rung can beat it by the margin, so none is trained. Smaller
    rungs only say which size would suffice: with masking they are one program (at the widest of them); without,
    they are trained from the smallest up and stop at the first within the margins of the configured model on both
    splits (seed 003: start small, increase capacity); larger rungs without masking stop at the first that fits."""
    spec = ctx.spec(settings.steps)
    seeds_ = ctx.seed + np.arange(settings.seeds_per_rung)
    cfg, from_seeds = configured_result(ctx, settings, configured)
    train_margin, val_margin = margins(float(np.nanmedian(cfg.initial_loss)), settings, ctx.shared.get("seed_spread"))
    bound = loss_lower_bound(ctx)

    def fits(r: RungResult) -> bool:
        return bound is not None and mean(r.train_loss) - bound <= train_margin

    def as_good(r: RungResult) -> bool:  # what judge() calls sufficient, against the configured model
        return (mean(r.train_loss) - mean(cfg.train_loss) <= train_margin
                and mean(r.val_loss) - mean(cfg.val_loss) <= val_margin)

    results: dict[Rung, RungResult] = {configured: cfg}
    decisions = []
    if from_seeds:
        decisions.append(f"the configured rung is the seed runs ({len(cfg.train_loss)} seeds)")
    skip_larger = fits(cfg)
    if skip_larger:
        decisions.append(f"larger rungs not trained: the configured model's training loss "
                         f"{mean(cfg.train_loss):.3g} is within the margin {train_margin:.3g} of the lowest reachable "
                         f"({bound:.3g}), so no larger model can beat it by the margin")
    groups = by_fixed(settings, [r for r in rungs if r != configured])
    programs, masked_groups = 0, 0

    def train(name: str, problem: Problem, members: list[Rung], widths=None):
        nonlocal programs
        hp = rung_hparams(ctx, settings, len(members), widths)
        result = ctx.train(name, spec, hp, problem=problem)
        programs += 1
        for i, rung in enumerate(members):
            results[rung] = _rung_result(rung, result, slice(i * len(seeds_), (i + 1) * len(seeds_)))

    for fixed, group in groups.items():
        smaller = sorted((r for r in group if r.params < configured.params), key=lambda r: r.params)
        larger = [] if skip_larger else sorted((r for r in group if r.params >= configured.params),
                                               key=lambda r: r.params)
        if not smaller and not larger:
            continue
        widths = [r.get(settings.width_key) for r in smaller + larger]
        masked = masked_problem(ctx, settings.width_key, max(widths), fixed) if settings.masking else None
        if masked is not None:
            # The smaller rungs in one program: the member table's (the masked model at the configured size)
            # when they were announced to it (:func:`requests`), else at the widest of them (each costs at most
            # a quarter of the configured model there); the larger ones in width bands.
            table = table_rungs(ctx, settings, rungs, configured)
            if smaller and table is not None and table[1] == smaller:
                train("capacity", table[0], smaller, [r.get(settings.width_key) for r in smaller])
                smaller = []
            bands = [smaller] if smaller else []
            if larger:
                bands += [[r for r in larger if r.get(settings.width_key) in band]
                          for band in width_bands([r.get(settings.width_key) for r in larger], settings.mask_bands)]
            for band in bands:
                band_widths = [r.get(settings.width_key) for r in band]
                train("capacity", masked_problem(ctx, settings.width_key, max(band_widths), fixed), band,
                      band_widths)
            masked_groups += 1
            continue
        for ordered, stop, why in ((smaller, as_good, "matches the configured model within the margins, so it "
                                                       "suffices"),
                                   (larger, fits, "fits the training set within the margin, so no larger rung "
                                                  "can do better by it")):
            for i, rung in enumerate(ordered):
                train(f"capacity/{rung.label}", rung_problem(ctx, rung.overrides), [rung])
                if stop(results[rung]) and i + 1 < len(ordered):
                    decisions.append(f"stopped at {rung.label}: it {why} "
                                     f"({', '.join(r.label for r in ordered[i + 1:])} not trained)")
                    break
    trained = [r for r in rungs if r in results]
    return Ladder([results[r] for r in trained], programs, masked_groups == len(groups),
                  [r for r in rungs if r not in results], decisions)


# ---------------------------------------------------------------------------------------------------------------
# The verdict (host numbers in, finding out).


@dataclasses.dataclass(frozen=True)
class Verdict:
    configured: RungResult
    better: list[RungResult]  # larger rungs that beat the configured model on train and val by the margins
    sufficient: RungResult  # the smallest rung within the margins of the ladder's best on train and val
    reference_loss: float  # the untrained loss: the scale of the margins
    train_margin: float
    val_margin: float


def mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def judge(results: list[RungResult], configured: Rung, settings: Settings, noise: dict[str, Any] | None) -> Verdict:
    by_rung = {r.rung: r for r in results}
    cfg = by_rung[configured]
    reference = float(np.nanmedian(cfg.initial_loss))
    train_margin, val_margin = margins(reference, settings, noise)
    tr, va = mean(cfg.train_loss), mean(cfg.val_loss)
    better = [r for r in results if r.rung.params > configured.params
              and tr - mean(r.train_loss) > train_margin and va - mean(r.val_loss) > val_margin]
    finite = [r for r in results if np.isfinite(mean(r.train_loss)) and np.isfinite(mean(r.val_loss))]
    best_tr = min(mean(r.train_loss) for r in finite)
    best_va = min(mean(r.val_loss) for r in finite)
    close = [r for r in finite if mean(r.train_loss) - best_tr <= train_margin and mean(r.val_loss) - best_va <= val_margin]
    # None within both margins (the best-fitting rung overfits): the best on validation is what suffices.
    sufficient = min(close, key=lambda r: r.rung.params) if close else min(finite, key=lambda r: mean(r.val_loss))
    return Verdict(cfg, better, sufficient, reference, train_margin, val_margin)


def _finite_or_zero(x) -> float:
    return float(x) if x is not None and np.isfinite(x) else 0.0


def capacity_finding(v: Verdict, results: list[RungResult], settings: Settings, width_key: str):
    if not v.better:
        return None
    cfg, best = v.configured, min(v.better, key=lambda r: mean(r.train_loss))
    smallest = v.sufficient if v.sufficient in v.better else v.better[0]  # the size to recommend
    message = (f"The configured model ({cfg.rung.label}, {cfg.rung.params:,} parameters) underfits: after "
               f"{settings.steps} steps its training loss is {mean(cfg.train_loss):.3g} and validation loss "
               f"{mean(cfg.val_loss):.3g}, while {smallest.rung.label} ({smallest.rung.params:,} parameters) reaches "
               f"{mean(smallest.train_loss):.3g} and {mean(smallest.val_loss):.3g}")
    if best is not smallest:
        message += f" and {best.rung.label} {mean(best.train_loss):.3g} and {mean(best.val_loss):.3g}"
    message += f" (the untrained loss is {v.reference_loss:.3g})."
    largest = max(results, key=lambda r: r.rung.params)
    still_high = mean(largest.train_loss) > settings.fit_fraction * v.reference_loss
    if best is largest and still_high:
        share = (f"{mean(largest.train_loss) / v.reference_loss:.0%} of the untrained loss, "
                 if v.reference_loss > 0 else "")  # an untrained loss of 0 is no scale
        message += (f" Even the largest rung ({largest.rung.label}) fits only to {mean(largest.train_loss):.3g}, "
                    f"{share}and is still improving.")
    suggestion = (f"Increase the model's {width_key} to at least {v.sufficient.rung.get(width_key)} (the smallest "
                  f"rung within the margin of the best), or add depth.")
    if best is largest and still_high:
        suggestion += " Try wider or deeper models than the ladder's largest."
    evidence = {
        "configured": cfg.rung.label, "configured_params": cfg.rung.params,
        "configured_train_loss": mean(cfg.train_loss), "configured_val_loss": mean(cfg.val_loss),
        "better": [r.rung.label for r in v.better], "sufficient": v.sufficient.rung.label,
        "best": best.rung.label, "best_train_loss": mean(best.train_loss), "best_val_loss": mean(best.val_loss),
        "untrained_loss": v.reference_loss, "train_margin": v.train_margin, "val_margin": v.val_margin,
        "steps": settings.steps,
    }
    return warning("train.capacity", message, suggestion, **evidence)


# ---------------------------------------------------------------------------------------------------------------
# The diagnostic.


def configured_size(ctx: Context, settings: Settings) -> tuple[dict[str, int] | None, str | None]:
    """The configured width (and depth when a depth ladder is asked for), or why the ladder cannot run."""
    keys = ", ".join(sorted(ctx.model_config)) or "none"
    out = {}
    for key, needed in ((settings.width_key, "width_key"), (settings.depth_key, "depth_key")):
        if key == settings.depth_key and settings.depths is None:
            continue
        value = ctx.model_config.get(key)
        if value is None:
            return None, (f"the model config has no '{key}' key (its keys: {keys}); set "
                          f"diagnostics.capacity.{needed} to the key that sets the model's size")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return None, f"model.{key} is {value!r}, not a positive integer"
        out[key] = int(value)
    return out, None


def run(ctx: Context, settings: Settings) -> Outcome:
    out = Outcome("capacity")
    configured, why = configured_size(ctx, settings)
    if configured is None:
        out.skipped = why
        return out
    rungs, failures = build_rungs(ctx, settings, configured)
    configured_rung = next((r for r in rungs if dict(r.overrides) == configured), None)
    if configured_rung is None:
        out.skipped = "the configured model could not be built for the ladder: " + "; ".join(failures[:2])
        return out
    from harness import budget

    spread = ctx.shared.get("seed_spread")
    late = budget.out_of_time(ctx, budget.ladder_cost(
        ctx, settings, configured_apart=spread is None or spread["spec"].steps != settings.steps,
        in_table=table_rungs(ctx, settings, rungs, configured_rung) is not None))
    if late is not None:
        out.skipped = late
        return out
    ladder = train_ladder(ctx, settings, rungs, configured_rung)
    results = ladder.results
    finite = [r for r in results if np.isfinite(mean(r.train_loss)) and np.isfinite(mean(r.val_loss))]
    out.metrics.update({"capacity/configured": configured_rung.label, "capacity/programs": ladder.programs,
                        "capacity/masked": ladder.masked, "capacity/rungs": len(rungs),
                        "capacity/trained": len(results)})
    if ladder.skipped:
        out.metrics["capacity/not_trained"] = [r.label for r in ladder.skipped]
    if ladder.decisions:
        out.metrics["capacity/decisions"] = ladder.decisions
    if failures:
        out.metrics["capacity/unbuildable"] = failures
    report_rungs(out, results, configured_rung, settings)
    if configured_rung not in [r.rung for r in finite]:
        out.skipped = ("the configured model's ladder runs went non-finite at the configured learning rate; "
                       "see lr_range")
        return out
    verdict = judge(finite, configured_rung, settings, ctx.shared.get("seed_spread"))
    out.metrics["capacity/sufficient"] = verdict.sufficient.rung.label
    out.metrics[f"capacity/sufficient_{settings.width_key}"] = verdict.sufficient.rung.get(settings.width_key)
    out.metrics["capacity/untrained_loss"] = verdict.reference_loss
    finding = capacity_finding(verdict, finite, settings, settings.width_key)
    if finding is not None:
        out.findings.append(finding)
    out.metrics = headline_first(out.metrics, ("capacity/configured", "capacity/sufficient", "capacity/trained",
                                               "capacity/programs"))
    return out


def report_rungs(out: Outcome, results: list[RungResult], configured: Rung, settings: Settings):
    for r in results:
        out.metrics[f"capacity/train_loss/{r.rung.label}"] = mean(r.train_loss)
        out.metrics[f"capacity/val_loss/{r.rung.label}"] = mean(r.val_loss)
        out.metrics[f"capacity/params/{r.rung.label}"] = r.rung.params
        for i in range(len(r.train_loss)):
            row = {**dict(r.rung.overrides), "params": r.rung.params, "seed": i,
                   "final_train_loss": float(r.train_loss[i]), "final_val_loss": float(r.val_loss[i])}
            if r.val_accuracy is not None:
                row["final_val_accuracy"] = float(r.val_accuracy[i])
            out.members.append(row)
    ordered = sorted(results, key=lambda r: r.rung.params)
    out.series["capacity/loss_vs_params"] = {
        "x": [r.rung.params for r in ordered],
        "y": [[mean(r.train_loss) for r in ordered], [mean(r.val_loss) for r in ordered]],
        "keys": ["final train loss", "final val loss"], "xname": "parameters"}
    out.plots.append(Plot("capacity", "Final loss vs parameter count (the capacity ladder)",
                          lambda path: draw(path, ordered, configured, settings)))


def draw(path: str, ordered: list[RungResult], configured: Rung, settings: Settings):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    groups: dict[tuple, list[RungResult]] = {}
    for r in ordered:
        groups.setdefault(tuple((k, v) for k, v in r.rung.overrides if k != settings.width_key), []).append(r)
    for i, (fixed, rs) in enumerate(groups.items()):
        suffix = f" ({', '.join(f'{k}={v}' for k, v in fixed)})" if fixed else ""
        x = [r.rung.params for r in rs]
        ax.plot(x, [mean(r.train_loss) for r in rs], "o-", color=f"C{2 * i}", label="train" + suffix)
        ax.plot(x, [mean(r.val_loss) for r in rs], "s--", color=f"C{2 * i + 1}", label="validation" + suffix)
        for r in rs:
            ax.annotate(str(r.rung.get(settings.width_key)), (r.rung.params, mean(r.train_loss)),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize="x-small")
    ax.axvline(configured.params, color="gray", ls=":", label=f"configured ({configured.label})")
    ax.set_xscale("log")
    values = [mean(v) for r in ordered for v in (r.train_loss, r.val_loss)]
    if min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"final loss after {settings.steps} steps")
    ax.legend(fontsize="small")
    fig.savefig(path)
    plt.close(fig)
