"""The report: report.json / report.md contents, atomic writes, plots, the terminal view, the environment record,
and the pipeline's crashed-diagnostic path end to end (in-process, fake diagnostics: no training)."""

from __future__ import annotations

import json
import os
import subprocess
import types

import numpy as np
import pytest
from helpers import compose, replace_group
from rich.console import Console

from harness.checks.base import Outcome, Plot
from harness.findings import error, info, warning
from harness.pipeline import RunResult
from harness.report import environment, plots, terminal, writer
from harness.report import format as fmt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def draw_line(path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([3.0, 1.0, 0.1])
    fig.savefig(path)


def draw_without_saving(path):
    import matplotlib.pyplot as plt

    plt.plot([1.0, 2.0])  # forgot savefig: the report saves the open figure


def draw_broken(path):
    raise ValueError("all-NaN curve")


def fake_outcomes() -> list[Outcome]:
    """A run as the diagnostics would report it: the model stage listed first on purpose, so ordering is tested."""
    return [
        Outcome("model", findings=[
            warning("model.initial_loss", "Initial loss 4.8 is far from -log(1/10) = 2.30.",
                    "Scale the output layer's init down.", observed=4.8, expected=2.303),
            error("model.gradient_flow", "Layer out receives no gradient.", "Check for a stop_gradient.",
                  layers=["out"]),
        ], metrics={"model/initial_loss": 4.8, "model/expected_initial_loss": 2.303}, seconds=1.25),
        Outcome("data", findings=[
            error("data.nonfinite", "3 training examples contain NaN.", "Drop or impute them.",
                  rows=np.array([12, 40, 99]), fraction=np.float32(0.0022)),
        ], metrics={"data/num_train": 1347, "data/nonfinite_rows": np.int64(3), "data/ratio": float("nan")},
            seconds=0.31),
        Outcome("overfit_batch", metrics={"overfit_batch/final_loss": 0.003},
                plots=[Plot("curve", "Overfitting one batch", draw_line),
                       Plot("unsaved", "Unsaved figure", draw_without_saving),
                       Plot("broken", "Broken plot", draw_broken)], seconds=2.0),
        Outcome("lr_range", findings=[info("train.learning_rate", "lr 1e-3 is inside the good range.", "",
                                           good_range=[3e-4, 3e-2])],
                members=[{"lr": 10.0 ** e, "final_loss": 1.0 / (1 + e * e), "diverged": e > 0} for e in range(-4, 2)],
                series={"loss": np.linspace(2.0, 0.1, 50)}, seconds=1.0),
        Outcome("capacity", skipped="crashed: RuntimeError: shapes do not match"),
    ]


def fake_result() -> RunResult:
    outcomes = fake_outcomes()
    findings = [f for o in outcomes for f in o.findings]
    return RunResult(outcomes, findings, "unhealthy", 4.56)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A report built from the fake run and written to disk once for the module."""
    out = str(tmp_path_factory.mktemp("report"))
    result = fake_result()
    warnings = []
    plot_files = plots.draw_all(result.outcomes, out, warn=warnings.append)
    report = writer.build_report(result, config={"optim": {"lr": 0.001}, "seed": 0},
                                 command=["harness", "optim.lr=0.001"], environment={"cwd": "/somewhere"},
                                 plots=plot_files, choices={"data": "digits", "model": "mlp"}, output_dir=out)
    writer.write_json(report, out)
    writer.write_markdown(report, out)
    return types.SimpleNamespace(dir=out, report=report, plots=plot_files, warnings=warnings)


# ----------------------------------------------------------------------------------------------------------------
# Formatting


@pytest.mark.parametrize("value, text", [
    (None, "–"), (True, "yes"), (3, "3"), (0.1234567, "0.1235"), (2.0, "2"), (1.5e-5, "1.5e-05"),
    (123456.0, "1.23e+05"), (float("nan"), "nan"), (float("-inf"), "-inf"), ("text", "text"),
])
def test_number(value, text):
    assert fmt.number(value) == text


def test_value_shortens_long_lists_and_strings():
    assert fmt.value([1, 2, 3]) == "[1, 2, 3]"
    assert fmt.value(list(range(100))) == "[100 values, min 0, max 99]"
    assert fmt.value(["a"] * 10) == "[a, a, a, a, a, a, … 4 more]"
    assert fmt.value("x" * 500).endswith("…") and len(fmt.value("x" * 500)) == 120


def test_findings_group_by_stage_in_checklist_order():
    findings = [
        {"id": "train.learning_rate", "severity": "warning", "diagnostic": "lr_range"},
        {"id": "model.dead_units", "severity": "warning", "diagnostic": "model"},
        {"id": "model.forward", "severity": "error", "diagnostic": "model"},
        {"id": "data.leakage", "severity": "info", "diagnostic": None},  # stage from the id's prefix
        {"id": "data.nonfinite", "severity": "error", "diagnostic": "data"},
    ]
    grouped = fmt.by_stage(findings)
    assert [stage for stage, _ in grouped] == ["data", "model", "hyperparameters"]
    assert [f["id"] for f in grouped[0][1]] == ["data.nonfinite", "data.leakage"]
    assert [f["id"] for f in grouped[1][1]] == ["model.forward", "model.dead_units"]  # errors first


def test_counts_text():
    assert fmt.counts_text({"error": 0, "warning": 0, "info": 0}) == "no findings"
    assert fmt.counts_text({"error": 1, "warning": 2, "info": 1}) == "1 error, 2 warnings, 1 info"


def test_dumps_is_json_with_scalar_lists_on_one_line():
    data = {"a": [1, 2.5, None, "x"], "b": {"c": []}, "d": [{"e": 1}]}
    text = fmt.dumps(data)
    assert json.loads(text) == data
    assert '"a": [1, 2.5, null, "x"]' in text


# ----------------------------------------------------------------------------------------------------------------
# report.json


def test_report_json_has_the_documented_keys(written):
    report = json.load(open(os.path.join(written.dir, "report.json")))
    for key in ("status", "findings", "metrics", "diagnostics", "programs", "config", "command", "environment"):
        assert key in report
    assert report["status"] == "unhealthy"
    assert report["counts"] == {"error": 2, "warning": 1, "info": 1}
    assert report["command"] == ["harness", "optim.lr=0.001"]
    assert report["config"]["optim"]["lr"] == 0.001


def test_first_to_fix_is_the_earliest_error_in_checklist_order(written):
    # model's error was reported first, but a data error comes earlier in the checklist.
    first = written.report["first_to_fix"]
    assert (first["id"], first["diagnostic"], first["stage"]) == ("data.nonfinite", "data", "data")
    assert [f["id"] for f in written.report["findings"]] == [
        "data.nonfinite", "model.gradient_flow", "model.initial_loss", "train.learning_rate"]


def test_report_json_holds_plain_values(written):
    report = json.load(open(os.path.join(written.dir, "report.json")))
    finding = report["findings"][0]
    assert finding["evidence"] == {"rows": [12, 40, 99], "fraction": pytest.approx(0.0022)}
    assert report["metrics"]["data/nonfinite_rows"] == 3
    assert report["metrics"]["data/ratio"] == "nan"  # JSON has no NaN: recorded as text
    capacity = report["diagnostics"]["capacity"]
    assert capacity["status"] == "crashed" and "shapes do not match" in capacity["skipped"]
    assert report["diagnostics"]["data"]["status"] == "error"
    assert report["diagnostics"]["overfit_batch"]["status"] == "ok"
    assert len(report["diagnostics"]["lr_range"]["members"]) == 6


def test_report_files_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    writer.atomic_write(str(path), "old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        writer.atomic_write(str(path), "new")
    assert path.read_text() == "old"  # the previous report survives
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # no temporary file left behind


# ----------------------------------------------------------------------------------------------------------------
# Plots and report.md


def test_plots_are_drawn_robustly(written):
    assert set(written.plots) == {"overfit_batch/curve", "overfit_batch/unsaved"}
    for p in written.plots.values():
        with open(os.path.join(written.dir, p["path"]), "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert len(written.warnings) == 1 and "overfit_batch/broken" in written.warnings[0]
    assert "all-NaN curve" in written.warnings[0]
    assert sorted(os.listdir(os.path.join(written.dir, "plots"))) == [
        "overfit_batch-curve.png", "overfit_batch-unsaved.png"]  # no temporary files


def test_no_plots_means_no_matplotlib_work(tmp_path):
    assert plots.draw_all([Outcome("data")], str(tmp_path)) == {}
    assert not os.path.exists(tmp_path / "plots")


def test_plot_names_are_made_file_safe_and_unique(tmp_path):
    outcome = Outcome("model", plots=[Plot("grad norms/layer", "A", draw_line), Plot("grad norms/layer", "B", draw_line)])
    files = plots.draw_all([outcome], str(tmp_path))
    assert [p["path"] for p in files.values()] == ["plots/model-grad_norms_layer.png",
                                                  "plots/model-grad_norms_layer-2.png"]


def test_background_plots_match_draw_all_whatever_the_arrival_order(tmp_path):
    outcomes = [Outcome("data", plots=[Plot("a", "A", draw_line)]),
                Outcome("seeds", plots=[Plot("b", "B", draw_line), Plot("broken", "Broken", draw_broken)]),
                Outcome("capacity", plots=[Plot("c", "C", draw_line)])]
    warnings: list[str] = []
    background = plots.BackgroundPlots(warn=warnings.append)
    background.submit(outcomes[1], str(tmp_path / "bg"))  # finished first (diagnostics run side by side)
    background.submit(outcomes[0], str(tmp_path / "bg"))  # capacity never submitted: drawn by files()
    background.submit(outcomes[0], str(tmp_path / "other"))  # another sweep point's directory
    files = background.files(outcomes, str(tmp_path / "bg"))
    expected = plots.draw_all(outcomes, str(tmp_path / "fg"), warn=lambda m: None)
    assert files == expected and list(files) == ["data/a", "seeds/b", "capacity/c"]
    assert all((tmp_path / "bg" / f["path"]).stat().st_size > 0 for f in files.values())
    assert len(warnings) == 1 and "seeds/broken" in warnings[0]
    assert background.files(outcomes[:1], str(tmp_path / "other")) == {"data/a": expected["data/a"]}


def test_markdown_reads_in_checklist_order(written):
    md = open(os.path.join(written.dir, "report.md")).read()
    assert md.startswith("# ❌ harness report: unhealthy")
    assert "**Root cause** (error, `data.nonfinite`): 3 training examples contain NaN." in md
    # stages in the checklist's order, each finding with its fix and evidence
    assert md.index("### Data") < md.index("### Model") < md.index("### Hyperparameters")
    assert "**Fix:** Drop or impute them." in md
    assert "| `rows` | [12, 40, 99] |" in md
    # the diagnostics table, with the crashed one and its reason
    assert "| `capacity` | Hyperparameters | 💥 crashed: RuntimeError: shapes do not match | – |  |" in md
    assert "| `model` | Model | ❌ 1 error, 1 warning | 1.2 s | initial_loss 4.8, expected_initial_loss 2.303 |" in md
    # plots linked relative to the report, members and metrics listed, how to reproduce
    assert "![Overfitting one batch](plots/overfit_batch-curve.png)" in md
    assert "<code>lr_range</code>: 6 members" in md
    assert "| `data/ratio` | nan |" in md
    assert "cd /somewhere\nharness optim.lr=0.001" in md


def test_markdown_of_a_healthy_run(tmp_path):
    result = RunResult([Outcome("data", metrics={"data/num_train": 10}, seconds=0.1)], [], "healthy", 0.2)
    report = writer.build_report(result, config={}, command=["harness"], environment={})
    md = writer.render_markdown(report)
    assert md.startswith("# ✅ harness report: healthy")
    assert "No findings: every check that ran passed." in md and "Root cause" not in md


# ----------------------------------------------------------------------------------------------------------------
# Terminal


def render(report, width=140) -> str:
    console = Console(record=True, width=width, force_terminal=False, color_system=None)
    terminal.print_report(console, report, "/runs/x")
    return console.export_text()


def test_terminal_report(written):
    text = render(written.report)
    assert text.index("Data") < text.index("Model") < text.index("Hyperparameters")
    assert "data.nonfinite" in text and "fix: Drop or impute them." in text
    assert "evidence: rows=[12, 40, 99], fraction=0.0022" in text
    assert "crashed: RuntimeError: shapes do not match" in text
    assert "status: unhealthy  2 errors, 1 warning, 1 info" in text
    lines = text.strip().splitlines()
    # The diagnosis first, above the findings; its id again on the last lines a user sees.
    assert lines[1].startswith("root cause: data.nonfinite: 3 training examples contain NaN.")
    assert text.index("root cause: data.nonfinite:") < text.index("Data") and "fix" in lines[2] + lines[3]
    assert lines[-2] == "root cause: data.nonfinite (diagnosis at the top of the report)"
    assert text.strip().endswith("report: /runs/x/report.md")


def test_terminal_report_from_disk_matches(written):
    from_disk = json.load(open(os.path.join(written.dir, "report.json")))
    assert render(from_disk) == render(written.report)


def test_progress_is_silent_without_a_terminal():
    console = Console(record=True, force_terminal=False)
    with terminal.progress(console, ("data", "model")) as view:
        view.update("seeds", 5, 10)
        view.outcome_done(Outcome("data"))
    assert console.export_text() == ""


def test_progress_on_a_terminal_tracks_diagnostics(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    console = Console(record=True, force_terminal=True, width=100)
    from rich.text import Text

    def description(view):
        return Text.from_markup(view._describe()).plain

    with terminal.progress(console, ("data", "model")) as view:
        assert description(view) == "checklist: data (1/2)"
        view.update("seeds", 5, 10)
        view.update("data/reload", 1, 4)
        view.outcome_done(Outcome("data", findings=[error("data.nonfinite", "x")]))
        assert description(view) == "checklist: model (2/2)  1 error so far"
        # A finished diagnostic hides its own bars only: "seeds" may still be training beside it.
        assert set(view._tasks) == {"seeds"}
        # A training bar says how long it has left; the checklist line, whose items differ in length, does not.
        remaining = next(c for c in view._progress.columns if isinstance(c, terminal.TrainingTimeRemaining))
        tasks = {t.id: t for t in view._progress.tasks}
        assert remaining.render(tasks[view._overall]).plain == ""
        assert remaining.render(tasks[view._tasks["seeds"]]).plain != ""


# ----------------------------------------------------------------------------------------------------------------
# Environment


def test_environment_records_versions_devices_and_git(tmp_path, monkeypatch):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f.txt").write_text("a")
    subprocess.run(git + ["-C", str(tmp_path), "add", "f.txt"], check=True)
    subprocess.run(git + ["-C", str(tmp_path), "commit", "-qm", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    env = environment.environment()
    for name in ("jax", "jaxlib", "flax", "optax"):
        assert env["versions"][name]
    assert env["device_kind"] and env["device_count"] >= 1
    assert env["git_revision"] == head.strip()
    assert env["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
    (tmp_path / "f.txt").write_text("b")
    assert environment.git_revision(str(tmp_path)) == head.strip() + "-dirty"
    assert environment.git_revision("/") is None


# ----------------------------------------------------------------------------------------------------------------
# End to end in-process: the pipeline's crashed-diagnostic path and the files it leaves


TINY = [*replace_group("data", "helpers.tiny_classification"), "model.width=8", "model.depth=1", "logger=none",
        "engine.compilation_cache=null"]


@pytest.fixture(scope="module")
def tiny_rc():
    return compose([*TINY, "diagnostics.run=[data,model,seeds]"])


def fake_diagnostics(monkeypatch, runs: dict):
    """Replace diagnostics by name with fake ``run(ctx, settings)`` functions."""
    import harness.pipeline

    real = harness.pipeline.diagnostic_module
    monkeypatch.setattr(harness.pipeline, "diagnostic_module",
                        lambda name: types.SimpleNamespace(run=runs[name]) if name in runs else real(name))


def test_a_crashing_diagnostic_is_an_internal_error_and_the_rest_still_run(tiny_rc, tmp_path, monkeypatch):
    from harness.app import run_and_report

    def data_check(ctx, settings):
        assert ctx.arrays.x_train.shape == (96, 6)  # the user's factory was called
        return Outcome("data", findings=[error("data.nonfinite", "2 rows contain NaN.", "Drop them.", rows=[0, 1])])

    def model_check(ctx, settings):
        raise ZeroDivisionError("something nobody foresaw")

    def seeds_check(ctx, settings):
        return Outcome("seeds", metrics={"seeds/val_loss_std": 0.01}, plots=[Plot("spread", "Seed spread", draw_line)])

    fake_diagnostics(monkeypatch, {"data": data_check, "model": model_check, "seeds": seeds_check})
    console = Console(record=True, width=140, force_terminal=False)
    result = run_and_report(tiny_rc, str(tmp_path), command=["harness"], console=console)

    assert [o.name for o in result.outcomes] == ["data", "model", "seeds"]
    model = result.outcomes[1]
    assert model.skipped == "crashed: ZeroDivisionError: something nobody foresaw"
    assert model.internal_error.type == "ZeroDivisionError"
    report = json.load(open(tmp_path / "report.json"))
    # A crash is never healthy, and it outranks the error finding: the report is incomplete.
    assert report["status"] == "internal_error" and report["first_to_fix"]["id"] == "data.nonfinite"
    assert report["diagnostics"]["model"]["status"] == "crashed"
    assert report["diagnostics"]["model"]["internal_error"] == {"type": "ZeroDivisionError",
                                                                 "message": "something nobody foresaw"}
    [crash] = report["internal_errors"]
    assert (crash["diagnostic"], crash["type"], crash["message"]) == (
        "model", "ZeroDivisionError", "something nobody foresaw")
    assert "Traceback" in crash["traceback"] and "model_check" in crash["traceback"]
    assert report["metrics"] == {"seeds/val_loss_std": 0.01}
    assert report["choices"]["model"] == "mlp" and "data" not in report["choices"]  # data replaced by a _target_
    assert report["config"]["model"]["width"] == 8  # the full resolved config, for reproduce
    assert report["environment"]["versions"]["jax"]
    assert (tmp_path / "plots" / "seeds-spread.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "![Seed spread](plots/seeds-spread.png)" in md
    assert md.startswith("# 💥 harness report: internal_error")
    assert "diagnostic model crashed: ZeroDivisionError: something nobody foresaw" in md and "harness.log" in md
    text = console.export_text()
    assert "crashed: ZeroDivisionError: something nobody foresaw" in text
    assert "status: internal_error" in text
    assert "internal error: diagnostic model crashed: ZeroDivisionError: something nobody foresaw" in text
    assert "root cause: data.nonfinite" in text
    assert not os.path.exists(tmp_path / "wandb")  # logger=none


def test_debug_prints_a_crash_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """debug=true adds the traceback on stderr; it does not change what is recorded (nor the exit code)."""
    from harness.pipeline import run

    rc = compose([*TINY, "diagnostics.run=[data,model]", "debug=true"])

    def model_check(ctx, settings):
        raise ZeroDivisionError("boom")

    fake_diagnostics(monkeypatch, {"model": model_check})
    result = run(rc)
    assert result.status == "internal_error"
    assert [e.summary for e in result.internal_errors] == ["ZeroDivisionError: boom"]
    assert result.outcomes[0].name == "data" and result.outcomes[0].internal_error is None  # it still ran
    err = capsys.readouterr().err
    assert "diagnostic model crashed" in err and "Traceback" in err and "ZeroDivisionError: boom" in err


def test_background_workers_import_heavy_packages_one_at_a_time(monkeypatch):
    """The plot worker's matplotlib import and the W&B warmup's wandb import share one lock: two threads importing
    packages with shared modules at once can hit "partially initialized module" ImportErrors (seen in a fresh venv)."""
    from harness.report import imports

    held = []

    class Recording:
        def __enter__(self):
            held.append(True)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(imports, "BACKGROUND_IMPORT_LOCK", Recording())
    plt = imports.matplotlib_pyplot()
    assert held == [True] and plt.get_backend().lower() == "agg"
