"""A monitored run as harness's report: the findings, the run's curves and a loss plot, in report.json,
report.md and W&B, for ``harness train`` and for :meth:`harness.monitor.Monitor.report` in a user's own loop alike.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from harness.checks.base import Outcome, Plot
from harness.findings import Finding

MAX_WANDB_LEAVES = 64  # per-leaf W&B keys beyond this are left out (a deep model has hundreds of leaves)


def outcome(watch, name: str = "monitor", metrics: dict[str, Any] | None = None, seconds: float = 0.0,
            findings: list[Finding] | None = None) -> Outcome:
    """The monitored run as one diagnostic's :class:`Outcome`: the detectors' findings (or ``findings``), the
    training and validation curves, the final and best values, and a loss plot marking each finding's step. A
    vmapped run is judged per member and plotted by its first member."""
    findings = watch.findings() if findings is None else findings
    runs = watch.series()
    steps, loss, lr = (runs[0].steps, runs[0].loss, runs[0].lr) if runs else (np.zeros(0, int), np.zeros(0), None)
    val_steps, val_loss, val_acc = watch.validations()
    if val_loss.ndim > 1:
        val_loss, val_acc = val_loss[:, 0], val_acc[:, 0]
    out = {"steps": int(steps[-1]) + 1 if steps.size else 0, "final_train_loss": _tail_mean(loss)}
    if val_loss.size:
        finite = np.isfinite(val_loss)
        best = int(np.nanargmin(np.where(finite, val_loss, np.nan))) if finite.any() else None
        out.update(final_val_loss=float(val_loss[-1]), best_val_loss=None if best is None else float(val_loss[best]),
                   best_val_step=None if best is None else int(val_steps[best]))
        if np.isfinite(val_acc).any():
            out["final_val_accuracy"] = float(val_acc[-1])
    out.update(metrics or {})
    series = {"train_step": steps.tolist(), "train_loss": loss.tolist(), "val_step": val_steps.tolist(),
              "val_loss": val_loss.tolist()}
    if lr is not None:
        series["train_lr"] = lr.tolist()

    def draw(path):
        draw_curves(path, steps, loss, val_steps, val_loss, findings)

    return Outcome(name, findings=list(findings), metrics=out, series=series,
                   plots=[Plot("curves", "training and validation loss", draw)] if steps.size else [],
                   seconds=seconds)


def _tail_mean(loss: np.ndarray, n: int = 50) -> float | None:
    tail = loss[-n:]
    tail = tail[np.isfinite(tail)]
    return float(tail.mean()) if tail.size else None


def draw_curves(path: str, steps, loss, val_steps, val_loss, findings: list[Finding]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="training loss (per step)")
    if len(loss) >= 20:
        k = max(len(loss) // 100, 5)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"training loss (mean of {k})")
    if len(val_loss):
        ax.plot(val_steps, val_loss, "o-", ms=3, label="validation loss")
    for f in findings:
        step = f.evidence.get("step")
        if isinstance(step, (int, np.integer)):
            ax.axvline(step, color="red" if f.severity.value == "error" else "orange", ls="--", lw=1)
            ax.text(step, ax.get_ylim()[1], f" {f.id}", rotation=90, va="top", fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    finite = np.asarray(loss)[np.isfinite(loss)]
    if finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def wandb_rows(watch, since: int, prefix: str = "monitor/") -> list[tuple[int, dict[str, float]]]:
    """One W&B history row per step read after step ``since``: loss, gradient norm, per-leaf gradient norm and
    update/parameter ratio (the first :data:`MAX_WANDB_LEAVES` leaves); a vmapped run logs its first member."""
    runs = watch.series(since)
    if not runs:
        return []
    s = runs[0]
    keep = s.steps >= since
    paths = s.paths[:MAX_WANDB_LEAVES]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = s.layer_update_norm / s.layer_param_norm
    rows = []
    for i in np.flatnonzero(keep):
        row = {f"{prefix}grad_norm": float(s.grad_norm[i])}
        if s.loss_recorded[i]:
            row[f"{prefix}loss"] = float(s.loss[i])
        if s.lr is not None:
            row[f"{prefix}lr"] = float(s.lr[i])
        for j, path in enumerate(paths):
            row[f"{prefix}grad_norm/{path}"] = float(s.layer_grad_norm[i, j])
            row[f"{prefix}update_ratio/{path}"] = float(ratio[i, j])
        rows.append((int(s.steps[i]), {k: v for k, v in row.items() if np.isfinite(v)}))
    return rows


def write_report(watch, output_dir: str, *, name: str = "monitor", config: dict | None = None,
                 wandb_run=None) -> dict:
    """:meth:`harness.monitor.Monitor.report`: report.json, report.md and the plot in ``output_dir``; the summary,
    findings table and plot into ``wandb_run`` when given. Returns the report."""
    from harness.pipeline import RunResult
    from harness.report import environment, plots, writer

    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    result = RunResult.of([outcome(watch, name)], time.perf_counter() - start)
    plot_files = plots.draw_all(result.outcomes, output_dir)
    report = writer.build_report(result, config=config or {}, command=[], environment=environment.environment(),
                                 plots=plot_files, output_dir=os.path.abspath(output_dir))
    writer.write_json(report, output_dir)
    writer.write_markdown(report, output_dir)
    if wandb_run is not None:
        import wandb

        from harness.report import wandb_logger

        wandb_run.summary.update(wandb_logger.main_summary(report, result))
        wandb_run.log({"findings": wandb_logger.findings_table(wandb, report),
                       **{f"plots/{k}": wandb.Image(os.path.join(output_dir, p["path"]))
                          for k, p in plot_files.items()}})
    return report
