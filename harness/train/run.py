"""``harness train``, start to finish: build the configured problem, resume from the output directory's last
checkpoint, train chunk by chunk (progress, validation, W&B, checkpoints), judge the run with the monitor's
detectors, locate a non-finite step by replaying it, and write the same report files as a checklist run.

Host work between chunks is a few small transfers: the chunk's losses and the monitor's statistics (never the
optimizer's state), a validation pass every ``train.eval_every`` steps, and an asynchronous orbax save every
``train.checkpoint_every`` steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from harness.checks.base import Outcome
from harness.config import FactoryConfig, RunConfig, TrainSettings
from harness.engine import compile as programs
from harness.errors import HarnessError
from harness.findings import Finding, error
from harness.monitor import Monitor
from harness.monitor.replay import Origin, locate
from harness.train import baseline, loop
from harness.train.checkpoint import Checkpoints

NAME = "train"
EVALUATIONS_PER_RUN = 20  # the default validation cadence: enough points for the overfitting detector's turn
# Config keys that do not change what is trained: a run may resume under other values of these.
NOT_THE_RUN = ("logger", "output_dir", "debug", "fail_on_error", "diagnostics", "budget", "collapse", "engine")
TRAIN_KEYS_NOT_THE_RUN = ("steps", "epochs", "eval_every", "checkpoint_every", "keep_checkpoints", "resume",
                          "checks")


def total_steps(t: TrainSettings, n_train: int, batch_size: int) -> int:
    if t.steps is not None:
        return t.steps
    if t.epochs is not None:
        return max(int(round(t.epochs * loop.epoch_steps(n_train, batch_size))), 1)
    raise HarnessError("harness train needs the run's length: train.steps=N or train.epochs=N", key="train.steps")


def make_schedule(t: TrainSettings, total: int, batch_size: int, n_train: int) -> loop.Schedule:
    every = t.eval_every or max(total // EVALUATIONS_PER_RUN, 1)
    log_every = min(t.log_every, every, total)  # validations fall at chunk ends
    eval_every = max(-(-every // log_every), 1) * log_every  # whole chunks
    checkpoint_every = max(-(-(t.checkpoint_every or eval_every) // log_every), 1) * log_every
    return loop.Schedule(steps=total, batch_size=batch_size, steps_per_epoch=loop.epoch_steps(n_train, batch_size),
                         log_every=log_every, history=t.log_every, eval_every=eval_every,
                         checkpoint_every=checkpoint_every)


def learning_rate(t: TrainSettings, lr: float, total: int) -> Callable[[Any], Any]:
    """The learning rate per step: a built-in kind peaking at ``optim.lr`` (optax's schedules), or the user's
    optax schedule factory."""
    import optax

    warmup = min(t.warmup_steps, total)
    if isinstance(t.schedule, FactoryConfig):
        factory = t.schedule.resolve("train.schedule._target_")
        try:
            fn = factory(**t.schedule.kwargs)
            jax.eval_shape(fn, jax.numpy.zeros((), jax.numpy.int32))
        except Exception as err:
            raise HarnessError(f"{t.schedule.target} does not give a schedule step -> learning rate: "
                               f"{type(err).__name__}: {err}", key="train.schedule") from None
        return fn
    if t.schedule == "constant":
        return loop.constant(lr) if warmup == 0 else optax.warmup_constant_schedule(0.0, lr, warmup)
    if t.schedule == "warmup_constant":
        return optax.warmup_constant_schedule(0.0, lr, max(warmup, 1))
    if t.schedule == "cosine" and warmup == 0:
        return optax.cosine_decay_schedule(lr, total)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))


def run_config(rc: RunConfig) -> dict[str, Any]:
    """The part of the config that defines what is trained (all of it but logging, cadences and the run's length):
    a checkpoint resumes only into the same run."""
    raw = {k: v for k, v in rc.raw.items() if k not in NOT_THE_RUN and k != "train"}
    raw["train"] = {k: v for k, v in (rc.raw.get("train") or {}).items() if k not in TRAIN_KEYS_NOT_THE_RUN}
    return json.loads(json.dumps(raw, sort_keys=True, default=str))


def run_identity(rc: RunConfig) -> str:
    return hashlib.sha256(json.dumps(run_config(rc), sort_keys=True).encode()).hexdigest()[:16]


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


class Progress:
    """A rich bar at a terminal; one line per validation elsewhere (CI logs)."""

    def __init__(self, console, total: int, start: int):
        from harness.report.terminal import show_progress

        self.console, self.total = console, total
        self.bar = None
        if show_progress(console):
            from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Bar(TextColumn("train"), BarColumn(bar_width=30), TextColumn("{task.completed}/{task.total}"),
                           TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
                           console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=total, completed=start)

    def update(self, step: int, loss: float | None, val: float | None, validated: bool):
        text = (f"loss {loss:.4g}" if loss is not None else "loss non-finite") + (
            f"  val {val:.4g}" if val is not None else "")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=text)
        elif validated:
            self.console.print(f"train: step {step}/{self.total}  {text}", highlight=False)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


@dataclasses.dataclass(frozen=True)
class Job:
    """The static side of one training run: the problem, its arrays on the device, the schedule, and the learning
    rate of every step (a table on the device: the programs take it as an argument)."""

    rc: RunConfig
    problem: Any
    arrays: tuple  # x_train, y_train, x_val, y_val on the device
    schedule: loop.Schedule
    lr_at: Callable[[Any], Any]
    lr_table: np.ndarray  # (steps,) float32, sliced per chunk (loop.chunk_lrs)
    identity: str

    @classmethod
    def of(cls, rc: RunConfig, ctx) -> "Job":
        from harness.monitor import learning_rates

        arrays = tuple(jax.device_put(a) for a in ctx.dataset.training_arrays())
        n_train = int(arrays[0].shape[0])
        batch_size = min(rc.batch_size, n_train)
        total = total_steps(rc.train, n_train, batch_size)
        schedule = make_schedule(rc.train, total, batch_size, n_train)
        lr_at = learning_rate(rc.train, rc.optim.lr, total)
        table = learning_rates(lr_at, np.arange(total)).astype(np.float32)
        return cls(rc, ctx.problem, arrays, schedule, lr_at, table, run_identity(rc))

    def run(self, name: str, fn: Callable, *args, shape: tuple = ()):
        """Compile (once per problem and ``shape``, what ``fn`` closes over besides the problem; counted in the
        report's programs) and run one of the run's programs. The learning rates, the seed and the run's length
        are arguments: runs that differ in them share programs."""
        from harness.engine.driver import cpu_options

        return programs.run(f"train/{name}", fn, *args, static_key=(f"train/{name}", self.problem, *shape),
                            opt_level=self.rc.engine.opt_level, options=cpu_options())


def train(rc: RunConfig, output_dir: str, *, command: list[str], console=None, run_name: str | None = None,
          group: str | None = None, show_report: bool = True):
    """Train the configured run into ``output_dir`` and write its report; returns ``(RunResult, report)``. When
    interrupted (Ctrl-C), it saves a checkpoint, writes the report of the steps done and raises KeyboardInterrupt."""
    from harness.app import enable_caches, wandb_enabled, write_outputs
    from harness.pipeline import RunResult, blocked_stages, build_context, run_diagnostics
    from harness.report import terminal, writer

    start = time.perf_counter()
    enable_caches(rc)
    since = writer.program_mark()
    console = console or terminal.make_console()
    ctx = build_context(rc)
    checked = run_diagnostics(dataclasses.replace(rc, diagnostics=rc.train.checks), ctx) if rc.train.checks else []
    blocked = blocked_stages([f for o in checked for f in o.findings])
    if "training" in blocked:  # no shapes to train on, no forward pass: the report says why
        result = RunResult.of([*checked, Outcome(NAME, skipped=blocked["training"])], time.perf_counter() - start,
                              ctx)
        return result, write_outputs(rc, result, output_dir, command=command, console=console, run_name=run_name,
                                     group=group, show_report=show_report, programs_since=since)
    job = Job.of(rc, ctx)
    problem, schedule = job.problem, job.schedule
    x_train, y_train, x_val, y_val = job.arrays
    carry = job.run("init", loop.make_init(problem, schedule.history), x_train[:1], np.uint32(rc.seed),
                    np.float32(rc.optim.lr), np.float32(rc.optim.weight_decay), shape=(schedule.history,))
    watch = Monitor(carry.params, learning_rate=job.lr_at, baseline_loss=no_input_loss(job, checked, carry))
    acts = loop.activation_log(problem, carry, x_train[:schedule.batch_size]) if rc.train.activations else None
    if not rc.train.resume:
        set_aside(output_dir)
    checkpoints = Checkpoints(output_dir, keep=rc.train.keep_checkpoints)
    live = None
    try:
        carry, wandb_id, resumed_from = resume(job, checkpoints, carry, watch, acts)
        live = _live_wandb(rc, output_dir, run_name, group, wandb_id) if wandb_enabled(rc) else None
        chunk_fn = loop.make_chunk(problem, schedule, activations=acts is not None)
        chunk_shape = (*schedule.shape(), schedule.log_every, acts is not None)
        total, seed = np.int32(schedule.steps), np.uint32(rc.seed)
        eval_batch = min(1024, max(int(x_val.shape[0]), 1))
        evaluate = loop.make_evaluate(problem, eval_batch)
        progress = Progress(console, schedule.steps, int(carry.step))
        interrupted = False
        saved_at = int(carry.step)

        def save(step):
            nonlocal saved_at
            host = {"monitor": watch.state(), **({"activations": acts.state()} if acts is not None else {})}
            checkpoints.save(step, carry, host,
                             {"identity": job.identity, "config": run_config(rc), "step": step,
                              "wandb_id": live.id if live else wandb_id})
            saved_at = step

        try:
            while int(carry.step) < schedule.steps and int(carry.bad_step) < 0:
                first = int(carry.step)
                lrs = loop.chunk_lrs(job.lr_table, first, schedule.log_every)
                carry, records = job.run("chunk", chunk_fn, carry, x_train, y_train, lrs, total, seed,
                                         shape=chunk_shape)
                records = jax.device_get(records)  # one transfer per chunk
                if acts is not None:  # a step not taken records no learning rate
                    acts.add(first, int(np.sum(~np.isnan(records.lr))), records.activations)
                step, stopped = int(carry.step), int(carry.bad_step) >= 0
                watch.read(carry.opt_state)
                loss = np.asarray(records.loss)
                finite = loss[np.isfinite(loss)]
                metrics = {"train/loss": float(finite.mean()) if finite.size else None,
                           "train/lr": float(job.lr_table[step - 1])}
                validated = step % schedule.eval_every == 0 or step >= schedule.steps or stopped
                if validated:
                    v_loss, v_acc = (float(v) for v in job.run("evaluate", evaluate, carry.params, carry.rest, x_val,
                                                               y_val, shape=(eval_batch,)))
                    watch.validation(v_loss, step - 1, accuracy=v_acc if problem.classification else None)
                    metrics["val/loss"] = v_loss
                    if problem.classification:
                        metrics["val/accuracy"] = v_acc
                if live is not None:
                    live.log(step, metrics)
                progress.update(step, metrics["train/loss"], metrics.get("val/loss"), validated)
                if step % schedule.checkpoint_every == 0 or step >= schedule.steps or stopped:
                    save(step)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
        if int(carry.step) != saved_at:
            save(int(carry.step))
    finally:
        checkpoints.close()

    origin = None
    if int(carry.bad_step) >= 0:
        origin = replay(problem, carry, schedule, rc.seed, job.lr_at, x_train, y_train, int(carry.bad_step))
    outcome = make_outcome(watch, carry, schedule, origin, resumed_from, interrupted, time.perf_counter() - start,
                           acts, validation=lambda: replay_validation(problem, carry, x_val, y_val))
    result = RunResult.of([*checked, outcome], time.perf_counter() - start, ctx)
    report = write_outputs(rc, result, output_dir, command=command, console=console, run_name=run_name,
                           group=group, show_report=show_report, programs_since=since, wandb_run=live)
    if interrupted:
        print(f"harness: interrupted at step {int(carry.step)}; its checkpoint is in {checkpoints.directory}: the same "
              f"command with output_dir={output_dir} resumes it", file=sys.stderr)
        raise KeyboardInterrupt
    return result, report


def no_input_loss(job: Job, checked, carry) -> float | None:
    """The loss of a model that ignores its inputs (:mod:`harness.train.baseline`): the constant-input control's
    when it ran, else a constant output fitted to the training targets."""
    from_controls = baseline.from_controls(checked)
    if from_controls is not None:
        return from_controls
    x_train, y_train = job.arrays[0], job.arrays[1]
    outputs = jax.eval_shape(job.problem.model, carry.params, carry.rest, x_train[:1])
    value = float(job.run("baseline", baseline.make_fit(job.problem, outputs), y_train[:baseline.MAX_EXAMPLES],
                          shape=(outputs.shape[1:], str(outputs.dtype))))
    return value if np.isfinite(value) else None


def set_aside(output_dir: str) -> None:
    """``train.resume=false``: an earlier run's checkpoints are moved to ``checkpoints.<time>``, not deleted."""
    import datetime
    import os

    directory = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(directory) and os.listdir(directory):
        os.rename(directory, f"{directory}.{datetime.datetime.now():%Y%m%d-%H%M%S-%f}")


def resume(job: Job, checkpoints: Checkpoints, carry, watch: Monitor, acts=None):
    """``carry`` continued from the output directory's last checkpoint (and ``watch``, and ``acts``, loaded from
    it), when it holds one; returns ``(carry, W&B run id, step resumed from)``."""
    latest = checkpoints.latest()
    if latest is None:
        return carry, None, None
    meta = checkpoints.meta(latest)
    if meta.get("identity") != job.identity:
        changed = differences(meta.get("config") or {}, run_config(job.rc))
        raise HarnessError(
            f"{checkpoints.directory} holds a checkpoint of another run (it differs in "
            f"{', '.join(changed[:5]) or 'the model, data, loss or optimizer'}); resume with the same config, or "
            f"train into another output_dir", key="output_dir")
    restored, host, meta = checkpoints.restore(latest, jax.eval_shape(lambda: carry))
    watch.load(host["monitor"])
    if acts is not None and "activations" in host:
        acts.load(host["activations"])
    return restored, meta.get("wandb_id"), int(latest)


def _live_wandb(rc, output_dir, run_name, group, run_id):
    from harness.report import wandb_logger

    try:
        return wandb_logger.LiveRun(rc, output_dir, run_name=run_name, group=group, run_id=run_id, job_type=NAME)
    except Exception as err:  # the run trains and reports without W&B
        print(f"harness: warning: W&B logging failed ({type(err).__name__}: {err}); training goes on without it",
              file=sys.stderr)
        return None


def replay(problem, carry, schedule, seed, lr_at, x_train, y_train, bad_step: int) -> Origin:
    """Replay step ``bad_step`` from the state the chunk kept (the last finite one) on the batch it trained on."""
    index = np.asarray(loop.batch_index(schedule, seed, int(x_train.shape[0]), bad_step))
    x, y = np.asarray(x_train)[index], np.asarray(y_train)[index]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0xD809), bad_step)

    def apply(params, x):
        return problem.model.apply(params, carry.rest, x, key=key, train=True)[0]

    tx = loop.make_optimizer_for(problem, schedule.history)

    def update(grads):
        from harness.optim import set_learning_rate

        state = carry.opt_state._replace(inner=set_learning_rate(carry.opt_state.inner, lr_at(bad_step)))
        return tx.update(grads, state, carry.params)[0]

    return locate(apply, problem.loss_fn, carry.params, x, y, update=update, name_path=problem.model.name_path)


# The validation examples a replay of a non-finite validation loss evaluates (one forward pass, on the host's
# schedule: after the run).
REPLAYED_VALIDATION = 1024


def replay_validation(problem, carry, x_val, y_val) -> Origin:
    """Where the validation loss is non-finite with the run's last parameters: its forward pass and loss in
    inference mode, on the first :data:`REPLAYED_VALIDATION` validation examples."""
    x, y = np.asarray(x_val)[:REPLAYED_VALIDATION], np.asarray(y_val)[:REPLAYED_VALIDATION]

    def apply(params, x):
        return problem.model.apply(params, carry.rest, x, key=jax.random.key(0), train=False)[0]

    return locate(apply, problem.loss_fn, carry.params, x, y, name_path=problem.model.name_path,
                  rows_of="validation")


def make_outcome(watch: Monitor, carry, schedule, origin: Origin | None, resumed_from, interrupted: bool,
                 seconds: float, acts=None, validation: Callable[[], Origin] | None = None) -> Outcome:
    """The run as the ``train`` diagnostic (:func:`harness.monitor.report.outcome`), the non-finite finding
    located by the replay (a non-finite validation loss, by ``validation()``: :func:`replay_validation`); with
    ``acts`` (``train.activations``), the activation detectors' findings, series and final values too."""
    from harness.monitor.report import outcome

    def locate_nonfinite(f: Finding) -> Finding:
        if f.evidence.get("split") != "validation":
            return located(f, origin)
        found = None if validation is None else validation()
        if found is None or found.stage != "none":
            return located(f, found, f"replayed on the validation set (its first {REPLAYED_VALIDATION} examples) "
                                     "with the run's last parameters")
        return dataclasses.replace(f, message=f"{f.message}; with the run's last parameters the first "
                                              f"{REPLAYED_VALIDATION} validation examples give a finite loss",
                                   evidence={**f.evidence, "origin": "none"})

    bad = int(carry.bad_step)
    findings = [locate_nonfinite(f) if f.id == "train.nonfinite" else f for f in watch.findings()
                if not (bad >= 0 and f.evidence.get("split") == "validation")]  # training's own is the finding
    if acts is not None:
        findings += acts.findings(watch)
    if bad >= 0 and not any(f.id == "train.nonfinite" for f in findings):  # finite gradients, non-finite update
        findings.insert(0, located(error("train.nonfinite", f"training went non-finite at step {bad}", "",
                                         step=bad), origin))
    steps = int(carry.step)
    result = outcome(watch, NAME, seconds=seconds, findings=findings, metrics={
        "steps": steps, "steps_planned": schedule.steps, "epochs": steps / schedule.steps_per_epoch,
        "resumed_from_step": resumed_from, "interrupted": interrupted,
        "first_nonfinite_step": bad if bad >= 0 else None})
    if acts is not None:
        result.series.update(acts.outcome_series())
        result.metrics.update(acts.metrics())
    if interrupted and steps == 0:
        result.skipped = "interrupted"
    return result


def located(f: Finding, origin: Origin | None, replayed: str = "replayed from the last finite state") -> Finding:
    """The monitor's non-finite finding with the replay's answer to where it started (``replayed``: how)."""
    if origin is None:
        return f
    fix = {
        "inputs": "Fix the data: the batch holds NaN or inf inputs (see the data checks: `harness "
                  "diagnostics.run=[data]`).",
        "targets": "Fix the data: the batch holds NaN or inf targets.",
        "parameters": "An update overflowed the weights: lower the learning rate or clip gradients (optim.clip_norm).",
        "forward": "An activation overflowed: lower the learning rate (the weights grew), add normalization, or "
                   "compute that layer in float32.",
        "outputs": "The model's outputs overflowed: lower the learning rate, or clip gradients (optim.clip_norm).",
        "loss": "Make the loss numerically safe: log_softmax / optax.softmax_cross_entropy instead of log(softmax), "
                "clip probabilities away from 0 before a log, guard divisions.",
        "backward": "A derivative is non-finite where the value is finite (sqrt or log at 0, a custom gradient, "
                    "an overflow in the backward pass): guard that operation (jnp.where before, not after) or "
                    "lower the learning rate.",
        "update": "The optimizer's update overflowed: check its epsilon and any custom transformation.",
        "none": f.suggestion,
    }[origin.stage]
    evidence = {**f.evidence, "origin": origin.stage, "origin_detail": origin.where, **{
        f"origin_{k}": v for k, v in origin.detail.items()}}
    message = f.message.split(";")[0] + f"; {replayed}, it started in {origin.describe()}"
    return dataclasses.replace(f, message=message, suggestion=fix, evidence=evidence)
