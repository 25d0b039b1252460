"""Time budgets (harness/budget.py): the probe measures the model's member-step and compile time, the plan cuts the
suite in order until the estimate fits what the run has left of the budget, every cut leaves valid settings, and a
run reports what was measured and cut."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import compose
from reference_job import fresh

from harness import budget
from harness.checks.registry import announced
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
    plan = budget.plan(fresh(), rc.settings, TRAINING, budget=60, measured=budget.Measured(1e-4), elapsed=0.0)
    assert plan.changes == [] and plan.settings == rc.settings and plan.fits
    # The default suite: the member table (~54 rows), the LR test's second round (35) and the ladder, 500 steps.
    assert 40_000 < plan.configured_seconds / 1e-4 < 50_000


def test_cuts_come_in_order_until_the_estimate_fits(rc):
    ctx = fresh()
    full = budget.cost(ctx, {n: rc.settings[n] for n in TRAINING}).member_steps
    plan = budget.plan(ctx, rc.settings, TRAINING, budget=0.6 * full * 1e-3, measured=budget.Measured(1e-3),
                       elapsed=0.0)
    assert plan.fits and plan.planned_seconds <= plan.budget < plan.configured_seconds
    assert plan.changes == [c.change for c in budget.CUTS[:len(plan.changes)]]
    assert plan.settings["lr_range"].refine is False and plan.settings["lr_range"].grid_size == 16
    assert plan.settings["seeds"].steps == rc.settings["seeds"].steps  # steps are cut last
    assert len(plan.costs) == len(plan.changes) and all(plan.costs) and plan.skipped == {}


def test_the_smallest_suite_keeps_the_horizons_that_are_judged(rc):
    """Steps are cut where the question stays the same: the seed runs, the controls, and the LR grid's training
    (the LR test extrapolates to the horizon it judges, which stays 500). The overfit test keeps its calibrated
    steps; the capacity ladder, which needs the full horizon for every rung, is dropped, with the reason."""
    plan = budget.plan(fresh(), rc.settings, TRAINING, budget=1.0, measured=budget.Measured(1.0), elapsed=0.0)
    assert not plan.fits and len(plan.changes) == len(budget.CUTS) and plan.declined == 0
    s = plan.settings
    assert s["seeds"].steps == s["controls"].steps == s["lr_range"].grid_steps == 125
    assert s["lr_range"].default_horizon == 500 and s["lr_range"].grid_size == 8
    assert s["overfit_batch"].steps == 500
    assert set(plan.skipped) == {"capacity"} and "full horizon" in plan.skipped["capacity"]
    for name, settings in s.items():
        settings.validate(f"diagnostics.{name}")
    assert "over the budget" in plan.summary()


def test_the_report_gives_the_overrides_that_run_the_chosen_suite_without_a_budget(rc):
    """Each cut names the config keys it set, at the values it set them to (the two halvings: 250, then 125 steps),
    and the plan gives the overrides that run the chosen suite again without a budget, whose choice moves with the
    machine's speed: composed, they give the settings the budget chose, the dropped ladder left out of the run."""
    plan = budget.plan(fresh(), rc.settings, TRAINING, budget=1.0, measured=budget.Measured(1.0), elapsed=0.0,
                       run=rc.diagnostics)
    keys = dict(zip(plan.changes, plan.change_overrides))
    assert plan.change_overrides[0] == ["diagnostics.lr_range.refine=false"]
    halvings = [k for c, k in zip(plan.changes, plan.change_overrides) if c == budget.HALF_STEPS.change]
    # The LR test's horizon, which the config derives from the seed runs' steps, stays 500 and is written so.
    assert halvings == [[f"diagnostics.seeds.steps={n}", f"diagnostics.controls.steps={n}",
                         f"diagnostics.lr_range.grid_steps={n}", "diagnostics.lr_range.default_horizon=500"]
                        for n in (250, 125)]
    assert keys["no capacity ladder"] == ["diagnostics.run=[data,model,overfit_batch,seeds,controls,lr_range]"]
    again = compose(["logger=none", *plan.overrides])
    assert again.diagnostics == ("data", "model", "overfit_batch", "seeds", "controls", "lr_range")
    assert all(again.settings[name] == plan.settings[name] for name in again.diagnostics)
    assert len(plan.overrides) == len(set(k.split("=")[0] for k in plan.overrides))  # each key once, its last value
    # What the report shows: each cut with its keys, and the suite's overrides after budget=null.
    from harness.report import format as fmt

    d = plan.to_dict()
    assert fmt.budget_rerun(d) == " ".join(["budget=null", *plan.overrides[:-1], f"'{plan.overrides[-1]}'"])
    assert [keys for _, keys, _ in fmt.budget_cuts(d)][0] == "diagnostics.lr_range.refine=false"
    kept = budget.plan(fresh(), rc.settings, TRAINING, budget=60, measured=budget.Measured(1e-4), elapsed=0.0)
    assert kept.overrides == [] and fmt.budget_rerun(kept.to_dict()) is None


