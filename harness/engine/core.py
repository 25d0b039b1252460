"""The pure training program: what one call of the engine computes, for every member of a sweep at once.

A *member* is one training run, described by traced hyperparameters (:class:`Hparams`): learning rate, a
log-LR growth for the LR range test's ramp, weight decay, init and batch-order seeds, an input scale (0 gives the
constant-input baseline), a label-permutation seed (the shuffled-label control), its own step budget, whether it
trains on the fixed batch, and a width-masked model's live width. Everything that changes the program's shapes or
code (model, loss, optimizer kind, batch size, step count) is static (:class:`Problem`, :class:`TrainSpec`). So
every training diagnostic is a choice of member rows, and diagnostics with the same static settings share one
compiled program: :func:`make_train` gives it, ``jit(vmap(train))`` over members in PureJaxRL's style
(luchris429/purejaxrl), one ``lax.scan`` over steps with the evaluations due inside. Padding, sharding, chunking,
compiling and gathering are the driver's (:mod:`harness.engine.driver`).

Failure is data: a member whose loss or gradient goes non-finite stops updating (its parameters stay at the last
finite values) and records the step, so a diverging learning rate never poisons the other members.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from harness import tasks
from harness.models.adapters import Model
from harness.optim import OptimSpec, make_optimizer, set_learning_rate
from harness.tasks import Task


# --------------------------------------------------------------------------------------------------------------
# Static description of the problem and of a run; the members' traced rows.


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

    def at_precision(self, precision: str) -> "Problem":
        """This problem with its model computing in ``precision`` (``float32`` or ``bfloat16``,
        :func:`harness.models.adapters.with_precision`): itself when it already does, else a Problem of its own,
        fingerprinted apart (float32 and bfloat16 never share a program) and made once per problem, so every
        request for it is the same object (the training memo and the program caches key on it)."""
        from harness.models.adapters import with_precision

        if self.model.precision == precision:
            return self
        with _AT_PRECISION_LOCK:
            cache = _AT_PRECISION.setdefault(self, {})
            if precision not in cache:
                made = Problem(with_precision(self.model, precision), self.loss_fn, self.optim, self.task,
                               fingerprint=None if self.fingerprint is None else (self.fingerprint, "precision",
                                                                                  precision))
                cache[precision] = made
                # And back: the made problem at this one's precision is this one (the same programs).
                _AT_PRECISION.setdefault(made, {})[self.model.precision] = self
            return cache[precision]

    def stable_key(self):
        """What identifies this problem's programs in another process (harness.engine.exported): the
        fingerprint; without one the problem has only an identity, and its programs are not stored."""
        if self.fingerprint is None:
            from harness.engine.exported import Unkeyable

            raise Unkeyable("a Problem without a fingerprint")
        return self.fingerprint



# Problem.at_precision's problems, per problem (a collapsed multirun's points call it from their threads).
_AT_PRECISION: "weakref.WeakKeyDictionary[Problem, dict]" = weakref.WeakKeyDictionary()
_AT_PRECISION_LOCK = threading.Lock()


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
    # Compile the evaluations inside the chunks even at a cadence of 0: a program that requests evaluating at other
    # cadences will reuse (the cadence is an argument of the compiled program, program_spec).
    inside_evals: bool = False
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



# --------------------------------------------------------------------------------------------------------------
# Pure functions (traced under jit and vmap).


def tree_norms(*trees) -> tuple:
    """The global L2 norm of each of several pytrees of one structure (``optax.tree.norm`` of each), in one
    variadic reduction per leaf for all of them: a reduction per leaf per tree is a kernel each for XLA to compile
    (README, "Performance"). A variadic ``lax.reduce`` reads the leaves where they are; stacking them into one array
    to reduce would copy them every step."""
    totals = [jnp.zeros((), jnp.float32) for _ in trees]
    for leaves in zip(*(jax.tree.leaves(t) for t in trees)):
        squares = tuple(jnp.real(x * jnp.conj(x)) for x in leaves)
        sums = jax.lax.reduce(squares, tuple(jnp.zeros((), x.dtype) for x in squares),
                              lambda a, b: tuple(p + q for p, q in zip(a, b)), tuple(range(squares[0].ndim)))
        totals = [total + s for total, s in zip(totals, sums)]
    return tuple(jnp.sqrt(total) for total in totals)


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


class Cadence(NamedTuple):
    """The evaluations inside a chunk: after every ``eval_every`` steps (the validation set, the fit subset and the
    fixed batch) and every ``batch_eval_every`` steps (the fixed batch only); 0 for none. A compiled program
    takes them as traced scalars, the same for every member of a call (:func:`program_spec`), so requests that
    differ only in how often they evaluate share one program (a budget's cut suite trains by its probe's)."""

    eval_every: Any
    batch_eval_every: Any

    @classmethod
    def of(cls, spec: TrainSpec) -> "Cadence":
        return cls(np.int32(spec.eval_every), np.int32(spec.batch_eval_every if spec.fixed_batch else 0))


def evaluates_inside(spec: TrainSpec) -> bool:
    """Whether a chunk's program evaluates inside the chunk (at a cadence it is passed, :class:`Cadence`)."""
    return spec.eval_every > 0 or (spec.batch_eval_every > 0 and bool(spec.fixed_batch)) or spec.inside_evals


