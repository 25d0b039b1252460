"""The checklist, end to end, without Hydra: load data, build the problem, run the diagnostics in order, report.

``run(rc, output_dir)`` is what the CLI calls and what tests call with a composed config. Bad input raises
:class:`HarnessError` before any work; the problems the harness exists to find become findings; a diagnostic that
crashes on something unforeseen is an internal error of that diagnostic (the run's status is ``internal_error``,
exit code 3, the traceback in ``harness.log``), and the others still run.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

from harness import losses
from harness.checks.base import Context, Outcome
from harness.checks import registry
from harness.checks.registry import DIAGNOSTICS, diagnostic_module, stage
from harness.config import FactoryConfig, RunConfig
from harness.data.dataset import Dataset, from_mapping
from harness.engine.core import Arrays, Problem
from harness.engine import driver
from harness.errors import HarnessError
from harness.models.adapters import Model, ModelFactory
from harness.findings import Finding, Severity

# An error with one of these ids makes the later stages meaningless (no shapes to train on, no forward pass):
# they are skipped, with the reason, instead of producing a cascade of misleading findings.
BLOCKING = {"data.shape": "model", "model.forward": "training"}
STAGE_ORDER = ("data", "model", "training", "hyperparameters")


def load_dataset(fc: FactoryConfig, name: str = "data") -> Dataset:
    """Call the data factory and validate what it returns: a mapping of arrays, or iterables of batches or examples
    drawn into memory up to ``data.max_examples`` (:mod:`harness.data.iterables`). ``max_examples`` is harness's
    key, not the factory's: it reaches the factory only when the factory names a ``max_examples`` parameter."""
    from harness.data import iterables

    factory = fc.resolve("data._target_")
    kwargs = dict(fc.kwargs)
    max_examples = iterables.max_examples_from(kwargs.pop("max_examples", None))
    if "max_examples" in fc.kwargs and iterables.accepts_max_examples(factory):
        kwargs["max_examples"] = fc.kwargs["max_examples"]  # as configured (null included)
    try:
        mapping = factory(**kwargs)
    except HarnessError:
        raise
    except TypeError as err:
        raise HarnessError(f"calling {fc.target} failed: {err}", key="data") from None
    except Exception as err:
        raise HarnessError(f"the data factory {fc.target} raised {type(err).__name__}: {err}", key="data") from None
    source = f"data ({fc.target})"
    if iterables.is_iterable_result(mapping):
        arrays, drawn = iterables.draw_dataset(mapping, source=f"the data factory {fc.target}",
                                               max_examples=max_examples)
        return from_mapping(arrays, source=source, name=name, drawn=drawn)
    return from_mapping(mapping, source=source, name=name)


def make_model_factory(fc: FactoryConfig, dataset: Dataset, framework: str = "auto",
                       precision: str = "float32") -> ModelFactory:
    """The user's model factory, called the documented way (:func:`harness.models.adapters.call_factory`); every
    model it adapts computes in ``precision`` (the config's ``precision``)."""
    x_example = dataset.training_arrays()[0][:2]
    return ModelFactory(fc.resolve("model._target_"), dict(fc.kwargs), dataset.input_shape, dataset.num_outputs,
                        x_example, framework=framework, target=fc.target, precision=precision)


def adapt_model(models: ModelFactory, fc: FactoryConfig) -> Model:
    """Detect the family and adapt the model (abstractly: no FLOPs), so a wrong config key or an unknown kind of
    model is a clear error, not a trace inside a sweep."""
    try:
        return models.adapt()
    except HarnessError:
        raise
    except TypeError as err:
        raise HarnessError(f"calling {fc.target} failed: {err}", key="model") from None
    except Exception as err:
        raise HarnessError(f"building the model with {fc.target} raised {type(err).__name__}: {err}",
                           key="model") from None


def make_loss(fc: FactoryConfig, dataset: Dataset) -> tuple[Callable, str]:
    target = fc.resolve("loss._target_")
    if target is losses.auto:
        fn = losses.auto(dataset.num_classes)
        return fn, fn.__name__
    if fc.partial:
        return (functools.partial(target, **fc.kwargs) if fc.kwargs else target), fc.target.rsplit(".", 1)[-1]
    try:
        fn = target(**fc.kwargs)
    except TypeError as err:
        raise HarnessError(
            f"{fc.target} was called without outputs and targets ({err}); a loss function needs `_partial_: true`",
            key="loss",
        ) from None
    except Exception as err:
        raise HarnessError(f"the loss factory {fc.target} raised {type(err).__name__}: {err}", key="loss") from None
    if not callable(fn):
        raise HarnessError(f"{fc.target} must be a loss function f(outputs, targets) (set `_partial_: true`)",
                           key="loss")
    return fn, fc.target.rsplit(".", 1)[-1]