def test_cuts_skip_what_does_not_run(rc):
    plan = budget.plan(fresh(), rc.settings, ["seeds"], budget=1.0, measured=budget.Measured(1.0), elapsed=0.0)
    # No LR test in this run: nothing of it is cut (only the seeds' rerun and steps are).
    assert plan.settings["lr_range"] == rc.settings["lr_range"]
    assert not any("learning rates" in c or "second round" in c for c in plan.changes) and len(plan.changes) == 3


def test_the_budget_counts_the_whole_run_compiles_and_time_already_spent_included(rc):
    """The same suite, the same member-step: what fits a budget as training alone does not once the run has
    already spent time or its programs take long to compile; and whatever the run spent beyond the budget, the
    plan says it is over."""
    ctx = fresh()
    full = {n: rc.settings[n] for n in TRAINING}
    training = budget.cost(ctx, full).member_steps * 1e-4
    assert budget.cost(ctx, full).programs == 1  # the reference job: one member table (the ladder's rungs in it)
    roomy = budget.plan(ctx, rc.settings, TRAINING, budget=1.2 * training, measured=budget.Measured(1e-4),
                        elapsed=0.0)
    assert roomy.changes == [] and roomy.fits and roomy.configured_programs == 1
    spent = budget.plan(ctx, rc.settings, TRAINING, budget=1.2 * training, measured=budget.Measured(1e-4),
                        elapsed=0.5 * training)
    compiling = budget.plan(ctx, rc.settings, TRAINING, budget=1.2 * training,
                            measured=budget.Measured(1e-4, compile=0.5 * training), elapsed=0.0)
    for plan in (spent, compiling):
        assert plan.changes and plan.fits and plan.planned_seconds <= plan.left < plan.configured_seconds
    assert compiling.configured_seconds == pytest.approx(1.5 * training)
    # Shorter seed runs no longer are the capacity ladder's configured rung, and the overfit test then trains
    # apart: a cut that shortens steps adds the programs it costs.
    short = budget.plan(ctx, rc.settings, TRAINING, budget=0.3 * training, measured=budget.Measured(1e-4),
                        elapsed=0.0)
    assert any("half the steps" in c for c in short.changes) and short.planned_programs > 1
    over = budget.plan(ctx, rc.settings, TRAINING, budget=10.0, measured=budget.Measured(1e-4), elapsed=12.0)
    assert not over.fits and over.left < 0 and len(over.changes) == len(budget.CUTS) and "over the budget" in \
        over.summary()


def test_when_no_suite_fits_and_cuts_cannot_help_nothing_is_cut(rc):
    """What the H200 showed: a 20-layer MLP's member-step is 0.03 ms and its training program takes 25 s to
    compile, so after the model stage and the probe no suite fits a 60 s budget, and every cut together saves a
    fraction of a second. None is made: confidence is not traded for time the estimate cannot tell apart. Where the
    cuts do save time, the same late run makes them all; and the rule only applies once nothing fits."""
    ctx = fresh()
    compiles = budget.Measured(3.3e-5, compile=25.0)
    late = budget.plan(ctx, rc.settings, TRAINING, budget=60.0, measured=compiles, elapsed=56.0)
    assert not late.fits and late.changes == [] and late.declined >= 3 and late.skipped == {}
    assert late.settings == rc.settings and late.planned_seconds == late.configured_seconds
    assert "nothing was cut" in late.summary() and late.to_dict()["declined_cuts"] == late.declined
    training = budget.plan(ctx, rc.settings, TRAINING, budget=60.0, measured=budget.Measured(4e-3, compile=10.0),
                           elapsed=56.0)
    assert not training.fits and len(training.changes) == len(budget.CUTS) and training.declined == 0
    assert training.planned_seconds < 0.3 * training.configured_seconds
    roomy = budget.plan(ctx, rc.settings, TRAINING, budget=200.0, measured=compiles, elapsed=56.0)
    assert roomy.fits and roomy.changes == [] and roomy.declined == 0
    tight = budget.plan(ctx, rc.settings, TRAINING, budget=60.0, measured=budget.Measured(4e-3, compile=10.0),
                        elapsed=0.0)
    assert tight.fits and tight.declined == 0  # a fitting suite takes whatever cuts it needs, small ones too


