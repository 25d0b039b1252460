"""Time budgets: the training diagnostics sized so that the run ends within ``budget=`` seconds.

The training diagnostics cost member-steps (one member's optimizer step on one minibatch) and compiles: about
45,000 member-steps for the default suite (the member table's ~54 rows and the LR test's second round of 35 members
for 500 steps, the capacity ladder's smaller rungs) and one to a few training programs. On the reference MLP a
member-step takes 0.2-0.5 ms on two CPU cores, on a 20-layer MLP about 4 ms and on the built-in CNN about 9 ms; a
training program compiles in 1-10 s cold (next to nothing from a warm cache). With a budget, harness measures the
user's model (a probe: the member table's own program, run for a few steps, its run timed apart from its compile,
which is what one of the suite's programs costs to compile and which a suite that keeps that table does not pay
again), estimates what the configured suite would take from the diagnostics' own requests, and, when that is
over what the budget has left (the budget less the time the run has already spent: data and model stages, the
probe), applies the cuts of :data:`CUTS` in order until the estimate fits (when no suite fits, all of them, or
none if together they save less than :data:`MATERIAL` of the time). The report says what was measured, what was
cut (with the config overrides each cut set) and what each cut costs in confidence, and gives the overrides that
run the chosen suite again without a budget (:func:`overrides`); ``budget=null`` (the default) keeps the
configured suite.

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
from typing import Any, Callable, NamedTuple

import numpy as np

from harness.checks.registry import announced
from harness.engine import compile as programs
from harness.engine import devices
from harness.engine.core import Hparams, program_spec
from harness.engine.driver import train_members
from harness.engine.table import repeats_fixed

# The probe trains at least PROBE_MEMBER_STEPS member-steps and PROBE_STEPS steps.
PROBE_STEPS = 10
PROBE_MEMBER_STEPS = 240
MIN_STEPS = 100  # no cut takes a training diagnostic below this many steps
# The estimate's error, as a share of it: the probe's figures move by 10-30% with the machine's load. When no suite
# fits the budget and every cut together saves less than this share of the estimate, they change the run's end by
# less than the estimate can tell, and none is made.
MATERIAL = 0.1
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
# the overfit test's steps (its target is calibrated for them; see joins_table for where it then trains) and the
# capacity ladder's (a larger model is ahead early in any run, so a short ladder would call a healthy model too
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


# Halving the seed runs', the controls' and the LR grid's steps: the fourth cut, and the last one again.
HALF_STEPS = Cut("half the steps for the seed runs, the controls and the LR grid",
                 "the noise floor and the controls come from a shorter run, and the LR test judges the same horizon "
                 "from validation curves extrapolated past what it trained", _steps(0.5))

CUTS: tuple[Cut, ...] = (
    Cut("the LR test's second round off",
        "the suggested LR rests on one run per grid LR: on a small or noisy validation set it can be a grid point "
        "or two from the best", _set("lr_range", refine=False)),
    Cut("an LR grid of 16 learning rates",
        "grid points 2.1x apart instead of 1.45x: the suggestion is that much coarser", _grid(16)),
    Cut("no determinism rerun",
        "a nondeterministic platform or data pipeline goes unnoticed", _set("seeds", check_determinism=False)),
    HALF_STEPS,
    Cut("an LR grid of 8 learning rates",
        "grid points 5x apart: the suggestion brackets the best LR within a factor of about 2", _grid(8)),
    Cut("no capacity ladder",
        "whether the model is too small is not asked: a fair ladder trains every rung for the full horizon",
        _without("capacity")),
    HALF_STEPS,
)


# Settings whose config default follows another's (``conf/diagnostics/lr_range/default.yaml``: the LR test's
# default horizon is ``diagnostics.seeds.steps``): source -> the one that follows it.
FOLLOWS = {("seeds", "steps"): ("lr_range", "default_horizon")}


def _value(v) -> str:
    """A setting's value as a command-line override writes it."""
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def overrides(before: dict[str, Any], after: dict[str, Any], run: tuple[str, ...]) -> list[str]:
    """The command-line overrides that turn the diagnostics' settings ``before`` into ``after``: each changed
    field as ``diagnostics.<name>.<field>=<value>``, and a diagnostic ``after`` drops as the ``diagnostics.run``
    list (``run``: the run's, in order) without it."""
    changed = [(name, f.name) for name, s in before.items() if name in after
               for f in dataclasses.fields(s) if getattr(s, f.name) != getattr(after[name], f.name)]
    # A cut leaves these as they were, but the config derives them from a key it changed: written, they stay.
    changed += [(name, field) for source, (name, field) in FOLLOWS.items()
                if source in changed and name in after and (name, field) not in changed]
    out = [f"diagnostics.{name}.{field}={_value(getattr(after[name], field))}" for name, field in changed]
    if any(name not in after for name in before):
        out.append("diagnostics.run=[" + ",".join(n for n in run if n in after or n not in before) + "]")
    return out


