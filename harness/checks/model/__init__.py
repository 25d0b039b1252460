"""The model stage of the checklist: is the model sound at init, before any training?

Seed 001's "Level 2: Model Debugging" (forward pass, parameter count, gradient flow, gradient checking), seed 003's
model section (initial loss, batch dependence, gradient norms per layer, intermediate values) and Karpathy's "A
Recipe for Training Neural Networks" (2019: "verify loss @ init", "init well", "use backprop to chart
dependencies"). All of it on one small batch of training examples, at ``init_seeds`` inits (the ones the
training stages train), in two compiled programs (:mod:`.programs`): everything at init vmapped over inits, and
the float64 gradient check. Families of checks, one module each:

* :mod:`.forward` -- ``model.forward``, ``model.output_range``, ``model.initial_loss``
* :mod:`.gradients` -- parameter counts, ``model.gradient_flow`` (zero, non-finite and vanishing gradients)
* :mod:`.gradient_check` -- ``model.gradient_check`` (analytic vs numerical directional derivatives)
* :mod:`.batch_dependence` -- ``model.batch_dependence``
* :mod:`.sequence` -- ``model.causal_leakage``, ``model.padding_leakage`` (causal tasks and padded data only)
* :mod:`.units` -- ``model.dead_units``, ``model.saturated_units``, ``model.exploding_activations`` (activations
  and their inputs recorded by :mod:`.capture`)

Everything that judges gradients or outputs runs the model in eval mode (dropout off, BatchNorm on running
statistics: deterministic and per-example); activation statistics come from a train-mode forward pass, as the
units are during training. Thresholds are :class:`Settings` (``diagnostics.model.*``), each justified where it is
used and measured silent on the healthy builtins.

They check the model's math, so they run it in float32 whatever ``precision`` says (a finite-difference gradient
check is meaningless in bfloat16); what bfloat16 does to training is the precision check's
(:mod:`harness.checks.training.precision`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from harness import losses
from harness.checks.base import Context, Outcome, Plot
from harness.checks.model import batch_dependence, forward, gradient_check, gradients, programs, sequence, units
from harness.checks.model.settings import NAME, Settings
from harness.findings import info

__all__ = ["Settings", "run"]


def sample_batch(ctx: Context, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random sample of training examples (data sorted by class must not give a one-class batch)."""
    x, y = ctx.arrays.x_train, ctx.arrays.y_train
    n = min(size, len(x))
    index = np.sort(np.random.default_rng(ctx.seed).choice(len(x), n, replace=False))
    return np.asarray(x[index]), np.asarray(y[index])


def run(ctx: Context, settings: Settings) -> Outcome:
    outcome = Outcome(NAME)
    if ctx.problem.model.precision != "float32":  # the model's math, in float32 (the module docstring)
        ctx = dataclasses.replace(ctx, problem=ctx.problem.at_precision("float32"))
    problem = ctx.problem
    x, y = sample_batch(ctx, settings.batch_size)
    probe = programs.probe(problem, x, y)
    metrics, series = gradients.parameter_outputs(gradients.parameter_table(probe.parameters))
    # What harness understood the setup to be: the model's library and the task read off the data.
    add(outcome, [], {f"{NAME}/family": problem.model.family, f"{NAME}/task": problem.task.kind, **metrics}, series)
    blocking = forward.probe_findings(probe, len(x), problem.task)
    if not blocking and not probe.parameters:
        blocking = [gradients.no_parameters_finding()]
    if blocking:
        add(outcome, blocking)
        return outcome  # nothing else can be computed from a model that does not run (or cannot learn)

    rows = batch_dependence.checked_rows(len(x), settings.batch_dependence_rows)
    stats, (params0, rest0), notes = init_statistics(ctx, settings, x, y, rows)
    add(outcome, notes)
    nonfinite = forward.finite_findings(stats.outputs, stats.losses)
    if nonfinite:
        add(outcome, nonfinite)
        return outcome

    add(outcome, *forward.initial_loss_findings(stats.losses, problem.loss_fn, ctx.dataset.num_classes, y,
                                                ctx.arrays.y_train, settings, outputs=stats.outputs,
                                                null_values=stats.null_losses))
    add(outcome, *forward.output_range_findings(stats.outputs, ctx.loss_name, ctx.dataset.classification,
                                                settings))
    if not any(f.id == f"{NAME}.output_range" for f in outcome.findings):
        saturation = []
        if stats.confident_losses and stats.null_losses:
            classes = ctx.dataset.num_classes
            null = losses.null_prediction(problem.loss_fn, classes, stats.outputs, y, stats.null_losses)
            saturation = forward.loss_saturation_findings(stats.confident_losses, null,
                                                          losses.output_space(stats.outputs), ctx.loss_name)
        clamped = forward.clamped_output_findings(stats.outputs, ctx.arrays.y_train, ctx.dataset.classification,
                                                  settings)
        add(outcome, saturation + clamped)
    layers = units.layer_table(stats.units, stats.input_spread)
    # Token ids are not a scale: growth is counted from the first activation layer for integer inputs.
    input_rms = None if problem.task.integer_inputs else float(np.mean(stats.input_rms))
    judge_gradient_flow(outcome, stats, layers, x, settings, probe.parameters)
    add(outcome, *batch_dependence.judge(stats.own_gradient, stats.cross_gradient, stats.leaking_examples, rows,
                                         len(x), settings))
    if not outcome.findings or outcome.findings[-1].id != f"{NAME}.batch_dependence":  # one mixing finding
        add(outcome, batch_dependence.judge_loss(stats.loss_mixing, rows, len(x), settings))
    add(outcome, *sequence.run(ctx, settings, params0, rest0, x))
    judge_units(outcome, layers, settings, input_rms)

    if settings.gradient_check and all(np.all(v) for v in stats.grad_finite.values()):
        result = gradient_check.run_check(problem, params0, rest0, x, y, seed=ctx.seed, settings=settings,
                                          opt_level=programs.RUN_ONCE_OPT_LEVEL)
        add(outcome, *gradient_check.judge(result, settings, min(settings.gradient_check_examples, len(x))))
    outcome.metrics = headline_first(outcome.metrics)
    return outcome