def program_spec(spec: TrainSpec) -> TrainSpec:
    """What a compiled program of ``spec`` depends on: whether its chunks evaluate inside at all (the
    ``lax.cond`` of :func:`train_chunk` and its records), not how often, which each call passes
    (:class:`Cadence`)."""
    inside = int(evaluates_inside(spec))
    return dataclasses.replace(spec, eval_every=inside, batch_eval_every=inside, inside_evals=False)


def eval_due(spec: TrainSpec, t, chunk_end, every=None):
    """Whether the evaluation after step ``t`` (0-based) happens inside the chunk (``spec.eval_every``, or
    ``every``, traced in a program): due every that many steps, except at the chunk's end, where the chunk's own
    evaluation runs anyway."""
    every = spec.eval_every if every is None else every
    done = t + 1
    period = jnp.maximum(every, 1) if isinstance(every, jax.Array) else max(every, 1)
    return (every > 0) & (done % period == 0) & (done < chunk_end) & (done < spec.steps)


def batch_eval_due(spec: TrainSpec, t, chunk_end, cadence: Cadence | None = None):
    """Whether only the fixed batch is evaluated after step ``t`` (``spec.batch_eval_every``, or ``cadence``'s,
    when no full evaluation is due then)."""
    every, batch_every = (spec.eval_every, spec.batch_eval_every) if cadence is None else cadence
    batch_every = batch_every if spec.fixed_batch else 0
    return eval_due(spec, t, chunk_end, batch_every) & ~eval_due(spec, t, chunk_end, every)


def any_eval_due(spec: TrainSpec, t, chunk_end):
    return eval_due(spec, t, chunk_end) | batch_eval_due(spec, t, chunk_end)


