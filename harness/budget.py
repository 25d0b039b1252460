"""Time budgets: the training diagnostics sized to fit ``budget=`` seconds of training on the user's model.

The training diagnostics cost member-steps (one member's optimizer step on one minibatch): about 45,000 for the
default suite (the member table's ~54 rows and the LR test's second round of 35 members for 500 steps, the capacity
ladder's smaller rungs). On the reference MLP a member-step takes 0.3-0.5 ms on two CPU cores, on a 20-layer MLP
about 4 ms and on the built-in CNN about 40 ms, so the same suite takes seconds, minutes or most of an hour. With a
budget, harness measures the user's model (a probe: a few members for a few steps, its run timed apart from its
compile), estimates what the configured suite would take from the diagnostics' own requests, and, when that is
over the budget, applies the cuts of :data:`CUTS` in order until the estimate fits. The report says what was
measured, what was cut and what each cut costs in confidence; ``budget=null`` (the default) keeps the configured
suite.

The order follows what each part of the suite is for: the LR test's second round only sharpens a suggestion the
first round already makes (``lr_range.refine_reading``); a coarser grid still brackets the best LR; the
determinism rerun checks the platform, not the model; shorter runs come last, and no cut changes the question a
diagnostic answers (the horizon the LR test judges, the overfit test's calibrated steps; the capacity ladder is
dropped rather than shortened). Successive halving's idea (Jamieson & Talwalkar, AISTATS 2016) decides the same
way: the budget goes to the measurements that still decide something.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from harness.checks.registry import diagnostic_module
from harness.engine import compile as programs
from harness.engine import devices
from harness.engine.core import Hparams
from harness.engine.driver import train_members

PROBE_STEPS = 30  # steps of the probe: its evaluation at the end costs under a fifth of them on the reference job
PROBE_MEMBERS_CPU = 8  # a CPU step costs the same per member from about 8 members on (harness.engine.table)
MIN_STEPS = 100  # no cut takes a training diagnostic below this many steps
# The capacity ladder's smaller rungs when not in the member table: about four members, masked at half the
# configured width or less (a quarter of the configured model's FLOPs each): one member-step per step.
CAPACITY_MEMBERS = 1.0


@dataclasses.dataclass(frozen=True)
class Cut:
    """One step down in the suite's size: what changes (as the config keys that do it) and what it costs."""

    change: str
    cost: str
    apply: Callable[[dict[str, Any]], dict[str, Any]]  # the diagnostics' settings -> smaller ones


def _set(name: str, **values) -> Callable[[dict], dict]:
    def apply(settings: dict) -> dict:
        if name not in settings:
            return settings
        return {**settings, name: dataclasses.replace(settings[name], **values)}

    return apply


def _grid(size: int) -> Callable[[dict], dict]:
    def apply(settings: dict) -> dict:
        if "lr_range" not in settings or settings["lr_range"].grid_size <= size:
            return settings
        return _set("lr_range", grid_size=size)(settings)

    return apply


# The steps a budget cuts: the seed runs and controls (the noise floor and the controls are read after a shorter
# run) and the LR grid's training (the LR test extrapolates its validation curves to the horizon it judges, which
# stays train.steps or diagnostics.lr_range.default_horizon). Cut together, they keep sharing one program. Never cut:
# the overfit test's steps (its target is calibrated for them, and alone at its own batch of 32 it is cheap) and
# the capacity ladder's (a larger model is ahead early in any run, so a short ladder would call a healthy model too
# small); the ladder is dropped instead.
STEP_SETTINGS = (("seeds", "steps"), ("controls", "steps"), ("lr_range", "grid_steps"))


def _steps(factor: float) -> Callable[[dict], dict]:
    def apply(settings: dict) -> dict:
        out = dict(settings)
        for name, field in STEP_SETTINGS:
            if name in out:
                value = getattr(out[name], field)
                out[name] = dataclasses.replace(out[name], **{field: max(min(value, MIN_STEPS),
                                                                          int(round(value * factor)))})
        return out

    return apply


def _without(name: str) -> Callable[[dict], dict]:
    def apply(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k != name}

    return apply


CUTS: tuple[Cut, ...] = (
    Cut("the LR test's second round off (diagnostics.lr_range.refine=false)",
        "the suggested LR rests on one run per grid LR: on a small or noisy validation set it can be a grid point "
        "or two from the best", _set("lr_range", refine=False)),
    Cut("an LR grid of 16 learning rates (diagnostics.lr_range.grid_size=16)",
        "grid points 2.1x apart instead of 1.45x: the suggestion is that much coarser", _grid(16)),
    Cut("no determinism rerun (diagnostics.seeds.check_determinism=false)",
        "a nondeterministic platform or data pipeline goes unnoticed", _set("seeds", check_determinism=False)),
    Cut("half the steps for the seed runs, the controls and the LR grid (diagnostics.seeds.steps, "
        "diagnostics.controls.steps, diagnostics.lr_range.grid_steps)",
        "the noise floor and the controls come from a shorter run, and the LR test judges the same horizon from "
        "validation curves extrapolated past what it trained", _steps(0.5)),
    Cut("an LR grid of 8 learning rates (diagnostics.lr_range.grid_size=8)",
        "grid points 5x apart: the suggestion brackets the best LR within a factor of about 2", _grid(8)),
    Cut("no capacity ladder",
        "whether the model is too small is not asked: a fair ladder trains every rung for the full horizon",
        _without("capacity")),
    Cut("half those steps again", "as above, from a shorter run still", _steps(0.5)),
)


