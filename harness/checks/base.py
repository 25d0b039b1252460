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
from harness.findings import Finding
from harness.optim import OptimSpec


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How training programs are cut and compiled (config group ``engine``)."""

    steps_per_call: int = 250
    max_members_per_call: int = 64
    opt_level: int | None = 0
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
              problem: Problem | None = None) -> SweepResult:
        """Run members through the engine with a progress callback labelled ``name``."""
        progress = None
        if self.progress is not None:
            progress = lambda done, total: self.progress(name, done, total)  # noqa: E731
        return train_members(problem or self.problem, spec, hparams, arrays or self.arrays, name=name,
                             progress=progress)


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


def nanmin_or(values, default=np.nan) -> float:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.min()) if finite.size else float(default)
