"""Weights & Biases logging: one main run per harness run, one summary run per sweep diagnostic, optionally one
run per sweep member. Offline by default; ``wandb sync`` uploads later.

What goes where (all runs of one harness run share one W&B ``group``):

* **main run** (``job_type="harness"``): the full resolved config (plus the group choices, e.g. data=digits),
  a summary with every diagnostic metric (``<diagnostic>/<quantity>``), the status, finding counts (and
  ``num_internal_errors``, ``internal_error/<diagnostic>`` = the crash's type and message), the first
  thing to fix and ``finding/<id>`` = worst severity per finding id (filterable in the runs table), the findings
  as a ``wandb.Table`` under ``findings``, every plot as a ``wandb.Image`` under ``plots/<diagnostic>/<name>``,
  and report.json / report.md as run files.
* **sweep summary run** per diagnostic whose Outcome has ``members`` rows (``job_type`` = the diagnostic's name):
  the members as a ``wandb.Table`` under ``members``, the diagnostic's metrics as summary, its plots, and one
  ``wandb.plot.line_series`` chart per curve in ``Outcome.series``.
* **member runs** (``logger.log_members=true``; ``job_type`` = the diagnostic): a member's hyperparameters as
  config, its results as summary, its own curves as history, so W&B overlays and compares members.

How ``Outcome.series`` and ``Outcome.members`` are read (what diagnostics should produce):

* a 2-D series (curves × points) is one chart with a curve per row, named after the members when there are as
  many rows as members (and, in member runs, each member's own row as its history); a dict
  ``{"x": [...], "y": [...] or [[...]], "keys": [...], "xname": "lr"}`` gives the x axis and names explicitly;
  1-D series named ``<group>_<quantity>`` are drawn together against their group's axis series
  (``<group>_lr``, ``_step``, ``_width``, ...) when one of the same length exists, else against their index.
* a member row is either ``{"hparams": {...}, "results": {...}}`` or flat; in a flat row the hyperparameter
  columns (the engine's ``Hparams`` fields, ``seed``, ``width``, ``depth``, ``control``, ``member``, and any text
  value) become the member run's config and the rest its summary.

Costs measured on the 2-core CPU machines here (wandb 0.31, offline): importing wandb 0.6 s, starting its service
0.2 s, the first ``init`` another 0.4 s (it imports ``wandb.sdk.launch``). :func:`start_warmup` does all three in
a background thread while the diagnostics compute; setting the process up in the run's mode also keeps W&B's own
usage analytics (requests, OpenTelemetry: 0.2 s more) off in offline runs. After that, logging a run with one
sweep diagnostic (main run + its summary run) takes about 0.5 s, most of it the main run's pip freeze (0.3 s, kept
for reproducibility); a lean run (no system metrics, no pip freeze) costs about 0.03 s to open and finish, and a
member run with its curve about 0.055 s (18 members: +1.0 s), hence ``log_members`` is off by default.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import threading
import uuid
from typing import Any, Iterable

import numpy as np

MAIN_JOB_TYPE = "harness"
# Member-row keys that describe a member (its hyperparameters) rather than its results.
HPARAM_KEYS = frozenset({"lr", "lr_growth", "weight_decay", "init_seed", "data_seed", "input_scale", "label_seed",
                         "seed", "width", "depth", "control", "member", "batch_size", "steps"})
MAX_CURVE_POINTS = 100  # per member-run curve: W&B samples long histories anyway; each point costs ~0.5 ms
MAX_CHART_POINTS = 200  # per line in a line_series chart: each row of its table costs W&B ~0.1 ms of type checks


# ----------------------------------------------------------------------------------------------------------------
# Mode, directory, warm-up


def resolve_mode(configured: str | None, environ: dict[str, str] | None = None) -> str:
    """``logger.mode`` if set, else ``$WANDB_MODE``, else offline. Computed here because an explicit ``mode=`` in
    ``wandb.init`` overrides ``WANDB_MODE``, and the user's variable must keep working."""
    environ = os.environ if environ is None else environ
    return configured or environ.get("WANDB_MODE") or "offline"


