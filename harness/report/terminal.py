"""The report in the terminal (rich), and the progress view while diagnostics run.

The report reads top to bottom the way the checklist does: findings grouped by stage (data -> model -> training
-> hyperparameters), each with its severity, message, evidence and fix, under the root cause (first: the diagnosis);
a compact table of the diagnostics (time, headline metrics, why one was skipped); then the status, with the root
cause's id again on the last lines a user sees. It renders the JSON-able
report, so ``report.json`` read back from disk prints the same.
"""

from __future__ import annotations

import contextlib
import os

from rich import box
from rich.console import Console, Group
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from harness.report import format as fmt

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
STATUS_STYLE = {"ok": "green", "error": "bold red", "warning": "yellow", "skipped": "dim", "crashed": "bold magenta"}


def make_console(**kwargs) -> Console:
    return Console(highlight=False, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Progress


class ProgressView:
    """Adapts the pipeline's callbacks to a rich progress display: one line for the checklist (which diagnostic
    runs, how many are done, findings so far) and a bar per training program while it runs. With ``progress=None``
    (stdout is not a terminal: CI, pipes) every method is a no-op."""

    def __init__(self, progress: Progress | None, names: tuple[str, ...] = ()):
        self._progress = progress
        self._names = tuple(names)
        self._done = 0
        self._counts = {"error": 0, "warning": 0, "info": 0}
        self._tasks: dict[str, int] = {}
        self._overall = None
        if progress is not None and self._names:
            self._overall = progress.add_task(self._describe(), total=len(self._names), checklist=True)

    def _describe(self) -> str:
        found = fmt.counts_text(self._counts) if any(self._counts.values()) else ""
        if self._done < len(self._names):
            current = f"[bold]{self._names[self._done]}[/] ({self._done + 1}/{len(self._names)})"
        else:
            current = "writing the report"
        return f"checklist: {current}" + (f"  [dim]{found} so far[/]" if found else "")

    def update(self, task: str, done: int, total: int):
        """A training program's progress: ``done`` of ``total`` steps."""
        if self._progress is None:
            return
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(f"  {task}", total=total)
        self._progress.update(self._tasks[task], completed=done, total=total, visible=done < total)

    def outcome_done(self, outcome):
        """A diagnostic finished: advance the checklist line and hide its finished training bars."""
        self._done += 1
        for f in outcome.findings:
            self._counts[f.severity.value] = self._counts.get(f.severity.value, 0) + 1
        if self._progress is None:
            return
        for task in [t for t in self._tasks if t == outcome.name or t.startswith(outcome.name + "/")]:
            self._progress.update(self._tasks.pop(task), visible=False)
        if self._overall is not None:
            self._progress.update(self._overall, completed=self._done, description=self._describe())


def show_progress(console: Console) -> bool:
    """Live progress only for a person at a terminal: not in CI, pipes or dumb terminals."""
    return console.is_terminal and not console.is_dumb_terminal and not os.environ.get("CI")


class TrainingTimeRemaining(TimeRemainingColumn):
    """The time a training program has left, from its calls so far (a deep model's or a CNN's suite trains for
    minutes on a CPU); none for the checklist line, whose diagnostics take anything from milliseconds to minutes."""

    def render(self, task):
        return Text("") if task.fields.get("checklist") else super().render(task)


@contextlib.contextmanager
def progress(console: Console, names: tuple[str, ...] = ()):
    """A transient progress display while the diagnostics run (it disappears when the report prints)."""
    if not show_progress(console):
        yield ProgressView(None, names)
        return
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                   TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TrainingTimeRemaining(),
                   console=console, transient=True)
    with bar:
        yield ProgressView(bar, names)


# ----------------------------------------------------------------------------------------------------------------
# The report


def findings_table(report: dict) -> Table | Text:
    if not report["findings"]:
        return Text("No findings: every check that ran passed.", style="green")
    table = Table(box=box.SIMPLE_HEAD, show_header=False, expand=False, padding=(0, 1), pad_edge=False)
    table.add_column("severity", no_wrap=True)
    table.add_column("id", no_wrap=True, style="bold")
    table.add_column("finding", overflow="fold")
    for stage, findings in fmt.by_stage(report["findings"]):
        table.add_row(Text(fmt.STAGE_TITLES.get(stage, stage), style="bold underline"), "", "")
        for f in findings:
            details = Text(f["message"])
            for line in fmt.causal_lines(f):
                details.append(f"\n{line}", style="magenta")
            if f.get("evidence"):
                details.append("\nevidence: ", style="dim").append(fmt.evidence_line(f["evidence"]), style="dim")
            if f.get("suggestion"):
                details.append("\nfix: ", style="green").append(f["suggestion"])
            table.add_row(Text(f["severity"], style=SEVERITY_STYLE.get(f["severity"], "")), f["id"], details)
    return table