def build_context(rc: RunConfig, progress=None) -> Context:
    started = time.perf_counter()
    data_name = rc.choices.get("data") or rc.data.target.rsplit(".", 1)[-1]
    dataset = load_dataset(rc.data, data_name)
    models = make_model_factory(rc.model, dataset, rc.framework, rc.precision)
    model = adapt_model(models, rc.model)
    loss_fn, loss_name = make_loss(rc.loss, dataset)
    fingerprint = _fingerprint(rc, dataset)
    problem = Problem(model=model, loss_fn=loss_fn, optim=rc.optim, task=dataset.task, fingerprint=fingerprint)
    return Context(
        dataset=dataset,
        arrays=Arrays(*dataset.training_arrays()),
        problem=problem,
        models=models,
        model_config=dict(rc.model.kwargs),
        loss_name=loss_name,
        optim=rc.optim,
        batch_size=rc.batch_size,
        seed=rc.seed,
        engine=rc.engine,
        reload_data=lambda: load_dataset(rc.data, data_name),
        progress=progress,
        started=started,
    )


def _fingerprint(rc: RunConfig, dataset: Dataset):
    """Everything that shapes a training program, as a hashable value (the learning rate and weight decay are
    traced, so they are left out: points of a sweep over them share programs). The compute dtype
    (``precision``) is in it: float32 and bfloat16 programs are never shared.

    The user's code is in it by content, not by name (:func:`harness.engine.code_identity.code_identity` of the
    model factory, the loss and the optimizer factory): an edited file is a new key, and a class or function with no
    source file (a notebook's) is keyed by the object itself, so a re-run cell that redefines it is traced again
    and its programs are never stored across processes. The data factory's code is left out: the data reach the
    programs as arguments, whose shapes and dtypes are keyed anyway. An object given to :func:`harness.diagnose`
    is keyed by :func:`harness.api.in_memory_identity` (its code, and the object itself when it holds data)."""
    import json

    from harness.engine.code_identity import code_identity

    def frozen(x):
        return json.dumps(x, sort_keys=True, default=str)

    optim = rc.optim
    return (
        rc.model.target, rc.model.code_key("model._target_"), frozen(rc.model.kwargs),
        rc.framework, dataset.input_shape, dataset.num_outputs, dataset.task,
        rc.loss.target, rc.loss.code_key("loss._target_"), frozen(rc.loss.kwargs),
        optim.name, code_identity(optim.factory), frozen(optim.kwargs), optim.clip_norm, rc.precision,
    )


def blocked_stages(findings: list[Finding]) -> dict[str, str]:
    """Stages that cannot run, from the earliest blocking error, with the reason."""
    for f in findings:
        if f.severity is Severity.ERROR and f.id in BLOCKING:
            first = STAGE_ORDER.index(BLOCKING[f.id])
            return {s: f"skipped: {f.id} ({f.message})" for s in STAGE_ORDER[first:]}
    return {}


def run_diagnostics(rc: RunConfig, ctx: Context, on_outcome: Callable[[Outcome], None] | None = None
                    ) -> list[Outcome]:
    """Run the configured diagnostics one after the other in the checklist's order (:data:`DIAGNOSTICS`, whatever
    order the config lists them in: later ones read what earlier ones share); ``on_outcome`` is called as each
    finishes.

    The data and model stages run first: their errors can block what follows (:data:`BLOCKING`). Then the budget
    is fitted (:func:`fit_budget`) and the training diagnostics' announced requests are trained as one member table
    (:func:`prefetch`), so each training diagnostic finds its training done and only reads and judges it. Without
    a budget, the member table's program compiles while the model stage runs (:func:`compile_ahead`).
    """
    outcomes: list[Outcome] = []
    names = sorted(rc.diagnostics, key=list(DIAGNOSTICS).index)
    later = [n for n in names if stage(n) not in ("data", "model")]
    ahead, interrupted = None, False
    try:
        for name in names:
            if ahead is None and later and stage(name) == "model":
                ahead = compile_ahead(rc, ctx, later, outcomes)
            if later and name == later[0]:
                rc = fit_budget(rc, ctx, later, outcomes)
                plan = ctx.shared.get("_budget")
                prefetch(rc, ctx, [n for n in later if plan is None or n not in plan.skipped], outcomes)
            outcome = _run_one(rc, ctx, name, outcomes)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    except KeyboardInterrupt:
        interrupted = True  # the user stops the run: no waiting for a compile nobody will use
        raise
    finally:
        if ahead is not None and not interrupted:  # unused after a model stage that blocked training: no thread
            ahead.join()  # outlives the run
    return outcomes


