"""What every diagnostic receives (:class:`Context`) and returns (:class:`Outcome`).

A diagnostic is ``run(ctx, settings) -> Outcome``: ``settings`` is the diagnostic's own frozen dataclass (built
from ``diagnostics.<name>`` in the config, see :mod:`harness.config`), ``ctx`` holds the validated data, the
training problem and results other diagnostics share (the seed-to-seed noise floor, reference runs). Numerics
happen in compiled programs (:mod:`harness.engine`); the outcome is plain host data: findings, flat metrics named
``<diagnostic>/<quantity>[/<scope>]``, curves for plots and W&B, and plot functions drawn by the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from harness.data.dataset import Dataset
from harness.engine.train import Arrays, Hparams, Problem, SweepResult, TrainSpec, train_members
from harness.errors import HarnessError
from harness.findings import Finding
from harness.optim import OptimSpec


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How training programs are cut and compiled (config group ``engine``)."""

    steps_per_call: int = 500
    max_members_per_call: int = 64
    opt_level: int | None = 2
    max_eval_examples: int = 2048


@dataclasses.dataclass
class Context:
    dataset: Dataset  # as the factory returned it (validated structure, values unchecked)
    arrays: Arrays  # finite examples, float32 inputs, int32 labels / float32 targets
    problem: Problem  # the configured model, loss and optimizer
    build_model: Callable[..., Any]  # (key, **model overrides) -> nnx.Module, e.g. build_model(key, width=64)
    model_config: dict[str, Any]  # the model's config keys (without _target_), e.g. {"width": 128, "depth": 2}
    loss_name: str
    optim: OptimSpec
    batch_size: int
    seed: int
    engine: EngineSettings = dataclasses.field(default_factory=EngineSettings)
    reload_data: Callable[[], Dataset] | None = None  # calls the data factory again (determinism checks)
    progress: Callable[[str, int, int], None] | None = None  # (task, done, total)
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)  # results diagnostics share, by name
    # What actually trains: the engine, or a collapsed multirun's batching trainer (harness.sweeps.collapse).
    train_fn: Callable[..., SweepResult] = train_members

    def spec(self, steps: int, **overrides) -> TrainSpec:
        """A TrainSpec with the engine settings and this run's batch size; diagnostics override what they need."""
        base = dict(
            steps=steps,
            batch_size=self.batch_size,
            steps_per_call=self.engine.steps_per_call,
            max_members_per_call=self.engine.max_members_per_call,
            opt_level=self.engine.opt_level,
            max_eval_examples=self.engine.max_eval_examples,
        )
        return TrainSpec(**{**base, **overrides})

    def train(self, name: str, spec: TrainSpec, hparams: Hparams, arrays: Arrays | None = None,
              problem: Problem | None = None, *, rerun: bool = False) -> SweepResult:
        """Train members through the engine (progress labelled ``name``).

        Every training diagnostic trains through here, so (1) identical requests are computed once per run
        (the controls reuse the seed runs' real-data members), and (2) a collapsed multirun can replace this
        method to merge the same request from many sweep points into one vmapped program. Requests that must be
        compared bitwise (determinism) are issued with equal shapes, so they stay like with like either way.
        ``rerun=True`` trains again even when an identical request was already computed: a determinism check
        must really run twice (identical reloaded data has the same fingerprint, so the memo would answer).
        """
        problem = problem or self.problem
        arrays = arrays if arrays is not None else self.arrays
        fingerprints = self.shared.setdefault("_arrays_keys", {})  # id -> (arrays, digest): hash each array once
        if id(arrays) not in fingerprints:
            fingerprints[id(arrays)] = (arrays, _arrays_key(arrays))
        key = (id(problem), spec, fingerprints[id(arrays)][1], _hparams_key(hparams))
        memo = self.shared.setdefault("_train_memo", {})
        if key in memo and not rerun:
            return memo[key]
        progress = None
        if self.progress is not None:
            progress = lambda done, total: self.progress(name, done, total)  # noqa: E731
        result = self.train_fn(problem, spec, hparams, arrays, name=name, progress=progress)
        memo.setdefault(key, result)
        return result

    def reloaded_arrays(self) -> Arrays:
        """The training arrays from a second call of the data factory (once per run)."""
        if "_reloaded_arrays" not in self.shared:
            if self.reload_data is None:
                raise RuntimeError("this context cannot reload its data")
            self.shared["_reloaded_arrays"] = Arrays(*self.reload_data().training_arrays())
        return self.shared["_reloaded_arrays"]


@dataclasses.dataclass
class Plot:
    """A figure the report draws after the compiled work: ``draw(path)`` writes a PNG to ``path``."""

    name: str
    title: str
    draw: Callable[[str], None]


@dataclasses.dataclass
class Outcome:
    name: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # flat scalars: report.json, W&B summary
    series: dict[str, Any] = dataclasses.field(default_factory=dict)  # curves: lists/arrays, for W&B and plots
    plots: list[Plot] = dataclasses.field(default_factory=list)
    members: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # sweep rows: hparams + results
    seconds: float = 0.0
    skipped: str | None = None  # why it did not run (e.g. blocked by an earlier error)


def require_at_least(settings, key: str, field: str, minimum, reason: str = ""):
    """Range check for a Settings field, naming the config key: ``diagnostics.seeds.num_seeds: must be at least 2
    (a spread needs two runs), got 1``."""
    value = getattr(settings, field)
    if value < minimum:
        why = f" ({reason})" if reason else ""
        raise HarnessError(f"must be at least {minimum}{why}, got {value}", key=f"{key}.{field}")


def _arrays_key(arrays: Arrays):
    """Identity for the run's own arrays; a content fingerprint for arrays a diagnostic made (a fixed batch)."""
    import hashlib

    digest = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str((a.shape, a.dtype)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _hparams_key(hparams: Hparams):
    return tuple(np.asarray(v).tobytes() for v in hparams)


def nanmin_or(values, default=np.nan) -> float:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.min()) if finite.size else float(default)
