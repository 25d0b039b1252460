"""The member table (harness/engine/table.py): the training diagnostics' requests merged into one program.

Planning on hand-built requests (which requests share a program, the merged cadence, the overfit batch repeated to
the run's batch size), then compiled on the reference job: every request's share of the merged program is bitwise
what that program gives its rows alone, follow-up requests (the LR test's second round, the determinism rerun)
reuse the program, and a default run compiles one training program for seeds, controls, LR range and overfit.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from helpers import compose

from harness.checks.training import controls, lr_range, overfit_batch, seeds
from harness.engine import compile as programs
from harness.engine import driver, table
from harness.engine.core import Hparams, TrainSpec
from harness.engine.driver import SweepResult, eval_schedule
from harness import budget, pipeline
from harness.pipeline import build_context, run

SMALL_LR = lr_range.Settings(grid_size=12, grid_steps=100)


def spec(**kw):
    return TrainSpec(**{"steps": 100, "batch_size": 128, **kw})


def request(name, n, **kw):
    return table.Request(name, spec(**kw), Hparams.make(n=n))


@pytest.fixture(scope="module")
def ctx():
    return build_context(compose(["logger=none"]))


def test_plan_groups_requests_that_can_share_a_program(ctx):
    base = ctx.arrays
    reqs = [request("a", 3), request("b", 4, eval_every=25), request("c", 2, steps=200), request("d", 5),
            table.Request("e", spec(), Hparams.make(n=2), arrays=base._replace(x_train=base.x_train.copy()))]
    groups = table.plan(reqs, base, 128, free_regularization=True)
    assert groups == [[0, 1, 2, 3]]  # other arrays (e) train alone; other steps (c) join with budgets
    merged = table.merged([reqs[i] for i in groups[0]], base)
    assert len(merged.hparams) == 14 and merged.spec.eval_every == 25 and merged.spec.steps == 200
    assert table.plan(reqs[:2], base, 128, free_regularization=True) == [[0, 1]]
    # Regularization off (overfit) joins only a model that has none to switch off.
    off = request("f", 2, regularization=False)
    assert table.plan([reqs[0], off], base, 128, free_regularization=False) == []
    assert table.plan([reqs[0], off], base, 128, free_regularization=True) == [[0, 1]]


def test_the_fixed_batch_joins_at_the_runs_batch_size(ctx):
    base = ctx.arrays
    index = np.arange(32, dtype=np.int32)
    fixed = table.Request("overfit", spec(batch_size=32, fixed_batch=32, regularization=False),
                          Hparams.make(n=2, fixed_batch=1), arrays=base._replace(fixed_index=index))
    assert table.fixed_only(fixed)
    groups = table.plan([request("seeds", 4), fixed], base, 128, free_regularization=True)
    assert groups == [[0, 1]]
    merged = table.merged([request("seeds", 4), fixed], base)
    assert merged.spec.batch_size == 128 and merged.spec.fixed_batch == 32 and merged.spec.regularization
    np.testing.assert_array_equal(merged.arrays.fixed_index, index)
    assert table.plan([request("seeds", 4), fixed], base, 100, free_regularization=True) == []  # 100 % 32 != 0


def test_call_width_fits_the_table_and_its_follow_ups():
    """On CPU (linear cost in members), the widest call that pads the table and the LR test's second round by at
    most 5% of their member-steps: 54 rows and 35 to follow in calls of 18 (90 rows trained, not 54 + 54 in calls
    of 54); members of different step counts are padded within their own calls."""
    assert table.call_width([(54, 500)], [(35, 500)], 64) == 18
    assert table.call_width([(54, 500)], [], 64) == 54  # nothing follows: one call
    assert table.call_width([(100, 500)], [], 64) == 64
    w = table.call_width([(40, 500)], [(13, 500)], 64)
    assert sum(-(-n // w) * w for n in (40, 13)) <= 1.05 * 53
    w = table.call_width([(19, 500), (35, 250)], [(35, 250)], 64)
    assert sum(-(-n // w) * w * t for n, t in ((19, 500), (35, 250), (35, 250))) <= 1.05 * (19 * 500 + 70 * 250)


def test_requests_of_different_steps_share_a_program_with_budgets(ctx):
    """A 60-step request beside a 100-step one: one program of 100 steps, the short request's members with a
    60-step budget, its share read at its own steps (its last evaluation after its members stopped)."""
    base = ctx.arrays
    long, short = request("long", 3), request("short", 2, steps=60)
    assert table.plan([long, short], base, 128, free_regularization=True) == [[0, 1]]
    both = table.merged([long, short], base)
    assert both.spec.steps == 100 and list(both.hparams.steps) == [-1, -1, -1, 60, 60]
    assert table.schedule_map(short.spec, eval_schedule(both.spec)) == [0]  # its step 60: read at 100
    # The overfit test's batch repeated to 128 joins only requests of its own steps.
    fixed = table.Request("overfit", spec(batch_size=32, fixed_batch=32, regularization=False),
                          Hparams.make(n=2, fixed_batch=1), arrays=base._replace(fixed_index=np.arange(32)))
    assert table.plan([long, fixed], base, 128, True) == [[0, 1]]
    assert table.plan([short, fixed], base, 128, True) == []
    # Chunks that would end elsewhere cannot be read off the merged program: kept apart.
    odd = request("odd", 2, steps=150, steps_per_call=100)  # alone: two chunks of 75
    assert table.plan([request("l", 2, steps=200, steps_per_call=100), odd], base, 128, True) == []


def test_the_fixed_batch_is_repeated_only_for_a_per_example_loss(ctx):
    """A loss that sums over its batch (a planted bug) would see the overfit batch's repeats: 4x its loss and
    gradient in a batch of 128, a different run. Such a fixed batch keeps its own program."""
    import dataclasses as dc

    import jax.numpy as jnp

    x, y = ctx.arrays.x_train[:2], ctx.arrays.y_train[:2]
    assert table.per_example_loss(ctx.problem, x, y)
    summed = dc.replace(ctx.problem, loss_fn=lambda out, labels: jnp.sum(ctx.problem.loss_fn(out, labels)))
    assert not table.per_example_loss(summed, x, y)
    base = ctx.arrays
    fixed = table.Request("overfit", spec(batch_size=32, fixed_batch=32, regularization=False),
                          Hparams.make(n=2, fixed_batch=1), arrays=base._replace(fixed_index=np.arange(32)))
    assert table.plan([request("seeds", 4), fixed], base, 128, True, repeat_fixed=False) == []


def test_split_takes_each_requests_own_evaluations():
    assert eval_schedule(spec(eval_every=25)) == [25, 50, 75, 100]
    assert eval_schedule(spec(steps=1000, steps_per_call=500)) == [500, 1000]


def test_a_share_keeps_its_own_batch_only_evaluations(ctx):
    """Overfit's batch-only cadence merged with another request's full one: the merged program evaluates the
    validation set where the other asked, but overfit's share has NaN there, as its program alone would."""
    base = ctx.arrays._replace(fixed_index=np.arange(32, dtype=np.int32))
    full = request("full", 2, eval_every=50)
    batch = table.Request("overfit", spec(fixed_batch=32, batch_eval_every=25, regularization=False),
                          Hparams.make(n=1, fixed_batch=1), arrays=base)
    merged = table.merged([full, batch], ctx.arrays)
    assert (merged.spec.eval_every, merged.spec.batch_eval_every) == (50, 25)
    steps = eval_schedule(merged.spec)
    assert steps == [25, 50, 75, 100]
    ones = np.ones((3, len(steps)))
    result = SweepResult(merged.hparams, np.ones((3, 100)), np.ones((3, 100)), np.ones((3, 100)), np.array(steps),
                         ones, ones, ones, np.full(3, -1), batch_loss=ones, batch_accuracy=ones)
    mine = table.split(result, slice(2, 3), batch)
    assert np.isnan(mine.val_loss[0, :3]).all() and mine.val_loss[0, 3] == 1 and (mine.batch_loss == 1).all()
    other = table.split(result, slice(0, 2), full)
    assert list(other.eval_steps) == [50, 100] and (other.val_loss == 1).all()


