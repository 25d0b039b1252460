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

from harness.engine.train import Arrays, Hparams, Problem, SweepResult, TrainSpec, eval_schedule


@dataclasses.dataclass(frozen=True)
class Request:
    """One ``ctx.train(name, spec, hparams, arrays)`` call a diagnostic is about to make (``arrays``: None for the
    run's own)."""

    name: str
    spec: TrainSpec
    hparams: Hparams
    arrays: Arrays | None = None
    rerun: bool = False  # a second run of an identical request (a determinism check): its own rows


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


def merged(requests: list[Request], base: Arrays) -> Request:
    """One request for a group: the members of every request in order, evaluated at the greatest common divisor of
    their cadences, with parameters returned if any asks for them."""
    specs = [r.spec for r in requests]
    cadences = [s.eval_every for s in specs if s.eval_every > 0]
    fixed = next((r for r in requests if _fixed(r) is not None), None)
    template = next((r.spec for r in requests if not fixed_only(r)), specs[0])
    spec = dataclasses.replace(
        template, eval_every=math.gcd(*cadences) if cadences else 0,
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
    share = result.take(rows, request.hparams, [steps.index(s) for s in eval_schedule(request.spec)])
    if not request.spec.return_params:
        share = dataclasses.replace(share, params=None)
    if not request.spec.fixed_batch:
        share = dataclasses.replace(share, batch_loss=None, batch_accuracy=None)
    return share