def announced(rc: RunConfig, ctx: Context, names: list[str], previous: list[Outcome]) -> list:
    """The training requests of the diagnostics ``names`` that ``previous`` findings do not block, in order
    (:func:`harness.checks.registry.announced`)."""
    blocked = blocked_stages([f for o in previous for f in o.findings])
    settings = {n: rc.settings[n] for n in names if n in rc.settings and stage(n) not in blocked}
    return [r for requests in registry.announced(ctx, settings).values() for r in requests]


def compile_ahead(rc: RunConfig, ctx: Context, names: list[str], previous: list[Outcome]):
    """Start compiling the member table's programs (:func:`harness.engine.driver.compile_ahead`) in a thread, so
    they compile while the model stage runs (XLA's compile releases the GIL; a training call that needs a program
    still compiling waits for it). Returns the thread, or None without a table to compile or with ``budget=``,
    whose probe times the table's program itself. Best effort: what fails here fails again, and is reported,
    where the table trains."""
    if rc.budget is not None or ctx.train_fn is not driver.train_members:
        return None

    def work():
        try:
            for _, both in ctx.table(announced(rc, ctx, names, previous)):
                driver.compile_ahead(both.problem or ctx.problem, both.spec, both.hparams, both.arrays,
                                     name="table")
        except Exception:  # noqa: BLE001
            if rc.debug:
                traceback.print_exc()

    thread = threading.Thread(target=work, name="harness-compile-ahead", daemon=True)
    thread.start()
    return thread


def prefetch(rc: RunConfig, ctx: Context, names: list[str], previous: list[Outcome]) -> None:
    """Train what the training diagnostics are about to ask for as few merged programs (the member table,
    :mod:`harness.engine.table`), before they run: each then finds its first request answered. Best effort: a
    request that fails here is left to its diagnostic, which trains it alone and reports what went wrong."""
    try:
        ctx.prefetch(announced(rc, ctx, names, previous))
    except HarnessError:
        raise
    except Exception:  # noqa: BLE001 -- as above: the diagnostics train on their own
        if rc.debug:
            traceback.print_exc()


def fit_budget(rc: RunConfig, ctx: Context, names: list[str], previous: list[Outcome]) -> RunConfig:
    """With ``budget=`` seconds, the training diagnostics' settings cut to fit it (:mod:`harness.budget`); the plan
    goes to ``ctx.shared["_budget"]`` for the report. Unchanged without a budget, when no training diagnostic
    runs, or when the data or model stage blocked training. A probe that fails (the model does not train at all)
    leaves the configured suite: its diagnostics report the problem."""
    blocked = blocked_stages([f for o in previous for f in o.findings])
    training = [n for n in names if stage(n) not in blocked]
    if rc.budget is None or not training:
        return rc
    from harness import budget

    try:
        plan = budget.plan(ctx, rc.settings, training, rc.budget, run=rc.diagnostics)
    except HarnessError:
        raise
    except Exception:  # noqa: BLE001
        if rc.debug:
            traceback.print_exc()
        return rc
    ctx.shared["_budget"] = plan
    return dataclasses.replace(rc, settings=plan.settings)