def test_each_share_is_what_the_merged_program_gives_its_rows_alone(ctx):
    """Bitwise: a request's share of the merged table equals the same program (spec, arrays, member count) run
    with only that request's rows (the others padding), and its follow-ups reuse that program."""
    seed_settings, control_settings = seeds.Settings(steps=100), controls.Settings(steps=100)
    ob_settings = overfit_batch.Settings(steps=100)
    reqs = (seeds.requests(ctx, seed_settings) + controls.requests(ctx, control_settings)
            + lr_range.requests(ctx, SMALL_LR) + overfit_batch.requests(ctx, ob_settings))
    fresh = dataclasses.replace(ctx, shared={})
    before = programs.STATS.compiles
    assert fresh.prefetch(reqs) == 1
    assert programs.STATS.compiles == before + 1  # one training program for four diagnostics
    plan, grid = lr_range.run_program(fresh, SMALL_LR)  # answered from the table
    assert programs.STATS.compiles == before + 1
    alone = fresh.train_like(grid, "alone", grid.hparams)  # the same program, only the grid's rows real
    np.testing.assert_array_equal(alone.loss, grid.loss)
    np.testing.assert_array_equal(alone.final_val_loss, grid.final_val_loss)
    refinement = lr_range.run_refinement(fresh, plan, grid)
    # As many members as the first round (15), in whole calls of the table's program.
    assert refinement is not None and len(refinement.val) % grid.program_width == 0
    assert len(grid.hparams) <= len(refinement.val) < len(grid.hparams) + grid.program_width
    assert programs.STATS.compiles == before + 1  # the second round reuses the table's program
    first = seeds.train_seeds(fresh, 100, seed_settings.num_seeds)
    again = fresh.train("seeds/rerun", seeds.seed_spec(fresh, 100), first.hparams, rerun=True)
    np.testing.assert_array_equal(first.loss, again.loss)  # duplicate members of one call: identical
    _, _, ob = overfit_batch.run_program(fresh, ob_settings)
    own = overfit_batch.train_request(fresh, ob_settings)[2]
    assert list(ob.eval_steps) == eval_schedule(own)  # its own cadence, not the table's
    assert ob.batch_loss.shape == (len(ob.hparams), len(ob.eval_steps)) and np.isfinite(ob.batch_loss).all()
    assert programs.STATS.compiles == before + 1


