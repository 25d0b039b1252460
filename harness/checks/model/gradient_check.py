"""Numerical gradient check: does back-propagation compute the derivative of the loss the forward pass computes?

The classic check (seed 001, "Gradient Checking"; CS231n "Gradient checks") compares the analytic gradient with
central differences. Per coordinate it costs two forward passes per parameter; along a random direction ``v`` it
costs two in all: ``(f(theta + h v) - f(theta - h v)) / 2h`` must equal ``grad f(theta) . v`` (the directional
derivative; the same identity ``jax.test_util.check_grads`` and ``torch.autograd.gradcheck``'s fast mode use).
A wrong backward pass (a ``jax.custom_vjp`` with a bug, a ``stop_gradient`` where a gradient should flow, a
hand-written derivative) is off along almost every direction, so a few directions suffice.

Precision: in float32, the rounding error of the difference (about 1e-7 |f| / h) rivals the derivative itself, so
the check runs in float64 (params, rest and inputs cast; ``jax.enable_x64`` for this program only), where CS231n's
scale applies: relative error below 1e-7 is right, 1e-4 is suspicious "for objectives with kinks", 1e-2 is wrong.
ReLU kinks: the check runs at the first init moved by ``perturbation_scale`` x each parameter's RMS, so no unit sits
exactly on a kink (a zero bias on an all-zero input patch does at the init itself); from there a step of
1e-6 x |theta| crosses a kink with probability about 1e-6 per unit and example, and the median over directions
ignores the rare direction that does. A model that computes in float32
whatever its inputs (an explicit ``dtype=jnp.float32``), or keeps parts in float32, is checked at a larger step,
where a tolerance alone cannot tell rounding from a subtly wrong rule (a custom_vjp missing one term of the product
rule is off by a few percent). There the numerical estimate is also taken at a second, 4x larger step: rounding
and curvature move the estimate between the two steps, a wrong backward rule does not, so a relative error of
more than 1e-2 (CS231n's "wrong") that is ten times the two estimates' own disagreement is wrong (the step-size
consistency test of Richardson extrapolation; the evidence gives both).

Eval mode (dropout off, BatchNorm on its running statistics): the loss must be a deterministic function of theta.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from harness.checks.model.noise import floating, perturb, unit_noise
from harness.checks.model.programs import compile_options
from harness.checks.model.settings import NAME, Settings
from harness.engine import compile as programs
from harness.engine.core import Problem
from harness.findings import Finding, error

# A model computing in float32 whatever its inputs: a step that balances rounding (1e-7 |f| / h) against curvature
# (h^2) is ~cbrt(1e-7) ~ 5e-3 of |theta|, and relative errors of 1e-2 are then normal; a wrong gradient is off by
# O(1). These two replace gradient_check_step and gradient_check_tolerance in that case.
FLOAT32_STEP = 3e-3
FLOAT32_TOLERANCE = 0.1
# At the float32 step: a median relative error above this that is CONSISTENT_FACTOR x the disagreement between the
# estimates at FLOAT32_STEP and 4 x FLOAT32_STEP is a wrong gradient, not rounding.
WRONG_ERROR = 1e-2
CONSISTENT_FACTOR = 10.0


class GradientCheck(NamedTuple):
    loss: Any  # the loss in the precision it was computed in (its dtype says which)
    numeric: Any  # (steps, directions) central differences
    analytic: Any  # (directions,) grad . v
    grad_norm: Any
    num_params: Any


def cast64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if floating(a) else a, tree)


def make_program(problem: Problem):
    def program(params, rest, seed, x, y, relative_steps, directions, perturbation_scale):
        params, rest, x = cast64(params), cast64(rest), cast64(x)  # integer inputs (token ids) stay integers
        # Off the exact init: a zero bias on an all-zero input patch puts a ReLU exactly on its kink, where the
        # loss is not differentiable (the CNN on digits' blank borders: relative error 0.02 at the init itself).
        params = perturb(params, seed, perturbation_scale)
        y = y.astype(jnp.float64) if floating(y) else y

        def loss(p):
            return jnp.mean(problem.loss_fn(problem.model(p, rest, x), y))

        value, grads = jax.value_and_grad(loss)(params)
        leaves, treedef = jax.tree.flatten(params)
        theta_norm = optax.tree.norm(params)
        num_params = sum(a.size for a in leaves if floating(a))

        # Random unit directions, one row per direction.
        noise = unit_noise(seed + 1, leaves, directions.shape)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(z), axis=tuple(range(1, z.ndim))) for z in noise))
        directions = jax.tree.unflatten(treedef, [z / norm.reshape((-1,) + (1,) * (z.ndim - 1)).astype(z.dtype)
                                                  for z in noise])

        def numeric(v, relative_step):
            h = (relative_step * jnp.maximum(theta_norm, 1.0)).astype(value.dtype)
            plus = loss(jax.tree.map(lambda p, d: p + h * d if floating(p) else p, params, v))
            minus = loss(jax.tree.map(lambda p, d: p - h * d if floating(p) else p, params, v))
            return (plus - minus) / (2 * h)

        analytic = jax.vmap(lambda v: sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                                           jax.tree.leaves(v))))(directions)
        numerics = jax.vmap(lambda s: jax.vmap(lambda v: numeric(v, s))(directions))(relative_steps)
        return GradientCheck(value, numerics, analytic, optax.tree.norm(grads), num_params)

    return program


def run_check(problem: Problem, params, rest, x, y, *, seed: int, settings: Settings,
              opt_level) -> GradientCheck:
    """Check at the first init's parameters (``params``, ``rest`` from :func:`programs.init_statistics`)."""
    n = min(settings.gradient_check_examples, x.shape[0])
    with jax.enable_x64(True):
        steps = np.array([settings.gradient_check_step, FLOAT32_STEP, 4 * FLOAT32_STEP,
                          100 * settings.gradient_check_step], np.float64)
        directions = np.zeros((settings.gradient_check_directions,), np.int8)  # carries the count as a shape
        out = programs.run("model/gradient_check", make_program(problem), params, rest,
                           np.uint32((seed * 7919 + 0x6C4E) % 2**32),
                           np.asarray(x[:n]), np.asarray(y[:n]), steps, directions,
                           np.float64(settings.perturbation_scale),
                           static_key=("model/gradient_check", problem), opt_level=opt_level,
                           options=compile_options())
        return jax.tree.map(np.asarray, out)


