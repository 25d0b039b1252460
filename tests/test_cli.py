"""The ``harness`` command end to end: a real run in a subprocess (report files, W&B offline output, exit code),
bad input as one clear line with exit code 2 and no traceback, ``fail_on_error``, ``debug``.

Subprocess runs cost ~4 s each here (Python, JAX and Hydra start-up), so only three run in a subprocess; the rest
call :func:`harness.cli.main` in-process, which goes through the same Hydra entry point."""

from __future__ import annotations

import json
import os
import re
import types

import pytest
from helpers import offline_runs, replace_group, run_cli, run_dirs, wandb_summary

from harness import cli
from harness.checks.base import Outcome
from harness.errors import HarnessError
from harness.findings import error

TINY = [*replace_group("data", "helpers.tiny_classification"), "model.width=8", "model.depth=1"]


def assert_one_line_error(stderr: str, *fragments: str):
    """Exactly the harness's error message: no traceback, no Hydra hint, naming what is wrong."""
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, stderr
    assert stderr.startswith("harness: error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


# ----------------------------------------------------------------------------------------------------------------
# Subprocess: the real command


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    """``python -m harness`` from a fresh directory with W&B on (offline, the default)."""
    cwd = str(tmp_path_factory.mktemp("cli"))
    proc = run_cli([*TINY, "diagnostics.run=[data,model]", "logger.tags=[cli]"], cwd)
    return types.SimpleNamespace(cwd=cwd, proc=proc, dirs=run_dirs(cwd))


def test_run_writes_reports_into_the_hydra_run_directory(healthy_run):
    proc = healthy_run.proc
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "backend 'tpu'" not in proc.stderr
    [run_dir] = healthy_run.dirs
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert report["status"] == "healthy"
    assert list(report["diagnostics"]) == ["data", "model"]
    assert report["command"] == ["harness", *TINY, "diagnostics.run=[data,model]", "logger.tags=[cli]"]
    assert report["config"]["data"] == {"_target_": "helpers.tiny_classification"}
    assert report["environment"]["cwd"] == healthy_run.cwd
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # engine.cpu_devices=auto: one CPU device per core (at most 8), the members sharded across them.
        assert report["environment"]["device_count"] == min(len(os.sched_getaffinity(0)), 8)
    md = open(os.path.join(run_dir, "report.md")).read()
    assert md.startswith("# ✅ harness report: healthy") and "## Reproduce" in md
    assert os.path.exists(os.path.join(run_dir, ".hydra", "config.yaml"))


def test_run_prints_the_report_and_no_progress_when_piped(healthy_run):
    out = healthy_run.proc.stdout
    assert "harness report" in out and "status: healthy" in out
    assert "checklist:" not in out  # the progress view stays off when stdout is not a terminal
    assert f"report: {os.path.join(healthy_run.dirs[0], 'report.md')}" in out


def test_run_logs_offline_to_wandb_in_the_run_directory(healthy_run):
    run_dir = os.path.relpath(healthy_run.dirs[0], healthy_run.cwd)
    assert f"upload with: wandb sync {run_dir}/wandb/offline-run-*" in healthy_run.proc.stdout
    [wandb_run] = offline_runs(healthy_run.dirs[0])  # no sweep diagnostics ran: the main run only
    main = wandb_summary(wandb_run)
    assert main["state"] == "finished" and main["tags"] == ["cli"]
    assert main["config"]["data"]["_target_"] == "helpers.tiny_classification"
    assert main["config"]["model"]["width"] == 8
    assert main["summary"]["status"] == "healthy" and main["summary"]["num_errors"] == 0
    assert main["summary"]["findings"]["_type"] == "table-file"
    assert main["notes"].startswith("harness ~data")


def test_planted_nan_fails_ci_with_exit_code_1(tmp_path):
    """The real data check in a real process: NaN rows are a finding, not a crash; fail_on_error makes CI fail."""
    proc = run_cli([*replace_group("data", "helpers.tiny_classification", nan_rows=3), *TINY[2:],
                    "diagnostics.run=[data]", "logger=none", "fail_on_error=true"], str(tmp_path))
    [run_dir] = run_dirs(str(tmp_path))
    report = json.load(open(os.path.join(run_dir, "report.json")))
    if "not implemented" in (report["diagnostics"]["data"]["skipped"] or ""):
        pytest.skip("the data diagnostic is not implemented yet")
    assert proc.returncode == cli.EXIT_FINDINGS, proc.stderr
    assert "Traceback" not in proc.stderr
    assert report["status"] == "unhealthy" and report["first_to_fix"]["id"] == "data.nonfinite"
    assert "root cause: data.nonfinite" in proc.stdout


PROJECT_LOADER = """
def load(path="train.npz"):
    raise FileNotFoundError(f"no such file: {path}")
"""


@pytest.mark.parametrize("args, fragments", [
    # a factory in the user's project directory (importable because harness runs from there) that raises
    ([*replace_group("data", "my_loader.load")], ["data: the data factory my_loader.load raised FileNotFoundError: "
                                                    "no such file: train.npz"]),
    (["data=nope"], ["Could not find 'data/nope'", "Available options in 'data'", "wine"]),
])
def test_bad_input_in_a_real_process(tmp_path, args, fragments):
    (tmp_path / "my_loader.py").write_text(PROJECT_LOADER)
    proc = run_cli([*args, "logger=none"], str(tmp_path), module=False)  # the installed `harness` script
    assert proc.returncode == cli.EXIT_BAD_INPUT
    assert_one_line_error(proc.stderr, *fragments)
    assert "Config search path" not in proc.stderr
    assert proc.stdout == ""


# ----------------------------------------------------------------------------------------------------------------
# In-process: the same entry point, without paying a process start-up per case


# In-process, Hydra must not reconfigure logging: dictConfig closes every handler, and a handler made at import
# time (absl's) holds one of pytest's capture streams.
NO_HYDRA_LOGGING = ["hydra/job_logging=none", "hydra/hydra_logging=none"]


def run_main(args, tmp_path, monkeypatch) -> int:
    os.makedirs(tmp_path, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "logger=none", "engine.compilation_cache=null", f"hydra.run.dir={tmp_path}/run",
                  *NO_HYDRA_LOGGING])
    return exit_info.value.code