def test_a_default_run_trains_one_program_for_the_training_diagnostics(monkeypatch):
    rc = compose(["logger=none", "diagnostics.seeds.steps=100", "diagnostics.overfit_batch.steps=100",
                  "diagnostics.controls.steps=100", "diagnostics.lr_range.grid_steps=100",
                  "diagnostics.capacity.steps=100",
                  "diagnostics.run=[model,overfit_batch,seeds,controls,lr_range,capacity]"])
    before = {k: dict(v) for k, v in programs.STATS.by_program.items()}
    ahead = []  # (thread, members, steps) of each program compiled ahead
    compile_ahead = driver.compile_ahead

    def recording(problem, spec, hparams, arrays, **kw):
        ahead.append((threading.current_thread().name, len(hparams), spec.steps))
        return compile_ahead(problem, spec, hparams, arrays, **kw)

    monkeypatch.setattr(driver, "compile_ahead", recording)
    result = run(rc)
    # The table's program was compiled beside the model stage, in a thread that did not outlive the run.
    table_rows = sum(len(r.hparams) for r in pipeline.announced(rc, result.context, [
        "overfit_batch", "seeds", "controls", "lr_range", "capacity"], []))
    assert ahead == [("harness-compile-ahead", table_rows, 100)]
    assert not any(t.name == "harness-compile-ahead" for t in threading.enumerate())
    runs = {k: v["runs"] - before.get(k, {}).get("runs", 0) for k, v in programs.STATS.by_program.items()}
    assert result.status == "healthy", [f.message for f in result.findings]
    ran = {k for k, v in programs.STATS.by_program.items()
           if k.endswith("/train") and v["run_seconds"] > before.get(k, {}).get("run_seconds", 0.0)}
    # Each diagnostic's time includes its rows' share of the table's training.
    seconds = {o.name: o.seconds for o in result.outcomes}
    shares = result.context.shared["_prefetched_seconds"]
    assert set(shares) == {"overfit_batch", "seeds", "controls", "lr_range", "capacity"}
    assert all(seconds[name] >= share > 0 for name, share in shares.items())
    # The table, the LR test's second round by the table's program (the rerun and the capacity ladder's smaller
    # rungs are rows of the table) and, at 100 steps, the ladder's larger rung: one call of one member.
    assert ran == {"table/train", "lr_range/refine/train", "capacity/train"}, ran
    capacity = result.outcomes[-1].metrics
    assert capacity["capacity/trained"] == 6 and runs["capacity/train"] == 1
    assert programs.STATS.by_program["lr_range/refine/train"]["compiles"] == before.get(
        "lr_range/refine/train", {}).get("compiles", 0)


