"""What every diagnostic receives (:class:`Context`) and returns (:class:`Outcome`).

A diagnostic is ``run(ctx, settings) -> Outcome``: ``settings`` is the diagnostic's own frozen dataclass (built
from ``diagnostics.<name>`` in the config, see :mod:`harness.config`), ``ctx`` holds the validated data, the
training problem and results other diagnostics share (the seed-to-seed noise floor, reference runs). Numerics
happen in compiled programs (:mod:`harness.engine`); the outcome is plain host data: findings, flat metrics named
``<diagnostic>/<quantity>[/<scope>]``, curves for plots and W&B, and plot functions drawn by the report.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from harness.data.dataset import Dataset
from harness.engine import devices
from harness.engine.core import Arrays, Hparams, Problem, TrainSpec
from harness.engine.driver import SweepResult, even_calls, train_members
from harness.errors import HarnessError
from harness.findings import Finding, InternalError
from harness.optim import OptimSpec


# engine.max_members_per_call=auto. On CPU, a few members per device keep the per-step overhead amortized on the
# smallest models while a convolutional model's activations (tens of MB per member) stay few per step; wider calls
# ran its member-steps slower and padded a short table's last call with more idle members (README, Performance).
CPU_MEMBERS_PER_DEVICE = 3
ACCELERATOR_MEMBERS_PER_CALL = 64


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How training programs are cut and compiled (config group ``engine``)."""

    steps_per_call: int = 500
    max_members_per_call: int | str = "auto"  # a count, or auto: members_per_call()
    opt_level: int | None = 2
    max_eval_examples: int = 2048

    def validate(self, key: str):
        if isinstance(self.max_members_per_call, str) and self.max_members_per_call != "auto":
            raise HarnessError(f"must be auto or a positive integer, got {self.max_members_per_call!r}",
                               key=f"{key}.max_members_per_call")
        for name in ("steps_per_call", "max_members_per_call", "max_eval_examples"):
            if not isinstance(getattr(self, name), str):
                require_at_least(self, key, name, 1)

    def members_per_call(self) -> int:
        """``max_members_per_call``, with ``auto`` resolved for this run's backend: on an accelerator
        :data:`ACCELERATOR_MEMBERS_PER_CALL` (members run in parallel there, so a call is as wide as memory allows);
        on CPU :data:`CPU_MEMBERS_PER_DEVICE` per device, since each CPU device (one per core) runs its members' steps
        one after another and a wider call only grows the working set each step sweeps through memory."""
        if self.max_members_per_call != "auto":
            return int(self.max_members_per_call)
        if jax.default_backend() != "cpu":
            return ACCELERATOR_MEMBERS_PER_CALL
        return CPU_MEMBERS_PER_DEVICE * devices.device_count()


