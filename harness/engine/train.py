"""The training engine: one pure, jit-compiled training program, vmapped over the members of a sweep.

A *member* is one training run, described by traced hyperparameters (:class:`Hparams`): learning rate, a
log-LR growth for the LR range test's ramp, weight decay, init and batch-order seeds, an input scale (0 gives the
constant-input baseline) and a label-permutation seed (the shuffled-label control). Everything that changes the
program's shapes or code (model, loss, optimizer kind, batch size, step count) is static (:class:`Problem`,
:class:`TrainSpec`). So every training diagnostic is a choice of member rows, and diagnostics with the same static
settings share one compiled program (PureJaxRL's ``jit(vmap(train))`` pattern, luchris429/purejaxrl).

Failure is data: a member whose loss or gradient goes non-finite stops updating (its parameters stay at the last
finite values) and records the step, so a diverging learning rate never poisons the other members.
Long runs are cut into chunks of steps (one compiled program reused per chunk) so the host can show progress and
evaluate on the validation set between chunks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from harness import tasks
from harness.engine import compile as programs
from harness.engine import devices
from harness.models.adapters import Model
from harness.optim import OptimSpec, make_optimizer, set_learning_rate
from harness.tasks import Task


# --------------------------------------------------------------------------------------------------------------
# Static description of the problem and of a run.


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """The static training problem: the model (any family, behind :class:`harness.models.adapters.Model`), the
    per-example loss, the optimizer and the task.

    ``model.init`` is traced inside jit and vmap, so each member gets its own init. Compiled programs are cached
    per Problem: two Problems with the same ``fingerprint`` (everything that shapes the program: model factory and
    its config, data shapes, loss, optimizer kind) share programs, so a second run in the same process, or a second
    group of a sweep, compiles nothing. Without a fingerprint, identity counts.
    """

    model: Model
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
    optim: OptimSpec
    task: Task
    fingerprint: Any = None
    # The problem this one computes exactly for members with Hparams.width 0 (a width-masked model at the
    # configured size, harness.checks.training.capacity): the member table may train that one's requests with it.
    covers: "Problem | None" = None

    @property
    def classification(self) -> bool:
        return self.task.classification

    def __eq__(self, other):
        if not isinstance(other, Problem):
            return NotImplemented
        if self.fingerprint is None or other.fingerprint is None:
            return self is other
        return self.fingerprint == other.fingerprint

    def __hash__(self):
        return hash(self.fingerprint) if self.fingerprint is not None else id(self)

    def stable_key(self):
        """What identifies this problem's programs in another process (harness.engine.exported): the
        fingerprint; without one the problem has only an identity, and its programs are not stored."""
        if self.fingerprint is None:
            from harness.engine.exported import Unkeyable

            raise Unkeyable("a Problem without a fingerprint")
        return self.fingerprint


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


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch_size: int
    fixed_batch: int = 0  # size of the fixed batch (Arrays.fixed_index) that members with Hparams.fixed_batch train on
    regularization: bool = True
    steps_per_call: int = 500  # chunk length: progress and validation are evaluated between chunks
    eval_every: int = 0  # also evaluate after every this many steps, inside the chunk (0: at chunk ends only)
    # Evaluate only the fixed batch (its loss and accuracy; the other values NaN) after every this many steps, inside
    # the chunk: overfit one batch's curve, without the validation and fit-subset passes every member would pay for.
    batch_eval_every: int = 0
    max_members_per_call: int = 64
    return_params: bool = False
    max_eval_examples: int = 2048
    opt_level: int | None = 2  # XLA backend optimization level; see harness.engine.compile and cpu_options


class Hparams(NamedTuple):
    """Traced per-member hyperparameters; every field is an array with a leading member axis."""

    lr: Any
    lr_growth: Any  # lr_t = lr * exp(lr_growth * t / (steps - 1)): 0 for a constant LR, log(max/min) for a ramp
    weight_decay: Any
    init_seed: Any
    data_seed: Any
    input_scale: Any  # 1 = real inputs, 0 = constant (all-zero) inputs
    label_seed: Any  # -1 = real labels, otherwise the seed of a random permutation of the training labels
    steps: Any  # the member's own step budget (-1: the spec's); past it the member stops updating
    fixed_batch: Any  # 1: every batch is the fixed batch (TrainSpec.fixed_batch, overfit one batch); 0: sampled
    # Live hidden units of a width-masked model (harness.models.width_mask; the capacity ladder's rungs as members
    # of one program); 0: the model as built. Other models ignore it.
    width: Any

    @classmethod
    def make(cls, n: int | None = None, **columns) -> "Hparams":
        """Member rows from columns; scalars broadcast. Defaults: constant LR, no decay, real data, seed 0."""
        defaults = dict(lr=1e-3, lr_growth=0.0, weight_decay=0.0, init_seed=0, data_seed=0, input_scale=1.0,
                        label_seed=-1, steps=-1, fixed_batch=0, width=0)
        unknown = set(columns) - set(defaults)
        if unknown:
            raise TypeError(f"unknown hparams {sorted(unknown)}")
        values = {**defaults, **columns}
        if n is None:
            n = max((np.size(v) for v in values.values()), default=1)
        dtypes = dict(lr=np.float32, lr_growth=np.float32, weight_decay=np.float32, init_seed=np.uint32,
                      data_seed=np.uint32, input_scale=np.float32, label_seed=np.int32, steps=np.int32,
                      fixed_batch=np.int32, width=np.int32)
        return cls(**{k: np.broadcast_to(np.asarray(v, dtypes[k]), (n,)).copy() for k, v in values.items()})

    def __len__(self):
        return int(np.shape(self.lr)[0])

    def take(self, index) -> "Hparams":
        return Hparams(*(np.asarray(v)[index] for v in self))

    def rows(self) -> list[dict[str, float]]:
        return [{k: np.asarray(getattr(self, k))[i].item() for k in self._fields} for i in range(len(self))]


class Arrays(NamedTuple):
    """Training and validation arrays as passed to compiled programs (arguments, never closed-over constants).
    ``fixed_index``: the training examples of the fixed batch (TrainSpec.fixed_batch), when there is one."""

    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    fixed_index: Any = None


class State(NamedTuple):
    params: Any
    rest: Any  # non-trainable model state: batch statistics, dropout RNG counters
    opt_state: Any
    alive: Any  # False once the member went non-finite
    first_nonfinite: Any  # step at which it did, -1 if never


class Records(NamedTuple):
    loss: Any
    grad_norm: Any
    lr: Any
    update_norm: Any  # |update|: how far the optimizer moved the weights this step
    param_norm: Any  # |params| before the step (update_norm / param_norm: CS231n's update-to-weight ratio)
    evals: Any = None  # with ``eval_every``: EVALUATIONS values after every step, NaN when not due


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


# --------------------------------------------------------------------------------------------------------------
# Pure functions (traced under jit and vmap).


def mean_loss(loss_fn, outputs, targets):
    per_example = loss_fn(outputs, targets)
    return jnp.mean(per_example)


def init_member(problem: Problem, hp: Hparams, x_example) -> State:
    """A member's initial state: its own model init (from ``init_seed``; ``x_example`` a batch of inputs, which
    Linen and Haiku size their layers from; a width-masked model reads its live width from ``hp.width``) and
    optimizer state."""
    key = jax.random.key(hp.init_seed)
    if problem.model.width_masked:
        params, rest = problem.model.init(key, x_example, member=hp)
    else:
        params, rest = problem.model.init(key, x_example)
    tx = make_optimizer(problem.optim, hp.lr, hp.weight_decay)
    return State(params, rest, tx.init(params), jnp.array(True), jnp.array(-1, jnp.int32))


def scale_inputs(x, scale):
    """The member's inputs: ``x * scale`` (0 gives the constant-input baseline); integer inputs (token ids)
    become the constant token 0 instead of being scaled."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return jnp.where(scale == 0, jnp.zeros_like(x), x)
    return x * scale.astype(x.dtype)


