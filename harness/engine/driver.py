"""The engine's driver: trains the members of a sweep through the pure program (:mod:`harness.engine.core`).

It pads the members to whole calls of one width (grouped by step budget, :func:`call_groups`), shards them across
devices, cuts long runs into chunks of steps (one compiled program reused per chunk, so the host can show progress
between them), compiles through :mod:`harness.engine.compile`, and gathers the records and evaluations into one
:class:`SweepResult` in the caller's member order. Models with convolutions train in the same scan: on CPU their
convolutions run as matrix multiplications (:mod:`harness.engine.convolution`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from harness.engine import compile as programs
from harness.engine import devices
from harness.engine.core import (Arrays, Cadence, Hparams, Problem, TrainSpec, any_eval_due, batch_eval_due,
                                 make_train, member_budget, program_spec)


def cpu_options() -> dict | None:
    """Extra XLA options for training programs on the CPU backend. Measured on the reference job's LR grid (32
    members x 200 steps, 2 cores, one quiet run): optimization level 0: 1.7 s compile + 3.4 s run; XLA's default
    (3): 3.9 + 1.8; level 2 with the fusion emitters off: 1.5 + 1.9 — about the fastest run for the cheapest
    compile, so that is the default (``engine.opt_level``)."""
    return {"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu" else None


@dataclasses.dataclass
class SweepResult:
    """Host-side results, one row per member (numpy arrays)."""

    hparams: Hparams
    loss: np.ndarray  # (members, steps) training minibatch loss; NaN after a member went non-finite
    grad_norm: np.ndarray  # (members, steps)
    lr: np.ndarray  # (members, steps)
    eval_steps: np.ndarray  # (evals,) step count at each evaluation
    val_loss: np.ndarray  # (members, evals)
    val_accuracy: np.ndarray | None  # (members, evals) for classification
    train_eval_loss: np.ndarray  # (members, evals) loss on the (fixed) training evaluation subset
    first_nonfinite: np.ndarray  # (members,) -1 if never
    params: Any = None  # final parameters with a leading member axis, when requested
    update_norm: np.ndarray | None = None  # (members, steps) |update| of each step, NaN once non-finite
    param_norm: np.ndarray | None = None  # (members, steps) |params| before each step
    batch_loss: np.ndarray | None = None  # (members, evals) loss on the fixed batch (TrainSpec.fixed_batch)
    batch_accuracy: np.ndarray | None = None  # (members, evals) its accuracy, for classification
    # The program that trained it (merged requests share one): a follow-up request given the same spec, arrays and
    # member count reuses it (Context.train_like).
    program_width: int | None = None
    program_spec: TrainSpec | None = None
    program_arrays: Arrays | None = None
    program_problem: Problem | None = None

    def take(self, rows, hparams: Hparams, evals=None) -> "SweepResult":
        """The members ``rows`` (a slice or index array) as their own result, labelled ``hparams``; ``evals``
        (indices into ``eval_steps``) keeps only those evaluations."""
        members = (lambda x: None if x is None else np.asarray(x)[rows])  # noqa: E731
        columns = slice(None) if evals is None else list(evals)

        def per_eval(x):
            return None if x is None else np.asarray(x)[rows][:, columns]

        params = None if self.params is None else jax.tree.map(lambda a: np.asarray(a)[rows], self.params)
        return dataclasses.replace(
            self, hparams=hparams, loss=members(self.loss), grad_norm=members(self.grad_norm), lr=members(self.lr),
            eval_steps=np.asarray(self.eval_steps)[columns], val_loss=per_eval(self.val_loss),
            val_accuracy=per_eval(self.val_accuracy), train_eval_loss=per_eval(self.train_eval_loss),
            first_nonfinite=members(self.first_nonfinite), params=params, update_norm=members(self.update_norm),
            param_norm=members(self.param_norm), batch_loss=per_eval(self.batch_loss),
            batch_accuracy=per_eval(self.batch_accuracy))

    @property
    def diverged(self) -> np.ndarray:
        return self.first_nonfinite >= 0

    @property
    def final_val_loss(self) -> np.ndarray:
        return self.val_loss[:, -1]

    @property
    def final_train_loss(self) -> np.ndarray:
        return self.train_eval_loss[:, -1]



def eval_schedule(spec: TrainSpec) -> list[int]:
    """The steps after which :func:`train_members` evaluates, in order (``SweepResult.eval_steps``): every
    ``eval_every`` (and ``batch_eval_every``) steps inside each chunk, and at each chunk's end."""
    calls, per_call = _chunk_plan(spec)
    spec = dataclasses.replace(spec, steps_per_call=per_call)
    out: list[int] = []
    for c in range(calls):
        end = (c + 1) * per_call
        if spec.eval_every > 0 or spec.batch_eval_every > 0:
            out += [t + 1 for t in range(c * per_call, end) if bool(any_eval_due(spec, t, end))]
        out.append(min(end, spec.steps))
    return out