@dataclasses.dataclass(frozen=True)
class Measured:
    """What the probe measured on the configured model."""

    member_step: float  # seconds: one member's optimizer step on one minibatch
    # Seconds to trace and compile one training program of this model with no cache: the probe's own (a program
    # the plan chooses may not be in the cache, even when the probe was: another budget, another plan).
    compile: float = 0.0
    took: float = 0.0  # what measuring took, its compile included
    # The member table's merged request whose program the probe ran, now compiled: the suite's table trains by it,
    # cut or not (harness.engine.table.onto). None when the probe ran a program of its own.
    program: Any = None


@dataclasses.dataclass
class Plan:
    """What the budget chose, for the report (``report.json["budget"]``)."""

    budget: float  # seconds for the whole run, asked for
    measured: Measured
    elapsed_seconds: float  # spent before the training diagnostics: data and model stages, the probe
    configured_seconds: float  # the configured suite's estimated training and compiles
    configured_programs: int  # the training programs it would compile
    planned_seconds: float  # the chosen suite's
    planned_programs: int
    changes: list[str]  # the cuts applied, in order
    costs: list[str]  # what each costs in confidence
    settings: dict[str, Any]  # the diagnostics' settings the run uses
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # diagnostic -> why the budget dropped it
    declined: int = 0  # cuts not made: no suite fitting, all of them saved less than MATERIAL of the estimate
    # The command-line overrides each cut made (:func:`overrides`), and those that run the chosen suite without a
    # budget (the same suite every time, where a budget's choice moves with the machine's speed).
    change_overrides: list[list[str]] = dataclasses.field(default_factory=list)
    overrides: list[str] = dataclasses.field(default_factory=list)

    @property
    def left(self) -> float:
        """Seconds the budget leaves for the training diagnostics."""
        return self.budget - self.elapsed_seconds

    @property
    def fits(self) -> bool:
        return self.planned_seconds <= self.left

    def summary(self) -> str:
        m = self.measured
        head = (f"{self.budget:g} s for the run, {max(self.left, 0):.0f} s of them left for the training diagnostics "
                f"after {self.elapsed_seconds:.0f} s of data and model stages and measuring: a member-step takes "
                f"{m.member_step * 1e3:.3g} ms on this model and a training program {m.compile:.2g} s to compile, "
                f"so the configured suite needs about {self.configured_seconds:.0f} s "
                f"({self.configured_programs} program{'s' if self.configured_programs != 1 else ''} to compile"
                f"{', measuring having compiled its member table' if m.program is not None else ''})")
        cuts = f"{len(self.changes)} cut{'s' if len(self.changes) != 1 else ''}"
        if self.fits:
            return head + (f"; {cuts} bring it to about {self.planned_seconds:.0f} s:" if self.changes else
                           "; it fits, nothing was cut.")
        if self.declined:
            return (head + f"; no suite fits, and all {self.declined} cuts would save under {MATERIAL:.0%} of that "
                    f"time, less than the estimate can tell: nothing was cut.")
        return (head + f"; after every cut ({cuts}) it still needs about {self.planned_seconds:.0f} s, over the "
                f"budget (the smallest suite harness runs):")

    def to_dict(self) -> dict[str, Any]:
        m = self.measured
        return {"budget_seconds": self.budget, "member_step_ms": m.member_step * 1e3,
                "compile_seconds_per_program": m.compile, "probe_seconds": m.took,
                "elapsed_seconds": self.elapsed_seconds, "left_seconds": self.left,
                "configured_seconds": self.configured_seconds, "configured_programs": self.configured_programs,
                "planned_seconds": self.planned_seconds, "planned_programs": self.planned_programs,
                "fits": self.fits, "changes": self.changes, "costs": self.costs, "skipped": self.skipped,
                "declined_cuts": self.declined, "change_overrides": self.change_overrides,
                "overrides": self.overrides,
                "summary": self.summary()}