def test_what_would_end_past_the_deadline_is_not_started(rc):
    """The plan's estimates can be off; a training it kept is still not started when, at its turn, it is estimated
    to end after the run's deadline: the LR test's second round and the capacity ladder say why instead."""
    import time

    from harness.checks.training import capacity, lr_range

    ctx = fresh()
    assert budget.out_of_time(ctx, budget.Cost(1e9, 9)) is None  # no budget: nothing is cut at run time
    small = lr_range.Settings(grid_size=12, grid_steps=100)
    plan = budget.plan(ctx, {**rc.settings, "lr_range": small}, TRAINING, budget=3600.0,
                       measured=budget.Measured(1e-4, compile=1.0), elapsed=0.0)
    assert plan.fits and not plan.changes
    ctx.shared["_budget"] = plan
    grid_plan, grid = lr_range.run_program(ctx, small)
    assert isinstance(lr_range.run_refinement(ctx, grid_plan, grid), lr_range.Refinement)  # time enough
    assert budget.out_of_time(ctx, budget.Cost(1000, 1)) is None
    ctx.started = time.perf_counter() - 3599.95  # the run has 50 ms left; the second round needs about 150
    late = lr_range.run_refinement(ctx, grid_plan, grid)
    assert isinstance(late, str) and late.startswith("not run: the budget (3600 s for the run) had 0 s left")
    assert budget.out_of_time(ctx, budget.Cost(0, 0)) is None  # nothing to train always fits
    ladder = capacity.run(ctx, capacity.Settings())
    assert ladder.skipped.startswith("not run: the budget") and ladder.findings == []


def test_the_probe_measures_the_configured_model():
    measured = budget.measure(fresh())
    assert 1e-6 < measured.member_step < 0.05 and measured.took > 0  # the reference MLP: well under a ms here
    assert 0.0 <= measured.compile <= measured.took


def test_a_run_with_a_budget_reports_what_it_cut():
    from harness.engine import compile as programs
    from harness.pipeline import run
    from harness.report import format as fmt
    from harness.report import writer
    from harness.report.wandb_logger import main_summary

    rc = compose(["logger=none", "budget=0.01", "diagnostics.run=[seeds,lr_range,capacity]",
                  "diagnostics.seeds.steps=200", "diagnostics.lr_range.grid_steps=200",
                  "diagnostics.lr_range.default_horizon=200"])
    before = {k: dict(v) for k, v in programs.STATS.by_program.items()}
    result = run(rc)
    b = result.budget
    # The cut suite's member table trained by the probe's program: the probe's one compile was the training's.
    table, earlier = programs.STATS.by_program["table/train"], before.get("table/train", {})
    assert table["compiles"] == earlier.get("compiles", 0) and table["runs"] > earlier.get("runs", 0)
    assert b["planned_programs"] == 0
    assert b["budget_seconds"] == 0.01 and b["member_step_ms"] > 0 and not b["fits"]
    assert b["elapsed_seconds"] > 0.01 and b["left_seconds"] < 0 and b["probe_seconds"] > 0
    made = [c.change for c in budget.CUTS if c.change in b["changes"]]
    assert all(c.change in made for c in budget.CUTS[:3]) and "no capacity ladder" in made
    # One of the two halvings takes the 200-step runs to the 100-step floor: the first, unless shorter seed runs
    # would cost more in programs than they save (then the second, once the capacity ladder is dropped).
    assert b["changes"].count(budget.HALF_STEPS.change) == 1
    assert b["change_overrides"][b["changes"].index(budget.HALF_STEPS.change)] == [
        "diagnostics.seeds.steps=100", "diagnostics.lr_range.grid_steps=100", "diagnostics.lr_range.default_horizon=200"]
    lr = next(o for o in result.outcomes if o.name == "lr_range").metrics
    assert lr["lr_range/horizon_steps"] == 200 and lr["lr_range/grid_steps"] == 100  # extrapolated to 200
    capacity = next(o for o in result.outcomes if o.name == "capacity")
    assert capacity.skipped.startswith("not run: the budget") and capacity.findings == []
    report = writer.build_report(result, config={}, command=["harness"], environment={})
    assert report["budget"] == b and report["diagnostics"]["capacity"]["skipped"] == capacity.skipped
    markdown = writer.render_markdown(report)
    assert "## Budget" in markdown and b["changes"][0] in markdown
    assert f"add `{fmt.budget_rerun(b)}`" in markdown and "'diagnostics.run=[seeds,lr_range]'" in markdown
    # W&B: the main run's summary tells runs whose cuts differ apart (their config is the same).
    summary = main_summary(report, result)
    assert summary["budget/seconds"] == 0.01 and summary["budget/fits"] is False
    assert summary["budget/cuts"] == len(b["changes"]) and summary["budget/overrides"] == " ".join(b["overrides"])
    assert {"diagnostics.lr_range.refine=false", "diagnostics.run=[seeds,lr_range]"} <= set(b["overrides"])


