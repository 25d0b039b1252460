"""``harness compare``: every report below the given directories, the overrides that differ, status, error ids,
key metrics (whichever names the reports use), a plot against the swept value, and clear errors for bad input.

Reports here are hand-built, so the expected table is known exactly; one test compares real CLI runs.
"""

from __future__ import annotations

import json
import os

import pytest

from harness.errors import HarnessError
from harness.sweeps import compare as cmp
from harness.sweeps.runs import display_names, find_reports, overrides_of, split_override


def write_run(run_dir, overrides, metrics, *, status="healthy", errors=(), hydra=True, command=None):
    os.makedirs(run_dir, exist_ok=True)
    report = {"status": status, "metrics": metrics,
              "findings": [{"severity": "error", "id": e} for e in errors] + [{"severity": "warning", "id": "w"}],
              "command": command or ["harness", *overrides]}
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(report, f)
    if hydra:
        os.makedirs(os.path.join(run_dir, ".hydra"), exist_ok=True)
        with open(os.path.join(run_dir, ".hydra", "overrides.yaml"), "w") as f:
            f.write("".join(f"- {o}\n" for o in overrides))
    return run_dir


@pytest.fixture
def lr_sweep(tmp_path):
    """A sweep over optim.lr (points numbered as Hydra does, 10 sorting after 2) with model.width fixed."""
    sweep = tmp_path / "multirun" / "sweep-abc"
    lrs = {"0": "0.1", "1": "0.001", "2": "0.01", "10": "1.0"}
    for point, lr in lrs.items():
        metrics = {"overfit_batch/steps_to_target": 100 * len(lr), "seeds/val_loss/mean": float(lr) + 0.5,
                   "seeds/val_loss/std": 0.01, "capacity/verdict": "fits", "lr_range/suggested_lr": 3e-3}
        errors = ["train.diverges"] if lr == "1.0" else []
        write_run(sweep / point, ["model.width=64", f"optim.lr={lr}"], metrics,
                  status="unhealthy" if errors else "healthy", errors=errors)
    os.makedirs(sweep / ".submitit" / "123")  # bookkeeping directories are not walked
    (sweep / "multirun.yaml").write_text("{}")
    return sweep


def test_finds_every_report_in_natural_order(lr_sweep):
    reports = find_reports([str(lr_sweep)])
    assert [os.path.basename(os.path.dirname(r)) for r in reports] == ["0", "1", "2", "10"]


def test_table_shows_only_differing_overrides(lr_sweep):
    c = cmp.build([str(lr_sweep)])
    assert list(c.differing) == ["optim.lr"]
    assert c.names == ["0", "1", "2", "10"]
    assert [col.title for col in c.columns] == ["overfit steps", "val loss", "seed spread", "capacity",
                                                "suggested lr"]
    # Rows sort by the swept value, numerically.
    assert [c.differing["optim.lr"][i] for i in c.sort_order()] == ["0.001", "0.01", "0.1", "1.0"]
    text = _render(c)
    assert "train.diverges" in text and "unhealthy" in text and "model.width" not in text


def test_key_metrics_follow_other_names_and_may_be_absent(tmp_path):
    write_run(tmp_path / "a", ["optim.lr=0.1"], {"lr_range/suggested_lr_steepest": 0.02, "seeds/val_loss_std": 0.1})
    write_run(tmp_path / "b", ["optim.lr=0.2"], {"data/ok": 1})
    c = cmp.build([str(tmp_path / "a"), str(tmp_path / "b")])
    cols = {col.title: col for col in c.columns}
    assert set(cols) == {"seed spread", "suggested lr"}  # nobody has overfit steps, val loss or capacity
    assert cols["suggested lr"].values == [0.02, None] and cols["suggested lr"].keys[0] == \
        "lr_range/suggested_lr_steepest"
    assert "–" in _render(c)


def test_extra_metric_columns(lr_sweep):
    c = cmp.build([str(lr_sweep)], ["seeds/*"])
    assert [col.title for col in c.columns][-2:] == ["seeds/val_loss/mean", "seeds/val_loss/std"]
    with pytest.raises(HarnessError, match="--metric nothing/\\*: no run has a metric matching it"):
        cmp.build([str(lr_sweep)], ["nothing/*"])


def test_overrides_from_the_command_when_hydra_left_none(tmp_path):
    run = write_run(tmp_path / "r", [], {}, hydra=False,
                    command=["harness", "-m", "optim.lr=0.3", "+data.x=1", "~logger", "hydra.verbose=true"])
    assert overrides_of(str(run), json.loads((run / "report.json").read_text())) == ["optim.lr=0.3", "+data.x=1"]
    assert split_override("+data.x=1") == ("data.x", "1")
    assert split_override("~logger") == ("logger", "~")


def test_runs_from_several_directories_are_named_relative_to_each_other(tmp_path):
    assert display_names([str(tmp_path / "outputs/a/b"), str(tmp_path / "multirun/s/0")]) == [
        "outputs/a/b", "multirun/s/0"]
    assert display_names([str(tmp_path / "x" / "run")]) == ["run"]


def test_plot_against_the_swept_value(lr_sweep, tmp_path):
    c = cmp.build([str(lr_sweep)])
    path = cmp.plot(c, str(tmp_path / "plots" / "lr.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert cmp.default_plot_path(c) == str(lr_sweep / "compare.png")


def test_plot_without_numeric_metrics_counts_findings(tmp_path):
    write_run(tmp_path / "a", ["model=mlp"], {"capacity/verdict": "fits"})
    write_run(tmp_path / "b", ["model=cnn"], {"capacity/verdict": "underfits"}, errors=["x"])
    c = cmp.build([str(tmp_path)])
    assert not any(col.numeric for col in c.columns)
    assert os.path.getsize(cmp.plot(c, str(tmp_path / "c.png"))) > 1000


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(HarnessError, match="nowhere: no such file or directory"):
        cmp.build([str(tmp_path / "nowhere")])
    (tmp_path / "empty" / ".hydra").mkdir(parents=True)
    (tmp_path / "empty" / ".hydra" / "report.json").write_text("{}")  # inside bookkeeping: not a run
    with pytest.raises(HarnessError, match="empty: no report.json below it"):
        cmp.build([str(tmp_path / "empty")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("[1, 2")
    with pytest.raises(HarnessError, match="report.json: not valid JSON"):
        cmp.build([str(tmp_path / "bad")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(HarnessError, match="not a report.json"):
        cmp.build([str(tmp_path / "notes.txt")])


def test_cli(lr_sweep, tmp_path):
    from helpers import run_cli

    out = tmp_path / "cmp.png"
    done = run_cli(["compare", str(lr_sweep), "--out", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "optim.lr" in done.stdout and "suggested lr" in done.stdout and out.is_file()


@pytest.mark.parametrize("args, message", [
    (["compare", "{tmp}/nowhere"], "harness: error: {tmp}/nowhere: no such file or directory"),
    (["compare"], "the following arguments are required: DIR"),
    (["compare", "{tmp}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, args, message):
    from harness.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def _render(comparison) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(cmp.table(comparison))
    return console.export_text()


def test_brackets_in_values_are_shown_not_taken_for_markup(tmp_path):
    write_run(tmp_path / "a", ["diagnostics.run=[data,model]"], {})
    write_run(tmp_path / "b", ["diagnostics.run=[data]"], {})
    text = _render(cmp.build([str(tmp_path)]))
    assert "[data,model]" in text and "[data]" in text