def add(outcome: Outcome, findings, metrics=None, series=None) -> None:
    outcome.findings += findings
    outcome.metrics.update(metrics or {})
    outcome.series.update(series or {})


def init_statistics(ctx: Context, settings: Settings, x, y, rows):
    """The init program's results; if recording the activations fails (the probe showed the model itself runs),
    the program again without the recording, and an info saying so."""
    thresholds = dict(perturbation_scale=settings.perturbation_scale, saturation_level=settings.saturation_level,
                      saturated_example_fraction=settings.saturated_example_fraction,
                      preactivation_saturation=settings.preactivation_saturation)

    def statistics(with_capture: bool):
        return programs.init_statistics(ctx.problem, x, y, seed=ctx.seed,
                                        init_seeds=settings.init_seeds, rows=rows, thresholds=thresholds,
                                        opt_level=programs.RUN_ONCE_OPT_LEVEL, with_capture=with_capture,
                                        steps=settings.zero_gradient_steps)

    try:
        return (*statistics(with_capture=True), [])
    except Exception as err:  # noqa: BLE001 -- the model ran in the probe: the recording is what failed
        note = info(
            f"{NAME}.dead_units",
            f"Activation statistics were not collected: recording the activations raised {type(err).__name__}: "
            f"{forward.first_line(err)}. The other model checks ran.",
            "Report this with your model's code; dead and saturated units are not checked for this model.",
            exception=type(err).__name__,
        )
        return (*statistics(with_capture=False), [note])


def judge_gradient_flow(outcome: Outcome, stats, layers, x, settings: Settings, shapes=None) -> None:
    dead_layers = [r["layer"] for r in layers if r["dead_everywhere"]]
    inputs_vary = len(x) >= 2 and not np.all(x == x[:1])
    add(outcome, *gradients.judge(stats, settings, dead_layers, inputs_vary, shapes))
    grad_median = {p: float(np.median(v)) for p, v in stats.grad_norm.items()}
    zero = {p for p, v in stats.grad_zero.items() if np.all(v)}
    nonfinite = {p for p, v in stats.grad_finite.items() if not np.all(v)}
    outcome.plots.append(Plot("grad_norms", "Gradient norm per parameter at init",
                              lambda path: gradients.draw(path, grad_median, zero, nonfinite)))
    outcome.series[f"{NAME}/grad_norm"] = {"x": list(range(len(grad_median))), "y": list(grad_median.values()),
                                           "keys": ["grad_norm"], "xname": "parameter",
                                           "labels": list(grad_median)}


def judge_units(outcome: Outcome, layers, settings: Settings, input_rms: float | None = None) -> None:
    add(outcome, units.judge(layers, settings, settings.init_seeds, input_rms), units.metrics(layers))
    if not layers:
        return
    grown = [g for g, _ in units.growth(layers, input_rms)]
    outcome.series[f"{NAME}/activations"] = {
        "columns": ["layer", "function", "units", "dead_fraction", "saturated_fraction", "spread_ratio",
                    "preactivation_saturated", "rms", "growth"],
        "rows": [[r["layer"], r["function"], r["units"], _finite(r["dead_fraction"]),
                  _finite(r["saturated_fraction"]), _finite(r["spread_ratio"]),
                  _finite(r["preactivation_saturated"]), _finite(r["rms"]), _finite(g)] for r, g in zip(layers, grown)],
    }
    outcome.plots.append(Plot("activations", "Activation statistics per layer at init",
                              lambda path: units.draw(path, layers, settings, input_rms)))


HEADLINE = ("initial_loss", "expected_initial_loss", "gradient_check/relative_error", "param_count", "family",
            "task")


def headline_first(metrics: dict) -> dict:
    """The numbers a reader wants first (the terminal and report.md show a diagnostic's first metrics)."""
    first = {f"{NAME}/{k}": metrics[f"{NAME}/{k}"] for k in HEADLINE if f"{NAME}/{k}" in metrics}
    return {**first, **{k: v for k, v in metrics.items() if k not in first}}


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