def diagnostics_table(report: dict) -> Table:
    table = Table(box=box.SIMPLE_HEAD, expand=False, padding=(0, 1), pad_edge=False, title_justify="left")
    table.add_column("diagnostic", no_wrap=True)
    table.add_column("result", overflow="fold")
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("key metrics", overflow="fold")
    for name, d in report["diagnostics"].items():
        status = d.get("status", "ok")
        if d.get("skipped"):
            result = Text(d["skipped"], style=STATUS_STYLE.get(status, ""))
        else:
            found = [f for f in report["findings"] if f.get("diagnostic") == name]
            result = Text(fmt.counts_text(fmt.counts(found)) if found else "ok", style=STATUS_STYLE.get(status, ""))
        metrics = ", ".join(f"{k} {v}" for k, v in fmt.key_metrics(d.get("metrics") or {}, name))
        time = "–" if d.get("skipped") else fmt.seconds(d.get("seconds"))
        table.add_row(name, result, time, Text(metrics, style="dim"))
    return table


def footer(report: dict, output_dir: str | None) -> Group:
    status = report["status"]
    counts = report.get("counts") or fmt.counts(report["findings"])
    programs = report.get("programs") or {}
    line = Text("status: ").append(status, style="bold green" if status == "healthy" else "bold red")
    line.append(f"  {fmt.counts_text(counts)} · {fmt.seconds(report.get('seconds'))} · "
                f"{fmt.compiles(programs, ' compiling')}", style="dim")
    parts = [line]
    for e in report.get("internal_errors") or []:
        parts.append(Text("internal error: ", style="bold magenta").append(fmt.internal_error_text(e)))
    if report.get("internal_errors"):
        parts.append(Text(f"  {fmt.INTERNAL_ERROR_ADVICE}", style="magenta"))
    not_run = [n for n, d in report["diagnostics"].items() if d.get("skipped") and not d.get("internal_error")]
    if not_run:
        parts.append(Text(f"did not run: {', '.join(not_run)} (reasons above)", style="dim"))
    for line in report.get("not_ruled_out") or []:
        parts.append(Text("not ruled out: ", style="dim bold").append(line, style="dim"))
    budget = report.get("budget")
    if budget:
        text = Text("budget: ", style="bold").append(budget["summary"])
        for change, keys, cost in fmt.budget_cuts(budget):
            label = f"\n  {change}" + (f" ({keys})" if keys else "") + ": "
            text.append(label, style="yellow").append(cost, style="dim")
        rerun = fmt.budget_rerun(budget)
        if rerun:
            text.append("\n  the same suite without a budget: ", style="dim").append(rerun)
        parts.append(text)
    first = report.get("first_to_fix")
    if first:  # the last line a user sees when the run ends; the whole diagnosis is the report's first block
        parts.append(Text("root cause: ", style="bold").append(first["id"], style=SEVERITY_STYLE.get(first["severity"]))
                     .append(" (diagnosis at the top of the report)", style="dim"))
    return Group(*parts)


def root_cause(report: dict) -> Text | None:
    """The diagnosis, shown first: the root cause (``report["root_cause"]``, the seeds' decision tree), what it
    explains, what ran clean and rules alternatives out, what could not be ruled out, and the fixes in order."""
    first = report.get("first_to_fix")
    if not first:
        return None
    cause = report.get("root_cause") or {}
    text = Text("root cause: ", style="bold").append(first["id"], style=SEVERITY_STYLE.get(first["severity"]))
    text.append(f": {first['message']}")
    if first.get("explains"):
        text.append("\n  explains: ", style="magenta").append(", ".join(first["explains"]))
    if cause.get("ruled_out"):
        text.append("\n  ruled out: ", style="dim bold").append("; ".join(cause["ruled_out"]), style="dim")
    if cause.get("not_ruled_out"):
        text.append("\n  not ruled out: ", style="yellow").append("; ".join(cause["not_ruled_out"]))
    fixes = cause.get("fixes") or ([first["suggestion"]] if first.get("suggestion") else [])
    for i, line in enumerate(fixes, 1):
        text.append(f"\n  fix {i}: " if len(fixes) > 1 else "\n  fix: ", style="green").append(line)
    return text


def renderables(report: dict, output_dir: str | None) -> list:
    """The report view as rich renderables, top to bottom (what :func:`print_report` prints; a
    :class:`harness.api.Report` yields them to any rich console)."""
    cause = root_cause(report)
    parts = [Rule("harness report", align="left"), *([cause, Text()] if cause is not None else []),
             findings_table(report), Text(), diagnostics_table(report), footer(report, output_dir)]
    if output_dir:
        parts.append(report_path(output_dir))
    return parts


def report_path(output_dir: str) -> Text:
    # Never wrapped or cropped: users copy this path, and tools grep it from piped output.
    return Text(f"report: {os.path.join(output_dir, 'report.md')}", style="dim", no_wrap=True, overflow="ignore")


def print_report(console: Console, report: dict, output_dir: str | None):
    *view, last = renderables(report, output_dir)
    for part in view:
        console.print(part)
    console.print(last, soft_wrap=bool(output_dir))