@dataclasses.dataclass
class Plan:
    """What the budget chose, for the report (``report.json["budget"]``)."""

    budget: float  # seconds of training asked for
    member_step_seconds: float  # measured: one member's step on one minibatch
    configured_seconds: float  # the configured suite's estimated training time
    planned_seconds: float  # the chosen suite's
    changes: list[str]  # the cuts applied, in order
    costs: list[str]  # what each costs in confidence
    settings: dict[str, Any]  # the diagnostics' settings the run uses
    probe_seconds: float  # what measuring took (its compile included)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # diagnostic -> why the budget dropped it

    @property
    def fits(self) -> bool:
        return self.planned_seconds <= self.budget

    def summary(self) -> str:
        head = (f"{self.budget:g} s of training: a member-step takes {self.member_step_seconds * 1e3:.3g} ms on "
                f"this model, so the configured suite needs about {self.configured_seconds:.0f} s")
        if not self.changes:
            return head + "; it fits, nothing was cut."
        cuts = f"{len(self.changes)} cut{'s' if len(self.changes) > 1 else ''}"
        if self.fits:
            return head + f"; {cuts} bring it to about {self.planned_seconds:.0f} s:"
        return (head + f"; after every cut ({cuts}) it still needs about {self.planned_seconds:.0f} s, over the "
                f"budget (the smallest suite harness runs):")

    def to_dict(self) -> dict[str, Any]:
        return {"budget_seconds": self.budget, "member_step_ms": self.member_step_seconds * 1e3,
                "configured_seconds": self.configured_seconds, "planned_seconds": self.planned_seconds,
                "fits": self.fits, "changes": self.changes, "costs": self.costs,
                "probe_seconds": self.probe_seconds, "skipped": self.skipped, "summary": self.summary()}


def member_steps(ctx, settings: dict[str, Any]) -> float:
    """The member-steps the training diagnostics in ``settings`` will train: their announced requests (each row at
    the run's batch size, as the member table trains them; the overfit test at its own batch when its steps differ
    from the seed runs', since it then trains alone) and follow-ups, and the capacity ladder: its configured rung
    when it cannot be the seed runs, and its smaller rungs (announced, or :data:`CAPACITY_MEMBERS`). An estimate: follow-ups
    beyond the announced ones (a ladder's larger rungs when the configured model underfits, a reloaded data set's
    rerun) are not counted."""
    total = 0.0
    seeds = settings.get("seeds")
    for name, s in settings.items():
        announce = getattr(diagnostic_module(name), "requests", None)
        try:
            requests = [] if announce is None else announce(ctx, s)
        except Exception:  # noqa: BLE001 -- the diagnostic will report its own problem
            requests = []
        for r in requests:
            weight = 1.0
            if r.spec.fixed_batch and (seeds is None or seeds.steps != r.spec.steps):
                weight = r.spec.batch_size / max(ctx.batch_size, 1)
            total += weight * (len(r.hparams) + r.follow_up) * r.spec.steps
        if name == "capacity":
            configured = 0 if seeds is not None and seeds.steps == s.steps else s.seeds_per_rung
            total += ((0 if requests else CAPACITY_MEMBERS) + configured) * s.steps
    return total


def measure(ctx) -> tuple[float, float]:
    """Seconds per member-step of the configured model, and what measuring took: a probe of a few members (on CPU,
    where a step costs the same per member at any width; elsewhere as many as one call trains) for
    :data:`PROBE_STEPS` steps, its run timed apart from its compile. The probe's evaluation at the end is counted
    as training, which errs towards a smaller suite. Every process of a multi-process run uses process 0's figure,
    so all of them choose the same suite."""
    began = time.perf_counter()
    spec = ctx.spec(PROBE_STEPS)
    members = PROBE_MEMBERS_CPU if jax.default_backend() == "cpu" else spec.max_members_per_call
    members = devices.padded_size(members)
    seeds = ctx.seed + np.arange(members)
    hp = Hparams.make(lr=ctx.optim.lr, weight_decay=ctx.optim.weight_decay, init_seed=seeds, data_seed=seeds)

    def ran() -> float:  # the probe's programs' run time
        return sum(v.get("run_seconds", 0.0) for k, v in programs.STATS.by_program.items()
                   if k.startswith("budget/probe/"))

    before = ran()
    train_members(ctx.problem, spec, hp, ctx.arrays, name="budget/probe")
    seconds = (ran() - before) / (members * PROBE_STEPS)
    if devices.process_count() > 1:
        from jax.experimental import multihost_utils

        seconds = float(multihost_utils.broadcast_one_to_all(np.float64(seconds)))
    return seconds, time.perf_counter() - began


def plan(ctx, settings: dict[str, Any], names: list[str], budget: float,
         step_seconds: float | None = None) -> Plan:
    """The suite that fits ``budget`` seconds of training: the configured one if it does, else the configured one
    with the first :data:`CUTS` that bring the estimate under the budget (all of them if none does).
    ``step_seconds``: a measured member-step (default: :func:`measure` now)."""
    probe = 0.0
    if step_seconds is None:
        step_seconds, probe = measure(ctx)
    chosen = {name: settings[name] for name in names}  # only what runs is cut
    configured = member_steps(ctx, chosen) * step_seconds
    changes, costs, skipped = [], [], {}
    estimate = configured
    for cut in CUTS:
        if estimate <= budget:
            break
        smaller = cut.apply(chosen)
        if smaller == chosen:
            continue  # nothing to cut here (that diagnostic does not run, or is already that small)
        for name in set(chosen) - set(smaller):
            skipped[name] = f"not run: the budget ({budget:g} s of training) dropped it; {cut.cost}"
        chosen = smaller
        changes.append(cut.change)
        costs.append(cut.cost)
        estimate = member_steps(ctx, chosen) * step_seconds
    return Plan(budget, step_seconds, configured, estimate, changes, costs, {**settings, **chosen}, probe, skipped)