@dataclasses.dataclass
class Context:
    dataset: Dataset  # as the factory returned it (validated structure, values unchecked)
    arrays: Arrays  # finite examples, float32 inputs, int32 labels / float32 targets
    problem: Problem  # the configured model, loss and optimizer
    models: Any  # harness.models.adapters.ModelFactory: models.adapt(width=64) is the model at another width
    model_config: dict[str, Any]  # the model's config keys (without _target_), e.g. {"width": 128, "depth": 2}
    loss_name: str
    optim: OptimSpec
    batch_size: int
    seed: int
    engine: EngineSettings = dataclasses.field(default_factory=EngineSettings)
    reload_data: Callable[[], Dataset] | None = None  # calls the data factory again (determinism checks)
    progress: Callable[[str, int, int], None] | None = None  # (task, done, total)
    # When the run began (time.perf_counter): ``budget=`` counts the run's wall clock from here (harness.budget).
    started: float = dataclasses.field(default_factory=time.perf_counter)
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)  # results diagnostics share, by name
    # What actually trains: the engine, or a collapsed multirun's batching trainer (harness.sweeps.collapse).
    train_fn: Callable[..., SweepResult] = train_members

    def spec(self, steps: int, **overrides) -> TrainSpec:
        """A TrainSpec with the engine settings and this run's batch size; diagnostics override what they need."""
        base = dict(
            steps=steps,
            batch_size=self.batch_size,
            steps_per_call=self.engine.steps_per_call,
            max_members_per_call=self.engine.members_per_call(),
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
        key = self._memo_key(problem, spec, arrays, hparams)
        memo = self.shared.setdefault("_train_memo", {})
        if rerun and (key, "rerun") in memo:  # trained by the member table beside the first run (prefetch)
            return memo.pop((key, "rerun"))
        if key in memo and not rerun:
            return memo[key]
        progress = None
        if self.progress is not None:
            progress = lambda done, total: self.progress(name, done, total)  # noqa: E731
        if self.train_fn is train_members:  # (a collapsed multirun's trainer sizes the calls of its merged programs)
            spec = even_calls(spec, len(hparams))
        # A failed request is not remembered: the next asker tries again.
        result = self.train_fn(problem, spec, hparams, arrays, name=name, progress=progress)
        memo.setdefault(key, result)
        return result

    def train_like(self, first: SweepResult, name: str, hparams: Hparams) -> SweepResult:
        """A follow-up request trained by the program that trained ``first`` (its spec, arrays and call width, which
        a merged member table sets): ``hparams`` padded to whole calls, so the compiled program is reused. The
        result has ``hparams``' rows and the program's evaluation schedule."""
        from harness.engine import table

        spec, width, steps = first.program_spec, first.program_width, first.loss.shape[1]
        if spec is None or width is None:
            return self.train(name, self.spec(steps), hparams)
        n = len(hparams)
        # As long as ``first`` trained: in a longer merged program, its steps are the follow-up's budget too.
        budgeted = table.with_budget(hparams, steps, spec.steps)
        padded = Hparams(*(np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], -(-n // width) * width - n)])
                           for v in budgeted))
        result = self.train(name, spec, padded, first.program_arrays, first.program_problem)
        return table.split(result, slice(0, n), table.Request(name, dataclasses.replace(spec, steps=steps), hparams))

    def _memo_key(self, problem: Problem, spec: TrainSpec, arrays: Arrays, hparams: Hparams):
        fingerprints = self.shared.setdefault("_arrays_keys", {})  # id -> (array, digest): hash each array once
        digests = []
        for a in arrays:
            if a is None:
                digests.append(None)
                continue
            if id(a) not in fingerprints:
                fingerprints[id(a)] = (a, _array_key(a))  # the array is kept: its id is not reused
            digests.append(fingerprints[id(a)][1])
        return id(problem), spec, tuple(digests), _hparams_key(hparams)

    def table(self, requests: list) -> list[tuple[list, Any]]:
        """The programs ``requests`` (:class:`harness.engine.table.Request`) train as when merged
        (:func:`harness.engine.table.plan`): each group's requests and their merged request (trained by the budget's
        probe's program when it can be, :func:`harness.engine.table.onto`). Empty when there is
        nothing to merge, or when a collapsed multirun's trainer merges across sweep points instead. Whether the
        model's regularization and loss let requests share (traced once per run) is remembered."""
        from harness import budget
        from harness.engine import table

        if len(requests) < 2 or self.train_fn is not train_members:
            return []
        traits = self.shared.setdefault("_table_traits", {}).setdefault(self.problem, {})
        mixed = len({r.spec.regularization for r in requests}) > 1  # else no need to trace the model twice
        if mixed and "free" not in traits:
            traits["free"] = not table.regularization_matters(self.problem, self.arrays.x_train[:2])
        # With budget=, the probe compiled a member table's program (harness.budget.measure): a group it
        # can train is trained by it, whatever the budget cut, instead of compiling a program of the cut suite's.
        probe = self.shared.get("_probe")
        compiled = None if probe is None else probe.program
        groups = table.plan(requests, self.arrays, self.batch_size, mixed and traits["free"], self.loss_per_example(),
                            self.problem, join_fixed=lambda r: budget.joins_table(r, self.batch_size, probe))
        out = []
        for parts in ([requests[i] for i in g] for g in groups):
            both = table.merged(parts, self.arrays)
            out.append((parts, (compiled is not None and table.onto(parts, both, compiled)) or both))
        return out

    def loss_per_example(self) -> bool:
        """Whether the loss returns one value per example (:func:`harness.engine.table.per_example_loss`, traced
        once per run): then a fixed batch repeated to fill the run's batch trains as the fixed batch alone."""
        from harness.engine import table

        traits = self.shared.setdefault("_table_traits", {}).setdefault(self.problem, {})
        if "repeat" not in traits:
            traits["repeat"] = table.per_example_loss(self.problem, self.arrays.x_train[:2], self.arrays.y_train[:2])
        return traits["repeat"]

    def prefetch(self, requests: list) -> int:
        """Train the training diagnostics' announced requests (:class:`harness.engine.table.Request`) merged into
        as few programs as can share one (:meth:`table`), and remember each request's share, so that when a
        diagnostic makes its request, it is answered at once. Returns the number of merged programs trained. A
        request that cannot share a program is left to its diagnostic."""
        from harness.engine import table

        groups = self.table(requests)
        memo = self.shared.setdefault("_train_memo", {})
        for parts, both in groups:
            progress = None
            if self.progress is not None:
                progress = lambda done, total: self.progress(both.name, done, total)  # noqa: E731
            began = time.perf_counter()
            result = self.train_fn(both.problem or self.problem, both.spec, both.hparams, both.arrays,
                                   name="table", progress=progress)
            seconds = time.perf_counter() - began
            # Each diagnostic is credited its rows' share of the table's time (the report's time per diagnostic).
            credit = self.shared.setdefault("_prefetched_seconds", {})
            start = 0
            for r in parts:
                rows = slice(start, start + len(r.hparams))
                start = rows.stop
                owner = r.name.split("/")[0]
                credit[owner] = credit.get(owner, 0.0) + seconds * len(r.hparams) / len(both.hparams)
                key = self._memo_key(r.problem or self.problem, r.spec,
                                     r.arrays if r.arrays is not None else self.arrays, r.hparams)
                memo.setdefault((key, "rerun") if r.rerun else key, table.split(result, rows, r))
        return len(groups)

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
    internal_error: InternalError | None = None  # it crashed on something unforeseen (a bug, not a finding)


def require_at_least(settings, key: str, field: str, minimum, reason: str = ""):
    """Range check for a Settings field, naming the config key: ``diagnostics.seeds.num_seeds: must be at least 2
    (a spread needs two runs), got 1``."""
    value = getattr(settings, field)
    if value < minimum:
        why = f" ({reason})" if reason else ""
        raise HarnessError(f"must be at least {minimum}{why}, got {value}", key=f"{key}.{field}")


def _array_key(a) -> str:
    """A content fingerprint of one array (the run's own, or one a diagnostic made: a fixed batch's indices)."""
    import hashlib

    a = np.ascontiguousarray(a)
    digest = hashlib.sha1(str((a.shape, a.dtype)).encode())
    digest.update(a.tobytes())
    return digest.hexdigest()


def _hparams_key(hparams: Hparams):
    return tuple(np.asarray(v).tobytes() for v in hparams)


def nanmin_or(values, default=np.nan) -> float:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.min()) if finite.size else float(default)
