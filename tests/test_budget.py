"""Time budgets (harness/budget.py): the probe measures the model's member-step, the plan cuts the suite in order
until the estimate fits, every cut leaves valid settings, and a run reports what was measured and cut."""

from __future__ import annotations

import pytest
from helpers import compose
from reference_job import fresh

from harness import budget
from harness.errors import HarnessError

TRAINING = ["overfit_batch", "seeds", "controls", "lr_range", "capacity"]


@pytest.fixture(scope="module")
def rc():
    return compose(["logger=none"])


def test_budget_is_null_by_default_and_must_be_positive(rc):
    assert rc.budget is None
    assert compose(["budget=90"]).budget == 90.0
    for bad in ("budget=0", "budget=-5", "budget=soon"):
        with pytest.raises(HarnessError, match="budget"):
            compose([bad])


def test_a_cheap_model_keeps_the_configured_suite(rc):
    plan = budget.plan(fresh(), rc.settings, TRAINING, budget=60, step_seconds=1e-4)
    assert plan.changes == [] and plan.settings == rc.settings and plan.fits
    # The default suite: the member table (~54 rows), the LR test's second round (35) and the ladder, 500 steps.
    assert 40_000 < plan.configured_seconds / 1e-4 < 50_000


def test_cuts_come_in_order_until_the_estimate_fits(rc):
    ctx = fresh()
    full = budget.member_steps(ctx, {n: rc.settings[n] for n in TRAINING})
    plan = budget.plan(ctx, rc.settings, TRAINING, budget=0.6 * full * 1e-3, step_seconds=1e-3)
    assert plan.fits and plan.planned_seconds <= plan.budget < plan.configured_seconds
    assert plan.changes == [c.change for c in budget.CUTS[:len(plan.changes)]]
    assert plan.settings["lr_range"].refine is False and plan.settings["lr_range"].grid_size == 16
    assert plan.settings["seeds"].steps == rc.settings["seeds"].steps  # steps are cut last
    assert len(plan.costs) == len(plan.changes) and all(plan.costs) and plan.skipped == {}


def test_the_smallest_suite_keeps_the_horizons_that_are_judged(rc):
    """Steps are cut where the question stays the same: the seed runs, the controls, and the LR grid's training
    (the LR test extrapolates to the horizon it judges, which stays 500). The overfit test keeps its calibrated
    steps; the capacity ladder, which needs the full horizon for every rung, is dropped, with the reason."""
    plan = budget.plan(fresh(), rc.settings, TRAINING, budget=1.0, step_seconds=1.0)
    assert not plan.fits and len(plan.changes) == len(budget.CUTS)
    s = plan.settings
    assert s["seeds"].steps == s["controls"].steps == s["lr_range"].grid_steps == 125
    assert s["lr_range"].default_horizon == 500 and s["lr_range"].grid_size == 8
    assert s["overfit_batch"].steps == 500
    assert set(plan.skipped) == {"capacity"} and "full horizon" in plan.skipped["capacity"]
    for name, settings in s.items():
        settings.validate(f"diagnostics.{name}")
    assert "over the budget" in plan.summary()


def test_cuts_skip_what_does_not_run(rc):
    plan = budget.plan(fresh(), rc.settings, ["seeds"], budget=1.0, step_seconds=1.0)
    # No LR test in this run: nothing of it is cut (only the seeds' rerun and steps are).
    assert plan.settings["lr_range"] == rc.settings["lr_range"]
    assert not any("learning rates" in c or "second round" in c for c in plan.changes) and len(plan.changes) == 3


def test_the_probe_measures_the_configured_model():
    seconds, took = budget.measure(fresh())
    assert 1e-6 < seconds < 0.05 and took > 0  # the reference MLP: well under a millisecond here


def test_a_run_with_a_budget_reports_what_it_cut():
    from harness.pipeline import run
    from harness.report import writer

    rc = compose(["logger=none", "budget=0.01", "diagnostics.run=[seeds,lr_range,capacity]",
                  "diagnostics.seeds.steps=200", "diagnostics.lr_range.grid_steps=200",
                  "diagnostics.lr_range.default_horizon=200"])
    result = run(rc)
    b = result.budget
    assert b["budget_seconds"] == 0.01 and b["member_step_ms"] > 0 and not b["fits"]
    assert b["changes"] == [c.change for c in budget.CUTS[:-1]]  # the last: already at the 100-step floor
    lr = next(o for o in result.outcomes if o.name == "lr_range").metrics
    assert lr["lr_range/horizon_steps"] == 200 and lr["lr_range/grid_steps"] == 100  # extrapolated to 200
    capacity = next(o for o in result.outcomes if o.name == "capacity")
    assert capacity.skipped.startswith("not run: the budget") and capacity.findings == []
    report = writer.build_report(result, config={}, command=["harness"], environment={})
    assert report["budget"] == b and report["diagnostics"]["capacity"]["skipped"] == capacity.skipped
    markdown = writer.render_markdown(report)
    assert "## Budget" in markdown and b["changes"][0] in markdown
