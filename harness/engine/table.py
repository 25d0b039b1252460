"""The member table: training requests of several diagnostics merged into one compiled program.

Every training diagnostic is a set of member rows of one pure training program (:mod:`harness.engine.core`): the
seed runs, the constant-input and shuffled-label controls, the LR ramp and grid, the overfit-one-batch members
(``Hparams.fixed_batch``) differ only in traced values. Trained one diagnostic at a time, each is its own program
shape (its own member count, evaluation cadence, returned parameters) and its own compile, which on these CPUs
costs seconds per program (tens of seconds for deep models) while the training itself takes less. So the pipeline
asks each training diagnostic for the requests it is about to make (``requests(ctx, settings)``), and
:func:`plan` merges those that can share a program: same step count, batch size, chunking and compile options,
the same arrays (at most one fixed batch), and the same regularization unless the model has none to switch off
(:func:`regularization_matters`). The merged request evaluates at the greatest common divisor of the requests'
cadences and returns parameters if any request wants them; :func:`split` gives each request exactly the rows,
steps and evaluations it asked for, so a diagnostic reads the same result, bitwise, as from running that merged
program with its rows alone (PureJaxRL's one ``jit(vmap(train))`` over every member, luchris429/purejaxrl).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import jax
import numpy as np

from harness.engine import devices
from harness.engine.core import Arrays, Hparams, Problem, TrainSpec, evaluates_inside, program_spec
from harness.engine.driver import SweepResult, batch_only_evals, eval_schedule


@dataclasses.dataclass(frozen=True)
class Request:
    """One ``ctx.train(name, spec, hparams, arrays)`` call a diagnostic is about to make (``arrays``: None for the
    run's own)."""

    name: str
    spec: TrainSpec
    hparams: Hparams
    arrays: Arrays | None = None
    # None for the run's problem; else one that covers it (Problem.covers: the capacity ladder's masked model at
    # the configured size), with which the whole group then trains.
    problem: Problem | None = None
    rerun: bool = False  # a second run of an identical request (a determinism check): its own rows
    # Members the diagnostic will train later by the same program (the LR test's second round, through
    # Context.train_like), so the table's call width can be chosen to fit both without padding.
    follow_up: int = 0


_DEAD = re.compile(r"^\s*(_:\S+\s+)+= ")  # a jaxpr equation whose outputs are all unused


def regularization_matters(problem: Problem, x) -> bool:
    """Whether switching regularization off (dropout, stochastic depth) changes the model's training-mode program:
    the jaxprs of ``apply(..., train=True, regularization=True)`` and ``False`` compared as text (tracing only, no
    FLOPs). A model with no dropout computes the same either way, and the overfit members can share the others'
    program."""
    model = problem.model
    key = jax.random.key(0)

    def program(regularization):
        def f(params, rest, x):
            return model.apply(params, rest, x, key=key, train=True, regularization=regularization)[0]

        params, rest = jax.eval_shape(lambda: model.init(key, x))
        # Without dead equations (every output unused, printed ``_``): the first trace in a process can carry one
        # (an unused ``random_seed``) that later traces do not, and a model without dropout then looked as if it
        # had some.
        return "\n".join(line for line in str(jax.make_jaxpr(f)(params, rest, x)).splitlines()
                         if not _DEAD.match(line))

    try:
        return program(True) != program(False)
    except Exception:  # noqa: BLE001 -- cannot tell: keep the requests apart
        return True


def per_example_loss(problem: Problem, x, y) -> bool:
    """Whether the loss returns one value per example, which harness averages (shape only: no FLOPs). Then a fixed
    batch repeated to fill a larger batch gives the same loss and gradient; a loss that sums over its batch itself
    (or returns a scalar) would see the repeats, 4x the batch of 32 in a batch of 128."""
    model = problem.model

    def loss(x, y):
        params, rest = model.init(jax.random.key(0), x)
        return problem.loss_fn(model(params, rest, x), y)

    try:
        out = jax.eval_shape(loss, x, y)
    except Exception:  # noqa: BLE001 -- cannot tell: keep the fixed batch at its own size
        return False
    return len(out.shape) >= 1 and out.shape[0] == len(x)


def fixed_only(request: Request) -> bool:
    """Every member trains on the fixed batch, in batches of exactly it (overfit one batch run alone)."""
    spec = request.spec
    return bool(spec.fixed_batch) and spec.batch_size == spec.fixed_batch and bool(
        np.all(np.asarray(request.hparams.fixed_batch) > 0))


def repeats_fixed(request: Request, batch_size: int, repeat_fixed: bool) -> bool:
    """Whether a request that trains only on its fixed batch can train at the run's ``batch_size``, the fixed batch
    repeated to fill it: the same loss and gradient when the loss is per example (``repeat_fixed``,
    :func:`per_example_loss`) and the batch a whole number of fixed batches."""
    return repeat_fixed and fixed_only(request) and batch_size % request.spec.fixed_batch == 0


def _group_key(request: Request, base: Arrays, batch_size: int, free_regularization: bool, repeat_fixed: bool,
               problem: Problem):
    spec, arrays = request.spec, request.arrays if request.arrays is not None else base
    if any(a is not b for a, b in zip(arrays[:4], base[:4])):
        return None  # other arrays (reloaded data, a control's own): a program of its own
    if request.problem is not None and request.problem.covers != problem:  # equal fingerprints: equal programs
        return None  # another model: a program of its own
    batch = batch_size if repeats_fixed(request, batch_size, repeat_fixed) else spec.batch_size
    regularization = True if free_regularization else spec.regularization
    return (batch, regularization, spec.steps_per_call, spec.max_members_per_call, spec.max_eval_examples,
            spec.opt_level)


def plan(requests: list[Request], base: Arrays, batch_size: int, free_regularization: bool,
         repeat_fixed: bool = True, problem: Problem | None = None,
         join_fixed: Callable[[Request], bool] = lambda request: False) -> list[list[int]]:
    """Groups of request indices that share a program (groups of one are left to train on their own). At most one
    fixed batch per group: a second one starts a group of its own. Requests of different step counts share one
    when each can read its own evaluations off the merged program's (:func:`schedule_map`): the shorter ones'
    members get their steps as budgets; a request that trains only on its fixed batch (repeated to the run's
    batch size) joins only when ``repeat_fixed`` (the loss is per example: :func:`per_example_loss`), and only
    requests of its own step count unless ``join_fixed(request)``: its rows then train in calls of their own at
    the others' batch size, more compute for one compile fewer (:func:`harness.budget.joins_table` weighs the
    two). ``batch_size``: the run's; ``problem``: the run's, which a request's own problem must cover (at most one
    such problem per group)."""
    groups: dict[tuple, list[list[int]]] = {}
    for i, r in enumerate(requests):
        key = _group_key(r, base, batch_size, free_regularization, repeat_fixed, problem)
        if key is None:
            continue
        bins = groups.setdefault(key, [])
        fixed = _fixed(r)
        for members in bins:
            other = next((_fixed(requests[j]) for j in members if _fixed(requests[j]) is not None), None)
            if fixed is not None and other is not None and not np.array_equal(fixed, other):
                continue
            own = next((requests[j].problem for j in members if requests[j].problem is not None), None)
            if r.problem is not None and own is not None and r.problem != own:
                continue
            candidate = [requests[j] for j in members] + [r]
            if len({q.spec.steps for q in candidate}) > 1 and not all(
                    join_fixed(q) for q in candidate if fixed_only(q)):
                # Its rows would train in calls of their own anyway (by budget), at the others' batch size:
                # the overfit test's 32 examples repeated to 128 cost 4x its compute to save one compile, worth it
                # only where that compile costs more (join_fixed).
                continue
            spec = merged_spec(candidate)
            if all(schedule_map(requests[j].spec, eval_schedule(spec)) is not None for j in [*members, i]):
                members.append(i)
                break
        else:
            bins.append([i])
    return [members for bins in groups.values() for members in bins if len(members) > 1]


def schedule_map(own: TrainSpec, merged_steps: list[int]) -> list[int] | None:
    """Where each evaluation of a request (``own``, trained alone) is in a merged program's schedule: the same step,
    or for the request's last step the first evaluation at or after it (its members stop there, so every later
    evaluation sees the same parameters). None when one is missing (its chunks would end elsewhere)."""
    out = []
    for step in eval_schedule(own):
        if step in merged_steps:
            out.append(merged_steps.index(step))
            continue
        later = [i for i, m in enumerate(merged_steps) if m >= step]
        if step != own.steps or not later:
            return None
        out.append(later[0])
    return out


def _fixed(request: Request):
    return None if request.arrays is None or not request.spec.fixed_batch else request.arrays.fixed_index


# A call width may pad the table and its follow-ups by this fraction of their rows (on CPU; see call_width).
PADDING_ALLOWED = 0.05


def call_width(parts: list[tuple[int, int]], follow_ups: list[tuple[int, int]], max_width: int) -> int:
    """How many members one call of the table's program trains; ``parts`` and ``follow_ups``: (members, steps).
    On accelerators, as many as allowed (``max_width``): members run in parallel there. On CPU, where a padded
    member costs as much as a real one and ``max_width`` is already narrow (``engine.max_members_per_call=auto``,
    :meth:`harness.checks.base.EngineSettings.members_per_call`), the widest width up to it whose calls hold the
    table's members of each step count (calls are grouped by budget, :func:`harness.engine.driver.call_groups`)
    and each follow-up (padded to whole calls, to reuse the program) within ``PADDING_ALLOWED`` of their
    member-steps. 54 table rows and the LR test's 35-member second round, all 500 steps, on two CPU devices:
    calls of 6, 90 rows trained (calls of 54 would train 108)."""
    by_steps: dict[int, int] = {}
    for n, steps in parts:
        by_steps[steps] = by_steps.get(steps, 0) + n
    widest = devices.padded_size(min(sum(by_steps.values()), max_width))
    if jax.default_backend() != "cpu" or (not follow_ups and len(by_steps) < 2):
        return widest
    classes = [*by_steps.items(), *((steps, n) for n, steps in follow_ups)]
    needed = sum(n * steps for steps, n in classes)
    for width in range(widest, 0, -1):
        if devices.padded_size(width) != width:
            continue
        padded = sum(-(-n // width) * width * steps for steps, n in classes)
        if padded <= (1 + PADDING_ALLOWED) * needed:
            return width
    return widest


def merged_spec(requests: list[Request]) -> TrainSpec:
    """The merged program's spec: the longest request's steps, evaluated at the greatest common divisor of the
    requests' cadences, with parameters returned if any asks for them, in calls of :func:`call_width` members."""
    specs = [r.spec for r in requests]
    cadences = [s.eval_every for s in specs if s.eval_every > 0]
    batch_cadences = [s.batch_eval_every for s in specs if s.batch_eval_every > 0 and s.fixed_batch]
    fixed = next((r for r in requests if _fixed(r) is not None), None)
    template = next((r.spec for r in requests if not fixed_only(r)), specs[0])
    return dataclasses.replace(
        template, steps=max(s.steps for s in specs), eval_every=math.gcd(*cadences) if cadences else 0,
        batch_eval_every=math.gcd(*batch_cadences) if batch_cadences else 0,
        max_members_per_call=call_width([(len(r.hparams), r.spec.steps) for r in requests],
                                        [(r.follow_up, r.spec.steps) for r in requests if r.follow_up],
                                        template.max_members_per_call),
        return_params=any(s.return_params for s in specs),
        fixed_batch=fixed.spec.fixed_batch if fixed is not None else 0,
        regularization=any(s.regularization for s in specs))


def with_budget(hparams: Hparams, steps: int, spec_steps: int) -> Hparams:
    """``hparams`` trained for ``steps`` inside a program of ``spec_steps``: their own budgets, at most ``steps``."""
    if steps >= spec_steps:
        return hparams
    own = np.asarray(hparams.steps)
    # (Hparams' __len__ counts members, so NamedTuple._replace cannot be used.)
    return Hparams(**{**hparams._asdict(), "steps": np.where(own > 0, np.minimum(own, steps), steps).astype(own.dtype)})


def merged(requests: list[Request], base: Arrays) -> Request:
    """One request for a group: the members of every request in order (:func:`merged_spec`); members of a request
    shorter than the longest get its steps as their budgets."""
    spec = merged_spec(requests)
    parts = [with_budget(r.hparams, r.spec.steps, spec.steps) for r in requests]
    hparams = Hparams(*(np.concatenate([np.asarray(getattr(h, f)) for h in parts]) for f in Hparams._fields))
    fixed = next((r for r in requests if _fixed(r) is not None), None)
    arrays = base if fixed is None else fixed.arrays
    problem = next((r.problem for r in requests if r.problem is not None), None)
    return Request("+".join(r.name for r in requests), spec, hparams, arrays, problem=problem)


def onto(parts: list[Request], both: Request, program: Request) -> Request | None:
    """``both`` (the merged request of ``parts``) trained by ``program``, a merged request whose program is already
    compiled (the budget's probe, which compiles its evaluations inside the chunks whatever the cadence): its spec,
    call width, arrays and model, at ``both``'s evaluation cadence (an argument of the program,
    :func:`harness.engine.core.program_spec`), the rows' steps as their budgets. A
    smaller suite than the one ``program`` was made for (fewer rows, shorter runs, an LR grid that evaluates to
    extrapolate) then compiles nothing. None when that is another program (another batch, model, fixed batch or
    chunking; evaluations inside the chunks where ``program`` has none), when ``both`` trains more steps or wants
    parameters ``program`` does not return, or when an evaluation of a part would not be made (a request's last
    step may be read at the first chunk end after it, evaluated after the chunk's loop, where its members have
    stopped; an evaluation inside the loop past the call's longest budget is never computed)."""
    s, p = both.spec, program.spec
    if (s.steps > p.steps or (s.return_params and not p.return_params)
            or any(getattr(s, f) != getattr(p, f) for f in ("batch_size", "regularization", "steps_per_call",
                                                             "max_eval_examples", "opt_level"))):
        return None
    if both.problem is not None and both.problem != program.problem:
        return None
    if any(a is not b for a, b in zip(both.arrays[:4], program.arrays[:4])):
        return None
    if s.fixed_batch and (s.fixed_batch != p.fixed_batch
                          or not np.array_equal(both.arrays.fixed_index, program.arrays.fixed_index)):
        return None
    spec = dataclasses.replace(p, eval_every=s.eval_every, batch_eval_every=s.batch_eval_every,
                               inside_evals=evaluates_inside(p))
    if program_spec(spec) != program_spec(p):
        return None
    schedule = eval_schedule(spec)
    batch_only = batch_only_evals(spec)
    chunk_ends = set(eval_schedule(dataclasses.replace(spec, eval_every=0, batch_eval_every=0)))
    for r in parts:
        own, columns = eval_schedule(r.spec), schedule_map(r.spec, schedule)
        if columns is None:
            return None
        own_batch_only = batch_only_evals(r.spec)
        for step, column in zip(own, columns):
            at = schedule[column]
            if (at != step and at not in chunk_ends) or (at in batch_only and step not in own_batch_only):
                return None
    return Request(both.name, spec, with_budget(both.hparams, s.steps, p.steps), program.arrays,
                   problem=program.problem)


def split(result: SweepResult, rows: slice, request: Request) -> SweepResult:
    """``request``'s share of a merged result: its rows, its steps, and the evaluations of its own schedule."""
    own = eval_schedule(request.spec)
    columns = schedule_map(request.spec, [int(s) for s in np.asarray(result.eval_steps)])
    share = result.take(rows, request.hparams, columns)
    n = request.spec.steps
    share = dataclasses.replace(
        share, eval_steps=np.asarray(own), loss=share.loss[:, :n], grad_norm=share.grad_norm[:, :n],
        lr=share.lr[:, :n], update_norm=None if share.update_norm is None else share.update_norm[:, :n],
        param_norm=None if share.param_norm is None else share.param_norm[:, :n])
    # Where the request alone evaluates only its fixed batch, the merged program may have evaluated everything (a
    # full evaluation another request asked for): the share keeps what its own program computes there.
    batch_only = [i for i, s in enumerate(own) if s in batch_only_evals(request.spec)]
    if batch_only:
        def blank(x):
            if x is None:
                return None
            x = np.array(x, copy=True)
            x[:, batch_only] = np.nan
            return x

        share = dataclasses.replace(share, val_loss=blank(share.val_loss), val_accuracy=blank(share.val_accuracy),
                                    train_eval_loss=blank(share.train_eval_loss))
    if not request.spec.return_params:
        share = dataclasses.replace(share, params=None)
    if not request.spec.fixed_batch:
        share = dataclasses.replace(share, batch_loss=None, batch_accuracy=None)
    return share