TINY_MODEL = ["model.width=8", "model.depth=1"]
TINY_DATA = replace_group("data", "helpers.tiny_classification")


@pytest.mark.parametrize("args, fragments", [
    ([*TINY_DATA, "optim.lr=-1"], ["optim.lr: must be positive, got -1"]),
    ([*TINY_DATA, "optim.lr=abc"], ["optim.lr: must be a number, got 'abc'"]),
    ([*TINY_DATA, "optim.b1=abc"], ["optim: optax.adam(b1='abc'", "does not work as an optimizer"]),
    ([*TINY_DATA, "diagnostics.run=[nope]"], ["diagnostics.run: unknown diagnostic 'nope'; valid: data, model"]),
    ([*TINY_DATA, "diagnostics.run=[]"], ["diagnostics.run: is empty"]),
    ([*TINY_DATA, "optim.lrr=1"], ["Could not override 'optim.lrr'", "+optim.lrr=1"]),
    ([*TINY_DATA, "+optim.lrr=1"], ["optim.lrr: optax.adam takes no argument 'lrr'"]),
    ([*TINY_DATA, "batch_size=0"], ["batch_size: must be positive, got 0"]),
    ([*TINY_DATA, "model.activation=nope"], ["model.activation: unknown value 'nope'"]),
    ([*TINY_DATA, "model._target_=nowhere.Model"], ["model._target_: cannot import 'nowhere.Model'"]),
    ([*TINY_DATA, *replace_group("loss", "helpers.failing_data")],
     ["loss: the loss factory helpers.failing_data raised ValueError"]),
    ([*TINY_DATA, *replace_group("model", "helpers.failing_factory")],
     ["model: building the model with helpers.failing_factory raised RuntimeError: factory exploded on purpose"]),
    (["data=nope"], ["Could not find 'data/nope'"]),
    (["data=file"], ["data.path: is required"]),
    (replace_group("data", "helpers.failing_data"),
     ["data: the data factory helpers.failing_data raised ValueError: corrupt shard 3 in /data/train"]),
    (replace_group("data", "helpers.tiny_classification", nope=1),
     ["data: calling helpers.tiny_classification failed", "unexpected keyword argument 'nope'"]),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, args, fragments):
    model = [] if "~model" in args else TINY_MODEL
    code = run_main(["diagnostics.run=[data]", *model, *args], tmp_path, monkeypatch)
    captured = capsys.readouterr()
    assert code == cli.EXIT_BAD_INPUT, captured
    assert_one_line_error(captured.err, *fragments)
    assert not os.path.exists(tmp_path / "run" / "report.json")  # nothing ran


def test_missing_data_file_names_the_file(tmp_path, monkeypatch, capsys):
    pytest.importorskip("harness.data.files", reason="the file loader is not there yet")
    code = run_main(["data=file", "data.path=missing.npz", "diagnostics.run=[data]"], tmp_path, monkeypatch)
    assert code == cli.EXIT_BAD_INPUT
    assert_one_line_error(capsys.readouterr().err, "missing.npz")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HarnessError, match="optim.lr: must be a number"):
        cli.main(["optim.lr=abc", "logger=none", "debug=true", f"hydra.run.dir={tmp_path}/a", *NO_HYDRA_LOGGING])
    monkeypatch.setenv("HARNESS_DEBUG", "1")
    with pytest.raises(Exception, match="Could not override 'optim.lrr'"):
        cli.main(["optim.lrr=1", "logger=none", f"hydra.run.dir={tmp_path}/b", *NO_HYDRA_LOGGING])
    assert os.environ.get("HYDRA_FULL_ERROR") is None  # what the CLI set for Hydra does not leak


def fake_data_check(monkeypatch, run):
    import harness.pipeline

    monkeypatch.setattr(harness.pipeline, "diagnostic_module", lambda name: types.SimpleNamespace(run=run))


def nan_rows_found(ctx, settings):
    return Outcome("data", findings=[error("data.nonfinite", "3 rows contain NaN.", "Drop them.")])