def _label_permutation(hp: Hparams, n: int):
    key = jax.random.key(jnp.maximum(hp.label_seed, 0).astype(jnp.uint32))
    perm = jax.random.permutation(jax.random.fold_in(key, 0x5EED), n)
    return jnp.where(hp.label_seed >= 0, perm, jnp.arange(n))


def member_budget(spec: TrainSpec, hp: Hparams):
    """The member's step budget: its own (``Hparams.steps``), at most the spec's; the spec's when unset."""
    return jnp.where(hp.steps > 0, jnp.minimum(hp.steps, spec.steps), spec.steps)


def eval_due(spec: TrainSpec, t, chunk_end, every: int | None = None):
    """Whether the evaluation after step ``t`` (0-based) happens inside the chunk (``spec.eval_every``, or
    ``every``): due every that many steps, except at the chunk's end, where the chunk's own evaluation runs
    anyway."""
    every = spec.eval_every if every is None else every
    done = t + 1
    return (every > 0) & (done % max(every, 1) == 0) & (done < chunk_end) & (done < spec.steps)


def batch_eval_due(spec: TrainSpec, t, chunk_end):
    """Whether only the fixed batch is evaluated after step ``t`` (``spec.batch_eval_every``, when no full
    evaluation is due then)."""
    cadence = spec.batch_eval_every if spec.fixed_batch else 0
    return eval_due(spec, t, chunk_end, cadence) & ~eval_due(spec, t, chunk_end)