def test_nothing_is_compiled_ahead_with_a_budget_whose_probe_times_the_table(ctx):
    budgeted = compose(["logger=none", "budget=60"])
    assert pipeline.compile_ahead(budgeted, ctx, ["seeds", "lr_range"], []) is None


def test_regularization_matters_only_for_a_model_with_dropout(ctx):
    x = ctx.arrays.x_train[:2]
    assert not table.regularization_matters(ctx.problem, x)
    dropout = build_context(compose(["logger=none", "model.dropout=0.3"]))
    assert table.regularization_matters(dropout.problem, x)


def test_a_smaller_suite_trains_by_an_already_compiled_tables_program(ctx):
    """The budget's probe compiles the configured table's program; the suite its cuts leave (fewer rows, shorter
    runs, an LR grid that evaluates to extrapolate) trains by that program, its shorter runs as budgets and its
    evaluation cadence passed to it, and compiles nothing. Each share is still bitwise what that program gives its
    rows alone; a request the program cannot answer (more steps, evaluations inside a program that has none) is
    not put onto it."""
    long_grid = lr_range.Settings(grid_size=12, grid_steps=200, default_horizon=200)
    short_grid = dataclasses.replace(long_grid, grid_steps=100)  # extrapolated to 200: evaluates every 20 steps
    configured = (overfit_batch.requests(ctx, overfit_batch.Settings(steps=200))
                  + seeds.requests(ctx, seeds.Settings(steps=200, check_determinism=False))
                  + lr_range.requests(ctx, long_grid))
    cut = (seeds.requests(ctx, seeds.Settings(steps=100, check_determinism=False))
           + lr_range.requests(ctx, short_grid))
    [(_, program)] = ctx.table(configured)  # the overfit test's batch evaluated inside, every 50 steps
    [(_, smaller)] = ctx.table(cut)
    assert program.spec.eval_every == 0 and program.spec.batch_eval_every == 50
    assert smaller.spec.eval_every == 20 and smaller.spec.steps == 100 and not smaller.spec.fixed_batch
    fresh = dataclasses.replace(ctx, shared={"_probe": budget.Measured(1e-3, program=program)})
    [(parts, onto)] = fresh.table(cut)
    assert onto.spec == dataclasses.replace(program.spec, eval_every=20, batch_eval_every=0, inside_evals=True)
    assert onto.arrays is program.arrays and len(onto.hparams) == len(smaller.hparams)
    assert (np.asarray(onto.hparams.steps) == 100).all()  # the cut steps, as budgets
    probe = program.hparams.take(np.arange(program.spec.max_members_per_call) % len(program.hparams))
    driver.train_members(ctx.problem, program.spec, probe, program.arrays)  # what the budget's probe compiles
    before = programs.STATS.compiles
    assert fresh.prefetch(cut) == 1 and programs.STATS.compiles == before  # compiled by the probe
    first = seeds.train_seeds(fresh, 100, 4)
    assert first.loss.shape[1] == 100 and np.isfinite(first.loss).all()
    grid_plan, grid = lr_range.run_program(fresh, short_grid)
    assert list(grid.eval_steps) == eval_schedule(smaller.spec)
    assert np.isfinite(grid.val_loss).all()  # every evaluation it asked for was made inside the calls' budgets
    rows = onto.hparams.take(np.arange(4))  # the seed rows (at least a call's width: the same program)
    assert program.spec.max_members_per_call <= 4
    alone = driver.train_members(ctx.problem, onto.spec, rows, program.arrays)
    np.testing.assert_array_equal(alone.loss[:, :100], first.loss)
    assert programs.STATS.compiles == before
    # Not onto it: longer runs than it trains; evaluations inside a program that has none.
    longer = seeds.requests(ctx, seeds.Settings(steps=300, check_determinism=False)) + lr_range.requests(ctx, short_grid)
    for parts, both in ctx.table(longer):
        assert table.onto(parts, both, program) is None
    [(_, plain)] = ctx.table(configured[1:])  # without the overfit test: no evaluation inside its chunks
    assert table.onto(cut, smaller, plain) is None
    capable = dataclasses.replace(plain, spec=dataclasses.replace(plain.spec, inside_evals=True))  # the probe's
    assert table.onto(cut, smaller, capable).spec.eval_every == 20


