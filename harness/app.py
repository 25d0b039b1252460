"""One run, start to finish: compile cache, progress, diagnostics, report files, terminal view, W&B.

The local report (report.json, report.md, plots) is written before anything is sent to W&B, and a logging failure
only costs a warning: nothing the user produced is lost. W&B's import and service start (about 1.2 s) happen in a
background thread while the diagnostics compute.
"""

from __future__ import annotations

import os
import sys

from harness.config import RunConfig
from harness.engine.compile import enable_persistent_cache
from harness.pipeline import RunResult, run
from harness.report import environment, plots, terminal, writer


def _warn(message: str):
    print(f"harness: warning: {message}", file=sys.stderr)


def wandb_enabled(rc: RunConfig) -> bool:
    if rc.logger.kind != "wandb":
        return False
    from harness.report.wandb_logger import resolve_mode

    return resolve_mode(rc.logger.mode) != "disabled"


def run_and_report(rc: RunConfig, output_dir: str, *, command: list[str], console=None,
                   run_name: str | None = None, group: str | None = None) -> RunResult:
    """Run the checklist on ``rc`` and write its report into ``output_dir``.

    ``command`` is recorded for ``harness reproduce``; ``run_name`` and ``group`` name the W&B runs (defaults: the
    output directory's name and a fresh group; ``logger.group`` wins over ``group``).
    """
    return run_and_write(rc, output_dir, command=command, console=console, run_name=run_name, group=group)[0]


def run_and_write(rc: RunConfig, output_dir: str, *, command: list[str], console=None, run_name: str | None = None,
                  group: str | None = None, show_report: bool = True) -> tuple[RunResult, dict | None]:
    """:func:`run_and_report`, returning the report too (None in a process other than process 0, which writes
    nothing). ``show_report=False``: the terminal view is not printed (:func:`harness.diagnose` returns it as an
    object that renders itself); the progress display still shows."""
    from harness.engine.devices import is_primary

    enable_caches(rc)
    programs_since = writer.program_mark()  # this run's compiles, not the process's (a notebook runs many)
    console = console or terminal.make_console()
    if wandb_enabled(rc) and is_primary():
        from harness.report import wandb_logger

        wandb_logger.start_warmup(wandb_logger.resolve_mode(rc.logger.mode))
    # Plots are drawn in a worker thread while later diagnostics compute (process 0 alone writes).
    background = plots.BackgroundPlots(warn=_warn) if is_primary() else None

    def outcome_done(outcome):
        view.outcome_done(outcome)
        if background is not None:
            background.submit(outcome, output_dir)

    try:
        with terminal.progress(console, rc.diagnostics) as view:
            result = run(rc, progress=view.update, on_outcome=outcome_done)
    finally:
        if background is not None:
            background.close()
    if background is None:
        return result, None  # multi-host: every process holds every member's results; process 0 writes and logs
    report = write_outputs(rc, result, output_dir, command=command, console=console, run_name=run_name,
                           group=group, plot_files=background.files(result.outcomes, output_dir),
                           show_report=show_report, programs_since=programs_since)
    return result, report


def enable_caches(rc: RunConfig):
    """JAX's persistent compilation cache and harness's traced-program cache (``engine.compilation_cache``,
    ``engine.program_cache``). The user's factories' packages join the program cache's key: editing them must
    retrace their programs."""
    roots = {fc.target.split(".")[0] for fc in (rc.data, rc.model, rc.loss)
             if fc.obj is None or "." in fc.target}  # an in-memory object's target is module.qualname, or a label
    enable_persistent_cache(rc.compilation_cache, programs=rc.program_cache, code_roots=roots)


def write_outputs(rc: RunConfig, result: RunResult, output_dir: str, *, command: list[str], console=None,
                  run_name: str | None = None, group: str | None = None,
                  plot_files: dict[str, dict[str, str]] | None = None, show_report: bool = True,
                  programs_since: tuple | None = None, wandb_run=None) -> dict:
    """Everything a finished run leaves behind: plots, report.json, report.md, the terminal view, then W&B.
    Returns the report. ``plot_files``: plots already drawn (:class:`plots.BackgroundPlots`); None draws them.
    A collapsed sweep calls this once per point (:mod:`harness.sweeps.collapse`). ``programs_since``: count the
    compiled programs from this :func:`writer.program_mark` on (default: the whole process's). ``wandb_run``: a
    :class:`harness.report.wandb_logger.LiveRun` already open (``harness train``) gets the report instead of a
    new run."""
    console = console or terminal.make_console()
    log_to_wandb = wandb_enabled(rc)
    os.makedirs(output_dir, exist_ok=True)
    if plot_files is None:
        plot_files = plots.draw_all(result.outcomes, output_dir, warn=_warn)
    report = writer.build_report(result, config=rc.raw, command=command, environment=environment.environment(),
                                 plots=plot_files, choices=rc.choices, output_dir=os.path.abspath(output_dir),
                                 programs=writer.program_stats(programs_since))
    writer.write_json(report, output_dir)
    writer.write_markdown(report, output_dir)
    if show_report:
        terminal.print_report(console, report, output_dir)

    if log_to_wandb:
        from harness.report import wandb_logger

        try:
            if wandb_run is not None:
                logged = wandb_run.finish(result, report, output_dir, plot_files)
            else:
                logged = wandb_logger.log_run(rc, result, report, output_dir, plot_files, run_name=run_name,
                                              group=group)
            console.print(logged.describe(), style="dim", soft_wrap=True)
        except Exception as err:  # the local report is already on disk; say what failed and go on
            _warn(f"W&B logging failed ({type(err).__name__}: {err}); the local report in {output_dir} is complete")
    return report