def wandb_dir(configured: str | None, output_dir: str) -> str:
    """Where W&B writes its ``wandb/`` folder: ``logger.dir``, else the run's output directory."""
    return os.path.abspath(os.path.expanduser(configured or output_dir))


def _setup_settings(mode: str):
    """Process-wide W&B settings: many runs per process, and the mode, so an offline process also keeps W&B's own
    usage analytics offline (they are set up from these settings: requests and OpenTelemetry imports, 0.2 s)."""
    import wandb

    return wandb.Settings(reinit="create_new", mode=mode)


class _Warmup:
    def __init__(self):
        self.thread: threading.Thread | None = None

    @staticmethod
    def _work(mode: str):
        from harness.report.imports import BACKGROUND_IMPORT_LOCK

        try:
            with BACKGROUND_IMPORT_LOCK:  # not beside the plot worker's matplotlib import (see that module)
                import wandb
                import wandb.sdk.launch  # noqa: F401  # the first init imports it (0.4 s): off the critical path

                wandb.setup(_setup_settings(mode))
        except BaseException:  # noqa: BLE001  # log_run imports and sets up again on the main thread, where a
            pass  # failure becomes the usual "W&B logging failed" warning instead of a thread traceback

    def start(self, mode: str):
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, args=(mode,), name="harness-wandb-warmup",
                                           daemon=True)
            self.thread.start()

    def wait(self, timeout: float = 120.0):
        if self.thread is not None:
            self.thread.join(timeout)


_WARMUP = _Warmup()


def start_warmup(mode: str = "offline"):
    """Import wandb and start its service in a background thread (hides ~1.2 s behind the diagnostics)."""
    _WARMUP.start(mode)


# ----------------------------------------------------------------------------------------------------------------
# Plain data for W&B


def scalar(x: Any) -> Any:
    """A summary value: numpy scalars to Python; None for what W&B cannot show as a scalar (lists, dicts)."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "shape") and np.ndim(x) == 0:
        return np.asarray(x).item()
    return None


def cell(x: Any) -> Any:
    """A table cell: scalars as they are, anything else as compact JSON."""
    s = scalar(x)
    if s is not None or x is None:
        return s
    from harness.findings import to_jsonable

    return json.dumps(to_jsonable(x), allow_nan=False, default=str)


def split_member(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hyperparameters, results) of one member row (see the module docstring)."""
    if isinstance(row.get("hparams"), dict):
        results = row.get("results", row.get("metrics", {k: v for k, v in row.items() if k != "hparams"}))
        return dict(row["hparams"]), dict(results)
    hparams = {k: v for k, v in row.items() if k in HPARAM_KEYS or isinstance(v, str)}
    return hparams, {k: v for k, v in row.items() if k not in hparams}


def member_label(index: int, row: dict[str, Any]) -> str:
    hparams, _ = split_member(row)
    shown = ", ".join(f"{k}={_short(v)}" for k, v in list(hparams.items())[:3])
    return f"#{index}" + (f" {shown}" if shown else "")


def _short(v: Any) -> str:
    from harness.report.format import number

    return number(scalar(v)) if scalar(v) is not None else str(v)


@dataclasses.dataclass
class Curves:
    """Curves of one series, normalized: ``ys`` rows of equal length ``len(xs)``."""

    xs: list[float]
    ys: list[list[float]]
    keys: list[str]
    xname: str


def curves(value: Any, member_labels: list[str]) -> Curves | None:
    """Normalize one ``Outcome.series`` value (see the module docstring); None when it is not a curve."""
    spec = value if isinstance(value, dict) else {"y": value}
    try:
        ys = np.asarray(spec.get("y"), dtype=float)
    except (TypeError, ValueError):
        return None
    if ys.ndim == 1:
        ys = ys[None, :]
    if ys.ndim != 2 or ys.shape[1] < 2:
        return None
    xs = np.asarray(spec["x"], dtype=float) if spec.get("x") is not None else np.arange(ys.shape[1], dtype=float)
    if xs.shape != (ys.shape[1],):
        return None
    keys = [str(k) for k in spec.get("keys") or []]
    if len(keys) != len(ys):
        keys = member_labels if len(member_labels) == len(ys) else [f"#{i}" for i in range(len(ys))]
    return Curves(xs.tolist(), ys.tolist(), keys, str(spec.get("xname") or ("step" if spec.get("x") is None else "x")))


