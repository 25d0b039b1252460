"""The model stage's compiled programs: two per model, whatever the number of checks.

* :func:`probe` -- an abstract trace (``jax.eval_shape``: no compile, no FLOPs) of the forward pass, the loss and
  the backward pass, staged so an exception is attributed to the step that raised it, and so the shapes are known
  before anything is compiled.
* :func:`init_statistics` -- one vmapped program over ``init_seeds`` initializations: the forward pass in eval mode
  (outputs, per-example losses), gradients at the init and after a few sign-gradient steps from it, per-parameter
  norms, the activation statistics of a train-mode forward pass (:mod:`.capture`, :mod:`.units`), and, for the
  first init, the gradient of single examples' outputs w.r.t. the whole batch's inputs (:mod:`.batch_dependence`);
  once, the loss at the null predictions (:func:`harness.losses.null_losses`, what a user's own loss is judged
  against at init).
* :mod:`.gradient_check` -- the numerical gradient check in float64, at the first init.

Thresholds and step sizes are traced arguments, so changing a setting never recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from harness import losses
from harness.checks.model import batch_dependence, capture, units
from harness.checks.model.noise import sign_step
from harness.engine import compile as programs
from harness.engine.core import Problem


# XLA's backend optimization level for the model stage's programs: each is compiled once per model and run once
# (milliseconds), so its compile is its whole cost. Measured on the reference job (2 cores, cold cache): level 0
# compiles the init program in 0.8 s and the gradient check in 0.4 s, against 1.4-1.7 s and 0.7-0.8 s at the
# training programs' level 2, and both still run in 15-65 ms; the model stage runs before the training
# diagnostics, so this is a second off every cold run.
RUN_ONCE_OPT_LEVEL = 0


def compile_options() -> dict | None:
    """XLA options for the model stage's programs, which are compiled once per model and run once, so compile
    time is their cost. On CPU, the legacy elemental emitter instead of the newer fusion emitters: the init program
    compiled in 0.7 s instead of 1.9 s of CPU time here and ran faster too (20 vs 30 ms). On a GPU, XLA's
    autotuning off for these programs alone compiled no faster (README, "On a GPU"), so nothing is set there."""
    return {"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu" else None


# --------------------------------------------------------------------------------------------------------------
# The abstract probe.


@dataclasses.dataclass
class Probe:
    """What an abstract trace of one init found: the parameter shapes, where it raised, the output shapes."""

    parameters: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # path -> shape
    failed_stage: str | None = None  # "the forward pass [in train mode]", "the loss function", "the backward pass"
    error: BaseException | None = None
    output: jax.ShapeDtypeStruct | None = None  # known as soon as the forward pass returned
    loss: jax.ShapeDtypeStruct | None = None


def probe(problem: Problem, x, y) -> Probe:
    """One abstract trace of the forward pass (eval mode, then train mode: the mode training runs in), the loss and
    the backward pass. Shapes are recorded as soon as they are known, so a loss that raises because the outputs
    have the wrong shape is reported as the wrong shape; the first exception is kept with the step that raised."""
    result = Probe()
    stage = ["building the model"]

    model = problem.model

    def trace(x, y):
        params, rest = model.init(jax.random.key(0), x)
        result.parameters = {path: tuple(a.shape) for path, a in model.flat_params(params).items()}

        def loss(params):
            stage[0] = "the forward pass"
            out = model(params, rest, x)
            result.output = jax.ShapeDtypeStruct(out.shape, out.dtype)
            stage[0] = "the forward pass in train mode"
            model.apply(params, rest, x, key=jax.random.key(1), train=True)
            stage[0] = "the loss function"
            per_example = problem.loss_fn(out, y)
            result.loss = jax.ShapeDtypeStruct(jnp.shape(per_example), per_example.dtype)
            stage[0] = "the backward pass"  # transposition runs after the forward trace returns
            return jnp.mean(per_example)

        return jax.grad(loss)(params)

    try:
        jax.eval_shape(trace, x, y)
    except Exception as err:  # a broken model or loss is a finding, never a crash
        result.failed_stage, result.error = stage[0], err
    return result


# --------------------------------------------------------------------------------------------------------------
# Everything at init, vmapped over inits.


class InitStats(NamedTuple):
    outputs: Any  # (seeds, batch, outputs) eval-mode outputs at init
    losses: Any  # (seeds, batch) per-example losses
    outputs_constant: Any  # (seeds,) every example's outputs identical, after the sign-gradient steps
    grad_norm: dict  # path -> (seeds,)
    param_norm: dict  # path -> (seeds,)
    grad_zero: dict  # path -> (seeds,) every element exactly zero at the init AND after each sign-gradient step
    grad_zero_at_init: dict  # path -> (seeds,) every element exactly zero at the init
    grad_finite: dict  # path -> (seeds,)
    input_spread: Any  # (seeds,) mean over input features of the std over examples
    input_rms: Any  # (seeds,) root mean square of the inputs (the level activation growth is counted from)
    units: dict  # activation name -> {statistic: (seeds,)}, see units.statistics
    own_gradient: Any  # (rows,) max |d out_i / d x_i| for the checked rows (first init)
    cross_gradient: Any  # (rows,) max |d out_i / d x_j|, j != i
    leaking_examples: Any  # (rows,) number of other examples j with a nonzero d out_i / d x_j
    loss_mixing: Any  # (own, cross, leaking) of the loss: d loss_i / d out_j (batch_dependence.loss_across_batch)
    null_losses: dict  # null prediction -> mean loss on the batch (losses.null_losses)
    confident_losses: dict  # margin -> mean loss of confidently correct logits (losses.confident_losses)


def leaf_summary(v) -> tuple:
    """A gradient leaf's L2 norm, whether every element is zero and whether every one is finite, in one variadic
    reduction: a reduction per statistic per leaf is a kernel each for XLA to compile (as the training step's
    norms, :func:`harness.engine.core.tree_norms`)."""
    v = jnp.asarray(v)
    squares = jnp.real(v * jnp.conj(v)).astype(jnp.float32)
    axes = tuple(range(v.ndim))
    total, zero, finite = jax.lax.reduce(
        (squares, v == 0, jnp.isfinite(v)), (jnp.float32(0), jnp.array(True), jnp.array(True)),
        lambda a, b: (a[0] + b[0], a[1] & b[1], a[2] & b[2]), axes)
    return jnp.sqrt(total), zero, finite


def make_init_program(problem: Problem, with_capture: bool, steps: int):
    model = problem.model

    def member(key, x, y, thresholds):
        params, rest = model.init(key, x)

        def loss(params):
            out = model(params, rest, x)
            per_example = problem.loss_fn(out, y)
            return jnp.mean(per_example), (out, per_example)

        # The init, then ``steps`` sign-gradient steps from it (noise.sign_step: Adam's first steps). A parameter
        # whose gradient is zero at the init and along those steps does not learn from this init; a
        # zero-initialized design (a residual branch's output, a ReZero gate, LoRA's B) gets its gradient after the
        # first step moves the zero weight. A rolled loop: the model's forward and backward pass are compiled once,
        # not once per step. (It was unrolled while XLA's CPU convolutions ran 50x slower inside a loop; on CPU they
        # now run as matrix multiplications, harness.engine.convolution.)
        def step(params, _):
            (_, (out, per_example)), grads = jax.value_and_grad(loss, has_aux=True)(params)
            g = model.flat_params(grads)
            norm, zero, finite = {}, {}, {}
            for k, v in g.items():
                norm[k], zero[k], finite[k] = leaf_summary(v)
            seen = dict(out=out, per_example=per_example, norm=norm, zero=zero, finite=finite)
            return sign_step(params, grads, thresholds["perturbation_scale"]), seen

        _, seen = jax.lax.scan(step, params, None, length=steps + 1)
        out, per_example, out_last = seen["out"][0], seen["per_example"][0], seen["out"][-1]
        p = model.flat_params(params)
        stats = dict(
            outputs=out,
            losses=jnp.reshape(per_example, (-1,)) if per_example.ndim else per_example[None],
            outputs_constant=jnp.all(out_last == out_last[:1]),
            grad_norm={k: v[0] for k, v in seen["norm"].items()},
            param_norm={k: optax.tree.norm(v) for k, v in p.items()},
            grad_zero={k: jnp.all(v) for k, v in seen["zero"].items()},
            grad_zero_at_init={k: v[0] for k, v in seen["zero"].items()},
            grad_finite={k: v[0] for k, v in seen["finite"].items()},
            input_spread=units.spread(x),
            input_rms=jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))),
            units={},
        )
        if with_capture:  # the units as training sees them: a train-mode forward pass
            def train_forward(params, x):
                return model.apply(params, rest, x, key=key, train=True)[0]

            _, activations = capture.record_activations(train_forward, params, x, name_path=model.name_path)
            # The call order travels as a statistic: a dict leaving the program comes back with sorted keys
            # (hidden/10 before hidden/2), and growth across depth is read in call order.
            stats["units"] = {a.name: {**units.statistics(a, thresholds), "order": jnp.int32(i)}
                              for i, a in enumerate(activations)}
        return stats, params, rest

    def program(keys, x, y, rows, cotangent_seed, thresholds):
        stats, params, rest = jax.vmap(member, in_axes=(0, None, None, None))(keys, x, y, thresholds)
        first = jax.tree.map(lambda a: a[0], (params, rest))
        params0, rest0 = first
        own, cross, leaking = batch_dependence.gradients_across_batch(
            lambda xx: model(params0, rest0, xx), x, rows, cotangent_seed)
        loss_mixing = batch_dependence.loss_across_batch(problem.loss_fn, stats["outputs"][0], y, rows)
        outputs = stats["outputs"]
        try:  # the user's loss at the null predictions (losses.null_prediction chooses on the host)
            null = losses.null_losses(problem.loss_fn, problem.task.num_classes, outputs.shape[1:], outputs.dtype,
                                      y)
        except Exception:  # noqa: BLE001 -- a loss that only takes the model's own outputs: no expectation
            null = {}
        try:
            confident = losses.confident_losses(problem.loss_fn, problem.task.num_classes, outputs.shape[1:],
                                                outputs.dtype, y)
        except Exception:  # noqa: BLE001 -- as above
            confident = {}
        return InitStats(own_gradient=own, cross_gradient=cross, leaking_examples=leaking, loss_mixing=loss_mixing,
                         null_losses=null, confident_losses=confident,
                         **stats), first

    return program


def init_statistics(problem: Problem, x, y, *, seed: int, init_seeds: int, rows,
                    thresholds: dict[str, float], opt_level, with_capture: bool = True,
                    steps: int = 2) -> tuple[InitStats, Any]:
    """The statistics (host arrays) and the first init's ``(params, rest)`` (device arrays, for the gradient
    check). ``steps``: sign-gradient steps after the init along which zero gradients are confirmed."""
    # The inits the training diagnostics train: init seed ``seed + i`` (harness.engine.core.init_member).
    keys = jax.vmap(jax.random.key)(np.arange(seed, seed + init_seeds, dtype=np.uint32))
    program = make_init_program(problem, with_capture, steps)
    thresholds = {k: np.float32(v) for k, v in thresholds.items()}
    out = programs.run("model/init", program, keys, x, y, np.asarray(rows, np.int32), np.uint32(seed), thresholds,
                       static_key=("model/init", problem, with_capture, steps), opt_level=opt_level,
                       options=compile_options())
    stats, first = out
    return jax.tree.map(np.asarray, stats), first
