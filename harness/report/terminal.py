"""The report in the terminal (rich): findings in the checklist's order, then the status and the first fix."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def make_console() -> Console:
    return Console(highlight=False)


class _ProgressView:
    """Adapts the pipeline's (task, done, total) callbacks to a rich progress bar."""

    def __init__(self, progress: Progress | None):
        self._progress = progress
        self._tasks: dict[str, int] = {}

    def update(self, task: str, done: int, total: int):
        if self._progress is None:
            return
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total)
        self._progress.update(self._tasks[task], completed=done, total=total)

    def outcome_done(self, outcome):
        pass


@contextlib.contextmanager
def progress(console: Console):
    if not console.is_terminal:
        yield _ProgressView(None)
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=console, transient=True)
    with bar:
        yield _ProgressView(bar)


def print_report(console: Console, report: dict, output_dir: str):
    table = Table(title="harness report", show_lines=False, expand=False)
    table.add_column("severity")
    table.add_column("id")
    table.add_column("finding")
    for f in report["findings"]:
        style = SEVERITY_STYLE.get(f["severity"], "")
        text = f["message"] + (f"\n→ {f['suggestion']}" if f["suggestion"] else "")
        table.add_row(f"[{style}]{f['severity']}[/]", f["id"], text)
    if report["findings"]:
        console.print(table)
    for name, d in report["diagnostics"].items():
        if d.get("skipped"):
            console.print(f"[dim]{name}: {d['skipped']}[/]")
    status = report["status"]
    colour = "green" if status == "healthy" else "red"
    console.print(f"status: [bold {colour}]{status}[/]  ({report['seconds']:.1f} s, "
                  f"{report['programs']['compiles']} compiles)")
    first = report.get("first_to_fix")
    if first:
        console.print(f"first to fix: [bold]{first['id']}[/]: {first['message']}"
                      + (f" → {first['suggestion']}" if first["suggestion"] else ""))
    console.print(f"report: {output_dir}/report.md")
