"""Run a group of sweep points as one set of vmapped programs.

The sweeper (hydra_plugins/harness_sweeper) groups points that differ only in traced values (learning rate, weight
decay, seed) and launches one job per group. Here each point runs the whole checklist in its own thread, exactly
as it would alone, except that its ``ctx.train`` requests go to a :class:`BatchingTrainer`: when every point is
waiting for training, the trainer merges the same request from all points (same problem, spec, data, request name)
into one ``train_members`` call — points become members of one vmapped program — and hands each point its rows.
Diagnostics need no knowledge of this; compiled programs for everything else (model checks) are shared through the
compile cache. A point's results differ from a run alone only by vmap-width float noise (~1e-3, see
../shared/ECOSYSTEM.md); each point's determinism check compares like with like because both of its runs are
merged the same way.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from harness.checks.base import Context, _array_key
from harness.config import RunConfig, from_hydra
from harness.engine.core import Hparams
from harness.engine.driver import SweepResult, train_members
from harness.errors import HarnessError
from harness.pipeline import RunResult, build_context, run_diagnostics

# Values that may differ between the points of one group; anything else must be equal (the sweeper ensures it).
TRACED_KEYS = (("optim", "lr"), ("optim", "weight_decay"), ("seed",))


@dataclasses.dataclass
class _Request:
    point: int
    name: str
    spec: Any
    hparams: Hparams
    arrays: Any
    problem: Any
    result: SweepResult | None = None
    error: BaseException | None = None
    done: bool = False


def _unique_rows(hparams: Hparams) -> tuple[Hparams, np.ndarray]:
    """Distinct member rows and, for every row, the index of its distinct row. Points of a sweep often ask for
    the same member (the LR range test's grid does not depend on the configured LR): it is trained once."""
    columns = [np.asarray(getattr(hparams, f)) for f in Hparams._fields]
    position: dict[bytes, int] = {}
    representatives: list[int] = []
    inverse = np.empty(len(hparams), dtype=int)
    for i in range(len(hparams)):
        key = b"".join(c[i].tobytes() for c in columns)
        if key not in position:
            position[key] = len(representatives)
            representatives.append(i)
        inverse[i] = position[key]
    return hparams.take(np.array(representatives)), inverse


def _concat(hparams: list[Hparams]) -> Hparams:
    return Hparams(*(np.concatenate([np.asarray(getattr(h, f)) for h in hparams]) for f in Hparams._fields))


class BatchingTrainer:
    """Collects ``train`` requests from the point threads and serves them merged (see module docstring)."""

    def __init__(self, num_points: int):
        self._cv = threading.Condition()
        self._pending: dict[int, _Request] = {}
        self._active = num_points
        self.merged_calls = 0
        self.requests = 0
        self.members_requested = 0
        self.members_trained = 0  # fewer than requested when points ask for identical members (e.g. an LR grid)

    # Called from point threads.
    def train_for(self, point: int):
        """A ``Context.train_fn`` for one point: same signature as ``train_members``."""

        def train_fn(problem, spec, hparams, arrays, *, name="train", progress=None):
            return self.train(point, name, spec, hparams, arrays, problem)

        return train_fn

    def train(self, point: int, name, spec, hparams, arrays, problem) -> SweepResult:
        request = _Request(point, name, spec, hparams, arrays, problem)
        with self._cv:
            self._pending[point] = request
            self._cv.notify_all()
            while not request.done:
                self._cv.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def finished(self, point: int):
        with self._cv:
            self._active -= 1
            self._cv.notify_all()

    # Called from the main thread.
    def serve(self):
        while True:
            with self._cv:
                while not (self._active == 0 or len(self._pending) == self._active):
                    self._cv.wait()
                if self._active == 0 and not self._pending:
                    return
                batch, self._pending = list(self._pending.values()), {}
            self._execute(batch)
            with self._cv:
                for request in batch:
                    request.done = True
                self._cv.notify_all()

    def _execute(self, batch: list[_Request]):
        groups: dict[Any, list[_Request]] = {}
        for r in sorted(batch, key=lambda r: r.point):
            key = (id(r.problem), r.spec, r.name, tuple(None if a is None else _array_key(a) for a in r.arrays))
            groups.setdefault(key, []).append(r)
        for requests in groups.values():
            self.requests += len(requests)
            self.merged_calls += 1
            first = requests[0]
            rows = _concat([r.hparams for r in requests])
            unique, inverse = _unique_rows(rows)
            try:
                merged = train_members(first.problem, first.spec, unique, first.arrays, name=first.name)
            except BaseException as err:  # surfaces in each point's thread, where the pipeline handles it
                for r in requests:
                    r.error = err
                continue
            self.members_trained += len(unique)
            self.members_requested += len(rows)
            start = 0
            for r in requests:
                stop = start + len(r.hparams)
                r.result = merged.take(inverse[start:stop], r.hparams)
                start = stop


def _check_same_static(rcs: list[RunConfig]):
    def static(raw: dict) -> dict:
        raw = json.loads(json.dumps(raw, default=str))
        for path in TRACED_KEYS:
            node = raw
            for k in path[:-1]:
                node = node.get(k, {})
            node.pop(path[-1], None)
        raw.pop("harness_collapse_group", None)
        return raw

    first = static(rcs[0].raw)
    for rc in rcs[1:]:
        if static(rc.raw) != first:
            raise HarnessError("sweep points of one collapsed group differ in more than learning rate, weight "
                               "decay and seed; run with collapse=false")


def point_context(base: Context, rc: RunConfig, trainer: BatchingTrainer, point: int) -> Context:
    """The base context with this point's traced values, training through the batching trainer."""
    return dataclasses.replace(base, optim=rc.optim, seed=rc.seed, shared={}, progress=None,
                               train_fn=trainer.train_for(point))


def run_points(rcs: list[RunConfig], on_outcome=None) -> tuple[list[RunResult], BatchingTrainer]:
    """Run every point's checklist with training merged across points; one RunResult per point.
    ``on_outcome(point, outcome)`` is called from the point's thread as each of its diagnostics finishes."""
    _check_same_static(rcs)
    start = time.perf_counter()
    base = build_context(rcs[0])
    trainer = BatchingTrainer(len(rcs))
    contexts = [point_context(base, rc, trainer, i) for i, rc in enumerate(rcs)]
    # One reload of the data serves every point's determinism check (the factory is called once more, not P times).
    reloaded: dict[str, Any] = {}
    lock = threading.Lock()

    def reloaded_arrays(ctx=None):
        with lock:
            if "arrays" not in reloaded:
                reloaded["arrays"] = Context.reloaded_arrays(base)
        return reloaded["arrays"]

    for ctx in contexts:
        ctx.reloaded_arrays = reloaded_arrays
    outcomes: list[Any] = [None] * len(rcs)
    errors: list[BaseException | None] = [None] * len(rcs)

    def work(i):
        try:
            done = (lambda outcome: on_outcome(i, outcome)) if on_outcome is not None else None
            outcomes[i] = run_diagnostics(rcs[i], contexts[i], done)
        except BaseException as err:
            errors[i] = err
        finally:
            trainer.finished(i)

    threads = [threading.Thread(target=work, args=(i,), name=f"point-{i}", daemon=True) for i in range(len(rcs))]
    for t in threads:
        t.start()
    trainer.serve()
    for t in threads:
        t.join()
    for err in errors:
        if err is not None:
            raise err
    seconds = time.perf_counter() - start
    results = []
    for ctx, outs, rc in zip(contexts, outcomes, rcs):
        results.append(RunResult.of(outs, seconds, ctx, rc.settings))
    return results, trainer


def load_group(path: str) -> tuple[dict, list[RunConfig | HarnessError]]:
    """The group file the sweeper wrote, and each point's validated config (or the error that rejected it: one
    bad point of a sweep must not cost the others)."""
    try:
        with open(path) as f:
            group = json.load(f)
    except (OSError, ValueError) as err:
        raise HarnessError(f"cannot read the sweep group file {path}: {err}") from None
    rcs: list[RunConfig | HarnessError] = []
    for point in group["points"]:
        try:
            cfg = OmegaConf.load(f"{point['dir']}/.hydra/config.yaml")
            rcs.append(from_hydra(cfg, point.get("choices")))
        except HarnessError as err:
            rcs.append(err)
    return group, rcs


def run_group(path: str, *, command: list[str]) -> int:
    """The job the sweeper launches for a group: run its points merged, then write each point's outputs into the
    point's own directory (report.json, report.md, plots, W&B run), as if it had run alone."""
    from harness.app import enable_caches, write_outputs
    from harness.cli import exit_code, report_internal_errors
    from harness.engine.devices import is_primary
    from harness.report.plots import BackgroundPlots

    group, loaded = load_group(path)
    code = 0
    points, rcs = [], []
    for point, rc in zip(group["points"], loaded):
        if isinstance(rc, HarnessError):
            print(f"harness: error: sweep point {point['index']} ({' '.join(point['overrides'])}): {rc}",
                  file=sys.stderr)
            code = 2
        else:
            points.append(point)
            rcs.append(rc)
    if not rcs:
        return code
    enable_caches(rcs[0])
    # Every point's plots are drawn in one worker thread while the merged programs run (16 points' PNGs cost
    # about 30 s of Python after the run otherwise).
    background = BackgroundPlots() if is_primary() else None
    try:
        results, trainer = run_points(rcs, on_outcome=(lambda i, outcome: background.submit(outcome, points[i]["dir"]))
                                      if background is not None else None)
    finally:
        if background is not None:
            background.close()
    if background is None:  # in a multi-process job every process computes; process 0 alone writes
        return code
    for point, rc, result in zip(points, rcs, results):
        point_command = [command[0], *point["overrides"]]
        write_outputs(rc, result, point["dir"], command=point_command,
                      plot_files=background.files(result.outcomes, point["dir"]))
        if result.internal_errors:  # a crashed diagnostic: its traceback into the point's harness.log, exit 3
            report_internal_errors(result, point["dir"], label=f" in sweep point {point['index']}")
        code = max(code, exit_code(rc, result))
    print(f"harness: {len(rcs)} sweep points ran as {trainer.merged_calls} merged training calls "
          f"(from {trainer.requests} requests; {trainer.members_trained} distinct members of "
          f"{trainer.members_requested} requested)")
    return code
