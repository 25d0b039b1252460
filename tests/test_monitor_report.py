"""The monitor's host side in a user's own loop writes harness's report files and logs to W&B: the report's root
cause is the monitor's finding, its plot marks the step, and a W&B run gets one history row per step read plus the
report's summary and findings."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax
import pytest
from helpers import offline_runs, wandb_records
from test_monitor import batches, digits, init_mlp, make_chunk, naive_ce, run, val_loss_fn  # noqa: F401

import harness.monitor as hm


def test_a_users_loop_writes_the_report_with_its_root_cause(digits, tmp_path):  # noqa: F811
    x, y = digits
    corrupted = dict(outlier_step=300, outlier_scale=1e4, corrupt_labels=True)
    watch = run(hm.monitor(optax.adam(1e-3)), x, y, loss=naive_ce, **corrupted)
    report = watch.report(str(tmp_path), config={"lr": 1e-3})
    assert report["status"] == "unhealthy" and report["root_cause"]["id"] == "train.nonfinite"
    assert report["root_cause"]["step"] == 300 and report["root_cause"]["branch"] == "nonfinite"
    on_disk = json.load(open(tmp_path / "report.json"))
    assert on_disk["diagnostics"]["monitor"]["metrics"]["steps"] == 400 and on_disk["config"] == {"lr": 1e-3}
    assert "**Root cause**" in open(tmp_path / "report.md").read()
    [plot] = on_disk["plots"].values()
    assert os.path.getsize(tmp_path / plot["path"]) > 0


@pytest.mark.parametrize("corrupted", [True, False])
def test_a_validation_set_with_a_nan_is_the_root_cause_while_training_stays_finite(digits, tmp_path,  # noqa: F811
                                                                                   corrupted):
    """The user's loop trains on clean data and validates on a held-out split one of whose images holds a NaN (a
    corrupted file the training set does not share): every training loss is finite, the validation loss NaN at each
    evaluation. The monitor's non-finite error, on the validation split at the first evaluation, is the report's
    root cause, and the NaN validations raise no other finding (overfitting). The clean split: healthy."""
    x, y = digits
    x_val, y_val = x[1000:].copy(), y[1000:]
    if corrupted:
        x_val[17, 5] = np.nan
    tx = hm.monitor(optax.adam(1e-3))
    params = init_mlp(jax.random.key(0))
    opt_state, watch = tx.init(params), hm.Monitor(params)
    xs, ys = batches(x[:1000], y[:1000], 600)
    chunk = make_chunk(tx)
    for start in range(0, 600, 100):
        (params, opt_state), _ = chunk(params, opt_state, xs[start:start + 100], ys[start:start + 100])
        watch.read(opt_state)
        watch.validation(val_loss_fn(params, x_val, y_val))
    report = watch.report(str(tmp_path))
    if not corrupted:
        assert report["status"] == "healthy" and report["findings"] == [], report["findings"]
        return
    [f] = report["findings"]
    assert f["id"] == "train.nonfinite" and f["severity"] == "error", report["findings"]
    assert f["evidence"]["split"] == "validation" and f["evidence"]["step"] == 99
    assert f["evidence"]["nonfinite_validations"] == f["evidence"]["validations"] == 6
    assert "validation loss went non-finite at step 99" in f["message"]
    assert report["status"] == "unhealthy" and report["root_cause"]["id"] == "train.nonfinite"


def test_a_healthy_loop_reports_healthy(digits, tmp_path):  # noqa: F811
    x, y = digits
    report = run(hm.monitor(optax.adam(1e-3)), x, y).report(str(tmp_path))
    assert report["status"] == "healthy" and report["root_cause"] is None and report["findings"] == []


def test_log_sends_each_step_read_once_and_report_adds_the_findings(digits, tmp_path):  # noqa: F811
    import wandb

    x, y = digits
    watch = run(hm.monitor(optax.adam(1e-3), update_norms=True), x, y, steps=200, chunk=100)
    wb = wandb.init(mode="offline", dir=str(tmp_path), project="harness-tests")
    assert watch.log(wb) == 200 and watch.log(wb) == 0  # nothing new since the last call
    watch.report(str(tmp_path / "report"), wandb_run=wb)
    wb.finish()
    [run_dir] = offline_runs(str(tmp_path))
    text = json.dumps(wandb_records(run_dir))
    assert "monitor/loss" in text and "monitor/update_ratio/dense0/kernel" in text and "findings" in text