def table_program(ctx, settings: dict[str, Any]):
    """The member table the training diagnostics in ``settings`` train (:meth:`Context.table`; the merged request
    with the most member-steps), or None when they train no merged program."""
    groups = ctx.table([r for requests in announced(ctx, settings).values() for r in requests])
    if not groups:
        return None
    return max((both for _, both in groups), key=lambda b: len(b.hparams) * b.spec.steps)


def probe_program(ctx, settings: dict[str, Any]):
    """The program the probe compiles and times: the configured member table's (:func:`table_program`), with its
    evaluations inside the chunks compiled even where the configured suite evaluates only at their ends (the
    cadence is an argument of the program: :func:`harness.engine.core.program_spec`). A cut suite's table then
    trains by it (:func:`harness.engine.table.onto`: fewer rows, the shorter runs as budgets, an LR grid that
    evaluates to extrapolate) instead of compiling a program of its own, which on a deep model costs as much as the
    probe again. None when the settings train no member table."""
    program = table_program(ctx, settings)
    if program is None:
        return None
    return dataclasses.replace(program, spec=dataclasses.replace(program.spec, inside_evals=True))


def program_key(ctx, request) -> tuple | None:
    """What makes a merged request's program: its problem, its spec (the call width included, not the evaluation
    cadence: :func:`harness.engine.core.program_spec`) and its fixed batch."""
    if request is None:
        return None
    fixed = request.arrays.fixed_index if request.arrays is not None else None
    return (request.problem or ctx.problem, program_spec(request.spec),
            None if fixed is None else tuple(np.asarray(fixed).tolist()))


class Cost(NamedTuple):
    member_steps: float
    programs: int  # training programs to compile


def joins_table(request, batch_size: int, measured: Measured | None) -> bool:
    """Whether a request that trains only on its fixed batch (the overfit test), whose steps differ from the member
    table's (a budget cut the others'), trains in the probe's program anyway, its batch repeated to the table's
    (:func:`harness.engine.table.plan`), rather than in a program of its own at its own batch: when the compile
    that saves (the probe's, measured with no cache) is more than the compute the larger batch adds. On a deep MLP
    the compile wins; on a CNN, whose step costs its batch, the compute does. Without a probe, or when the probe's
    program has no fixed batch to train on, never."""
    if measured is None or measured.program is None or not measured.program.spec.fixed_batch:
        return False
    spec = request.spec
    added = (1 - spec.batch_size / max(batch_size, 1)) * (len(request.hparams) + request.follow_up) * spec.steps
    return added * measured.member_step < measured.compile


def cost(ctx, settings: dict[str, Any], measured: Measured | None = None) -> Cost:
    """What the training diagnostics in ``settings`` will train and compile after the probe (``measured``): their
    announced requests (each row at the run's batch size, as the member table trains them, in one program; the
    overfit test at its own batch and in a program of its own when its loss cannot repeat its batch to the run's
    (:func:`harness.engine.table.repeats_fixed`), or when its steps differ from the seed runs' and it does not
    :func:`joins_table`) and follow-ups (which reuse their request's program), and the capacity ladder: its
    configured rung when it cannot be the seed runs, and its smaller rungs (announced, or :data:`CAPACITY_MEMBERS`
    in the programs of :func:`harness.checks.training.capacity.own_programs`). An estimate: follow-ups beyond the
    announced ones (a ladder's larger rungs when the configured model underfits, a reloaded data set's rerun) are
    not counted."""
    steps, table, apart = 0.0, False, 0
    seeds = settings.get("seeds")
    for name, requests in announced(ctx, settings).items():
        s = settings[name]
        for r in requests:
            joins = repeats_fixed(r, ctx.batch_size, ctx.loss_per_example()) and (
                (seeds is not None and seeds.steps == r.spec.steps) or joins_table(r, ctx.batch_size, measured))
            alone = bool(r.spec.fixed_batch) and not joins
            weight = r.spec.batch_size / max(ctx.batch_size, 1) if alone else 1.0
            steps += weight * (len(r.hparams) + r.follow_up) * r.spec.steps
            apart, table = apart + alone, table or not alone
        if name == "capacity":
            ladder = ladder_cost(ctx, s, configured_apart=seeds is None or seeds.steps != s.steps,
                                 in_table=bool(requests))
            steps, apart = steps + ladder.member_steps, apart + ladder.programs
    return Cost(steps, int(table) + apart)