def relative_errors(numeric: np.ndarray, analytic: np.ndarray, grad_norm: float, num_params: int) -> np.ndarray:
    """|numeric - analytic| / max(|numeric|, |analytic|, floor): CS231n's relative error. The floor (a tenth of the
    typical |grad . v| = |grad| / sqrt(n) for a random unit v) keeps a direction that happens to be nearly
    orthogonal to the gradient from turning rounding noise into a large ratio."""
    floor = 0.1 * grad_norm / np.sqrt(max(num_params, 1))
    scale = np.maximum(np.maximum(np.abs(numeric), np.abs(analytic)), max(floor, np.finfo(np.float64).tiny))
    return np.abs(numeric - analytic) / scale


def judge(result: GradientCheck, settings: Settings, examples: int) -> tuple[list[Finding], dict[str, Any]]:
    precision = "float64" if np.asarray(result.loss).dtype == np.float64 else "float32"
    # (steps, directions): the fine step, FLOAT32_STEP, 4 x FLOAT32_STEP, 100 x the fine step.
    numeric = np.asarray(result.numeric, np.float64)
    analytic = np.asarray(result.analytic, np.float64)
    metrics: dict[str, Any] = {}
    if not (np.all(np.isfinite(numeric)) and np.all(np.isfinite(analytic))):
        return [], metrics  # non-finite gradients are model.gradient_flow's finding

    def rel(a, b):
        return relative_errors(a, b, float(result.grad_norm), int(result.num_params))

    tolerance, step, row = settings.gradient_check_tolerance, settings.gradient_check_step, 0
    errors = rel(numeric[0], analytic)
    if precision == "float32" or (np.median(errors) > tolerance
                                  and np.median(rel(numeric[0], numeric[3])) > tolerance):
        # Rounding drowns the fine step: the model computes in float32, or keeps parts in float32 under float64
        # (Flax's embedding lookup and attention softmax); the fine estimate then disagrees with the one at a
        # 100x step, whose float32 rounding is 100x smaller. In float64 both are exact to ~1e-6 (curvature at
        # 100x the fine step is still negligible), so a fully float64 model with a wrong rule is judged here.
        if precision == "float64":
            precision = "float64 with parts in float32"
        tolerance, step, row = FLOAT32_TOLERANCE, FLOAT32_STEP, 1
        errors = rel(numeric[1], analytic)
    median = float(np.median(errors))
    between_steps = float(np.median(rel(numeric[1], numeric[2])))
    wrong = median > tolerance or (row == 1 and median > WRONG_ERROR and median > CONSISTENT_FACTOR * between_steps)
    metrics[f"{NAME}/gradient_check/relative_error"] = median
    findings = []
    if wrong:
        why = (f"tolerance {tolerance:g}" if median > tolerance else
               f"the estimates at two step sizes agree within {between_steps:.2g}, so it is not rounding")
        findings.append(error(
            f"{NAME}.gradient_check",
            f"The gradient does not match the loss: along {len(errors)} random directions the analytic directional "
            f"derivative (grad . v) and central differences of the loss differ by a median relative error of "
            f"{median:.2g} ({why}; computed in {precision} on {examples} examples).",
            "Back-propagation is not differentiating what the forward pass computes: look for a jax.custom_vjp or "
            "custom_jvp with a wrong backward rule, a jax.lax.stop_gradient (or .detach-like trick) on a path the "
            "loss needs, or a hand-written derivative; check it with jax.test_util.check_grads.",
            relative_errors=np.round(errors, 6).tolist(), numeric=numeric[row].tolist(), analytic=analytic.tolist(),
            tolerance=tolerance, relative_step=step, precision=precision, examples=examples,
            disagreement_between_steps=between_steps,
        ))
    return findings, metrics