def test_the_probe_runs_the_member_tables_own_program_which_the_table_then_reuses():
    """The probe measures on the program the configured member table trains (its spec and call width, a few
    steps of budget per member): a suite the budget keeps whole compiles nothing more, and trains what it trains
    without a budget, bitwise."""
    from harness.engine import compile as programs
    from harness.pipeline import run

    args = ["logger=none", "diagnostics.run=[seeds,controls]", "diagnostics.seeds.steps=100",
            "diagnostics.controls.steps=100"]
    plain = run(compose(args))
    table = programs.STATS.by_program.get("table/train", {}).get("compiles", 0)
    budgeted = run(compose([*args, "budget=3600"]))
    b = budgeted.budget
    assert b["fits"] and b["changes"] == [] and b["configured_programs"] == 0
    assert "measuring having compiled its member table" in b["summary"]
    assert programs.STATS.by_program["table/train"]["compiles"] == table  # the probe's compile served it
    for name in ("seeds", "controls"):
        a, c = (next(o for o in r.outcomes if o.name == name) for r in (plain, budgeted))
        assert a.metrics == c.metrics and [f.id for f in a.findings] == [f.id for f in c.findings]


def batch_mean_cross_entropy(outputs, targets):
    """A user's loss that averages over its batch itself: a scalar, not one value per example."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean()


def test_the_estimate_trains_the_overfit_test_where_the_member_table_will(rc):
    """The overfit test joins the member table only with its batch repeated to the run's, which needs a loss per
    example (a loss that averages its batch itself would see the repeats): with such a loss it is a program of its
    own at any step count, and the estimate counts it so, the same suite at the same steps as the table trains it.
    With a per-example loss and the seed runs' steps, it is a row of the table; under a cut to other steps, it
    joins the probe's program only when that program's compile costs more than the batch it adds."""
    from harness.pipeline import build_context

    settings = {n: rc.settings[n] for n in ("overfit_batch", "seeds")}
    per_example = fresh()
    assert per_example.loss_per_example()
    assert budget.cost(per_example, settings).programs == 1
    scalar = build_context(compose(["logger=none", "~loss",
                                    "+loss={_target_:test_budget.batch_mean_cross_entropy,_partial_:true}"]))
    assert not scalar.loss_per_example()
    assert budget.cost(scalar, settings).programs == 2
    [(parts, _)] = scalar.table([r for requests in announced(scalar, settings).values() for r in requests])
    assert all(r.name != "overfit_batch" for r in parts)  # what the estimate said: it trains apart
    probe = budget.Measured(1e-6, compile=100.0, program=budget.probe_program(per_example, settings))
    assert probe.program.spec.fixed_batch  # the configured table's program holds the fixed batch
    short = {**settings, "seeds": dataclasses.replace(settings["seeds"], steps=250)}
    assert budget.cost(per_example, short).programs == 2  # no probe: apart
    assert budget.cost(per_example, short, probe).programs == 1  # a dear compile: joined
    cheap = dataclasses.replace(probe, member_step=1.0, compile=1.0)
    assert budget.cost(per_example, short, cheap).programs == 2
    assert budget.cost(scalar, short, probe).programs == 2  # it cannot join, whatever the compile
