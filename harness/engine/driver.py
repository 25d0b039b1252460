"""The engine's driver: trains the members of a sweep through the pure program (:mod:`harness.engine.core`).

It pads the members to whole calls of one width (grouped by step budget, :func:`call_groups`), shards them across
devices, cuts long runs into chunks of steps (one compiled program reused per chunk, so the host can show progress
between them), compiles through :mod:`harness.engine.compile`, and gathers the records and evaluations into one
:class:`SweepResult` in the caller's member order. On CPU, models with convolutions train with the step loop on
the host instead (:func:`needs_host_step_loop`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from harness.engine import compile as programs
from harness.engine import devices
from harness.engine.core import (Arrays, Hparams, Problem, Records, TrainSpec, any_eval_due, batch_eval_due,
                                 eval_due, evaluate_member, init_member, make_train, member_budget, train_chunk)


def cpu_options() -> dict | None:
    """Extra XLA options for training programs on the CPU backend. Measured on the reference job's LR grid (32
    members x 200 steps, 2 cores, one quiet run): optimization level 0: 1.7 s compile + 3.4 s run; XLA's default
    (3): 3.9 + 1.8; level 2 with the fusion emitters off: 1.5 + 1.9 — about the fastest run for the cheapest
    compile, so that is the default (``engine.opt_level``)."""
    return {"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu" else None


def needs_host_step_loop(problem: Problem) -> bool:
    """XLA's CPU backend runs convolutions inside a while loop (``lax.scan``) about 50x slower than the same
    convolution in a top-level program (measured here: 0.43 s vs 0.009 s per step of the built-in CNN on digits;
    neither unrolling by 4 nor XLA flags helped; a full unroll compiles for 12 s). So on CPU a model with
    convolutions trains with the step loop on the host: one compiled, vmapped *step* program called per step.
    Accelerators keep the scan."""
    return jax.default_backend() == "cpu" and problem.model.convolutions


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
    spec = dataclasses.replace(spec, steps_per_call=per_call)
    data, x_fit = prepare_arrays(arrays, spec)

    n = len(hparams)
    width = devices.padded_size(min(n, spec.max_members_per_call))
    budgets = np.asarray(jax.device_get(member_budget(spec, hparams)))
    order = call_groups(budgets, width)
    groups = [hparams.take(index) for index in order]
    total_work = len(groups) * calls
    done = 0

    train = make_train(problem, spec)

    def first_call(hp, data, x_fit, active):
        return train(hp, data, x_fit, active)

    def advance(state, hp, data, x_fit, t0, active):
        return train(hp, data, x_fit, active, state, t0)

    def key(kind):
        return (problem, spec, kind)  # Problems with equal fingerprints share programs

    host_loop = needs_host_step_loop(problem)
    if host_loop:
        # Chunking and evaluation cadence happen on the host here: they must not change the programs' keys.
        step_spec = dataclasses.replace(spec, steps_per_call=1, eval_every=0, batch_eval_every=0)

        def host_key(kind):
            return (problem, step_spec, kind)

        def init_states(hp, x_example):
            return jax.vmap(lambda h: init_member(problem, h, x_example))(hp)

        def one_step(state, hp, data, t):
            return jax.vmap(lambda s, h: train_chunk(problem, step_spec, s, h, data, t))(state, hp)

        def evaluate(state, hp, data, x_fit, full=True):
            return jax.vmap(lambda s, h: evaluate_member(problem, s, h, data, x_fit, full))(state, hp)

        def evaluate_batch(state, hp, data, x_fit):
            return evaluate(state, hp, data, x_fit, False)

        def host_chunk(state, hp, c, last, frozen):
            """The same chunk as ``advance``, with the step loop on the host. XLA's default optimization level:
            level 0 leaves CPU convolutions several times slower still. Steps from ``last`` on (every member of
            the call is past its budget) are not run: they record what a member past its budget records, and the
            parameters no longer change, so each kind of evaluation is computed once more (``frozen``) and reused."""
            if state is None:
                state = programs.run(f"{name}/init", init_states, hp, x_fit[:1], static_key=host_key("init"))
                state = devices.shard_members(state)
            recs, inside = [], []

            def run_eval(kind, fn, done):  # ``done``: steps trained when it is due
                if kind in frozen:
                    return frozen[kind]
                out = programs.run(f"{name}/{kind}", fn, state, hp, data, x_fit, static_key=host_key(kind))
                if done >= last:
                    frozen[kind] = out
                return out

            for t in range(c * per_call, (c + 1) * per_call):
                if t < last:
                    state, rec = programs.run(f"{name}/train", one_step, state, hp, data, np.int32(t),
                                              static_key=host_key("step"))
                    state = devices.shard_members(state)
                    frozen.setdefault("template", rec._replace(evals=None))
                    recs.append(rec._replace(evals=None))
                else:
                    recs.append(past_budget(frozen, t))
                if bool(eval_due(spec, t, (c + 1) * per_call)):
                    inside.append((t + 1, run_eval("eval", evaluate, t + 1)))
                elif bool(batch_eval_due(spec, t, (c + 1) * per_call)):
                    inside.append((t + 1, run_eval("eval_batch", evaluate_batch, t + 1)))
            rec = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *recs)
            ev = run_eval("eval", evaluate, (c + 1) * per_call)
            return state, rec, ev, inside

        def past_budget(frozen: dict, t: int) -> Records:
            """A step's records for members all past their budgets: NaN but the learning rate's schedule. What
            does not change from step to step (NaN records, the members' LRs and ramps) is made once per call,
            on the host: no device work for a skipped step."""
            if "nan" not in frozen:
                template = frozen["template"]
                h = jax.tree.map(np.asarray, devices.to_host(frozen["hp"]))
                steps = np.where(h.steps > 0, np.minimum(h.steps, spec.steps), spec.steps)  # member_budget
                frozen["schedule"] = (h.lr, h.lr_growth, np.maximum(steps - 1, 1).astype(np.float32),
                                      np.asarray(template.lr).dtype)
                frozen["nan"] = jax.tree.map(lambda a: np.full(np.shape(a), np.nan, np.asarray(a).dtype), template)
            lr0, growth, denom, dtype = frozen["schedule"]
            lr = (lr0 * np.exp(growth * np.float32(t) / denom)).astype(dtype)[:, None]
            return frozen["nan"]._replace(lr=lr)

    outputs = []
    for index, group in zip(order, groups):
        real = len(group)
        last = int(budgets[index].max())  # the call trains until its longest-running member's budget
        hp = devices.shard_members(devices.pad_members(group, width))
        records, evals, eval_steps = [], [], []
        state = None
        frozen: dict = {"hp": hp}  # host step loop: what the call's members give once all are past their budgets
        for c in range(calls):
            inside = []  # (step, evaluation) due inside this chunk (spec.eval_every)
            active = np.arange(c * per_call, (c + 1) * per_call) < last
            if host_loop:
                state, rec, ev, inside = host_chunk(state, hp, c, last, frozen)
            elif state is None:
                state, rec, ev = programs.run(f"{name}/train", first_call, hp, data, x_fit, active,
                                              static_key=key("first"), opt_level=spec.opt_level,
                                              options=cpu_options())
            else:
                state, rec, ev = programs.run(f"{name}/train", advance, state, hp, data, x_fit,
                                              np.int32(c * per_call), active, static_key=key("next"),
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
