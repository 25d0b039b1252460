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
    full = budget.member_steps(ctx, rc.settings, TRAINING)
    plan = budget.plan(ctx, rc.settings, TRAINING, budget=0.6 * full * 1e-3, step_seconds=1e-3)
    assert plan.fits and plan.planned_seconds <= plan.budget < plan.configured_seconds
    assert plan.changes == [c.change for c in budget.CUTS[:len(plan.changes)]]
    assert plan.settings["lr_range"].refine is False and plan.settings["lr_range"].grid_size == 16
    assert plan.settings["seeds"].steps == rc.settings["seeds"].steps  # steps are cut last
    assert len(plan.costs) == len(plan.changes) and all(plan.costs)


def test_the_smallest_suite_is_valid_and_says_it_does_not_fit(rc):
    plan = budget.plan(fresh(), rc.settings, TRAINING, budget=1.0, step_seconds=1.0)
    assert not plan.fits and len(plan.changes) == len(budget.CUTS)
    s = plan.settings
    assert [s[n].steps for n in ("overfit_batch", "seeds", "controls", "capacity")] == [125] * 4
    assert s["lr_range"].grid_size == 8 and s["lr_range"].grid_steps == 125
    assert s["overfit_batch"].eval_every <= s["overfit_batch"].steps
    for name, settings in s.items():
        settings.validate(f"diagnostics.{name}")
    assert "over the budget" in plan.summary()


def test_cuts_skip_what_does_not_run(rc):
    plan = budget.plan(fresh(), rc.settings, ["seeds"], budget=1.0, step_seconds=1.0)
    assert not any("LR" in c for c in plan.changes)  # no LR test in this run: nothing of it to cut


def test_the_probe_measures_the_configured_model():
    seconds, took = budget.measure(fresh())
    assert 1e-6 < seconds < 0.05 and took > 0  # the reference MLP: well under a millisecond here


def test_a_run_with_a_budget_reports_what_it_cut():
    from harness.pipeline import run
    from harness.report import writer

    rc = compose(["logger=none", "budget=0.3", "diagnostics.run=[seeds,lr_range]", "diagnostics.seeds.steps=200",
                  "diagnostics.lr_range.grid_steps=200", "diagnostics.lr_range.default_horizon=200"])
    result = run(rc)
    b = result.budget
    assert b["budget_seconds"] == 0.3 and b["member_step_ms"] > 0 and b["changes"]
    lr = next(o for o in result.outcomes if o.name == "lr_range").metrics
    assert "lr_range/refine/runs" not in lr or lr.get("lr_range/refine/runs") in (None, 0)
    assert result.context.shared["_budget"].settings["lr_range"].refine is False
    report = writer.build_report(result, config={}, command=["harness"], environment={})
    assert report["budget"] == b
    markdown = writer.render_markdown(report)
    assert "## Budget" in markdown and b["changes"][0] in markdown