# A 1-D series whose last name segment is ``[<group>_]<axis>`` is an x axis for the other 1-D series of its group
# (``lr_range/ramp_lr`` is the x of ``lr_range/ramp_loss`` and ``lr_range/ramp_smoothed_loss``).
_AXIS = re.compile(r"^(?:(?P<group>.+?)_)?(?P<axis>lr|lrs|learning_rate|step|steps|width|widths|depth|seed|seeds|x)$")


def _numeric_1d(value: Any) -> np.ndarray | None:
    if isinstance(value, dict) or isinstance(value, str):
        return None
    try:
        a = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    return a if a.ndim == 1 and a.size >= 2 else None


def charts(series: dict[str, Any], member_labels: list[str]) -> dict[str, Curves]:
    """The charts of a diagnostic's series, for ``wandb.plot.line_series``: a 2-D series or an explicit dict is one
    chart; 1-D series of one group (``<group>_<quantity>``) that share an axis series (``<group>_lr``, ``_step``,
    ...) of their length are drawn together against it; other 1-D series against their index."""
    leaf = {k: k.rsplit("/", 1)[-1] for k in series}
    axes: dict[str, tuple[str, np.ndarray]] = {}
    for key, name in leaf.items():
        match, values = _AXIS.match(name), _numeric_1d(series[key])
        if match and values is not None:
            axes[match.group("group") or ""] = (match.group("axis"), values)
    out: dict[str, Curves] = {}
    grouped: dict[str, Curves] = {}
    for key, value in series.items():
        if _AXIS.match(leaf[key]) and _numeric_1d(value) is not None:
            continue  # an axis, drawn as the x of its group
        values = _numeric_1d(value)
        group = leaf[key].split("_", 1)[0] if "_" in leaf[key] else ""
        axis = axes.get(group)
        if values is not None and axis is not None and len(axis[1]) == len(values):
            chart = f"{key.rsplit('/', 1)[0]}/{group}" if "/" in key else group
            quantity = leaf[key][len(group) + 1:]
            c = grouped.setdefault(chart, Curves(axis[1].tolist(), [], [], axis[0]))
            c.ys.append(values.tolist())
            c.keys.append(quantity)
            continue
        c = curves(value, member_labels)
        if c is not None:
            if values is not None:
                c.keys = [leaf[key]]  # one curve: named after its quantity
            out[key] = c
    return {**grouped, **out}


