"""Watch your own training loop: statistics recorded inside your compiled step, judged on the host.

    import harness.monitor as hm

    tx = hm.monitor(optax.adam(1e-3))            # your optimizer, unchanged updates, statistics in its state
    opt_state = tx.init(params)
    watch = hm.Monitor(params)                   # names the parameter leaves
    for step in range(steps):                    # or chunks of a lax.scan: read at least every `history` steps
        params, opt_state, loss = train_step(params, opt_state, batch)   # tx.update(grads, s, params, value=loss)
        watch.read(opt_state)
        watch.validation(val_loss)               # optional: overfitting, a held-out non-finite loss
    for finding in watch.findings():             # train.nonfinite, train.divergence, train.plateau, ...
        print(finding.id, finding.message)

``Monitor(params, learning_rate=schedule)`` (a float or an optax schedule) lets the divergence, oscillation and
plateau findings name the learning rate and suggest one (``evidence["suggested_lr"]``).

In the graph (:mod:`.stats`): per parameter leaf, gradient and parameter norms (and update norms with
``monitor(tx, update_norms=True)``, for the plateau detector's learning-rate call) and whether its gradient holds a
non-finite entry, the global gradient norm and the loss, in ring buffers of the optimizer state; nothing leaves the
device until :meth:`Monitor.read`. On the host (:mod:`.detectors`): each finding names the step and the layer.
"""

from __future__ import annotations

import jax
import numpy as np

from harness.findings import Finding
from harness.models.adapters.base import slash_path
from harness.monitor.detectors import Series, detect
from harness.monitor.stats import DEFAULT_HISTORY, MonitorState, find_state, monitor

__all__ = ["DEFAULT_HISTORY", "Monitor", "MonitorState", "Series", "monitor"]

_FIELDS = ("loss", "loss_recorded", "grad_norm", "layer_grad_norm", "layer_param_norm", "layer_update_norm",
           "layer_nonfinite")


def learning_rates(learning_rate, steps: np.ndarray) -> np.ndarray | None:
    """The learning rate at each step: a constant, or a schedule evaluated on the host (one vectorized call, as
    optax's schedules allow; step by step for a schedule written for scalars)."""
    if learning_rate is None:
        return None
    if not callable(learning_rate):
        return np.full(steps.shape, float(learning_rate))
    try:
        values = np.asarray(learning_rate(steps), np.float64)
        if values.shape == steps.shape:
            return values
    except Exception:  # a schedule written for one step at a time (an ``if step < warmup:``)
        pass
    return np.asarray([float(learning_rate(int(step))) for step in steps], np.float64)


