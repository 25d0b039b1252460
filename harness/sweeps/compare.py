"""``harness compare DIR...``: finished runs side by side, without W&B.

Every ``report.json`` below the given directories becomes a row: the run (its directory relative to the others),
the overrides that differ between runs, the status, the error findings, a few key metrics (whichever the reports
have: overfit steps to target, validation loss, seed spread, capacity verdict, suggested learning rate) and any
metric asked for with ``--metric``. A plot of the numeric columns goes to ``--out``: against the swept value when
the runs differ in one numeric override (a learning-rate sweep gives metric vs lr, log-scaled), else per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import os
from typing import Any

from harness.errors import HarnessError
from harness.sweeps.runs import Run, display_names, load_runs, natural_key, split_override

# (column title, patterns tried in order against the flat metric keys). The first key a run has wins, so the
# columns keep working while diagnostics rename or add metrics; a column no run has is left out.
KEY_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("overfit steps", ("overfit_batch/steps_to_target", "overfit_batch/*steps_to*", "overfit_batch/*steps*")),
    ("val loss", ("seeds/val_loss/mean", "seeds/*val_loss*mean*", "*/final_val_loss", "*/val_loss",
                  "lr_range/configured_val_loss")),
    ("seed spread", ("seeds/*spread*", "seeds/*std*", "seeds/*noise*")),
    ("capacity", ("capacity/verdict", "capacity/*verdict*")),
    ("suggested lr", ("lr_range/suggested_lr", "lr_range/*suggest*")),
)


@dataclasses.dataclass
class Column:
    title: str
    values: list[Any]  # one per run; None when the run lacks it
    keys: list[str | None]  # which metric key each value came from

    @property
    def numeric(self) -> bool:
        present = [v for v in self.values if v is not None]
        return bool(present) and all(_is_number(v) for v in present)


@dataclasses.dataclass
class Comparison:
    runs: list[Run]
    names: list[str]
    differing: dict[str, list[str | None]]  # override key -> value per run (None: not set in that run)
    columns: list[Column]

    def sort_order(self) -> list[int]:
        """Rows by the differing override values (numbers numerically), then by directory."""

        def key(i):
            parts = []
            for values in self.differing.values():
                v = values[i]
                parts.append((0, float(v), "") if _is_number_text(v) else (1, 0.0, str(v)))
            return parts, natural_key(self.names[i])

        return sorted(range(len(self.runs)), key=key)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_number_text(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def differing_overrides(runs: list[Run]) -> dict[str, list[str | None]]:
    """Override keys whose value is not the same in every run, in first-seen order."""
    per_run = [dict(split_override(o) for o in run.overrides) for run in runs]
    keys: dict[str, None] = {}
    for overrides in per_run:
        keys.update(dict.fromkeys(overrides))
    out = {}
    for key in keys:
        values = [o.get(key) for o in per_run]
        if len(set(values)) > 1:
            out[key] = values
    return out


def pick_metric(metrics: dict[str, Any], patterns: tuple[str, ...]) -> tuple[str | None, Any]:
    for pattern in patterns:
        if pattern in metrics:
            return pattern, metrics[pattern]
        matches = sorted(k for k in metrics if fnmatch.fnmatchcase(k, pattern))
        if matches:
            return matches[0], metrics[matches[0]]
    return None, None


def metric_columns(runs: list[Run], extra: list[str] = ()) -> list[Column]:
    """The key-metric columns some run has, then one column per metric key matching an ``--metric`` pattern."""
    columns = []
    for title, patterns in KEY_METRICS:
        picked = [pick_metric(r.metrics, patterns) for r in runs]
        if any(k is not None for k, _ in picked):
            columns.append(Column(title, [v for _, v in picked], [k for k, _ in picked]))
    for pattern in extra:
        keys = sorted({k for r in runs for k in r.metrics if fnmatch.fnmatchcase(k, pattern)}, key=natural_key)
        if not keys:
            raise HarnessError(f"--metric {pattern}: no run has a metric matching it")
        for key in keys:
            columns.append(Column(key, [r.metrics.get(key) for r in runs], [key] * len(runs)))
    return columns


def build(paths: list[str], extra_metrics: list[str] = ()) -> Comparison:
    runs = load_runs(paths)
    return Comparison(runs, display_names([r.dir for r in runs]), differing_overrides(runs),
                      metric_columns(runs, list(extra_metrics)))


# ----------------------------------------------------------------------------------------------------------------
# Output


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def error_ids(run: Run) -> list[str]:
    return [f["id"] for f in run.report.get("findings", []) if f.get("severity") == "error"]


def table(comparison: Comparison):
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"harness compare: {len(comparison.runs)} run{'s' if len(comparison.runs) != 1 else ''}")
    t.add_column("run", overflow="fold")
    for key in comparison.differing:
        t.add_column(key, overflow="fold")
    if not comparison.differing:
        t.add_column("overrides", overflow="fold")
    t.add_column("status")
    t.add_column("errors", overflow="fold")
    for col in comparison.columns:
        t.add_column(col.title, justify="right" if col.numeric else "left")
    for i in comparison.sort_order():
        run = comparison.runs[i]
        status = str(run.report.get("status", "?"))
        # Text, not markup: override values such as diagnostics.run=[data,model] hold brackets.
        cells = [Text(comparison.names[i])]
        if comparison.differing:
            cells += [Text(fmt(values[i])) for values in comparison.differing.values()]
        else:
            cells.append(Text(" ".join(run.overrides) or "(defaults)"))
        cells += [Text(status, style="green" if status == "healthy" else "red"),
                  Text(", ".join(error_ids(run)) or "–")]
        cells += [Text(fmt(col.values[i])) for col in comparison.columns]
        t.add_row(*cells)
    return t


def plot(comparison: Comparison, path: str) -> str:
    """Numeric columns against the swept value (one numeric override differs) or per run; falls back to the
    count of error and warning findings when no numeric metric exists. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = comparison.sort_order()
    series = [(c.title, [c.values[i] for i in order]) for c in comparison.columns if c.numeric]
    if not series:
        for severity in ("error", "warning"):
            counts = [sum(f.get("severity") == severity for f in comparison.runs[i].report.get("findings", []))
                      for i in order]
            series.append((f"{severity} findings", counts))
    swept = [(k, v) for k, v in comparison.differing.items() if all(_is_number_text(x) for x in v)]
    x_label, xs, log_x = None, list(range(len(order))), False
    if len(comparison.differing) == 1 and len(swept) == 1:
        x_label = swept[0][0]
        xs = [float(swept[0][1][i]) for i in order]
        log_x = min(xs) > 0 and max(xs) / min(xs) >= 10

    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.6), squeeze=False)
    unhealthy = [comparison.runs[i].report.get("status") not in (None, "healthy") for i in order]
    for ax, (title, ys) in zip(axes[0], series):
        points = [(x, y, bad) for x, y, bad in zip(xs, ys, unhealthy) if _is_number(y)]
        if x_label:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
            bad = [p for p in points if p[2]]
            if bad:  # runs with error findings stand out
                ax.plot([p[0] for p in bad], [p[1] for p in bad], "o", color="tab:red", label="unhealthy")
                ax.legend(fontsize=8)
            ax.set_xlabel(x_label)
            if log_x:
                ax.set_xscale("log")
        else:
            ax.bar([p[0] for p in points], [p[1] for p in points],
                   color=["tab:red" if p[2] else "tab:blue" for p in points])
            ax.set_xticks(range(len(order)), [comparison.names[i] for i in order], rotation=45, ha="right",
                          fontsize=8)
        positive = [p[1] for p in points if p[1] > 0]
        if title in ("suggested lr",) and positive and max(positive) / min(positive) >= 10:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fig.savefig(path, dpi=110)
    except ValueError as err:  # an extension matplotlib cannot write, e.g. --out plot.xyz
        raise HarnessError(f"--out {path}: {err}") from None
    finally:
        plt.close(fig)
    return path


def default_plot_path(comparison: Comparison) -> str:
    """``compare.png`` in the runs' common parent directory (a sweep's own directory)."""
    dirs = [r.dir for r in comparison.runs]
    parent = os.path.commonpath(dirs) if len(dirs) > 1 else os.path.dirname(dirs[0])
    return os.path.join(parent, "compare.png")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness compare", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories (every report.json below)")
    p.add_argument("--metric", action="append", default=[], metavar="PATTERN",
                   help="add columns for metrics matching this glob, e.g. 'lr_range/*' (repeatable)")
    p.add_argument("--out", metavar="PNG", help="where to write the plot (default: compare.png in the runs' "
                                                 "common parent directory)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    return p


def main(args: list[str]) -> int:
    from harness.sweeps.runs import make_console

    opts = parser().parse_args(args)
    comparison = build(opts.dirs, opts.metric)
    console = make_console()
    console.print(table(comparison))
    if not opts.no_plot:
        path = plot(comparison, opts.out or default_plot_path(comparison))
        console.print(f"plot: {path}", markup=False)
    return 0