def test_fail_on_error_sets_exit_code_1(tmp_path, monkeypatch, capsys):
    fake_data_check(monkeypatch, nan_rows_found)
    args = [*TINY, "diagnostics.run=[data]"]
    assert run_main([*args, "fail_on_error=true"], tmp_path / "a", monkeypatch) == cli.EXIT_FINDINGS
    assert run_main(args, tmp_path / "b", monkeypatch) == cli.EXIT_OK  # reported, but not a failure
    out = capsys.readouterr().out
    assert "root cause: data.nonfinite" in out
    assert json.load(open(tmp_path / "a" / "run" / "report.json"))["status"] == "unhealthy"


def test_a_bug_in_harness_is_one_line_with_exit_code_3(tmp_path, monkeypatch, capsys):
    import harness.report.writer

    fake_data_check(monkeypatch, nan_rows_found)

    def broken(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(harness.report.writer, "write_markdown", broken)
    assert run_main([*TINY, "diagnostics.run=[data]"], tmp_path, monkeypatch) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert_one_line_error(err, "internal error: KeyError: 'oops'", f"{tmp_path / 'run' / 'harness.log'}",
                          "debug=true prints it")
    assert os.path.exists(tmp_path / "run" / "report.json")  # written before the failing step
    log = (tmp_path / "run" / "harness.log").read_text()  # the traceback, for the bug report
    assert "Traceback (most recent call last)" in log and "KeyError: 'oops'" in log


def test_a_sweep_exits_with_its_worst_code(tmp_path, monkeypatch, capsys):
    fake_data_check(monkeypatch, nan_rows_found)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-m", "hydra/sweeper=basic", *TINY, "diagnostics.run=[data]", "optim.lr=0.01,-1", "logger=none",
                  "engine.compilation_cache=null", f"hydra.sweep.dir={tmp_path}/sweep", *NO_HYDRA_LOGGING])
    assert exit_info.value.code == cli.EXIT_BAD_INPUT  # the second point is bad input
    assert os.path.exists(tmp_path / "sweep" / "0" / "report.json")  # the first still ran
    assert "optim.lr: must be positive, got -1" in capsys.readouterr().err


def test_wandb_names_follow_hydra(tmp_path):
    from hydra.types import RunMode

    def hc(mode, overrides, sweep="multirun/lr-1a2b"):
        return types.SimpleNamespace(mode=mode, overrides=types.SimpleNamespace(task=overrides),
                                     sweep=types.SimpleNamespace(dir=sweep),
                                     runtime=types.SimpleNamespace(output_dir="/x/outputs/2026-01-02/03-04-05"))

    assert cli._wandb_names(hc(RunMode.RUN, ["optim.lr=0.1", "logger.tags=[a]"])) == (
        "optim.lr=0.1", "run-2026-01-02_03-04-05")
    assert cli._wandb_names(hc(RunMode.RUN, [])) == ("defaults", "run-2026-01-02_03-04-05")
    assert cli._wandb_names(hc(RunMode.MULTIRUN, ["seed=1"])) == ("seed=1", "sweep-lr-1a2b")
    assert cli._wandb_names(hc(RunMode.MULTIRUN, ["seed=1"], "multirun/sweep-0f3c")) == ("seed=1", "sweep-0f3c")


def test_exit_codes_are_documented():
    doc = cli.__doc__
    for code in (cli.EXIT_OK, cli.EXIT_FINDINGS, cli.EXIT_BAD_INPUT, cli.EXIT_INTERNAL):
        assert re.search(rf"^\* {code}: ", doc, re.M)


class _Exited(Exception):
    def __init__(self, how, code):
        super().__init__(how, code)
        self.how, self.code = how, code


@pytest.mark.parametrize("raised, code", [(None, 0), (SystemExit(None), 0), (SystemExit(2), 2),
                                          (SystemExit("bad"), 1)])
def test_the_script_exits_promptly_with_mains_code(monkeypatch, raised, code):
    """``console_main`` ends the process with os._exit after the atexit handlers (skipping the slow teardown of
    JAX's objects), keeping main's exit code by sys.exit's rules."""
    import atexit

    def fake_main():
        if raised is not None:
            raise raised

    ran = []
    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: ran.append("atexit"))
    monkeypatch.setattr(os, "_exit", lambda c: (_ for _ in ()).throw(_Exited("os._exit", c)))
    with pytest.raises(_Exited) as exited:
        cli.console_main()
    assert (exited.value.how, exited.value.code) == ("os._exit", code)
    assert ran == ["atexit"]


def test_the_script_exits_normally_while_a_worker_thread_is_unfinished(monkeypatch):
    """A live non-daemon thread means unfinished work: exit the normal way, which waits for it."""
    import threading

    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    monkeypatch.setattr(cli, "main", lambda: None)
    monkeypatch.setattr(os, "_exit", lambda c: pytest.fail("must not end the process under a live thread"))
    try:
        with pytest.raises(SystemExit) as exited:
            cli.console_main()
        assert exited.value.code == 0
    finally:
        release.set()
        worker.join()