def _overfit_both_ways(ctx) -> dict:
    """The overfit test of a cut suite (the others' steps halved) trained in the probe's program (a dear compile)
    and apart (a cheap one): its outcome each way, after checking the rule, the grouping and the estimate."""
    from harness.checks.training.overfit_batch import requests as overfit_requests

    overfit = overfit_batch.Settings(steps=200)
    long_grid = lr_range.Settings(grid_size=12, grid_steps=200, default_horizon=200)
    configured = (overfit_requests(ctx, overfit) + seeds.requests(ctx, seeds.Settings(steps=200,
                                                                                       check_determinism=False))
                  + lr_range.requests(ctx, long_grid))
    cut = (overfit_requests(ctx, overfit) + seeds.requests(ctx, seeds.Settings(steps=100, check_determinism=False))
           + lr_range.requests(ctx, dataclasses.replace(long_grid, grid_steps=100)))
    [(_, program)] = ctx.table(configured)
    program = dataclasses.replace(program, spec=dataclasses.replace(program.spec, inside_evals=True))  # the probe's
    fixed = cut[0]
    # The overfit test's rows at 128 examples instead of 32: 3/4 of (members x 200 steps) member-steps added.
    added = 0.75 * len(fixed.hparams) * 200
    dear_compile = budget.Measured(1e-3, compile=2.0 * added * 1e-3, program=program)
    cheap_compile = budget.Measured(1e-3, compile=0.5 * added * 1e-3, program=program)
    assert budget.joins_table(fixed, ctx.batch_size, dear_compile)
    assert not budget.joins_table(fixed, ctx.batch_size, cheap_compile)
    assert not budget.joins_table(fixed, ctx.batch_size, None)
    no_fixed = dataclasses.replace(program, spec=dataclasses.replace(program.spec, fixed_batch=0))
    assert not budget.joins_table(fixed, ctx.batch_size, dataclasses.replace(dear_compile, program=no_fixed))

    outcomes = {}
    for label, probe in (("joined", dear_compile), ("apart", cheap_compile)):
        fresh = dataclasses.replace(ctx, shared={"_probe": probe})
        [(parts, trained)] = fresh.table(cut)
        assert (fixed in parts) == (label == "joined")
        assert budget.program_key(fresh, trained) == budget.program_key(fresh, program)  # the probe's program
        fresh.prefetch(cut)
        outcomes[label] = overfit_batch.run(fresh, overfit)
        # What the budget's estimate counts: the overfit test's own program only when it trains apart.
        settings = {"overfit_batch": overfit, "seeds": seeds.Settings(steps=100, check_determinism=False)}
        assert budget.cost(fresh, settings, probe).programs == (1 if label == "joined" else 2)
    return outcomes


def test_a_cut_suite_takes_the_overfit_test_into_the_probes_program_when_its_compile_costs_more(ctx):
    """A budget that shortens the other runs leaves the overfit test's steps as they are, so it no longer shares
    their step count. It joins the probe's program anyway (its fixed batch repeated to the table's batch, its rows
    in calls of their own) when the compile that saves is more than the compute it adds, and trains apart at its
    own batch when not (harness.budget.joins_table): both ways its diagnosis is the same, on a healthy setup and
    on a planted learning rate 100x too low."""
    outcomes = _overfit_both_ways(ctx)
    joined, apart = (outcomes[k].metrics for k in ("joined", "apart"))
    assert joined["overfit_batch/passed"] and apart["overfit_batch/passed"]
    assert [f.id for f in outcomes["joined"].findings] == [f.id for f in outcomes["apart"].findings]
    assert joined["overfit_batch/final_loss"] == pytest.approx(apart["overfit_batch/final_loss"], rel=0.2, abs=1e-3)
    assert abs(joined["overfit_batch/steps_to_target"] - apart["overfit_batch/steps_to_target"]) <= 10

    outcomes = _overfit_both_ways(build_context(compose(["logger=none", "optim.lr=1e-5"])))
    joined, apart = (outcomes[k].metrics for k in ("joined", "apart"))
    assert not joined["overfit_batch/passed"] and not apart["overfit_batch/passed"]
    assert joined["overfit_batch/failure"] == apart["overfit_batch/failure"]
    codes = [f.id for f in outcomes["joined"].findings]
    assert codes and codes == [f.id for f in outcomes["apart"].findings]
