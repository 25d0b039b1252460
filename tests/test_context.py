"""What the pipeline and the diagnostics' Context promise: diagnostics run one after the other in the checklist's
order, identical training requests are computed once (a determinism rerun trains again), a failed request is not
remembered, and a crash costs one diagnostic, never the report."""

from __future__ import annotations

import types

import pytest

from harness.checks.base import Outcome
from harness.engine.core import Hparams
from helpers import compose, replace_group
from reference_job import fresh

TINY = [*replace_group("data", "helpers.tiny_classification"), "model.width=8", "model.depth=1", "logger=none",
        "engine.compilation_cache=null", "diagnostics.seeds.steps=40", "diagnostics.controls.steps=40"]


def test_the_same_training_request_trains_once_and_a_rerun_trains_again():
    calls = []

    def train(problem, spec, hparams, arrays, *, name, progress):
        calls.append(name)
        return types.SimpleNamespace(name=name)

    ctx = fresh(train_fn=train)
    spec, hp = ctx.spec(10), Hparams.make(lr=[1e-3, 1e-2])
    first = ctx.train("first", spec, hp)
    assert ctx.train("second", spec, hp) is first and calls == ["first"]
    assert ctx.train("other", ctx.spec(11), hp) is not first  # another spec is another request
    ctx.train("again", spec, hp, rerun=True)  # a determinism rerun really trains again
    assert calls == ["first", "other", "again"]


def test_a_failed_training_request_is_not_remembered():
    attempts = []

    def flaky(problem, spec, hparams, arrays, *, name, progress):
        attempts.append(name)
        if len(attempts) == 1:
            raise RuntimeError("out of memory")
        return "trained"

    ctx = fresh(train_fn=flaky)
    spec, hp = ctx.spec(10), Hparams.make(lr=[1e-3])
    with pytest.raises(RuntimeError):
        ctx.train("first", spec, hp)
    assert ctx.train("second", spec, hp) == "trained" and len(attempts) == 2


def fake_diagnostics(monkeypatch, fakes: dict):
    import harness.pipeline

    real = harness.pipeline.diagnostic_module
    monkeypatch.setattr(harness.pipeline, "diagnostic_module", lambda name: fakes.get(name) or real(name))


def test_diagnostics_run_in_the_checklists_order_whatever_order_the_config_lists(monkeypatch):
    """Later diagnostics read what earlier ones share (the seed spread): the checklist's order is the producers'."""
    from harness.pipeline import run

    order = []

    def fake(name):
        def check(ctx, settings):
            order.append(name)
            return Outcome(name)
        return types.SimpleNamespace(run=check)

    fake_diagnostics(monkeypatch, {n: fake(n) for n in ("seeds", "controls", "lr_range", "capacity")})
    result = run(compose([*TINY, "diagnostics.run=[capacity,lr_range,controls,seeds,data]"]))
    assert order == ["seeds", "controls", "lr_range", "capacity"]
    assert [o.name for o in result.outcomes] == ["data", "seeds", "controls", "lr_range", "capacity"]


def test_a_crashed_producer_costs_only_itself(monkeypatch):
    from harness.pipeline import run

    seen = {}

    def seeds_check(ctx, settings):
        raise ZeroDivisionError("seeds broke")

    def controls_check(ctx, settings):
        seen["spread"] = ctx.shared.get("seed_spread")  # never published: the consumer falls back
        return Outcome("controls", metrics={"controls/ran": 1})

    fake_diagnostics(monkeypatch, {"seeds": types.SimpleNamespace(run=seeds_check),
                                   "controls": types.SimpleNamespace(run=controls_check)})
    result = run(compose([*TINY, "diagnostics.run=[seeds,controls]"]))
    assert [o.name for o in result.outcomes] == ["seeds", "controls"]
    assert result.outcomes[0].skipped == "crashed: ZeroDivisionError: seeds broke"
    assert result.outcomes[1].metrics == {"controls/ran": 1} and seen == {"spread": None}


def test_training_after_a_broken_model_is_skipped_with_why():
    """A blocking model error (the forward pass raises) skips the training diagnostics, saying which error."""
    from harness.pipeline import run

    broken = [*replace_group("data", "helpers.tiny_classification"),
              *replace_group("model", "planted.ShapeMismatch", width=8, depth=1), "logger=none",
              "engine.compilation_cache=null", "diagnostics.seeds.steps=20", "diagnostics.controls.steps=20",
              "diagnostics.run=[model,seeds,controls]"]
    model, seeds, controls = run(compose(broken)).outcomes
    assert [f.id for f in model.findings if f.severity.value == "error"] == ["model.forward"]
    assert seeds.skipped and seeds.skipped.startswith("skipped: model.forward")
    assert controls.skipped == seeds.skipped and not seeds.findings and not seeds.metrics


def test_a_request_of_its_own_trains_in_even_calls():
    """Members beyond one call's width split evenly over as few calls as the width allows (a padded member costs
    a real one's step on CPU): 7 members at 6 per call train in 2 calls of 4, and their results are the rows asked
    for; a follow-up padded to whole calls of the first request's program keeps that program's width."""
    from harness.engine import devices, driver

    spec = fresh().spec(10, max_members_per_call=6)
    assert driver.even_calls(spec, 7).max_members_per_call == devices.padded_size(4)
    assert driver.even_calls(spec, 6) is spec and driver.even_calls(spec, 3) is spec
    assert driver.even_calls(spec, 12).max_members_per_call == 6  # whole calls keep the width
    assert driver.even_calls(spec, 13).max_members_per_call == min(devices.padded_size(5), 6)
    ctx = fresh()
    hp = Hparams.make(lr=[1e-3] * 7, init_seed=range(7))
    result = ctx.train("own", ctx.spec(10, max_members_per_call=6), hp)
    assert result.program_width == devices.padded_size(4) and result.loss.shape == (7, 10)
