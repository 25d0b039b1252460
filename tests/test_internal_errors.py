"""A crash is never healthy: a diagnostic that crashes on something unforeseen is an internal error of that
diagnostic, named by the exception's own type and message (never JAX's traceback-filtering note); the others still
run, the report says ``internal_error``, the traceback goes to ``harness.log`` and the CLI exits 3, with
``debug=true`` too.

The crash planted here is the one users met: Flax's ``TraceContextError`` ("Cannot mutate RngCount from a
different trace level"), which JAX raises with its "For simplicity, JAX has removed its internal frames ..." note.
In-process through :func:`harness.cli.main` (same Hydra entry point), plus one real process for Hydra's own
job logging."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import types

import pytest
from helpers import cli_env, replace_group, run_dirs

from harness import cli
from harness.checks.base import Outcome
from harness.findings import InternalError, error, exception_message

JAX_NOTE = "For simplicity, JAX has removed"
TINY = [*replace_group("data", "helpers.tiny_classification"), "model.width=8", "model.depth=1"]
NO_HYDRA_LOGGING = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
MESSAGE = "Cannot mutate RngCount from a different trace level"


def mutate_rngs_under_jit():
    """Raises flax.errors.TraceContextError, with JAX's filtering note attached, like a real diagnostic bug."""
    import jax
    from flax import nnx

    rngs = nnx.Rngs(0)
    jax.jit(lambda x: x + jax.random.normal(rngs(), ()))(1.0)


def crashing_model_check(ctx, settings):
    mutate_rngs_under_jit()


def data_check_with_an_error(ctx, settings):
    return Outcome("data", findings=[error("data.nonfinite", "3 rows contain NaN.", "Drop them.")],
                   metrics={"data/num_train": 96})


def plant(monkeypatch, runs: dict):
    import harness.pipeline

    real = harness.pipeline.diagnostic_module
    monkeypatch.setattr(harness.pipeline, "diagnostic_module",
                        lambda name: types.SimpleNamespace(run=runs[name]) if name in runs else real(name))


def run_main(args, run_dir, monkeypatch) -> int:
    os.makedirs(run_dir.parent, exist_ok=True)
    monkeypatch.chdir(run_dir.parent)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*TINY, *args, "logger=none", "engine.compilation_cache=null", f"hydra.run.dir={run_dir}",
                  *NO_HYDRA_LOGGING])
    return exit_info.value.code


def test_the_message_is_the_exceptions_own_never_jaxs_note():
    with pytest.raises(Exception) as info:
        mutate_rngs_under_jit()
    err = info.value
    assert any(JAX_NOTE in n for n in getattr(err, "__notes__", [])), "the planted error carries JAX's note"
    crash = InternalError.from_exception("seeds", err)
    assert (crash.diagnostic, crash.type) == ("seeds", "TraceContextError")
    assert crash.message.startswith(MESSAGE) and JAX_NOTE not in crash.summary
    assert crash.summary.startswith(f"TraceContextError: {MESSAGE}")
    assert "Traceback" in crash.traceback and "mutate_rngs_under_jit" in crash.traceback
    assert InternalError.from_dict(crash.to_dict()) == crash
    # Only the first line of a multi-line message; a note that some versions put into the message is dropped.
    assert exception_message(ValueError(f"{JAX_NOTE} its internal frames.\n----\nreal problem\nmore")) == "real problem"
    assert exception_message(RuntimeError()) == ""


@pytest.mark.parametrize("debug", [False, True])
def test_a_crashed_diagnostic_exits_3_and_logs_its_traceback(tmp_path, monkeypatch, capsys, debug):
    plant(monkeypatch, {"data": data_check_with_an_error, "model": crashing_model_check})
    run_dir = tmp_path / "run"
    args = ["diagnostics.run=[data,model]", "fail_on_error=true", *(["debug=true"] if debug else [])]
    assert run_main(args, run_dir, monkeypatch) == cli.EXIT_INTERNAL  # not 1 (fail_on_error), not a raise (debug)
    out, err = capsys.readouterr()

    report = json.load(open(run_dir / "report.json"))
    assert report["status"] == "internal_error"
    [crash] = report["internal_errors"]
    assert (crash["diagnostic"], crash["type"]) == ("model", "TraceContextError")
    assert crash["message"].startswith(MESSAGE) and JAX_NOTE not in crash["message"]
    assert report["diagnostics"]["model"]["status"] == "crashed"
    assert report["diagnostics"]["model"]["internal_error"]["type"] == "TraceContextError"
    assert JAX_NOTE not in report["diagnostics"]["model"]["skipped"]
    # The other diagnostic still ran and its finding is reported.
    assert report["diagnostics"]["data"]["status"] == "error" and report["metrics"] == {"data/num_train": 96}
    assert report["first_to_fix"]["id"] == "data.nonfinite"

    summary = f"diagnostic model crashed: TraceContextError: {MESSAGE}"
    flat = " ".join(out.split())  # the terminal view wraps at the console's width
    assert "status: internal_error" in flat and f"internal error: {summary}" in flat
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# 💥 harness report: internal_error") and summary in md and "harness.log" in md
    assert f"harness: error: internal error: {summary}" in err and str(run_dir / "harness.log") in err
    own_lines = "\n".join(line for line in err.splitlines() if line.startswith("harness:"))
    for text in (out, md.split("<details>")[0], own_lines):
        assert JAX_NOTE not in text  # JAX's note never stands in for the message

    log = (run_dir / "harness.log").read_text()
    assert f"[harness][ERROR] - internal error: {summary}" in log
    assert "Traceback (most recent call last)" in log and "crashing_model_check" in log
    # The traceback is printed only on request.
    assert ("Traceback (most recent call last)" in err) is debug
    assert "Traceback" not in out


