"""``harness reproduce``: a rerun from report.json matches bitwise in the same environment, a tampered report does
not, tolerance applies when the environment differs, and bad run directories are clear errors.

The in-process tests train through a small probe diagnostic registered here (``repro_probe``: three members of a
tiny MLP, whose curves and final losses become metrics), so they exercise real compiled training whatever the
checklist's diagnostics currently compute. The CLI test runs the real commands end to end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.sweeps import reproduce as rp

PROBE = "repro_probe"
SMALL = ["logger=none", "~data", "+data={_target_:helpers.tiny_classification}", "model.width=8", "model.depth=1",
         "batch_size=16", "engine.compilation_cache=null"]


# ----------------------------------------------------------------------------------------------------------------
# The probe diagnostic


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 10


def run(ctx, settings):
    from harness.checks.base import Outcome
    from harness.engine.core import Hparams

    hp = Hparams.make(lr=[1e-3, 1e-2, 1e-1], init_seed=[0, 1, 2], data_seed=[0, 1, 2])
    result = ctx.train(PROBE, ctx.spec(settings.steps), hp)
    metrics = {f"final_loss/lr_{lr:g}": float(result.loss[i, -1]) for i, lr in enumerate(hp.lr)}
    metrics["best_val_loss"] = float(np.min(result.final_val_loss))
    metrics["diverged"] = int(result.diverged.sum())
    return Outcome(PROBE, metrics=metrics, series={"loss": result.loss, "val_loss": result.val_loss},
                   members=[{**row, "final_loss": float(result.loss[i, -1])} for i, row in enumerate(hp.rows())])


@pytest.fixture(scope="module")
def probe():
    """The probe diagnostic registered, and a fixed git revision: other engineers commit to this repository while
    the tests run, and a new revision rightly switches reproduce to tolerance."""
    from harness.checks import registry
    from harness.report import environment

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry.DIAGNOSTICS, PROBE, (__name__, "training"))
        mp.setattr(environment, "git_revision", lambda *args, **kwargs: "fixed-revision")
        yield


@pytest.fixture(scope="module")
def original_once(probe, tmp_path_factory):
    from helpers import compose

    from harness.app import run_and_report

    rc = compose([f"diagnostics.run=[{PROBE}]", *SMALL])
    run_dir = tmp_path_factory.mktemp("reproduce") / "original"
    run_and_report(rc, str(run_dir), command=["harness", *SMALL])
    return run_dir


@pytest.fixture
def original_run(original_once, tmp_path):
    """A private copy of the original run: tests tamper with its report."""
    copy = tmp_path / "original"
    shutil.copytree(original_once, copy)
    return copy


# ----------------------------------------------------------------------------------------------------------------
# End to end, in process


def test_rerun_matches_bitwise_in_the_same_environment(original_run, tmp_path):
    from harness.engine import compile as programs

    programs.clear_cache()  # recompile: the check is that a fresh compile of the same program gives the same bits
    outcome = rp.reproduce(str(original_run), out_dir=str(tmp_path / "rerun"))
    assert outcome.exact, outcome.differences
    assert outcome.matched, outcome.mismatches
    # Status, findings, 5 metrics, 2 curves and the member rows were compared.
    assert outcome.compared > 30
    rerun = json.loads((tmp_path / "rerun" / "report.json").read_text())
    assert rerun["command"][:2] == ["harness", "reproduce"]
    assert rerun["metrics"][f"{PROBE}/best_val_loss"] == json.loads(
        (original_run / "report.json").read_text())["metrics"][f"{PROBE}/best_val_loss"]


def test_a_one_ulp_change_is_a_mismatch(original_run, tmp_path):
    path = original_run / "report.json"
    report = json.loads(path.read_text())
    key = f"{PROBE}/best_val_loss"
    report["metrics"][key] = float(np.nextafter(report["metrics"][key], np.inf))
    path.write_text(json.dumps(report))
    outcome = rp.reproduce(str(original_run), out_dir=str(tmp_path / "rerun"))
    assert not outcome.matched
    assert [m.key for m in outcome.mismatches] == [f"metrics/{key}"]
    assert outcome.mismatches[0].max_rel < 1e-6  # tiny, and still caught: the comparison is bitwise
    summary = json.loads((tmp_path / "rerun" / "reproduction.json").read_text())
    assert summary["matched"] is False and summary["rule"] == "bitwise"
    assert summary["mismatches"][0]["key"] == f"metrics/{key}"


def test_other_environment_compares_within_tolerance(original_run, tmp_path):
    """A report from another jax version is compared with rtol: a 1e-5 relative change passes, 1e-2 does not."""
    path = original_run / "report.json"
    report = json.loads(path.read_text())
    report["environment"]["versions"]["jax"] = "0.0.1"
    key = f"{PROBE}/best_val_loss"
    value = report["metrics"][key]
    report["metrics"][key] = value * (1 + 1e-5)
    path.write_text(json.dumps(report))
    outcome = rp.reproduce(str(original_run), out_dir=str(tmp_path / "a"))
    assert not outcome.exact and outcome.matched
    assert ("jax version", "0.0.1", report["environment"]["versions"]["jax"], True) not in outcome.differences
    assert any(d[0] == "jax version" and d[1] == "0.0.1" and d[3] for d in outcome.differences)
    report["metrics"][key] = value * (1 + 1e-2)
    path.write_text(json.dumps(report))
    outcome = rp.reproduce(str(original_run), out_dir=str(tmp_path / "b"))
    assert [m.key for m in outcome.mismatches] == [f"metrics/{key}"]


def test_existing_output_dir_is_refused(original_run):
    with pytest.raises(HarnessError, match="already holds a report"):
        rp.reproduce(str(original_run), out_dir=str(original_run))


# ----------------------------------------------------------------------------------------------------------------
# Comparison rules (pure functions)


def _report(metrics, series=None, status="healthy", findings=()):
    return {"status": status, "findings": [{"severity": s, "id": i} for s, i in findings], "metrics": metrics,
            "diagnostics": {"d": {"series": series or {}, "members": [], "skipped": None}}}


def test_values_match_rules():
    assert rp.values_match(0.1, 0.1, exact=True, rtol=0, atol=0)
    assert not rp.values_match(0.1, math.nextafter(0.1, 1), exact=True, rtol=0, atol=0)
    assert rp.values_match(1.0, 1.0005, exact=False, rtol=1e-3, atol=0)
    assert not rp.values_match(1.0, 1.002, exact=False, rtol=1e-3, atol=0)
    assert rp.values_match("nan", "nan", exact=True, rtol=0, atol=0)  # non-finite floats are stored as strings
    assert not rp.values_match("nan", 1.0, exact=False, rtol=1, atol=1)
    assert not rp.values_match(True, 1, exact=False, rtol=1, atol=1)  # a flag is not a number
    assert not rp.values_match("underfits", "fits", exact=False, rtol=1, atol=1)
    assert not rp.values_match(float("inf"), 1e308, exact=False, rtol=1, atol=1)


def test_curves_are_summarized_per_curve():
    a = _report({"d/x": 1.0}, {"loss": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]})
    b = _report({"d/x": 1.0}, {"loss": [[1.0, 2.5, 3.0], [4.0, 5.0, 9.0]]})
    compared, mismatches = rp.compare_reports(a, b, exact=True)
    assert compared == 2 + 1 + 6
    (m,) = mismatches
    assert (m.key, m.count, m.total) == ("d/series/loss", 2, 6)
    assert (m.original, m.rerun, m.max_abs) == (6.0, 9.0, 3.0)  # the worst element is shown


def test_missing_metrics_status_and_findings_are_mismatches():
    a = _report({"d/x": 1.0, "d/gone": 2.0}, status="unhealthy", findings=[("error", "train.diverges")])
    b = _report({"d/x": 1.0, "d/new": 3.0})
    _, mismatches = rp.compare_reports(a, b, exact=False)
    keys = {m.key: m for m in mismatches}
    assert set(keys) == {"status", "findings", "metrics/d/gone", "metrics/d/new"}
    assert keys["metrics/d/gone"].rerun == "(missing)" and keys["metrics/d/new"].original == "(missing)"


def test_environment_differences_say_what_changes_numbers():
    base = {"versions": {"jax": "0.10.2", "flax": "0.12.8"}, "backend": "cpu", "device_kind": "cpu",
            "device_count": 1, "git_revision": "abc", "cwd": "/a", "env": {"XLA_FLAGS": "", "WANDB_MODE": "offline"}}
    assert rp.environment_differences(base, base) == []
    other = json.loads(json.dumps(base))
    other.update(device_count=8, cwd="/b")
    other["versions"]["flax"] = "0.13.0"
    other["env"].update(XLA_FLAGS="--xla_force_host_platform_device_count=8", WANDB_MODE="online")
    diffs = {d[0]: d[3] for d in rp.environment_differences(base, other)}
    assert diffs == {"flax version": True, "device count": True, "cwd": False, "$XLA_FLAGS": True,
                     "$WANDB_MODE": False}


def test_bad_run_directories(tmp_path):
    with pytest.raises(HarnessError, match="no such file or directory"):
        rp.locate_report(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match="no report.json below it"):
        rp.locate_report(str(tmp_path / "empty"))
    for point in ("0", "1"):
        (tmp_path / "sweep" / point).mkdir(parents=True)
        (tmp_path / "sweep" / point / "report.json").write_text(json.dumps(_report({})))
    with pytest.raises(HarnessError, match="holds 2 runs; reproduce one of them"):
        rp.locate_report(str(tmp_path / "sweep"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{not json")
    with pytest.raises(HarnessError, match="not valid JSON"):
        rp.reproduce(str(tmp_path / "broken"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(_report({})))
    with pytest.raises(HarnessError, match="no stored config"):
        rp.reproduce(str(tmp_path / "old"))


# ----------------------------------------------------------------------------------------------------------------
# The CLI, end to end


def test_cli_reproduce_then_tamper(tmp_path):
    from helpers import run_cli, run_dirs

    first = run_cli(["diagnostics.run=[data,model]", *SMALL[:5]], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir,) = run_dirs(str(tmp_path))

    # --mode bitwise: the harness checkout's git revision may move between the runs (shared repository).
    again = run_cli(["reproduce", run_dir, "--mode", "bitwise", "--out", str(tmp_path / "rerun1")], cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "reproduced" in again.stdout and "bitwise" in again.stdout

    path = os.path.join(run_dir, "report.json")
    report = json.loads(open(path).read())
    numeric = [k for k, v in report["metrics"].items() if isinstance(v, float)]
    if numeric:  # nudge a real metric by one ulp
        report["metrics"][numeric[0]] = float(np.nextafter(report["metrics"][numeric[0]], np.inf))
        tampered = f"metrics/{numeric[0]}"
    else:  # the checklist computed no numeric metric yet: plant one the rerun cannot produce
        report["metrics"]["data/planted"] = 1.5
        tampered = "metrics/data/planted"
    open(path, "w").write(json.dumps(report))
    bad = run_cli(["reproduce", run_dir, "--mode", "bitwise", "--out", str(tmp_path / "rerun2")], cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "not reproduced" in bad.stdout and tampered in bad.stdout.replace("\n", "")



def test_cli_bad_run_dir_exits_2(tmp_path, capsys):
    from harness.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"harness: error: {tmp_path / 'nowhere'}: no such file or directory"