def batch_only_evals(spec: TrainSpec) -> set[int]:
    """The steps of :func:`eval_schedule` at which only the fixed batch is evaluated (``batch_eval_every``)."""
    calls, per_call = _chunk_plan(spec)
    spec = dataclasses.replace(spec, steps_per_call=per_call)
    return {t + 1 for c in range(calls) for t in range(c * per_call, (c + 1) * per_call)
            if bool(batch_eval_due(spec, t, (c + 1) * per_call))}


def even_calls(spec: TrainSpec, members: int) -> TrainSpec:
    """``spec`` for a request of its own (no other request shares its program) with its ``members`` split evenly:
    as few calls as ``spec.max_members_per_call`` allows, each as narrow as they then can be. On CPU, where a padded
    member costs as much as a real one, 7 members at 6 per call train as 2 calls of 4, not 6 and 6 (the second
    padded with 5). Members that fill whole calls keep the width (a follow-up padded to the calls of its first
    request's program, :meth:`harness.checks.base.Context.train_like`, still reuses it)."""
    cap = spec.max_members_per_call
    if members <= cap:
        return spec
    calls = -(-members // cap)
    return dataclasses.replace(spec, max_members_per_call=min(devices.padded_size(-(-members // calls)), cap))


def call_groups(budgets: np.ndarray, width: int) -> list[np.ndarray]:
    """Which members train together, as index arrays of at most ``width`` (each call is padded to ``width``). A
    call runs until its longest budget (:func:`member_budget`), so members are grouped by budget when that costs
    fewer member-steps than calls in the caller's order: the LR grid's short runs beside the seeds' long ones then
    fill calls that stop early. Equal budgets (the usual case) keep the caller's order."""
    budgets = np.asarray(budgets)
    n = len(budgets)
    in_order = [np.arange(i, min(i + width, n)) for i in range(0, n, width)]
    if n == 0 or np.all(budgets == budgets[0]):
        return in_order
    by_budget = []
    for b in np.unique(budgets)[::-1]:
        members = np.flatnonzero(budgets == b)
        by_budget += [members[i:i + width] for i in range(0, len(members), width)]

    def cost(groups):
        return sum(width * int(budgets[g].max()) for g in groups)

    return by_budget if cost(by_budget) < cost(in_order) else in_order


def _chunk_plan(spec: TrainSpec) -> tuple[int, int]:
    """(number of calls, steps per call): calls of equal length so one compiled program serves them all."""
    calls = max(1, math.ceil(spec.steps / max(1, spec.steps_per_call)))
    per_call = math.ceil(spec.steps / calls)
    return calls, per_call


def eval_size(n: int, max_eval_examples: int, y) -> int:
    """How many of ``n`` examples an evaluation reads: ``max_eval_examples`` counts *predictions*, so a sequence
    of T class targets (a language model's tokens) counts T. Every member evaluates in one vmapped call, so this
    bounds its memory: 2048 sequences of 64 tokens are 131k predictions a member, and a 34-member LR grid of a
    small character-level transformer ran out of 24 GB."""
    y = np.asarray(y)
    per_example = int(np.prod(y.shape[1:])) if np.issubdtype(y.dtype, np.integer) else 1
    return min(n, max(1, max_eval_examples // max(per_example, 1)))


def prepare_arrays(arrays: Arrays, spec: TrainSpec) -> tuple[Arrays, Any]:
    """Device arrays, replicated over the mesh; the validation set capped at ``spec.max_eval_examples``
    predictions (:func:`eval_size`). Evaluation on the training side uses the first examples, as many."""
    n_eval = eval_size(len(arrays.x_val), spec.max_eval_examples, arrays.y_val)
    fixed = None
    if spec.fixed_batch:
        fixed = np.asarray(arrays.fixed_index, np.int32)
        if fixed.shape != (spec.fixed_batch,) or spec.batch_size % spec.fixed_batch:
            raise ValueError(f"a fixed batch of {spec.fixed_batch} needs Arrays.fixed_index of that length and a "
                             f"batch_size that is a multiple of it, got {fixed.shape} and {spec.batch_size}")
    capped = Arrays(arrays.x_train, arrays.y_train, arrays.x_val[:n_eval], arrays.y_val[:n_eval], fixed)
    n_fit = eval_size(len(arrays.x_train), spec.max_eval_examples, arrays.y_train)
    return devices.replicate(capped), devices.replicate(np.asarray(arrays.x_train[:n_fit]))


class _Calls(NamedTuple):
    """What :func:`train_members` trains with."""

    spec: TrainSpec  # at its chunk length
    data: Arrays  # on the devices
    x_fit: Any
    width: int  # members per call
    budgets: np.ndarray  # each member's steps
    order: list[np.ndarray]  # the calls' members (call_groups)
    first_call: Callable  # the first chunk's program, which initializes the members
    advance: Callable  # the next chunks'
    key: Callable[[str], tuple]  # their static keys
    cadence: Cadence  # the evaluations inside the chunks, an argument of both programs


def _calls(problem: Problem, spec: TrainSpec, hparams: Hparams, arrays: Arrays) -> _Calls:
    spec = dataclasses.replace(spec, steps_per_call=_chunk_plan(spec)[1])
    data, x_fit = prepare_arrays(arrays, spec)
    width = devices.padded_size(min(len(hparams), spec.max_members_per_call))
    budgets = np.asarray(jax.device_get(member_budget(spec, hparams)))
    static = program_spec(spec)  # the evaluation cadence is an argument: requests that differ in it share
    train = make_train(problem, static)

    def first_call(hp, data, x_fit, active_steps, cadence):
        return train(hp, data, x_fit, active_steps, cadence=cadence)

    def advance(state, hp, data, x_fit, t0, active_steps, cadence):
        return train(hp, data, x_fit, active_steps, state, t0, cadence)

    def key(kind):
        return (problem, static, kind)  # Problems with equal fingerprints share programs

    return _Calls(spec, data, x_fit, width, budgets, call_groups(budgets, width), first_call, advance, key,
                  Cadence.of(spec))


def compile_ahead(problem: Problem, spec: TrainSpec, hparams: Hparams, arrays: Arrays, *, name: str = "train"):
    """Compile the program whose first call :func:`train_members` will make with these arguments, without running
    it: a later ``train_members`` finds it compiled (or waits for this compile, :func:`harness.engine.compile.
    compiled`). The pipeline compiles the member table's program this way while the model stage runs."""
    c = _calls(problem, spec, hparams, arrays)
    hp = devices.shard_members(devices.pad_members(hparams.take(c.order[0]), c.width))
    programs.compiled(f"{name}/train", c.first_call, hp, c.data, c.x_fit, np.int32(0), c.cadence,
                      static_key=c.key("first"), opt_level=c.spec.opt_level, options=cpu_options())


def train_members(
    problem: Problem,
    spec: TrainSpec,
    hparams: Hparams,
    arrays: Arrays,
    *,
    name: str = "train",
    progress: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Train every member of ``hparams`` and return their curves: members in chunks of at most
    ``spec.max_members_per_call`` (padded to a multiple of the device count, sharded across devices), steps in
    chunks of ``spec.steps_per_call``. All chunks share one compiled training program and one evaluation program.
    """
    original_spec = spec
    calls, per_call = _chunk_plan(spec)
    prepared = _calls(problem, spec, hparams, arrays)
    spec, data, x_fit, width, cadence = prepared.spec, prepared.data, prepared.x_fit, prepared.width, prepared.cadence
    order, key = prepared.order, prepared.key
    groups = [hparams.take(index) for index in order]
    total_work = len(groups) * calls
    done = 0

    outputs = []
    for index, group in zip(order, groups):
        real = len(group)
        last = int(prepared.budgets[index].max())  # the call trains until its longest-running member's budget
        hp = devices.shard_members(devices.pad_members(group, width))
        records, evals, eval_steps = [], [], []
        state = None
        for c in range(calls):
            inside = []  # (step, evaluation) due inside this chunk (spec.eval_every)
            active = np.int32(np.clip(last - c * per_call, 0, per_call))  # its steps any member trains
            if state is None:
                state, rec, ev = programs.run(f"{name}/train", prepared.first_call, hp, data, x_fit, active, cadence,
                                              static_key=key("first"), opt_level=spec.opt_level,
                                              options=cpu_options())
            else:
                state, rec, ev = programs.run(f"{name}/train", prepared.advance, state, hp, data, x_fit,
                                              np.int32(c * per_call), active, cadence, static_key=key("next"),
                                              opt_level=spec.opt_level, options=cpu_options())
            # Re-place the state on the member sharding so every continuation call sees the same input layout
            # and one executable serves them all (another layout would be another program).
            state = devices.shard_members(state)
            # to_host: multi-host, every process gathers every member (harness.engine.devices).
            rec = jax.tree.map(lambda a: a[:real], devices.to_host(rec))
            if rec.evals is not None:
                steps_here = np.arange(c * per_call, (c + 1) * per_call)
                due = np.asarray(any_eval_due(spec, steps_here, (c + 1) * per_call))
                inside = [(int(t) + 1, tuple(np.asarray(v)[:, j] for v in rec.evals))
                          for j, t in enumerate(steps_here) if due[j]]
                rec = rec._replace(evals=None)
            records.append(rec)
            for step, inside_ev in inside:
                evals.append(jax.tree.map(lambda a: np.asarray(a)[:real], devices.to_host(inside_ev)))
                eval_steps.append(step)
            evals.append(jax.tree.map(lambda a: a[:real], devices.to_host(ev)))
            eval_steps.append(min((c + 1) * per_call, spec.steps))
            done += 1
            if progress is not None:
                progress(done, total_work)
        params = jax.tree.map(lambda a: a[:real], devices.to_host(state.params)) if spec.return_params else None
        outputs.append((records, evals, devices.to_host(state.first_nonfinite)[:real], params))

    # Rows back in the caller's order (calls group members by budget).
    back = np.argsort(np.concatenate(order), kind="stable")

    def stack_records(field):
        per_group = [np.concatenate([getattr(r, field) for r in recs], axis=1) for recs, *_ in outputs]
        return np.concatenate(per_group, axis=0)[back, : spec.steps]

    def stack_evals(i):
        return np.concatenate([np.stack([e[i] for e in evs], axis=1) for _, evs, *_ in outputs], axis=0)[back]

    val_acc = stack_evals(1) if problem.classification else None
    batch_loss = stack_evals(3) if spec.fixed_batch else None
    batch_acc = stack_evals(4) if spec.fixed_batch and problem.classification else None
    params = None
    if spec.return_params:
        params = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0)[back], *[p for *_, p in outputs])
    return SweepResult(
        hparams=hparams,
        loss=stack_records("loss"),
        grad_norm=stack_records("grad_norm"),
        lr=stack_records("lr"),
        eval_steps=np.asarray(eval_steps),
        val_loss=stack_evals(0),
        val_accuracy=val_acc,
        train_eval_loss=stack_evals(2),
        first_nonfinite=np.concatenate([o[2] for o in outputs])[back],
        params=params,
        update_norm=stack_records("update_norm"),
        param_norm=stack_records("param_norm"),
        batch_loss=batch_loss,
        batch_accuracy=batch_acc,
        program_width=width,
        program_spec=original_spec,
        program_arrays=arrays,
        program_problem=problem,
    )