def ladder_cost(ctx, settings, *, configured_apart: bool, in_table: bool) -> Cost:
    """What the capacity ladder trains and compiles beyond the member table: its configured rung when it cannot be
    the seed runs, and its smaller rungs when they are not rows of the table (:data:`CAPACITY_MEMBERS`, in the
    programs of :func:`harness.checks.training.capacity.own_programs`)."""
    from harness.checks.training import capacity

    own = 0 if in_table else capacity.own_programs(ctx, settings)
    members = (CAPACITY_MEMBERS if own else 0) + configured_apart * settings.seeds_per_rung
    return Cost(members * settings.steps, int(configured_apart) + own)


def from_process_0(value) -> np.ndarray:
    """``value`` (seconds) as process 0 of a multi-process run has it, so every process decides alike."""
    value = np.asarray(value, np.float64)
    if devices.process_count() > 1:
        from jax.experimental import multihost_utils

        value = np.asarray(multihost_utils.broadcast_one_to_all(value))
    return value


def out_of_time(ctx, needed: Cost) -> str | None:
    """Why a training the plan kept must not start now, or None: with ``budget=``, it is estimated (the probe's
    figures) to end after the run's deadline. The plan's estimates can be off (a program that compiles slower than
    the probe's, a busy machine), and the budget is a promise about when the run ends. Every process of a
    multi-process run decides as process 0 does, so all of them train the same programs."""
    plan = ctx.shared.get("_budget")
    if plan is None:
        return None
    left = float(from_process_0(plan.budget - (time.perf_counter() - ctx.started)))
    seconds = needed.member_steps * plan.measured.member_step + needed.programs * plan.measured.compile
    if seconds <= left:
        return None
    return (f"not run: the budget ({plan.budget:g} s for the run) had {max(left, 0):.0f} s left, and this needed "
            f"about {seconds:.0f} s")