def any_eval_due(spec: TrainSpec, t, chunk_end):
    return eval_due(spec, t, chunk_end) | batch_eval_due(spec, t, chunk_end)


def train_chunk(problem: Problem, spec: TrainSpec, state: State, hp: Hparams, arrays: Arrays, t0,
                evaluate: Callable[[State], Any] | None = None, active=None):
    """``spec.steps_per_call`` optimizer steps for one member, from global step ``t0``; steps past ``spec.steps``
    are masked (no update), which lets every chunk reuse one compiled program. With ``spec.eval_every`` and
    ``evaluate(state)``, the evaluations due inside the chunk run there too (``lax.cond`` on the step, which is
    the same for every member, so under vmap only the due steps pay for it): a diagnostic that wants a curve of
    evaluations is one chunk, hence one compiled program, instead of a chunk per evaluation."""
    n_train = arrays.x_train.shape[0]
    perm = _label_permutation(hp, n_train)
    tx = make_optimizer(problem.optim, hp.lr, hp.weight_decay)
    data_key = jax.random.key(hp.data_seed)
    dropout_key = jax.random.fold_in(jax.random.key(hp.init_seed), 0xD809)  # its own stream, per member
    budget = member_budget(spec, hp)
    denom = jnp.maximum(budget - 1, 1).astype(jnp.float32)  # a ramp spans the member's own budget

    def loss_and_rest(params, rest, x, y, key):
        outputs, new_rest = problem.model.apply(params, rest, x, key=key, train=True,
                                                regularization=spec.regularization)
        return mean_loss(problem.loss_fn, outputs, y), new_rest

    def step(state: State, t):
        # i.i.d. minibatches: O(batch) per step whatever the dataset size, identical across reruns.
        idx = jax.random.randint(jax.random.fold_in(data_key, t), (spec.batch_size,), 0, n_train)
        if spec.fixed_batch:
            # The fixed batch, repeated to fill the batch (batch_size is a multiple of it): the same mean loss,
            # gradient and batch statistics as the batch alone, so its members share the program of the others.
            fixed = arrays.fixed_index[jnp.arange(spec.batch_size) % spec.fixed_batch]
            idx = jnp.where(hp.fixed_batch > 0, fixed, idx)
        x = scale_inputs(arrays.x_train[idx], hp.input_scale)
        y = arrays.y_train[perm[idx]]
        lr_t = hp.lr * jnp.exp(hp.lr_growth * t.astype(jnp.float32) / denom)
        (loss, new_rest), grads = jax.value_and_grad(loss_and_rest, has_aux=True)(
            state.params, state.rest, x, y, jax.random.fold_in(dropout_key, t))
        grad_norm = optax.tree.norm(grads)
        opt_state = set_learning_rate(state.opt_state, lr_t)
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # How far the optimizer moves the weights: against lr x |g| and |params| it says whether the chain shrinks
        # the steps (a clip threshold, a scale) whatever the learning rate.
        update_norm, param_norm = optax.tree.norm(updates), optax.tree.norm(state.params)

        in_range = (t < spec.steps) & (t < budget)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        now_bad = state.alive & ~finite & in_range
        keep = state.alive & finite & in_range

        def choose(new, old):
            return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)

        new_state = State(
            params=choose(params, state.params),
            rest=choose(new_rest, state.rest),
            opt_state=choose(opt_state, state.opt_state),
            alive=state.alive & (finite | ~in_range),
            first_nonfinite=jnp.where(now_bad, t.astype(jnp.int32), state.first_nonfinite),
        )
        recorded = jnp.where(state.alive & in_range, loss, jnp.nan)
        evals = None
        if evaluate is not None and (spec.eval_every > 0 or (spec.batch_eval_every > 0 and spec.fixed_batch)):
            nan = jnp.full((), jnp.nan, jnp.float32)
            end = t0 + spec.steps_per_call

            def values(full):
                return tuple(jnp.asarray(v, jnp.float32) for v in evaluate(new_state, full))

            # Nested conds on the step (the same for every member): under vmap only the due steps pay.
            evals = jax.lax.cond(eval_due(spec, t, end), lambda: values(True),
                                 lambda: jax.lax.cond(batch_eval_due(spec, t, end), lambda: values(False),
                                                      lambda: (nan,) * EVALUATIONS))
        live = state.alive & in_range
        return new_state, Records(recorded, jnp.where(in_range, grad_norm, jnp.nan), lr_t,
                                  jnp.where(live, update_norm, jnp.nan), jnp.where(live, param_norm, jnp.nan), evals)

    if spec.steps_per_call == 1:  # the host step loop: no while loop in the program (needs_host_step_loop)
        new_state, rec = step(state, jnp.asarray(t0))
        return new_state, jax.tree.map(lambda a: a[None], rec)
    steps = t0 + jnp.arange(spec.steps_per_call)
    if active is None:
        return jax.lax.scan(step, state, steps)

    # ``active[i]``: whether any member of this call still trains at step t0 + i (the same for every member, so
    # under vmap the cond stays a branch): a call whose members are all past their budgets skips the step's
    # compute. What a skipped step records is what a member past its budget records anyway, except the
    # evaluations inside the chunk, which a request never reads past its own steps.
    records = jax.eval_shape(step, state, steps[0])[1]

    def skipped(state, t):
        nan = jax.tree.map(lambda r: jnp.full(r.shape, jnp.nan, r.dtype), records)
        lr_t = hp.lr * jnp.exp(hp.lr_growth * t.astype(jnp.float32) / denom)
        return state, nan._replace(lr=lr_t.astype(records.lr.dtype))

    def maybe(state, xs):
        t, on = xs
        return jax.lax.cond(on, step, skipped, state, t)

    return jax.lax.scan(maybe, state, (steps, active))


