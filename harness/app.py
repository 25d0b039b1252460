"""One run, start to finish: compile cache, progress, diagnostics, report files, terminal view, W&B.

The local report is written before anything is sent to W&B, and a logging failure only costs a warning: nothing
the user produced is lost.
"""

from __future__ import annotations

import os
import sys

from harness.config import RunConfig
from harness.engine.compile import enable_persistent_cache
from harness.pipeline import RunResult, run
from harness.report import environment, plots, terminal, writer


def run_and_report(rc: RunConfig, output_dir: str, *, command: list[str], console=None) -> RunResult:
    enable_persistent_cache(rc.compilation_cache)
    console = console or terminal.make_console()
    with terminal.progress(console) as progress:
        result = run(rc, progress=progress.update, on_outcome=progress.outcome_done)
    write_outputs(rc, result, output_dir, command=command, console=console)
    return result


def write_outputs(rc: RunConfig, result: RunResult, output_dir: str, *, command: list[str], console=None):
    """Everything a finished run leaves behind: plots, report.json, report.md, the terminal view, then W&B."""
    console = console or terminal.make_console()
    os.makedirs(output_dir, exist_ok=True)
    plot_files = plots.draw_all(result.outcomes, output_dir)
    env = environment.environment()
    report = writer.build_report(result, config=rc.raw, command=command, environment=env, plots=plot_files)
    writer.write_json(report, output_dir)
    writer.write_markdown(report, output_dir)
    terminal.print_report(console, report, output_dir)
    if rc.logger.kind == "wandb":
        from harness.report import wandb_logger

        try:
            wandb_logger.log_run(rc, result, report, output_dir, plot_files)
        except Exception as err:  # the local report is already on disk; say what failed and go on
            print(f"harness: warning: W&B logging failed ({type(err).__name__}: {err}); the local report in "
                  f"{output_dir} is complete", file=sys.stderr)
    return report