def measure(ctx, settings: dict[str, Any] | None = None) -> Measured:
    """The configured model's member-step and compile time, from a probe of a few members for a few steps, its run
    timed apart from its compile. The probe runs the program of the member table that ``settings`` train
    (:func:`probe_program`), at its call width, each member's budget a few steps (the rest of its scan skipped):
    its compile is then the table's, which the suite does not pay again, cut or not (the table trains by the
    probe's program whenever it can). Without a table, a program of its own, as many members as one call trains
    (``engine.max_members_per_call``). What the call costs whatever its steps (the evaluation at its end,
    transfers) is counted as training, which errs towards a smaller suite (timed as the difference of two budgets
    instead, it underestimated the CNN's suite, README). Every process of a multi-process run uses process 0's
    figures, so all of them choose the same suite. The figures go to ``ctx.shared["_probe"]``, for
    :meth:`harness.checks.base.Context.table`."""
    began = time.perf_counter()
    table = probe_program(ctx, settings) if settings else None
    if table is not None:
        problem, spec, arrays = table.problem or ctx.problem, table.spec, table.arrays
        members = spec.max_members_per_call  # merged_spec's call width, already whole calls
    else:
        problem, arrays = ctx.problem, ctx.arrays
        members = devices.padded_size(ctx.engine.members_per_call())
        spec = ctx.spec(max(PROBE_MEMBER_STEPS // members, PROBE_STEPS))
    steps = min(max(PROBE_MEMBER_STEPS // members, PROBE_STEPS), spec.steps)
    seeds = ctx.seed + np.arange(members)
    hp = Hparams.make(lr=ctx.optim.lr, weight_decay=ctx.optim.weight_decay, init_seed=seeds, data_seed=seeds,
                      steps=steps)

    def stats() -> np.ndarray:  # the probe's programs' (run, compile with no cache) seconds so far
        return np.array([sum(v.get(k, 0.0) for name, v in programs.STATS.by_program.items()
                             if name.startswith("budget/probe/")) for k in ("run_seconds", "cold_compile_seconds")])

    before = stats()
    train_members(problem, spec, hp, arrays, name="budget/probe")
    ran, compiled = stats() - before
    figures = from_process_0(np.array([ran / (members * steps), compiled]))
    measured = Measured(float(figures[0]), float(figures[1]), time.perf_counter() - began, table)
    ctx.shared["_probe"] = measured  # the member table trains by its program (Context.table)
    return measured


def plan(ctx, settings: dict[str, Any], names: list[str], budget: float, measured: Measured | None = None,
         elapsed: float | None = None, run: tuple[str, ...] | None = None) -> Plan:
    """The suite that ends the run within ``budget`` seconds: the configured one if its estimated training and
    compiles fit in what is left of the budget, else the configured one with the first :data:`CUTS` that bring the
    estimate under it (all of them if none does, unless together they save less than :data:`MATERIAL` of the
    estimate: then none). ``measured``: the model's figures (default: :func:`measure`
    now); ``elapsed``: seconds the run has spent so far (default: since ``ctx.started``, the probe included);
    ``run``: the run's ``diagnostics.run`` (default ``names``), for the overrides that drop a diagnostic."""
    chosen = {name: settings[name] for name in names}  # only what runs is cut
    if measured is None:
        measured = measure(ctx, chosen)
    if elapsed is None:
        elapsed = float(from_process_0(time.perf_counter() - ctx.started))
    left = budget - elapsed

    def estimate(chosen: dict[str, Any]) -> tuple[float, int]:
        c = cost(ctx, chosen, measured)
        programs = c.programs
        if measured.program is not None and programs and program_key(ctx, measured.program) == program_key(
                ctx, table_program(ctx, chosen)):
            programs -= 1  # the probe compiled this suite's member table
        return c.member_steps * measured.member_step + programs * measured.compile, programs

    configured, configured_programs = estimate(chosen)

    run = tuple(names) if run is None else tuple(run)
    current, changes, costs, skipped, keys, running = chosen, [], [], {}, [], run
    seconds, compiles = configured, configured_programs
    for cut in CUTS:
        if seconds <= left:
            break
        smaller = cut.apply(current)
        if smaller == current:
            continue  # nothing to cut here (that diagnostic does not run, or is already that small)
        smaller_seconds, smaller_compiles = estimate(smaller)
        if smaller_seconds >= seconds:
            continue  # it would save nothing (shorter seed runs cost programs of their own): confidence for nothing
        for name in set(current) - set(smaller):
            skipped[name] = f"not run: the budget ({budget:g} s for the run) dropped it; {cut.cost}"
        keys.append(overrides(current, smaller, running))
        running = tuple(n for n in running if n in smaller or n not in current)
        current = smaller
        changes.append(cut.change)
        costs.append(cut.cost)
        seconds, compiles = smaller_seconds, smaller_compiles
    declined = 0
    if seconds > left and configured - seconds < MATERIAL * configured:
        # No suite fits, and every cut together saves less than the estimate's own error: the run ends late
        # whatever is cut, so nothing is (on an accelerator, where the compiles are the run and the whole suite
        # trains in a second, no cut helps).
        declined, current, changes, costs, skipped, keys = len(changes), chosen, [], [], {}, []
        seconds, compiles = configured, configured_programs
    return Plan(budget, measured, elapsed, configured, configured_programs, seconds, compiles, changes, costs,
                {**settings, **current}, skipped, declined, keys, overrides(chosen, current, run))
