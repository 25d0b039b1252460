"""Training diagnostics run side by side (engine.concurrent_diagnostics): same results as one at a time, shared
results waited for, identical requests and programs computed once, a crash costs one diagnostic, no deadlock."""

from __future__ import annotations

import math
import threading
import time
import types

import numpy as np
import pytest

from harness.checks.base import Outcome, Shared
from harness.engine import compile as programs
from harness.engine.train import Hparams
from helpers import compose, replace_group
from reference_job import fresh

TINY = [*replace_group("data", "helpers.tiny_classification"), "model.width=8", "model.depth=1", "logger=none",
        "engine.compilation_cache=null", "diagnostics.overfit_batch.steps=40",
        "diagnostics.overfit_batch.eval_every=20",
        "diagnostics.seeds.steps=40", "diagnostics.controls.steps=40", "diagnostics.lr_range.grid_steps=30",
        "diagnostics.lr_range.grid_size=8", "diagnostics.capacity.steps=40",
        "diagnostics.run=[data,overfit_batch,seeds,controls,lr_range,capacity]"]


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_concurrent_diagnostics_give_exactly_the_sequential_results():
    from harness.pipeline import flat_metrics, run

    results = {}
    for workers in (1, 2):
        result = run(compose([*TINY, f"engine.concurrent_diagnostics={workers}"]))
        assert [o.name for o in result.outcomes] == ["data", "overfit_batch", "seeds", "controls", "lr_range",
                                                     "capacity"]  # the configured order, whatever finished first
        assert all(o.skipped is None for o in result.outcomes), [o.skipped for o in result.outcomes]
        results[workers] = result
    one, two = (flat_metrics(results[w].outcomes) for w in (1, 2))
    assert one.keys() == two.keys()
    differing = [k for k in one if not same(one[k], two[k])]
    assert differing == []  # bitwise: every compiled program is deterministic on its own
    assert [f.id for f in results[1].findings] == [f.id for f in results[2].findings]
    # The LR range test, running beside the seeds diagnostic, waited for its spread instead of falling back.
    assert two["lr_range/margin_source"] == one["lr_range/margin_source"] == "seed_spread"


def test_shared_get_waits_for_a_promised_key_and_stops_waiting_when_resolved():
    shared = Shared()
    shared.promise("seed_spread")
    got = []
    reader = threading.Thread(target=lambda: got.append(shared.get("seed_spread")))
    reader.start()
    time.sleep(0.05)
    assert got == [] and reader.is_alive()  # still waiting
    shared["seed_spread"] = {"val_loss_std": 0.1}
    reader.join(timeout=5)
    assert got == [{"val_loss_std": 0.1}]

    shared.promise("never_published")
    reader = threading.Thread(target=lambda: got.append(shared.get("never_published", "default")))
    reader.start()
    shared.resolve("never_published")  # its diagnostic finished (or crashed) without publishing it
    reader.join(timeout=5)
    assert got[-1] == "default"
    assert Shared().get("unpromised") is None  # nothing promised: no wait


def test_the_same_training_request_from_two_threads_trains_once():
    calls = []

    def slow_train(problem, spec, hparams, arrays, *, name, progress):
        calls.append(name)
        time.sleep(0.2)
        return types.SimpleNamespace(name=name)

    ctx = fresh(train_fn=slow_train)
    spec, hp = ctx.spec(10), Hparams.make(lr=[1e-3, 1e-2])
    results = [None, None]

    def ask(i):
        results[i] = ctx.train(f"asker{i}", spec, hp)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] is results[1]
    ctx.train("again", spec, hp, rerun=True)  # a determinism rerun really trains again
    assert len(calls) == 2


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


def test_a_program_two_threads_want_compiles_once():
    def program(x):
        return x * 2 + 1

    before = programs.STATS.compiles
    x = np.arange(7, dtype=np.float32)
    outs = [None, None]

    def ask(i):
        outs[i] = programs.run("test/twice", program, x, static_key=("test_concurrency", "twice"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert programs.STATS.compiles - before == 1
    np.testing.assert_array_equal(outs[0], outs[1])


def test_a_crashed_producer_neither_blocks_its_consumers_nor_the_report(monkeypatch):
    import harness.pipeline
    from harness.pipeline import run

    seen = {}

    def seeds_check(ctx, settings):
        time.sleep(0.1)
        raise ZeroDivisionError("seeds broke")

    def controls_check(ctx, settings):
        seen["spread"] = ctx.shared.get("seed_spread")  # waits for seeds, which crashes without publishing
        return Outcome("controls", metrics={"controls/ran": 1})

    fakes = {"seeds": types.SimpleNamespace(run=seeds_check, SHARES=("seed_spread",)),
             "controls": types.SimpleNamespace(run=controls_check)}
    real = harness.pipeline.diagnostic_module
    monkeypatch.setattr(harness.pipeline, "diagnostic_module", lambda name: fakes.get(name) or real(name))
    result = run(compose([*TINY, "diagnostics.run=[seeds,controls]"]))
    assert [o.name for o in result.outcomes] == ["seeds", "controls"]
    assert result.outcomes[0].skipped == "crashed: ZeroDivisionError: seeds broke"
    assert result.outcomes[1].metrics == {"controls/ran": 1} and seen == {"spread": None}


@pytest.mark.parametrize("processes, workers, side_by_side", [(1, 2, True), (2, 2, False), (1, 1, False)])
def test_diagnostics_run_side_by_side_only_where_the_order_may_vary(monkeypatch, processes, workers, side_by_side):
    """Multi-process runs must launch the same sharded programs in the same order on every process: sequential."""
    import harness.pipeline
    from harness.engine import devices
    from harness.pipeline import run

    threads = {}

    def fake(name):
        def check(ctx, settings):
            threads[name] = threading.current_thread().name
            return Outcome(name)
        return types.SimpleNamespace(run=check)

    monkeypatch.setattr(devices, "process_count", lambda: processes)
    monkeypatch.setattr(harness.pipeline, "diagnostic_module", fake)
    run(compose([*TINY, "diagnostics.run=[seeds,controls]", f"engine.concurrent_diagnostics={workers}"]))
    in_workers = {n: t.startswith("harness-diagnostic") for n, t in threads.items()}
    assert in_workers == {"seeds": side_by_side, "controls": side_by_side}


def test_training_after_a_broken_model_is_skipped_whether_side_by_side_or_not():
    """A blocking model error (the forward pass raises) skips the training diagnostics, with why, in both modes."""
    from harness.pipeline import run

    broken = [*replace_group("data", "helpers.tiny_classification"),
              *replace_group("model", "planted.ShapeMismatch", width=8, depth=1), "logger=none",
              "engine.compilation_cache=null", "diagnostics.seeds.steps=20", "diagnostics.controls.steps=20",
              "diagnostics.run=[model,seeds,controls]"]
    for workers in (2, 1):
        result = run(compose([*broken, f"engine.concurrent_diagnostics={workers}"]))
        model, seeds, controls = result.outcomes
        assert [f.id for f in model.findings if f.severity.value == "error"] == ["model.forward"]
        assert seeds.skipped and seeds.skipped.startswith("skipped: model.forward")
        assert controls.skipped == seeds.skipped and not seeds.findings and not seeds.metrics


def test_compile_wall_time_counts_overlapping_compiles_once():
    stats = programs.ProgramStats(compile_intervals=[(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)])
    assert stats.compile_wall_seconds == pytest.approx(4.0)  # [0, 3] and [5, 6]
    assert programs.ProgramStats().compile_wall_seconds == 0.0