def _run_one(rc: RunConfig, ctx: Context, name: str, previous: list[Outcome]) -> Outcome:
    blocked = blocked_stages([f for o in previous for f in o.findings])
    if stage(name) in blocked:
        return Outcome(name, skipped=blocked[stage(name)])
    plan = ctx.shared.get("_budget")
    if plan is not None and name in plan.skipped:
        return Outcome(name, skipped=plan.skipped[name])
    start = time.perf_counter()
    try:
        outcome = diagnostic_module(name).run(ctx, rc.settings[name])
    except HarnessError:
        raise
    except Exception as err:  # an unforeseen failure costs this diagnostic, never the report
        # Recorded as an internal error (the run's status is internal_error, the CLI exits 3, the traceback goes
        # to harness.log); the other diagnostics still run. debug=true also prints the traceback now.
        import os
        import sys

        from harness.findings import InternalError

        crash = InternalError.from_exception(name, err)
        if rc.debug or os.environ.get("HARNESS_DEBUG", "").lower() in ("1", "true", "yes"):
            print(f"harness: diagnostic {name} crashed (debug=true: its traceback follows; the run goes on)",
                  file=sys.stderr)
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        outcome = Outcome(name, skipped=f"crashed: {crash.summary}", internal_error=crash)
    # Plus its share of the member table trained for it beforehand (Context.prefetch).
    outcome.seconds = time.perf_counter() - start + ctx.shared.get("_prefetched_seconds", {}).get(name, 0.0)
    return outcome


def _precision(context: Context | None) -> str:
    """The dtype the run's model computed in (``precision``): float32 without a context."""
    model = getattr(getattr(context, "problem", None), "model", None)
    return getattr(model, "precision", "float32")


@dataclasses.dataclass
class RunResult:
    outcomes: list[Outcome]
    findings: list[Finding]
    status: str
    seconds: float
    context: Context | None = None
    not_ruled_out: list[str] = dataclasses.field(default_factory=list)  # harness.causes.not_ruled_out
    budget: dict[str, Any] | None = None  # what ``budget=`` measured and cut (harness.budget.Plan.to_dict)
    root_cause: Any = None  # harness.causes.RootCause: the first thing to fix in the decision tree, or None

    @property
    def has_error(self) -> bool:
        return any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def internal_errors(self) -> list:  # of harness.findings.InternalError
        """The diagnostics that crashed, in the configured order."""
        return [o.internal_error for o in self.outcomes if o.internal_error is not None]

    @classmethod
    def of(cls, outcomes: list[Outcome], seconds: float, context: Context | None = None,
           settings: dict | None = None) -> "RunResult":
        """The run's result once every diagnostic has run: findings reconciled into causes and the symptoms they
        explain (:func:`harness.causes.reconcile`, written back into the outcomes), the status, and what the
        training budgets (``settings``: the run's diagnostic settings) could not rule out."""
        from harness.causes import not_ruled_out, reconcile_outcomes, root_cause

        optim = getattr(context, "optim", None)
        optimizer = f"{optim.name}, lr {optim.lr:g}" if optim is not None else "the configured optimizer"
        findings = reconcile_outcomes(outcomes, optimizer)
        plan = context.shared.get("_budget") if context is not None else None
        if plan is not None:
            settings = plan.settings
        limits = not_ruled_out(outcomes, settings) if settings is not None else []
        return cls(outcomes, findings, cls.status_of(outcomes), seconds, context, limits,
                   plan.to_dict() if plan is not None else None,
                   root_cause(findings, outcomes, precision=_precision(context)))

    @staticmethod
    def status_of(outcomes: list[Outcome]) -> str:
        """``internal_error`` when a diagnostic crashed (a crash is never healthy), else ``unhealthy`` when there
        is an error finding, else ``healthy``."""
        if any(o.internal_error is not None for o in outcomes):
            return "internal_error"
        findings = (f for o in outcomes for f in o.findings)
        return "unhealthy" if any(f.severity is Severity.ERROR for f in findings) else "healthy"


def run(rc: RunConfig, progress=None, on_outcome=None) -> RunResult:
    start = time.perf_counter()
    ctx = build_context(rc, progress)
    outcomes = run_diagnostics(rc, ctx, on_outcome)
    return RunResult.of(outcomes, time.perf_counter() - start, ctx, rc.settings)


def flat_metrics(outcomes: list[Outcome]) -> dict[str, Any]:
    """Every diagnostic's scalar metrics in one flat mapping (``<diagnostic>/<quantity>...``)."""
    out: dict[str, Any] = {}
    for o in outcomes:
        for k, v in o.metrics.items():
            out[k if k.startswith(o.name + "/") else f"{o.name}/{k}"] = v
    return out


def finite_or_none(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