class Monitor:
    """Host side of :func:`monitor`: :meth:`read` copies the steps recorded since the last read out of an
    optimizer state; :meth:`series` and :meth:`findings` judge them. A state with a leading member axis (a vmapped
    sweep) is read as one run per member."""

    def __init__(self, params=None, paths: list[str] | None = None, learning_rate=None,
                 baseline_loss: float | None = None):
        """``learning_rate``: the optimizer's, when the detectors should name it and suggest a value: a float, an
        optax schedule (a callable of the step, evaluated on the host), or one of those per vmapped member.
        ``baseline_loss``: the loss of a model that ignores its inputs (predicting the label prior: the entropy of
        the class frequencies for cross-entropy, the targets' variance for a squared error), for the underfitting
        detector."""
        self.learning_rate = learning_rate
        self.baseline_loss = baseline_loss
        if paths is None and params is not None:
            paths = [slash_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        self.paths = paths
        self._read = 0  # steps read so far
        self._logged = 0  # steps logged to W&B so far (Monitor.log)
        self._steps: list[int] = []
        self._rows: dict[str, list[np.ndarray]] = {f: [] for f in _FIELDS}
        self.lost: list[tuple[int, int]] = []  # [first, last) steps overwritten before they were read
        self._val: list[tuple[int, np.ndarray]] = []

    def read(self, opt_state) -> int:
        """Copy the steps recorded since the last read (one device-to-host transfer); returns how many."""
        state = find_state(opt_state)
        if state is None:
            raise ValueError("no harness.monitor state in this optimizer state: build the optimizer with "
                             "harness.monitor.monitor(tx)")
        # Only the statistics: the wrapped optimizer's own state (Adam's moments: twice the parameters) stays put.
        host = jax.device_get(state._replace(inner=None))
        count = int(np.max(np.asarray(host.count)))
        history = np.shape(host.loss)[-1]
        if count <= self._read:
            return 0
        start = max(self._read, count - history)
        if start > self._read:
            self.lost.append((self._read, start))
        if self.paths is None:
            self.paths = [f"leaf{i}" for i in range(np.shape(host.layer_grad_norm)[-1])]
        index = np.arange(start, count) % history
        for f in _FIELDS:
            values = np.asarray(getattr(host, f))
            axis = values.ndim - (2 if f.startswith("layer_") else 1)  # the history axis (after any member axis)
            self._rows[f].append(np.moveaxis(np.take(values, index, axis=axis), axis, 0))
        self._steps.extend(range(start, count))
        self._read = count
        return count - start

    def validation(self, loss, step: int | None = None, accuracy=None) -> None:
        """Record a validation loss (one per member for a vmapped run) measured after ``step`` (default: the last
        step read): the overfitting detector compares it with the training loss; a NaN or inf, training finite, is
        a ``train.nonfinite`` error. ``accuracy``: for the report."""
        self._val.append((self._read - 1 if step is None else int(step), np.asarray(loss, np.float64),
                          np.asarray(np.nan if accuracy is None else accuracy, np.float64)))

    def series(self, since: int = 0) -> list[Series]:
        """The steps read so far (from step ``since`` on: only the reads that hold them are joined, so a caller that
        asks for the new steps after each read, :meth:`log`, does not copy the whole run every time): one
        :class:`Series` per member (one for an unbatched run)."""
        pieces, kept = 0, 0  # the last reads, back to the one holding step ``since``
        for piece in reversed(self._rows["loss"]):
            if kept and self._steps[-kept - 1] < since:
                break
            pieces, kept = pieces + 1, kept + len(piece)
        if not kept:
            return []
        rows = {f: np.concatenate(v[len(v) - pieces:], axis=0) for f, v in self._rows.items()}
        steps = np.asarray(self._steps[len(self._steps) - kept:])
        if steps[0] < since:
            keep = steps >= since
            rows, steps = {f: v[keep] for f, v in rows.items()}, steps[keep]
            if not steps.size:
                return []
        val_steps = np.asarray([v[0] for v in self._val]) if self._val else None
        val = np.stack([v[1] for v in self._val]) if self._val else None
        members = rows["loss"].shape[1:]  # () or (members,)
        if not members:
            return [Series(steps, **rows, paths=self.paths, val_steps=val_steps, val_loss=val,
                           lr=learning_rates(self.learning_rate, steps), baseline_loss=self.baseline_loss)]
        per_member = isinstance(self.learning_rate, (list, tuple)) or np.ndim(self.learning_rate) == 1
        return [Series(steps, **{f: v[:, m] for f, v in rows.items()}, paths=self.paths, val_steps=val_steps,
                       val_loss=None if val is None else (val if val.ndim == 1 else val[:, m]),
                       lr=learning_rates(self.learning_rate[m] if per_member else self.learning_rate, steps),
                       baseline_loss=self.baseline_loss)
                for m in range(members[0])]

    def state(self) -> dict[str, np.ndarray]:
        """Everything read so far as plain arrays (a checkpoint's host part: ``harness train`` saves it with orbax),
        for :meth:`load` in a resumed run."""
        rows = {f: (np.concatenate(v, axis=0) if v else np.zeros((0,), np.float32)) for f, v in self._rows.items()}
        return dict(read=np.asarray(self._read), steps=np.asarray(self._steps, np.int64),
                    lost=np.asarray(self.lost, np.int64).reshape(-1, 2),
                    val_steps=np.asarray([v[0] for v in self._val], np.int64),
                    val_loss=np.asarray([v[1] for v in self._val], np.float64),
                    val_accuracy=np.asarray([v[2] for v in self._val], np.float64), **rows)

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`state` (the run resumed from the checkpoint that saved it)."""
        self._read = int(state["read"])
        self._steps = [int(s) for s in state["steps"]]
        self.lost = [(int(a), int(b)) for a, b in np.asarray(state["lost"]).reshape(-1, 2)]
        self._val = [(int(s), np.asarray(v), np.asarray(a))
                     for s, v, a in zip(state["val_steps"], state["val_loss"], state["val_accuracy"])]
        self._rows = {f: ([np.asarray(state[f])] if len(self._steps) else []) for f in _FIELDS}

    def validations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The recorded validations: steps, losses and accuracies (NaN where none was given)."""
        if not self._val:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        return (np.asarray([v[0] for v in self._val]), np.stack([v[1] for v in self._val]),
                np.stack([v[2] for v in self._val]))

    def log(self, run, prefix: str = "monitor/") -> int:
        """Log the steps read since the last call to a W&B run (``wandb.init()``'s), one history row per step at
        its step: the loss, the gradient norm, and per parameter leaf the gradient norm and the update/parameter
        ratio. Returns how many rows were logged."""
        from harness.monitor.report import wandb_rows

        rows = wandb_rows(self, self._logged, prefix)
        for step, row in rows:
            run.log(row, step=step)
        self._logged = self._read
        return len(rows)

    def report(self, output_dir: str, *, name: str = "monitor", config: dict | None = None, wandb_run=None) -> dict:
        """Write the findings as harness's report files into ``output_dir`` (report.json, report.md, the loss plot);
        with ``wandb_run``, also log the report's summary, findings table and plot into that run. Returns the
        report (report.json's content)."""
        from harness.monitor.report import write_report

        return write_report(self, output_dir, name=name, config=config, wandb_run=wandb_run)

    def findings(self) -> list[Finding]:
        """The detectors' findings (:mod:`.detectors`) for every member; steps that were overwritten before a read
        are named in each finding's evidence."""
        runs = self.series()
        out = []
        for m, s in enumerate(runs):
            for f in detect(s, f"member {m}: " if len(runs) > 1 else ""):
                if self.lost:
                    f.evidence["steps_not_read"] = [list(span) for span in self.lost]
                out.append(f)
        return out
