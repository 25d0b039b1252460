"""Multirun collapsing and resume: points that differ only in traced values train as one vmapped program and
still get their own results; a killed sweep resumes without losing or redoing points."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import cli_env, compose

from harness.checks import registry
from harness.checks.base import Outcome
from harness.engine import compile as programs
from harness.engine.core import Hparams
from harness.sweeps import collapse
from hydra_plugins.harness_sweeper.harness_sweeper import group_points, point_complete
from harness.sweeps.resolvers import sweep_id

# ---------------------------------------------------------------------------------------------------------------
# A minimal training diagnostic, registered for these tests only: trains the configured LR and seed.


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 30


def run(ctx, settings):
    spec = ctx.spec(settings.steps, batch_size=32)
    result = ctx.train("probe", spec, Hparams.make(lr=ctx.optim.lr, init_seed=ctx.seed, data_seed=ctx.seed))
    return Outcome("probe", metrics={"final_loss": float(result.final_val_loss[0]), "lr": ctx.optim.lr,
                                     "seed": ctx.seed})


@pytest.fixture
def probe_registered(monkeypatch):
    monkeypatch.setitem(registry.DIAGNOSTICS, "probe", ("test_collapse", "training"))


TINY = ["~data", "+data={_target_:helpers.tiny_classification}", "model.width=16", "model.depth=1",
        "diagnostics.run=[probe]", "logger=none"]


def test_points_run_as_one_program_and_match_running_alone(probe_registered):
    points = [(lr, seed) for lr in (3e-3, 3e-2) for seed in (0, 1)]
    rcs = [compose([*TINY, f"optim.lr={lr}", f"seed={seed}"]) for lr, seed in points]
    results, trainer = collapse.run_points(rcs)
    assert trainer.requests == 4 and trainer.merged_calls == 1  # four points, one training program call
    for (lr, seed), result in zip(points, results):
        metrics = result.outcomes[0].metrics
        assert metrics["lr"] == lr and metrics["seed"] == seed
    # Each point equals the same point run alone, up to vmap-width float noise.
    from harness.pipeline import run as run_alone

    alone = run_alone(rcs[3]).outcomes[0].metrics["final_loss"]
    np.testing.assert_allclose(results[3].outcomes[0].metrics["final_loss"], alone, rtol=2e-3)
    losses = [r.outcomes[0].metrics["final_loss"] for r in results]
    assert len(set(np.round(losses, 6))) == 4  # the points really trained differently


def test_identical_members_of_different_points_train_once(probe_registered):
    # The probe ignores weight decay, so these two points ask for the same member: it is trained once.
    rcs = [compose([*TINY, "optim.weight_decay=0.0"]), compose([*TINY, "optim.weight_decay=0.1"])]
    results, trainer = collapse.run_points(rcs)
    assert (trainer.members_requested, trainer.members_trained) == (2, 1)
    assert results[0].outcomes[0].metrics == results[1].outcomes[0].metrics


def test_second_collapsed_group_compiles_nothing(probe_registered):
    rcs = [compose([*TINY, f"optim.lr={lr}", "seed=5"]) for lr in (1e-3, 2e-3, 4e-3, 8e-3)]
    collapse.run_points(rcs)
    before = programs.STATS.compiles
    rcs = [compose([*TINY, f"optim.lr={lr}", "seed=6"]) for lr in (1e-2, 2e-2, 4e-2, 8e-2)]
    collapse.run_points(rcs)
    assert programs.STATS.compiles == before


def test_points_differing_in_shapes_are_refused_in_one_group(probe_registered):
    from harness.errors import HarnessError

    rcs = [compose([*TINY, "model.width=16"]), compose([*TINY, "model.width=32"])]
    with pytest.raises(HarnessError, match="collapse=false"):
        collapse.run_points(rcs)


def test_grouping_keeps_shape_changes_apart():
    points = [
        ["optim.lr=0.1", "seed=0", "model.width=64"],
        ["optim.lr=0.01", "seed=1", "model.width=64"],
        ["optim.lr=0.1", "seed=0", "model.width=128"],
        ["optim.lr=0.01", "seed=1", "model.width=128"],
    ]
    assert group_points(points, ("optim.lr", "seed")) == [[0, 1], [2, 3]]
    assert group_points(points, ()) == [[0], [1], [2], [3]]


def test_sweep_id_is_stable_and_order_free():
    assert sweep_id(["a=1,2", "b=3"]) == sweep_id(["b=3", "a=1,2"])
    assert sweep_id(["a=1,2"]) != sweep_id(["a=1,3"])


def test_point_complete_needs_report_for_the_same_overrides(tmp_path):
    d = tmp_path / "0"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    assert not point_complete(d, ["seed=0"])
    (d / "report.json").write_text("{")  # half-written (not possible with atomic writes, but be safe)
    assert not point_complete(d, ["seed=0"])
    (d / "report.json").write_text("{}")
    assert point_complete(d, ["seed=0"])
    assert not point_complete(d, ["seed=1"])


# ---------------------------------------------------------------------------------------------------------------
# End to end through the CLI.


def _harness(args, cwd, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_collapsed_multirun_writes_every_point(tmp_path):
    args = ["-m", "~data", "+data={_target_:helpers.tiny_classification}", "model.width=16", "model.depth=1",
            "diagnostics.run=[data,overfit_batch]", "diagnostics.overfit_batch.steps=20",
            "diagnostics.overfit_batch.eval_every=10", "logger=none",
            "optim.lr=1e-3,1e-2", "seed=0,1"]
    proc = _harness(args, str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    sweep = next((tmp_path / "multirun").iterdir())
    reports = sorted(sweep.glob("*/report.json"))
    assert len(reports) == 4
    assert "4 sweep points ran as" in out
    for i in range(4):
        overrides = (sweep / str(i) / ".hydra" / "overrides.yaml").read_text()
        report = json.loads((sweep / str(i) / "report.json").read_text())
        assert report["status"] in ("healthy", "unhealthy")
        assert "optim.lr=" in overrides and "seed=" in overrides


@pytest.mark.slow
def test_killed_sweep_resumes_without_loss_or_duplication(tmp_path):
    """kill -9 a sweep after its first points finish; the same command completes it, redoing nothing."""
    args = ["-m", "~data", "+data={_target_:slow_data.slow_classification,delay:1.5}", "diagnostics.run=[data]",
            "logger=none", "collapse=false", "seed=0,1,2,3,4,5"]
    proc = _harness(args, str(tmp_path), start_new_session=True)
    deadline = time.time() + 120
    sweep_root = tmp_path / "multirun"
    while time.time() < deadline:
        done = list(sweep_root.glob("*/*/report.json")) if sweep_root.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    sweep = next(sweep_root.iterdir())
    first = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/report.json")}
    assert 2 <= len(first) < 6, first
    assert not list(sweep.glob("*/.tmp-*"))  # no half-written report left behind

    proc = _harness(args, str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"{len(first)} of 6 points are complete" in out + err
    after = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/report.json")}
    assert sorted(after) == [str(i) for i in range(6)]  # nothing lost
    assert all(after[k] == v for k, v in first.items())  # nothing redone
    seeds = sorted(json.loads((sweep / k / "report.json").read_text())["config"]["seed"] for k in after)
    assert seeds == [0, 1, 2, 3, 4, 5]  # each point once, with its own overrides