def train_chunk(problem: Problem, spec: TrainSpec, state: State, hp: Hparams, arrays: Arrays, t0,
                evaluate: Callable[[State, Any], Any] | None = None, active_steps=None,
                cadence: Cadence | None = None):
    """``spec.steps_per_call`` optimizer steps for one member, from global step ``t0``; steps past ``spec.steps``
    are masked (no update), which lets every chunk reuse one compiled program. Returns the state, the records and,
    with ``evaluate(state, full)``, the evaluation after the chunk's last trained step (else None). With
    ``spec.eval_every`` the evaluations due inside the chunk run there too (``lax.cond`` on the step, which is the
    same for every member, so under vmap only the due steps pay for it): a diagnostic that wants a curve of
    evaluations is one chunk, hence one compiled program, instead of a chunk per evaluation. ``cadence``: how
    often, traced (then ``spec`` only says whether there are any, :func:`program_spec`); default the spec's."""
    cadence = Cadence.of(spec) if cadence is None else cadence
    n_train = arrays.x_train.shape[0]
    perm = _label_permutation(hp, n_train)
    tx = make_optimizer(problem.optim, hp.lr, hp.weight_decay)
    data_key = jax.random.key(hp.data_seed)
    dropout_key = jax.random.fold_in(jax.random.key(hp.init_seed), 0xD809)  # its own stream, per member
    budget = member_budget(spec, hp)
    denom = jnp.maximum(budget - 1, 1).astype(jnp.float32)  # a ramp spans the member's own budget
    inside = evaluate is not None and evaluates_inside(spec)
    # Only the chunk's first ``active`` steps train (the call's longest budget within the chunk; the same for
    # every member, so under vmap the loop stays a loop of that many trips): the rest record what a member past its
    # budget records anyway, except the evaluations inside the chunk, which a request never reads past its own
    # steps. A loop of that length instead of a branch per step: a skipped step under ``lax.cond`` still passed
    # every member's parameters and optimizer state through the conditional (0.7 ms a step for the reference job's
    # 12-member calls on CPU, and a probe of a few steps in a 500-step program paid it 480 times). A chunk that
    # trains no step still makes one trip, past every member's budget (no update), for its evaluation.
    active = spec.steps_per_call if active_steps is None else jnp.minimum(active_steps, spec.steps_per_call)
    trips = jnp.maximum(active, 1)

    def loss_and_rest(params, rest, x, y, key):
        outputs, new_rest = problem.model.apply(params, rest, x, key=key, train=True,
                                                regularization=spec.regularization)
        return mean_loss(problem.loss_fn, outputs, y), new_rest

    def step(state: State, i, last):
        t = t0 + i
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
        opt_state = set_learning_rate(state.opt_state, lr_t)
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # How far the optimizer moves the weights: against lr x |g| and |params| it says whether the chain shrinks
        # the steps (a clip threshold, a scale) whatever the learning rate.
        grad_norm, update_norm, param_norm = tree_norms(grads, updates, state.params)

        in_range = (t < spec.steps) & (t < budget)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        now_bad = state.alive & ~finite & in_range
        keep = state.alive & finite & in_range

        def choose(new, old):
            return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)

        # Only what a stopped member is read for stays frozen: its parameters and model state (evaluated, returned).
        # Its optimizer state is never read again (past its budget or non-finite, it never updates), so it takes
        # whatever the step made of it: freezing it too (Adam's two moments) was most of the freezing's cost.
        new_state = State(
            params=choose(params, state.params),
            rest=choose(new_rest, state.rest),
            opt_state=opt_state,
            alive=state.alive & (finite | ~in_range),
            first_nonfinite=jnp.where(now_bad, t.astype(jnp.int32), state.first_nonfinite),
        )
        recorded = jnp.where(state.alive & in_range, loss, jnp.nan)
        evals = ev = None
        if evaluate is not None:
            nan = jnp.full((), jnp.nan, jnp.float32)
            full = batch = jnp.array(False)
            if inside:
                end = t0 + spec.steps_per_call
                trained = i < active
                full = eval_due(spec, t, end, cadence.eval_every) & trained
                batch = batch_eval_due(spec, t, end, cadence) & trained

            def values(full):
                return tuple(jnp.asarray(v, jnp.float32) for v in evaluate(new_state, full))

            # A cond on the step (the same for every member): under vmap only the due steps pay. One evaluation
            # traced, for those inside the chunk and the one after its last step alike, whose validation and
            # training-subset passes are a cond on ``full`` inside it: each further trace of the model's forward
            # passes (a branch for the fixed batch alone, the chunk's end evaluation after the loop) is more to
            # compile.
            ev = jax.lax.cond(full | batch | last, lambda: values(full | last), lambda: (nan,) * EVALUATIONS)
            if inside:  # what an inside evaluation records: the fixed batch's values alone when only it was due
                evals = tuple(jnp.where(full | (batch & (j >= EVALUATIONS - 2)), v, nan) for j, v in enumerate(ev))
        live = state.alive & in_range
        f32 = jnp.float32  # every record is a float32 scalar: the skipped steps' records are built without a trace
        return new_state, Records(recorded.astype(f32), jnp.where(in_range, grad_norm, jnp.nan).astype(f32),
                                  lr_t.astype(f32), jnp.where(live, update_norm, jnp.nan).astype(f32),
                                  jnp.where(live, param_norm, jnp.nan).astype(f32), evals), ev

    steps = t0 + jnp.arange(spec.steps_per_call)
    lr_all = hp.lr * jnp.exp(hp.lr_growth * steps.astype(jnp.float32) / denom)
    nan = jnp.full((spec.steps_per_call,), jnp.nan, jnp.float32)
    skipped = Records(nan, nan, lr_all.astype(jnp.float32), nan, nan, (nan,) * EVALUATIONS if inside else None)
    final = None if evaluate is None else (jnp.full((), jnp.nan, jnp.float32),) * EVALUATIONS

    def body(i, carry):
        state, out, final = carry
        last = i == trips - 1
        state, rec, ev = step(state, i, last)
        out = jax.tree.map(lambda o, r: jax.lax.dynamic_update_index_in_dim(o, r, i, 0), out, rec)
        return state, out, ev if ev is None else tuple(jnp.where(last, e, f) for e, f in zip(ev, final))

    return jax.lax.fori_loop(0, trips, body, (state, skipped, final))