def thin(n: int, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` evenly spaced points out of ``n``, always keeping the first and last."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


# ----------------------------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class Logged:
    """What was logged: the mode, the wandb folder, each run's local directory and (online) URL."""

    mode: str
    directory: str | None = None
    run_dirs: list[str] = dataclasses.field(default_factory=list)
    urls: list[str] = dataclasses.field(default_factory=list)

    def describe(self, cwd: str | None = None) -> str:
        """One line for the terminal: where the runs are and, offline, the exact command that uploads them."""
        if self.mode == "disabled" or not self.run_dirs:
            return "W&B: disabled"
        if self.mode == "online":
            return f"W&B: {len(self.run_dirs)} runs logged" + (f": {self.urls[0]}" if self.urls else "")
        where = os.path.relpath(self.directory, cwd or os.getcwd()) if self.directory else "."
        where = where if not where.startswith("..") else self.directory
        return (f"W&B: {len(self.run_dirs)} offline run{'s' if len(self.run_dirs) != 1 else ''} in {os.path.join(where, 'wandb')}; upload with: "
                f"wandb sync {os.path.join(where, 'wandb', 'offline-run-*')}")


def default_group() -> str:
    return f"harness-{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


_JOB_GROUP: list[str] = []  # the group of the current CLI job, for runs logged without an explicit group


def use_group(name: str | None):
    """Make ``name`` the group of every run this process logs without an explicit group (the CLI sets it per
    Hydra job, so the points of a collapsed sweep share their sweep's group)."""
    _JOB_GROUP[:] = [name] if name else []


def name_from_overrides(overrides: Iterable[str]) -> str:
    """A run's W&B name: its command-line overrides (``optim.lr=0.1 seed=2``) without the logger's and Hydra's
    own, or 'defaults'."""
    kept = [o for o in overrides if "=" in o and not o.lstrip("+~").startswith(("logger", "hydra"))]
    return " ".join(kept)[:128] or "defaults"


class _Runs:
    """Opens runs with shared arguments and finishes every one of them, also when logging fails."""

    def __init__(self, wandb, *, mode: str, directory: str, project: str, entity: str | None, group: str,
                 tags: tuple[str, ...], logged: Logged):
        self.wandb, self.logged = wandb, logged
        self.common = dict(mode=mode, dir=directory, project=project, entity=entity, group=group, tags=list(tags))

    def settings(self, lean: bool):
        # No system metrics: the runs open after the compiled work, so there is nothing to sample. Lean runs (sweep
        # summaries, members) also skip the pip freeze (0.06 s each) the main run already records.
        extra = {"x_save_requirements": False} if lean else {}
        return self.wandb.Settings(silent=True, console="off", x_disable_stats=True, **extra)

    def open(self, *, lean: bool, **kwargs):
        run = self.wandb.init(**self.common, **kwargs, settings=self.settings(lean))
        if getattr(run, "disabled", False):
            return run
        self.logged.run_dirs.append(os.path.dirname(run.dir.rstrip(os.sep)))  # .../offline-run-*/files
        if self.common["mode"] == "online" and run.url:  # asking an offline run for its URL logs a warning
            self.logged.urls.append(run.url)
        return run


class _finishing:
    """``with _finishing(run):`` finishes the run on exit; with exit code 1 when the body raised."""

    def __init__(self, run):
        self.run = run

    def __enter__(self):
        return self.run

    def __exit__(self, exc_type, exc, tb):
        self.run.finish(exit_code=1 if exc_type else 0)
        return False


def main_summary(report: dict, result) -> dict[str, Any]:
    """The main run's summary: status, counts, worst severity per finding id, timings, every metric."""
    from harness.pipeline import flat_metrics

    summary: dict[str, Any] = {
        "status": report["status"],
        "first_to_fix": (report.get("first_to_fix") or {}).get("id", ""),
        "root_cause": (report.get("root_cause") or {}).get("id", ""),
        "root_cause/branch": (report.get("root_cause") or {}).get("branch", ""),
        "root_cause/message": (report.get("root_cause") or {}).get("message", ""),
        "num_errors": report["counts"].get("error", 0),
        "num_warnings": report["counts"].get("warning", 0),
        "num_infos": report["counts"].get("info", 0),
        "num_internal_errors": len(report.get("internal_errors") or []),
        "harness/seconds": report.get("seconds"),
        "harness/compiles": report["programs"].get("compiles"),
        "harness/compile_seconds": report["programs"].get("compile_seconds"),
        "harness/compile_wall_seconds": report["programs"].get("compile_wall_seconds"),
    }
    b = report.get("budget")
    if b:  # what budget= chose: runs whose cuts differ are told apart (their config is the same)
        summary.update({"budget/seconds": b["budget_seconds"], "budget/fits": b["fits"],
                        "budget/cuts": len(b["changes"]), "budget/member_step_ms": b["member_step_ms"],
                        "budget/overrides": " ".join(b.get("overrides") or [])})
    for f in reversed(report["findings"]):  # most severe last, so it wins
        summary[f"finding/{f['id']}"] = f["severity"]
    for e in report.get("internal_errors") or []:  # a crashed diagnostic: its exception's type and message
        summary[f"internal_error/{e['diagnostic']}"] = f"{e['type']}: {e['message']}" if e.get("message") else e["type"]
    for name, d in report["diagnostics"].items():
        summary[f"{name}/status"] = d["status"]
        summary[f"{name}/seconds"] = d["seconds"]
    for k, v in flat_metrics(result.outcomes).items():
        v = scalar(v)
        if v is not None:
            summary[k] = v
    return summary


def findings_table(wandb, report: dict):
    columns = ["stage", "diagnostic", "severity", "id", "message", "suggestion", "evidence"]
    rows = [[f.get("stage"), f.get("diagnostic"), f["severity"], f["id"], f["message"], f.get("suggestion", ""),
             json.dumps(f.get("evidence") or {}, allow_nan=False, default=str)] for f in report["findings"]]
    return wandb.Table(columns=columns, data=rows)


def members_table(wandb, members: list[dict[str, Any]]):
    columns: list[str] = []
    flat_rows = []
    for row in members:
        hparams, results = split_member(row)
        flat = {**hparams, **results}
        flat_rows.append(flat)
        columns += [k for k in flat if k not in columns]
    return wandb.Table(columns=["member", *columns],
                       data=[[i, *(cell(r.get(c)) for c in columns)] for i, r in enumerate(flat_rows)])


def line_chart(wandb, name: str, c: Curves, title: str):
    idx = thin(len(c.xs), MAX_CHART_POINTS)
    # Each line keeps only its finite points (its own xs): a gap instead of a None cell, which W&B's table type
    # inference handles several times slower than a float.
    xs = [[c.xs[i] for i in idx if math.isfinite(row[i])] for row in c.ys]
    ys = [[row[i] for i in idx if math.isfinite(row[i])] for row in c.ys]
    return wandb.plot.line_series(xs=xs, ys=ys, keys=c.keys, title=title, xname=c.xname)


def _images(wandb, outcome_plots: dict[str, dict], output_dir: str) -> dict[str, Any]:
    return {f"plots/{key}": wandb.Image(os.path.join(output_dir, p["path"]), caption=p.get("title"))
            for key, p in outcome_plots.items() if os.path.exists(os.path.join(output_dir, p["path"]))}


def _attach_report(run, output_dir: str):
    """Copy report.json and report.md into the run's files (uploaded with the run; ``run.save`` would symlink them
    and warn about it)."""
    import shutil

    for filename in ("report.json", "report.md"):
        source = os.path.join(output_dir, filename)
        if os.path.exists(source):
            shutil.copyfile(source, os.path.join(run.dir, filename))


def log_run(rc, result, report: dict, output_dir: str, plot_files: dict[str, dict] | None = None, *,
            run_name: str | None = None, group: str | None = None) -> Logged:
    """Log one harness run to W&B (see the module docstring). Raises on failure after finishing every run it
    opened; the caller keeps the local report either way."""
    _WARMUP.wait()
    import wandb

    cfg = rc.logger
    mode = resolve_mode(cfg.mode)
    directory = wandb_dir(cfg.dir, output_dir)
    logged = Logged(mode=mode, directory=directory)
    if mode == "disabled":
        return logged
    wandb.setup(_setup_settings(mode))
    os.makedirs(directory, exist_ok=True)
    group = cfg.group or group or (_JOB_GROUP[0] if _JOB_GROUP else default_group())
    name = run_name or name_from_overrides((report.get("command") or [])[1:])
    runs = _Runs(wandb, mode=mode, directory=directory, project=cfg.project, entity=cfg.entity, group=group,
                 tags=tuple(cfg.tags), logged=logged)
    plot_files = plot_files or {}
    by_name = {o.name: o for o in result.outcomes}

    config = {**report["config"], "choices": report.get("choices") or {}}
    notes = " ".join(report.get("command") or [])
    with _finishing(runs.open(lean=False, job_type=MAIN_JOB_TYPE, name=name, notes=notes, config=config)) as run:
        run.summary.update(main_summary(report, result))
        run.log({"findings": findings_table(wandb, report), **_images(wandb, plot_files, output_dir)})
        _attach_report(run, output_dir)

    for diag_name, d in report["diagnostics"].items():
        outcome = by_name.get(diag_name)
        if outcome is None or not outcome.members:
            continue
        labels = [member_label(i, row) for i, row in enumerate(outcome.members)]
        series = charts(outcome.series, labels)
        sweep_config = {"diagnostic": diag_name, "members": len(outcome.members), "main_run": name,
                        "settings": dataclasses.asdict(rc.settings[diag_name])
                        if dataclasses.is_dataclass(rc.settings.get(diag_name)) else {}}
        with _finishing(runs.open(lean=True, job_type=diag_name, name=f"{name}/{diag_name}", notes=notes,
                                  config=sweep_config)) as run:
            run.summary.update({k: v for k, v in ((k, scalar(v)) for k, v in d["metrics"].items()) if v is not None})
            payload = {"members": members_table(wandb, outcome.members)}
            payload.update({f"charts/{k}": line_chart(wandb, k, c, f"{diag_name}: {k}") for k, c in series.items()})
            mine = {k: p for k, p in plot_files.items() if p.get("diagnostic") == diag_name}
            payload.update(_images(wandb, mine, output_dir))
            run.log(payload)
        if cfg.log_members:
            _log_members(runs, diag_name, outcome, labels, series, name, notes)
    return logged


class LiveRun:
    """The W&B run of ``harness train``, open while it trains: each chunk's metrics as history (W&B's step is the
    optimizer step), then at the end what a checklist run's main run gets (summary, findings table, plots, the
    report files). A resumed run continues the W&B run of its checkpoint (same id). A logging failure while
    training costs one warning and the rest of the live history, never the training."""

    def __init__(self, rc, output_dir: str, *, run_name: str | None = None, group: str | None = None,
                 run_id: str | None = None, job_type: str = "train"):
        _WARMUP.wait()
        import wandb

        cfg = rc.logger
        mode = resolve_mode(cfg.mode)
        directory = wandb_dir(cfg.dir, output_dir)
        self.logged = Logged(mode=mode, directory=directory)
        self.run = None
        self.id = run_id
        self.failed = False
        if mode == "disabled":
            return
        wandb.setup(_setup_settings(mode))
        os.makedirs(directory, exist_ok=True)
        group = cfg.group or group or (_JOB_GROUP[0] if _JOB_GROUP else default_group())
        runs = _Runs(wandb, mode=mode, directory=directory, project=cfg.project, entity=cfg.entity, group=group,
                     tags=tuple(cfg.tags), logged=self.logged)
        self.wandb = wandb
        resume = dict(id=run_id, resume="allow") if run_id else {}
        self.run = runs.open(lean=False, job_type=job_type, name=run_name or "train", config=dict(rc.raw), **resume)
        self.id = self.run.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.run is None or self.failed:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        except Exception as err:  # noqa: BLE001
            self.failed = True
            import sys

            print(f"harness: warning: W&B logging failed ({type(err).__name__}: {err}); training goes on, the "
                  f"report is written at the end", file=sys.stderr)

    def finish(self, result, report: dict, output_dir: str, plot_files: dict[str, dict] | None = None) -> Logged:
        """Log the report into the run and finish it; raises on failure after finishing the run."""
        if self.run is None:
            return self.logged
        with _finishing(self.run) as run:
            run.summary.update(main_summary(report, result))
            run.log({"findings": findings_table(self.wandb, report), **_images(self.wandb, plot_files or {},
                                                                                 output_dir)})
            _attach_report(run, output_dir)
        return self.logged


def _log_members(runs: _Runs, diag_name: str, outcome, labels: list[str], series: dict[str, Curves], name: str,
                 notes: str):
    """One run per member: hyperparameters as config, results as summary, its own rows of every curve as history."""
    for i, row in enumerate(outcome.members):
        hparams, results = split_member(row)
        config = {k: cell(v) for k, v in hparams.items()}
        own = {k: c for k, v in outcome.series.items()
               if np.ndim(v) == 2 and (c := curves(v, labels)) is not None and len(c.ys) == len(outcome.members)}
        with _finishing(runs.open(lean=True, job_type=diag_name, name=f"{name}/{diag_name}/{labels[i]}",
                                  notes=notes, config={**config, "diagnostic": diag_name, "member": i})) as run:
            for key, c in own.items():
                # One history per curve, on its own x axis (W&B's define_metric), so curves of different lengths
                # or axes (steps, learning rates) do not share a step counter.
                x_key = f"{key}/{c.xname}"
                run.define_metric(x_key, hidden=True)
                run.define_metric(key, step_metric=x_key)
                for j in thin(len(c.xs), MAX_CURVE_POINTS):
                    y = c.ys[i][j]
                    if math.isfinite(y):
                        run.log({x_key: c.xs[j], key: y})
            run.summary.update({k: v for k, v in ((k, scalar(v)) for k, v in results.items()) if v is not None})
