"""The member table: training requests of several diagnostics merged into one compiled program.

Every training diagnostic is a set of member rows of one pure training program (:mod:`harness.engine.train`): the
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

import jax
import numpy as np

from harness.engine import devices
from harness.engine.train import (Arrays, Hparams, Problem, SweepResult, TrainSpec, batch_only_evals,
                                  eval_schedule)


@dataclasses.dataclass(frozen=True)
class Request:
    """One ``ctx.train(name, spec, hparams, arrays)`` call a diagnostic is about to make (``arrays``: None for the
    run's own)."""

    name: str
    spec: TrainSpec
    hparams: Hparams
    arrays: Arrays | None = None
    rerun: bool = False  # a second run of an identical request (a determinism check): its own rows
    # Members the diagnostic will train later by the same program (the LR test's second round, through
    # Context.train_like), so the table's call width can be chosen to fit both without padding.
    follow_up: int = 0


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
        return str(jax.make_jaxpr(f)(params, rest, x))

    try:
        return program(True) != program(False)
    except Exception:  # noqa: BLE001 -- cannot tell: keep the requests apart
        return True


def fixed_only(request: Request) -> bool:
    """Every member trains on the fixed batch, in batches of exactly it (overfit one batch run alone)."""
    spec = request.spec
    return bool(spec.fixed_batch) and spec.batch_size == spec.fixed_batch and bool(
        np.all(np.asarray(request.hparams.fixed_batch) > 0))


def _group_key(request: Request, base: Arrays, batch_size: int, free_regularization: bool):
    spec, arrays = request.spec, request.arrays if request.arrays is not None else base
    if any(a is not b for a, b in zip(arrays[:4], base[:4])):
        return None  # other arrays (reloaded data, a control's own): a program of its own
    batch = spec.batch_size
    if fixed_only(request) and batch_size % spec.fixed_batch == 0:
        batch = batch_size  # the fixed batch repeated to fill the others' batches: the same loss and gradient
    regularization = True if free_regularization else spec.regularization
    return (spec.steps, batch, regularization, spec.steps_per_call, spec.max_members_per_call,
            spec.max_eval_examples, spec.opt_level)


def plan(requests: list[Request], base: Arrays, batch_size: int, free_regularization: bool) -> list[list[int]]:
    """Groups of request indices that share a program (groups of one are left to train on their own). At most one
    fixed batch per group: a second one starts a group of its own. ``batch_size``: the run's."""
    groups: dict[tuple, list[list[int]]] = {}
    for i, r in enumerate(requests):
        key = _group_key(r, base, batch_size, free_regularization)
        if key is None:
            continue
        bins = groups.setdefault(key, [])
        fixed = _fixed(r)
        for members in bins:
            other = next((_fixed(requests[j]) for j in members if _fixed(requests[j]) is not None), None)
            if fixed is None or other is None or np.array_equal(fixed, other):
                members.append(i)
                break
        else:
            bins.append([i])
    return [members for bins in groups.values() for members in bins if len(members) > 1]


def _fixed(request: Request):
    return None if request.arrays is None or not request.spec.fixed_batch else request.arrays.fixed_index


# A call width may pad the table and its follow-ups by this fraction of their rows (on CPU; see call_width).
PADDING_ALLOWED = 0.05


def call_width(rows: int, follow_ups: list[int], max_width: int) -> int:
    """How many members one call of the table's program trains. On accelerators, as many as allowed: members run
    in parallel there. On CPU a step costs the same per member whatever the call width (measured on the reference
    job: 54 members in calls of 54, 27, 18 or 9 run within 5% of each other, the cores are busy from 9 on), so the
    width that matters is the one that wastes least on padding: the widest whose calls hold the table's rows and
    each follow-up (every follow-up is padded to whole calls, to reuse the program) within ``PADDING_ALLOWED``
    of their count. 54 table rows and the LR test's 35-member second round: calls of 18, 90 rows trained
    instead of 108 in calls of 54."""
    widest = devices.padded_size(min(rows, max_width))
    if jax.default_backend() != "cpu" or not follow_ups:
        return widest
    needed = rows + sum(follow_ups)
    for width in range(widest, 0, -1):
        if devices.padded_size(width) != width:
            continue
        padded = sum(-(-n // width) * width for n in (rows, *follow_ups))
        if padded <= (1 + PADDING_ALLOWED) * needed:
            return width
    return widest


def merged(requests: list[Request], base: Arrays) -> Request:
    """One request for a group: the members of every request in order, evaluated at the greatest common divisor of
    their cadences, with parameters returned if any asks for them, in calls of :func:`call_width` members."""
    specs = [r.spec for r in requests]
    cadences = [s.eval_every for s in specs if s.eval_every > 0]
    batch_cadences = [s.batch_eval_every for s in specs if s.batch_eval_every > 0 and s.fixed_batch]
    fixed = next((r for r in requests if _fixed(r) is not None), None)
    template = next((r.spec for r in requests if not fixed_only(r)), specs[0])
    spec = dataclasses.replace(
        template, eval_every=math.gcd(*cadences) if cadences else 0,
        batch_eval_every=math.gcd(*batch_cadences) if batch_cadences else 0,
        max_members_per_call=call_width(sum(len(r.hparams) for r in requests),
                                        [r.follow_up for r in requests if r.follow_up], template.max_members_per_call),
        return_params=any(s.return_params for s in specs),
        fixed_batch=fixed.spec.fixed_batch if fixed is not None else 0,
        regularization=any(s.regularization for s in specs))
    hparams = Hparams(*(np.concatenate([np.asarray(getattr(r.hparams, f)) for r in requests])
                        for f in Hparams._fields))
    arrays = base if fixed is None else fixed.arrays
    return Request("+".join(r.name for r in requests), spec, hparams, arrays)


def split(result: SweepResult, rows: slice, request: Request) -> SweepResult:
    """``request``'s share of a merged result: its rows, its steps, and the evaluations of its own schedule."""
    steps = list(np.asarray(result.eval_steps))
    own = eval_schedule(request.spec)
    share = result.take(rows, request.hparams, [steps.index(s) for s in own])
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
