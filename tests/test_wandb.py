"""W&B logging: offline runs read back with W&B's own reader (``wandb leet inspect``), the mode rules, how sweep
members and curves are read, and that a W&B failure never costs the local report."""

from __future__ import annotations

import glob
import json
import os
import types

import numpy as np
import pytest
from helpers import compose, offline_runs, replace_group, wandb_records, wandb_summary
from rich.console import Console

from harness.checks.base import Outcome, Plot
from harness.findings import error, warning
from harness.pipeline import RunResult
from harness.report import environment, plots, wandb_logger, writer


def draw_line(path):
    import matplotlib.pyplot as plt

    plt.plot([1.0, 0.5, 0.2])
    plt.savefig(path)


def sweep_outcomes() -> list[Outcome]:
    losses = np.array([[2.0, 1.0, 0.5, 0.4], [2.0, 1.5, np.nan, np.nan], [2.0, 0.8, 0.3, 0.1]])
    return [
        Outcome("data", findings=[error("data.nonfinite", "3 rows contain NaN.", "Drop them.", rows=[1, 2, 3])],
                metrics={"data/num_train": 96}, seconds=0.1),
        Outcome("lr_range", findings=[warning("train.learning_rate", "lr 1.0 diverges.", "Use 0.01.", lr=1.0)],
                metrics={"lr_range/best_lr": 0.01, "lr_range/diverged": np.int64(1)},
                members=[{"lr": lr, "final_loss": float(row[np.isfinite(row)][-1]), "diverged": bool(np.isnan(row).any())}
                         for lr, row in zip((0.001, 1.0, 0.01), losses)],
                series={"loss": losses, "not_a_curve": "text"},
                plots=[Plot("loss_vs_lr", "Loss against learning rate", draw_line)], seconds=0.5),
    ]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One harness run logged in-process with one run per member: 1 main + 1 sweep summary + 3 member runs."""
    out = str(tmp_path_factory.mktemp("wandb-run"))
    rc = compose(["logger=wandb", "logger.log_members=true", "logger.tags=[unit]", "optim.lr=0.003"])
    outcomes = sweep_outcomes()
    result = RunResult(outcomes, [f for o in outcomes for f in o.findings], "unhealthy", 0.6)
    plot_files = plots.draw_all(outcomes, out)
    report = writer.build_report(result, config=rc.raw, command=["harness", "optim.lr=0.003"],
                                 environment=environment.environment(), plots=plot_files, choices=rc.choices)
    writer.write_json(report, out)
    writer.write_markdown(report, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DATA_DIR", str(tmp_path_factory.mktemp("wandb-data")))
        info = wandb_logger.log_run(rc, result, report, out, plot_files, run_name="optim.lr=0.003", group="g-test")
    runs = offline_runs(out)
    return types.SimpleNamespace(dir=out, info=info, runs=runs, report=report)


def run_record(run_dir: str) -> dict:
    return next(r["run"] for r in wandb_records(run_dir) if r.get("type") == "run")


def test_one_main_one_summary_and_one_run_per_member(logged):
    assert len(logged.runs) == 5
    assert sorted(logged.info.run_dirs) == sorted(logged.runs)
    assert logged.info.mode == "offline"


def test_main_run_holds_config_summary_and_findings(logged):
    main = wandb_summary(logged.runs[0])
    assert main["state"] == "finished" and main["exit_code"] == 0
    assert main["name"] == "optim.lr=0.003" and main["notes"] == "harness optim.lr=0.003"
    assert main["tags"] == ["unit"]
    # the full resolved config, plus which config of each group was picked
    assert main["config"]["optim"]["lr"] == 0.003
    assert main["config"]["model"]["_target_"] == "harness.models.mlp.MLP"
    assert main["config"]["choices"]["data"] == "digits"
    summary = main["summary"]
    assert summary["status"] == "unhealthy" and summary["first_to_fix"] == "data.nonfinite"
    assert (summary["num_errors"], summary["num_warnings"]) == (1, 1)
    assert summary["finding/data.nonfinite"] == "error" and summary["finding/train.learning_rate"] == "warning"
    assert summary["lr_range/best_lr"] == 0.01 and summary["lr_range/diverged"] == 1
    assert summary["data/num_train"] == 96 and summary["lr_range/status"] == "warning"
    assert summary["findings"]["_type"] == "table-file" and summary["findings"]["nrows"] == 2
    assert summary["plots/lr_range/loss_vs_lr"]["_type"] == "image-file"
    # the findings table itself, and the report files attached to the run
    files = os.path.join(logged.runs[0], "files")
    table = json.load(open(os.path.join(files, summary["findings"]["path"])))
    assert table["columns"] == ["stage", "diagnostic", "severity", "id", "message", "suggestion", "evidence"]
    assert table["data"][0][:4] == ["data", "data", "error", "data.nonfinite"]
    assert json.loads(table["data"][0][6]) == {"rows": [1, 2, 3]}
    assert json.load(open(os.path.join(files, "report.json")))["status"] == "unhealthy"
    assert os.path.exists(os.path.join(files, "report.md"))


def test_main_run_is_grouped(logged):
    record = run_record(logged.runs[0])
    assert (record["run_group"], record["job_type"]) == ("g-test", "harness")


def test_sweep_summary_run_has_members_table_and_chart(logged):
    records = wandb_records(logged.runs[1])
    run = next(r["run"] for r in records if r.get("type") == "run")
    assert (run["run_group"], run["job_type"], run["display_name"]) == ("g-test", "lr_range", "optim.lr=0.003/lr_range")
    summary = {}
    for r in records:
        if r.get("type") == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["lr_range/best_lr"] == 0.01
    assert summary["members.nrows"] == 3 and summary["members.ncols"] == 4  # member, lr, final_loss, diverged
    members = json.load(open(os.path.join(logged.runs[1], "files", summary["members.path"])))
    assert members["columns"] == ["member", "lr", "final_loss", "diverged"]
    assert [row[1] for row in members["data"]] == [0.001, 1.0, 0.01]
    assert "charts/loss_table.path" in summary  # the line_series chart of all members' curves
    assert "plots/lr_range/loss_vs_lr._type" in summary


def test_member_run_has_hparams_as_config_and_its_curve(logged):
    records = wandb_records(logged.runs[3])  # member #1: lr=1.0, diverged after two steps
    run = next(r["run"] for r in records if r.get("type") == "run")
    assert (run["run_group"], run["job_type"]) == ("g-test", "lr_range")
    config = {k: v for k, v in run["config"]["update"].items() if not k.startswith("_")}
    assert config == {"lr": 1.0, "diagnostic": "lr_range", "member": 1}
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert [h["loss"] for h in history] == [2.0, 1.5]  # the non-finite points are left out
    summary = {}
    for r in records:
        if r.get("type") == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["final_loss"] == 1.5 and summary["diverged"] is True


def test_describe_gives_the_sync_command(logged, tmp_path):
    text = logged.info.describe(cwd=os.path.dirname(logged.dir))
    name = os.path.basename(logged.dir)
    assert text == (f"W&B: 5 offline runs in {name}/wandb; upload with: "
                    f"wandb sync {name}/wandb/offline-run-*")
    assert len(glob.glob(os.path.join(logged.dir, "wandb", "offline-run-*"))) == 5


# ----------------------------------------------------------------------------------------------------------------
# Rules


@pytest.mark.parametrize("configured, env, mode", [
    (None, {}, "offline"),
    (None, {"WANDB_MODE": "disabled"}, "disabled"),
    ("online", {"WANDB_MODE": "offline"}, "online"),  # the config key wins over the environment
    ("offline", {}, "offline"),
])
def test_mode(configured, env, mode):
    assert wandb_logger.resolve_mode(configured, env) == mode


def test_member_rows_split_into_hparams_and_results():
    assert wandb_logger.split_member({"lr": 0.1, "init_seed": 3, "final_loss": 0.2, "control": "shuffled"}) == (
        {"lr": 0.1, "init_seed": 3, "control": "shuffled"}, {"final_loss": 0.2})
    assert wandb_logger.split_member({"hparams": {"width": 8}, "results": {"loss": 1.0}}) == (
        {"width": 8}, {"loss": 1.0})


def test_series_are_read_as_curves():
    one = wandb_logger.curves([3.0, 2.0, 1.0], [])
    assert (one.xs, one.ys, one.keys, one.xname) == ([0.0, 1.0, 2.0], [[3.0, 2.0, 1.0]], ["#0"], "step")
    many = wandb_logger.curves(np.ones((2, 4)), ["#0 lr=0.1", "#1 lr=1"])
    assert many.keys == ["#0 lr=0.1", "#1 lr=1"] and len(many.ys) == 2
    explicit = wandb_logger.curves({"x": [1e-3, 1e-2], "y": [1.0, 0.5], "xname": "lr", "keys": ["loss"]}, [])
    assert (explicit.xs, explicit.keys, explicit.xname) == ([1e-3, 1e-2], ["loss"], "lr")
    assert wandb_logger.curves("text", []) is None and wandb_logger.curves([1.0], []) is None
    assert wandb_logger.curves({"x": [1, 2, 3], "y": [1, 2]}, []) is None  # mismatched axis


def test_line_charts_leave_gaps_for_non_finite_points_and_thin_long_curves():
    import wandb

    diverged = [1.0, 0.5, float("nan"), float("inf")]
    chart = wandb_logger.line_chart(wandb, "loss", wandb_logger.curves(np.array([[2.0, 1.0, 0.5, 0.25], diverged]),
                                                                       ["#0", "#1"]), "loss")
    rows = chart.table.data
    assert [r for r in rows if r[1] == "#1"] == [[0.0, "#1", 1.0], [1.0, "#1", 0.5]]  # a gap, not None cells
    assert len(rows) == 6 and all(r[2] is not None for r in rows)
    long = wandb_logger.curves(np.ones((1, 5000)), ["#0"])
    assert len(wandb_logger.line_chart(wandb, "loss", long, "loss").table.data) == wandb_logger.MAX_CHART_POINTS


def test_series_become_charts_against_their_axes():
    series = {
        "lr_range/ramp_lr": [1e-4, 1e-3, 1e-2], "lr_range/ramp_loss": [2.0, 1.0, 3.0],
        "lr_range/ramp_smoothed_loss": [2.0, 1.5, 2.0],
        "lr_range/grid_lr": [1e-3, 1e-2], "lr_range/grid_val_loss": [0.5, 0.4],
        "lr_range/configured_loss": [3.0, 2.0, 1.0], "lr_range/verdict": "ok",
        "seeds/val_loss": np.ones((2, 3)),
    }
    out = wandb_logger.charts(series, ["#0 seed=0", "#1 seed=1"])
    assert list(out) == ["lr_range/ramp", "lr_range/grid", "lr_range/configured_loss", "seeds/val_loss"]
    ramp = out["lr_range/ramp"]
    assert (ramp.xs, ramp.keys, ramp.xname) == ([1e-4, 1e-3, 1e-2], ["loss", "smoothed_loss"], "lr")
    assert out["lr_range/grid"].ys == [[0.5, 0.4]]
    assert (out["lr_range/configured_loss"].xname, out["lr_range/configured_loss"].keys) == ("step", ["configured_loss"])
    assert out["seeds/val_loss"].keys == ["#0 seed=0", "#1 seed=1"]


def test_thin_keeps_ends():
    assert wandb_logger.thin(5, 10).tolist() == [0, 1, 2, 3, 4]
    idx = wandb_logger.thin(1000, 100)
    assert len(idx) == 100 and idx[0] == 0 and idx[-1] == 999


# ----------------------------------------------------------------------------------------------------------------
# Failures never cost the local report


TINY = [*replace_group("data", "helpers.tiny_classification"), "model.width=8", "model.depth=1",
        "engine.compilation_cache=null", "diagnostics.run=[data]"]


def fake_data_check(monkeypatch):
    import harness.pipeline

    monkeypatch.setattr(harness.pipeline, "diagnostic_module", lambda name: types.SimpleNamespace(
        run=lambda ctx, settings: Outcome("data", findings=[error("data.nonfinite", "NaN rows.", "Drop them.")])))


def test_wandb_init_failing_still_leaves_the_report(tmp_path, monkeypatch, capsys):
    import wandb

    from harness.app import run_and_report

    def broken_init(*args, **kwargs):
        raise RuntimeError("wandb service unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    fake_data_check(monkeypatch)
    rc = compose([*TINY, "logger=wandb"])
    result = run_and_report(rc, str(tmp_path), command=["harness"], console=Console(file=open(os.devnull, "w")))
    assert result.has_error
    assert json.load(open(tmp_path / "report.json"))["findings"][0]["id"] == "data.nonfinite"
    assert (tmp_path / "report.md").exists()
    err = capsys.readouterr().err
    assert "W&B logging failed (RuntimeError: wandb service unreachable)" in err
    assert f"the local report in {tmp_path} is complete" in err


def test_a_failure_mid_logging_finishes_every_opened_run(tmp_path, monkeypatch, capsys):
    import wandb

    from harness.app import run_and_report

    exit_codes = []
    real_init = wandb.init

    def recording_init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_finish = run.finish

        def finish(*a, **k):
            exit_codes.append(k.get("exit_code"))
            return real_finish(*a, **k)

        run.finish = finish
        return run

    def broken_table(*args, **kwargs):
        raise ValueError("table schema rejected")

    monkeypatch.setattr(wandb, "init", recording_init)
    monkeypatch.setattr(wandb, "Table", broken_table)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    fake_data_check(monkeypatch)
    run_and_report(compose([*TINY, "logger=wandb"]), str(tmp_path), command=["harness"],
                   console=Console(file=open(os.devnull, "w")))
    assert exit_codes == [1]  # the main run was opened, failed, and still finished (marked failed)
    assert "table schema rejected" in capsys.readouterr().err
    assert (tmp_path / "report.json").exists()


def test_disabled_mode_and_logger_none_open_no_runs(tmp_path, monkeypatch):
    from harness.app import run_and_report

    fake_data_check(monkeypatch)
    quiet = Console(file=open(os.devnull, "w"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_and_report(compose([*TINY, "logger=wandb"]), str(tmp_path / "a"), command=["harness"], console=quiet)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_and_report(compose([*TINY, "logger=none"]), str(tmp_path / "b"), command=["harness"], console=quiet)
    for d in ("a", "b"):
        assert (tmp_path / d / "report.json").exists() and not (tmp_path / d / "wandb").exists()