# What every evaluation returns: validation loss and accuracy, the loss on a fixed training subset, and the loss and
# accuracy on the fixed batch (TrainSpec.fixed_batch; NaN without one).
EVALUATIONS = 5


def evaluate_member(problem: Problem, state: State, hp: Hparams, arrays: Arrays, x_fit, full: bool = True):
    """Validation loss (and accuracy), the loss on a fixed training subset and, with a fixed batch, its loss and
    accuracy, in evaluation mode. ``full=False``: the fixed batch only (the others NaN)."""
    def model(x):
        return problem.model(state.params, state.rest, scale_inputs(x, hp.input_scale))

    perm = _label_permutation(hp, arrays.x_train.shape[0])
    batch_loss = batch_acc = jnp.array(jnp.nan)
    if arrays.fixed_index is not None:  # the fixed batch as its members train on it (their labels)
        index = arrays.fixed_index
        out_batch = model(arrays.x_train[index])
        batch_labels = arrays.y_train[perm[index]]
        batch_loss = mean_loss(problem.loss_fn, out_batch, batch_labels)
        if problem.classification:
            batch_acc = tasks.accuracy(out_batch, batch_labels)
    if not full:
        nan = jnp.array(jnp.nan)
        return nan, nan, nan, batch_loss, batch_acc
    out_val = model(arrays.x_val)
    val_loss = mean_loss(problem.loss_fn, out_val, arrays.y_val)
    if problem.classification:
        val_acc = tasks.accuracy(out_val, arrays.y_val)
    else:
        val_acc = jnp.array(jnp.nan)
    # The training-subset loss uses the labels the member trained on (permuted for the shuffled-label control).
    fit_labels = arrays.y_train[perm[: x_fit.shape[0]]]
    out_fit = model(x_fit)
    fit_loss = mean_loss(problem.loss_fn, out_fit, fit_labels)
    return val_loss, val_acc, fit_loss, batch_loss, batch_acc


# --------------------------------------------------------------------------------------------------------------
# Host driver.


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

    def advance(state, hp, data, x_fit, t0, active):
        """One chunk of steps, then the evaluation, for every member: one program, not two. ``active``: whether
        any member of the call trains at each step of the chunk (calls past every member's budget skip it)."""

        def member(s, h):
            def evaluate(state, full=True):
                return evaluate_member(problem, state, h, data, x_fit, full)

            s, rec = train_chunk(problem, spec, s, h, data, t0, evaluate, active)
            return s, rec, evaluate(s)

        return jax.vmap(member)(state, hp)

    def first_call(hp, data, x_fit, active):
        """Initialization fused with the first chunk: a diagnostic that fits in one chunk is one compile."""
        return advance(jax.vmap(lambda h: init_member(problem, h, x_fit[:1]))(hp), hp, data, x_fit, 0, active)

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