def test_a_crash_outranks_fail_on_error_and_no_crash_keeps_0_and_1(tmp_path, monkeypatch):
    plant(monkeypatch, {"data": data_check_with_an_error})
    assert run_main(["diagnostics.run=[data]"], tmp_path / "a", monkeypatch) == cli.EXIT_OK
    assert run_main(["diagnostics.run=[data]", "fail_on_error=true"], tmp_path / "b", monkeypatch) == cli.EXIT_FINDINGS
    assert not os.path.exists(tmp_path / "a" / "harness.log")  # nothing crashed, nothing logged (Hydra logging off)


def test_a_bug_outside_the_diagnostics_exits_3_with_debug_too(tmp_path, monkeypatch, capsys):
    import harness.report.writer

    plant(monkeypatch, {"data": data_check_with_an_error})

    def broken(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(harness.report.writer, "write_markdown", broken)
    assert run_main(["diagnostics.run=[data]", "debug=true"], tmp_path / "run", monkeypatch) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "harness: error: internal error: KeyError: 'oops'" in err
    log = (tmp_path / "run" / "harness.log").read_text()
    assert "KeyError: 'oops'" in log and "Traceback (most recent call last)" in log


def test_a_collapsed_sweep_point_that_crashes_exits_3(tmp_path, monkeypatch, capsys):
    """The harness sweeper runs points that differ only in the learning rate as one job (harness.sweeps.collapse):
    a point whose diagnostic crashes is an internal error of that point, with its own harness.log."""
    def model_check(ctx, settings):
        if ctx.optim.lr > 0.05:
            mutate_rngs_under_jit()
        return Outcome("model")

    plant(monkeypatch, {"data": data_check_with_an_error, "model": model_check})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-m", *TINY, "diagnostics.run=[data,model]", "optim.lr=0.01,0.1", "logger=none",
                  "engine.compilation_cache=null", f"hydra.sweep.dir={tmp_path}/sweep", *NO_HYDRA_LOGGING])
    assert exit_info.value.code == cli.EXIT_INTERNAL
    ok, crashed = (json.load(open(tmp_path / "sweep" / str(i) / "report.json")) for i in (0, 1))
    assert ok["status"] == "unhealthy" and crashed["status"] == "internal_error"
    assert crashed["internal_errors"][0]["type"] == "TraceContextError"
    assert "Traceback" in (tmp_path / "sweep" / "1" / "harness.log").read_text()
    assert not os.path.exists(tmp_path / "sweep" / "0" / "harness.log")
    assert "internal error in sweep point 1: diagnostic model crashed" in capsys.readouterr().err


def test_a_real_process_logs_the_traceback_to_hydras_harness_log(tmp_path):
    """With Hydra's own job logging (console + <run dir>/harness.log): the traceback goes to the file only."""
    import subprocess

    code = textwrap.dedent(f"""
        import sys, types
        import harness.pipeline
        from test_internal_errors import crashing_model_check
        real = harness.pipeline.diagnostic_module
        harness.pipeline.diagnostic_module = (
            lambda name: types.SimpleNamespace(run=crashing_model_check) if name == "model" else real(name))
        sys.argv = ["harness", *{[*TINY, "diagnostics.run=[data,model]", "logger=none"]!r}]
        from harness.cli import console_main
        console_main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == cli.EXIT_INTERNAL, proc.stderr
    [run_dir] = run_dirs(str(tmp_path))
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert report["status"] == "internal_error" and report["diagnostics"]["data"]["status"] != "crashed"
    log = open(os.path.join(run_dir, "harness.log")).read()
    assert f"internal error: diagnostic model crashed: TraceContextError: {MESSAGE}" in log
    assert "Traceback (most recent call last)" in log
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr  # without debug: the file only
    assert f"harness: error: internal error: diagnostic model crashed: TraceContextError: {MESSAGE}" in proc.stderr


def test_the_report_terminal_and_wandb_summary_name_the_crash():
    """Built from a RunResult directly: report.json's keys, the terminal footer and the W&B summary."""
    from rich.console import Console

    from harness.pipeline import RunResult
    from harness.report import terminal, writer
    from harness.report.wandb_logger import main_summary

    crash = InternalError("seeds", "TraceContextError", MESSAGE, "Traceback (most recent call last):\n  ...")
    outcomes = [Outcome("data", metrics={"data/num_train": 96}),
                Outcome("seeds", skipped=f"crashed: {crash.summary}", internal_error=crash)]
    result = RunResult(outcomes, [], RunResult.status_of(outcomes), 1.0)
    assert result.status == "internal_error" and result.internal_errors == [crash] and not result.has_error
    report = writer.build_report(result, config={}, command=["harness"], environment={})
    assert report["internal_errors"] == [crash.to_dict()]
    assert report["diagnostics"]["data"]["internal_error"] is None

    console = Console(record=True, width=200, force_terminal=False, color_system=None)
    terminal.print_report(console, report, "/runs/x")
    text = console.export_text()
    assert f"internal error: diagnostic seeds crashed: TraceContextError: {MESSAGE}" in text
    assert "did not run" not in text  # it crashed: said as such, not as a skip

    summary = main_summary(report, result)
    assert summary["status"] == "internal_error" and summary["num_internal_errors"] == 1
    assert summary["internal_error/seeds"] == f"TraceContextError: {MESSAGE}"
    assert summary["seeds/status"] == "crashed"
