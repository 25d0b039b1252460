"""The compiled programs of ``harness train``: initialization, a chunk of optimizer steps with the monitor inside,
and the validation pass.

A chunk is one ``lax.scan`` over ``Schedule.log_every`` steps (PureJaxRL's pattern: the whole inner loop on the
device, the host only between chunks), reading its batches from the training arrays on the device: each epoch is a
permutation of the examples drawn from the seed and the epoch number, so a run resumed at any chunk boundary draws
exactly the batches the uninterrupted run would have. The optimizer is the configured one
(:func:`harness.optim.make_optimizer`, the learning rate written per step from ``train.schedule``) wrapped in
:func:`harness.monitor.monitor`, so the per-layer statistics come out of the same step.

A step whose loss, gradient or update is non-finite is not applied: the chunk keeps the last finite parameters and
optimizer state, records the step in ``Carry.bad_step`` (and the monitor records its statistics), and skips the
rest. So a diverging run stops cleanly, and the state it ends with is the one to replay the failing step from
(:mod:`harness.monitor.replay`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from harness import tasks
from harness.engine.core import Problem, mean_loss
from harness.monitor import activations as watch_activations
from harness.monitor import monitor
from harness.optim import make_optimizer, set_learning_rate


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The run's length and cadences, in optimizer steps. Only :meth:`shape` shapes the programs: the length, the
    learning rates (a table per step), the seed and the cadences are the host's or traced arguments, so runs that
    differ in them (a sweep over learning rates or seeds, a run resumed into a longer one) share programs."""

    steps: int  # optimizer steps of the whole run
    batch_size: int
    steps_per_epoch: int  # full batches per pass over the training set (the last partial batch is dropped)
    log_every: int  # steps per compiled chunk: the progress and W&B cadence
    history: int  # the monitor's ring buffers (train.log_every, at least a chunk): the same whatever the length,
    # so a run resumes into a longer one
    eval_every: int  # a multiple of log_every
    checkpoint_every: int  # a multiple of log_every

    def shape(self) -> tuple:
        """What the compiled chunk depends on."""
        return self.batch_size, self.steps_per_epoch, self.log_every, self.history


class Carry(NamedTuple):
    """What a chunk continues from: everything a checkpoint holds (the data order is a function of the step)."""

    step: Any  # optimizer steps done (int32)
    params: Any
    rest: Any  # the model's non-trainable state (batch statistics)
    opt_state: Any  # harness.monitor.MonitorState around the configured optimizer's state
    bad_step: Any  # the first step whose loss, gradient or update was non-finite; -1 while none was


class Records(NamedTuple):
    loss: Any  # (log_every,) the minibatch loss of each step; NaN for a step not taken
    lr: Any  # (log_every,) the learning rate it used
    # With ``train.activations``: a harness.monitor.activations.ActivationRecord with a leading (log_every,) axis;
    # NaN for a step not taken. None otherwise.
    activations: Any = None


def make_optimizer_for(problem: Problem, history: int) -> optax.GradientTransformationExtraArgs:
    optim = problem.optim
    return monitor(make_optimizer(optim, optim.lr, optim.weight_decay), history, update_norms=True)


def make_init(problem: Problem, history: int) -> Callable:
    """``init(x_example, seed, lr, weight_decay) -> Carry`` at step 0 (the optimizer's hyperparameters are state,
    :func:`harness.optim.make_optimizer`)."""

    def init(x_example, seed, lr, weight_decay):
        tx = monitor(make_optimizer(problem.optim, lr, weight_decay), history, update_norms=True)
        params, rest = problem.model.init(jax.random.key(seed), x_example)
        return Carry(jnp.zeros((), jnp.int32), params, rest, tx.init(params), jnp.full((), -1, jnp.int32))

    return init