# What every evaluation returns: validation loss and accuracy, the loss on a fixed training subset, and the loss and
# accuracy on the fixed batch (TrainSpec.fixed_batch; NaN without one).
EVALUATIONS = 5


def evaluate_member(problem: Problem, state: State, hp: Hparams, arrays: Arrays, x_fit, full: bool = True):
    """Validation loss (and accuracy), the loss on a fixed training subset and, with a fixed batch, its loss and
    accuracy, in evaluation mode. ``full`` False (or traced and false): the fixed batch only (the others NaN)."""
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

    def held_out():
        return _held_out(problem, model, perm, arrays, x_fit)

    if full is True:
        val_loss, val_acc, fit_loss = held_out()
    else:  # traced: the same for every member (the step), so a branch under vmap
        nan = jnp.full((), jnp.nan, jnp.float32)
        val_loss, val_acc, fit_loss = jax.lax.cond(full, held_out, lambda: (nan, nan, nan))
    return val_loss, val_acc, fit_loss, batch_loss, batch_acc


def _held_out(problem: Problem, model: Callable, perm, arrays: Arrays, x_fit) -> tuple:
    """Validation loss and accuracy, and the loss on the training subset ``x_fit`` with the member's labels."""
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
    return (jnp.asarray(val_loss, jnp.float32), jnp.asarray(val_acc, jnp.float32),
            jnp.asarray(fit_loss, jnp.float32))


def make_train(problem: Problem, spec: TrainSpec) -> Callable:
    """The pure program of one call: ``train(hparams, arrays, x_fit, active_steps, state=None, t0=0, cadence=None)
    -> (state, records, evaluation)`` for every member of ``hparams`` (vmapped): the members initialized (``state``
    None) or continued from ``state`` at global step ``t0``, ``spec.steps_per_call`` steps (:func:`train_chunk`,
    with the evaluations due inside at ``cadence``, default the spec's, and the chunk's end evaluation after its
    last trained step: :func:`evaluate_member` on ``arrays`` and the training subset ``x_fit``). ``active_steps``:
    how many of the chunk's first steps any member trains (None: all of them). Initialization and the first chunk
    are one program, so a diagnostic that fits in one chunk is one compile."""

    def train(hparams: Hparams, arrays: Arrays, x_fit, active_steps, state: State | None = None, t0=0,
              cadence: Cadence | None = None):
        def member(s, h):
            if s is None:
                s = init_member(problem, h, x_fit[:1])

            def evaluate(st, full=True):
                return evaluate_member(problem, st, h, arrays, x_fit, full)

            return train_chunk(problem, spec, s, h, arrays, t0, evaluate, active_steps, cadence)

        return jax.vmap(member)(state, hparams)

    return train