def make_chunk(problem: Problem, schedule: Schedule, activations: bool = False) -> Callable:
    """``chunk(carry, x_train, y_train, lrs, total, seed) -> (carry, records)``: ``log_every`` steps from
    ``carry.step``, step ``carry.step + i`` at the learning rate ``lrs[i]`` (:func:`chunk_lrs`:
    the same shape for every chunk and run length); steps from ``total`` on or after a
    non-finite one are skipped; ``seed`` draws the data order and dropout. ``activations``: the forward pass runs
    through the activation recorder and each step's statistics come back in ``records.activations``
    (:mod:`harness.monitor.activations`)."""
    tx = make_optimizer_for(problem, schedule.history)  # its hyperparameters are read from the state
    spe, bs = schedule.steps_per_epoch, schedule.batch_size

    def chunk(carry: Carry, x_train, y_train, lrs, total, seed):
        t0 = carry.step
        dropout_key = jax.random.fold_in(jax.random.key(seed), 0xD809)

        def order(n, epoch):
            return epoch_order(seed, n, epoch)

        n = x_train.shape[0]

        def loss_and_rest(params, rest, x, y, key):
            if activations:
                def apply(params, x):
                    return problem.model.apply(params, rest, x, key=key, train=True)

                (outputs, new_rest), record = watch_activations.forward(apply, params, x, problem.model.name_path)
                return mean_loss(problem.loss_fn, outputs, y), (new_rest, record)
            outputs, new_rest = problem.model.apply(params, rest, x, key=key, train=True)
            return mean_loss(problem.loss_fn, outputs, y), new_rest

        def step(state, _):
            carry, perm = state
            t = carry.step
            epoch, position = t // spe, t % spe
            perm = jax.lax.cond(position == 0, lambda: order(n, epoch), lambda: perm)
            index = jax.lax.dynamic_slice(perm, (position * bs,), (bs,))
            x, y = x_train[index], y_train[index]
            (loss, new_rest), grads = jax.value_and_grad(loss_and_rest, has_aux=True)(
                carry.params, carry.rest, x, y, jax.random.fold_in(dropout_key, t))
            new_rest, record = new_rest if activations else (new_rest, None)
            lr = lrs[t - t0]
            opt_state = carry.opt_state._replace(inner=set_learning_rate(carry.opt_state.inner, lr))
            updates, new_opt = tx.update(grads, opt_state, carry.params, value=loss)
            params = optax.apply_updates(carry.params, updates)
            finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)) & jnp.isfinite(
                optax.tree.norm(updates))

            def pick(new, old):
                return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

            # The failing step's statistics are recorded (the monitor's buffers), its update is not.
            new_carry = Carry(
                t + 1,
                pick(params, carry.params),
                pick(new_rest, carry.rest),
                new_opt._replace(inner=pick(new_opt.inner, carry.opt_state.inner)),
                jnp.where(finite, carry.bad_step, t),
            )
            return (new_carry, perm), Records(loss, lr, record)

        def skipped(state, xs):
            nan = jnp.full((), jnp.nan, jnp.float32)
            if not activations:
                return state, Records(nan, nan)
            return state, Records(nan, nan, watch_activations.nan_record(jax.eval_shape(step, state, xs)[1][2]))

        def maybe(state, xs):
            carry = state[0]
            go = (carry.bad_step < 0) & (carry.step < total)
            return jax.lax.cond(go, step, skipped, state, xs)

        perm = order(n, carry.step // spe)
        (carry, _), records = jax.lax.scan(maybe, (carry, perm), None, length=schedule.log_every)
        return carry, records

    return chunk


def chunk_lrs(table: np.ndarray, start: int, length: int) -> np.ndarray:
    """The learning rates of the ``length`` steps from ``start`` (past the table's end: its last value, for steps a
    chunk skips anyway)."""
    return np.asarray(table[np.minimum(np.arange(start, start + length), len(table) - 1)], np.float32)


def activation_log(problem: Problem, carry: Carry, x) -> watch_activations.ActivationLog:
    """The host's log of a run's activation records (``train.activations``), its layers read off a trace of the
    training forward pass on ``x`` (a batch)."""

    def apply(params, x):
        return problem.model.apply(params, carry.rest, x, key=jax.random.key(0), train=True)

    return watch_activations.ActivationLog(*watch_activations.layers(apply, carry.params, x,
                                                                     problem.model.name_path))


def make_evaluate(problem: Problem, batch: int) -> Callable:
    """``evaluate(params, rest, x, y) -> (loss, accuracy)`` over a whole split in batches of ``batch`` (padded to a
    multiple of it, the padding masked out), in inference mode; accuracy is NaN for regression."""

    def evaluate(params, rest, x, y):
        n = x.shape[0]
        chunks = -(-n // batch)
        pad = chunks * batch - n
        xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(chunks, batch, *x.shape[1:])
        ys = jnp.concatenate([y, jnp.zeros((pad, *y.shape[1:]), y.dtype)]).reshape(chunks, batch, *y.shape[1:])
        mask = (jnp.arange(chunks * batch) < n).reshape(chunks, batch)

        def one(args):
            xb, yb, mb = args
            out = problem.model(params, rest, xb)
            per_example = jnp.reshape(problem.loss_fn(out, yb), (batch, -1)).mean(axis=1)
            loss = jnp.sum(jnp.where(mb, per_example, 0.0))
            if not problem.classification:
                return loss, jnp.zeros(()), jnp.zeros(())
            real = tasks.valid(yb) & jnp.reshape(mb, (batch,) + (1,) * (yb.ndim - 1))
            hits = (jnp.argmax(out, -1) == yb) & real
            return loss, jnp.sum(hits), jnp.sum(real)

        loss, hits, real = jax.lax.map(one, (xs, ys, mask))
        accuracy = jnp.sum(hits) / jnp.maximum(jnp.sum(real), 1) if problem.classification else jnp.nan
        return jnp.sum(loss) / n, accuracy

    return evaluate


def epoch_order(seed: int, n: int, epoch):
    """The order of the training examples in ``epoch``: a permutation drawn from the seed and the epoch alone."""
    return jax.random.permutation(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0xDA7A), epoch), n)


def batch_index(schedule: Schedule, seed: int, n: int, step: int):
    """The training examples step ``step`` trains on (as the chunk draws them)."""
    epoch, position = divmod(step, schedule.steps_per_epoch)
    start = position * schedule.batch_size
    return epoch_order(seed, n, epoch)[start:start + schedule.batch_size]


def constant(lr: float) -> Callable[[Any], Any]:
    def schedule(step):
        del step
        return lr

    return schedule


def epoch_steps(n_train: int, batch_size: int) -> int:
    return max(n_train // batch_size, 1)
