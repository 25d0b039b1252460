"""The controls: real data must beat the constant-input baseline and the shuffled-label control on validation loss.
Planted bugs (labels shuffled relative to the inputs, pure-noise labels) are train.no_signal; the healthy built-in
jobs are silent; the controls reuse the seed runs (memo) and their compiled program."""

import dataclasses
import json
import os

import numpy as np
import pytest
import yaml
from helpers import compose, headline, run_cli, run_dirs
from reference_job import fresh

from harness.checks.training import controls, seeds
from harness.data import builtin, dataset
from harness.engine import compile as programs
from harness.engine.core import Arrays
from harness.errors import HarnessError
from harness.pipeline import build_context

STEPS = 150  # the reference job is far from the controls by then (val loss ~0.3 vs 2.3); the default is 500
SETTINGS = controls.Settings(steps=STEPS)
SEEDS = seeds.Settings(steps=STEPS, check_determinism=False)


# ---------------------------------------------------------------------------------------------------------------
# Planted bugs: the training labels permuted relative to the inputs; labels that are pure noise.


def misaligned_digits():
    d = builtin.digits()
    d["y_train"] = d["y_train"][np.random.default_rng(123).permutation(len(d["y_train"]))]
    return d


def noise_label_digits():
    d = builtin.digits()
    rng = np.random.default_rng(7)
    d["y_train"] = rng.integers(0, 10, len(d["y_train"]))
    d["y_val"] = rng.integers(0, 10, len(d["y_val"]))
    return d


def with_data(ctx, factory):
    """The context's job on other data of the same shapes: same Problem, hence the same compiled programs."""
    ds = dataset.from_mapping(factory())
    return dataclasses.replace(ctx, dataset=ds, arrays=Arrays(*ds.training_arrays()), shared={})


@pytest.fixture(scope="module")
def reference():
    """The reference job: seeds (3 seeds -> 4 members), then controls (2 + 2 members) on the same program."""
    ctx = fresh()
    start = programs.STATS.compiles
    seeds.run(ctx, SEEDS)
    after_seeds = programs.STATS.compiles
    outcome = controls.run(ctx, SETTINGS)
    return ctx, outcome, after_seeds - start, programs.STATS.compiles - after_seeds


def test_reference_job_has_signal(reference):
    _, outcome, _, _ = reference
    assert outcome.findings == [] and outcome.skipped is None
    m = outcome.metrics
    assert m["controls/signal"] is True
    assert m["controls/val_loss/real"] < 0.6  # learned
    # Constant inputs learn the label frequencies: about log(10) on digits' near-uniform classes.
    assert m["controls/val_loss/constant_input"] == pytest.approx(np.log(10), abs=0.05)
    assert m["controls/val_loss/shuffled_labels"] > m["controls/val_loss/constant_input"] - 0.05
    assert m["controls/val_accuracy/real"] > 0.85 and m["controls/val_accuracy/constant_input"] < 0.15


def test_margin_is_k_std_with_a_floor(reference):
    ctx, outcome, _, _ = reference
    std = ctx.shared["seed_spread"]["val_loss_std"]
    for c in controls.CONTROLS:
        expected = max(SETTINGS.margin_std * std, SETTINGS.margin_fraction * outcome.metrics[f"controls/val_loss/{c}"])
        assert outcome.metrics[f"controls/margin/{c}"] == pytest.approx(expected)


def test_controls_reuse_the_seed_runs_and_their_program(reference):
    ctx, outcome, seed_compiles, control_compiles = reference
    # 4 seed members and 2 + 2 controls: one program (compiled by the seed runs, or earlier in this session).
    assert seed_compiles <= 1 and control_compiles == 0
    assert seeds.real_runs(ctx, STEPS) is ctx.shared["seed_spread"]["result"]  # the memo served the real runs
    kinds = [row["control"] for row in outcome.members]
    assert kinds == ["real"] * 4 + ["constant_input"] * 2 + ["shuffled_labels"] * 2
    assert [row["input_scale"] for row in outcome.members[4:]] == [0.0, 0.0, 1.0, 1.0]
    assert [row["label_seed"] for row in outcome.members[4:]] == [-1, -1, 0, 1]


@pytest.mark.parametrize("factory", [misaligned_digits, noise_label_digits], ids=["misaligned", "noise"])
def test_labels_without_signal_are_no_signal(reference, factory):
    ctx, _, _, _ = reference
    before = programs.STATS.compiles
    outcome = controls.run(with_data(ctx, factory), SETTINGS)  # seeds did not run here: controls trains them
    assert programs.STATS.compiles == before  # same shapes and Problem: the reference program
    [finding] = outcome.findings
    assert finding.id == "train.no_signal" and finding.severity.value == "error"
    assert "constant_input" in finding.evidence["failed_controls"]
    assert finding.evidence["real_val_loss"] > finding.evidence["constant_input_val_loss"] - 0.05
    assert "does no better than training on constant inputs" in finding.message
    assert "aligned" in finding.suggestion
    assert outcome.metrics["controls/signal"] is False
    assert headline(outcome.findings, trained=True) == "train.no_signal"


@pytest.mark.parametrize("data", ["breast_cancer", "regression"])  # wine: through the CLI below
def test_healthy_builtin_jobs_are_silent(data):
    ctx = build_context(compose(["logger=none", f"data={data}"]))
    outcome = controls.run(ctx, SETTINGS)
    assert outcome.findings == [], outcome.findings
    m = outcome.metrics
    for c in controls.CONTROLS:
        assert m[f"controls/gap/{c}"] > 3 * m[f"controls/margin/{c}"]  # not a near miss
    if data == "regression":
        assert "controls/val_accuracy/real" not in m  # MSE only
        assert m["controls/val_loss/constant_input"] == pytest.approx(np.var(ctx.arrays.y_val), rel=0.25)


# ---------------------------------------------------------------------------------------------------------------
# The comparison, on hand-built numbers.


def test_compare_uses_the_larger_of_k_std_and_the_floor():
    s = controls.Settings(margin_std=2.0, margin_fraction=0.01)
    noisy = controls.compare("constant_input", np.array([1.0, 1.2]), np.array([2.0, 2.0]), 0.3, s)
    assert noisy.loss_margin == pytest.approx(0.6) and noisy.loss_gap == pytest.approx(0.9) and noisy.beaten
    quiet = controls.compare("constant_input", np.array([1.99]), np.array([2.0]), 1e-4, s)
    assert quiet.loss_margin == pytest.approx(0.02) and not quiet.beaten  # 0.5% better: inside the floor
    diverged = controls.compare("constant_input", np.array([0.5, np.nan]), np.array([2.0]), 0.0, s)
    assert diverged.real_loss == 0.5


def test_accuracy_above_sampling_noise_counts_as_signal():
    """An over-confident model can lose to the label prior on cross-entropy while classifying far better."""
    s = controls.Settings()
    c = controls.compare("constant_input", np.array([2.5]), np.array([2.3]), 0.01, s,
                         np.array([0.60]), np.array([0.10]), 0.01, n_val=400, unrelated=0.1)
    assert not c.beaten_on_loss and c.beaten_on_accuracy and c.beaten
    assert c.accuracy_margin == pytest.approx(3 * np.sqrt(2 * 0.1 * 0.9 / 400))
    # The constant baseline's majority class can be rare in validation (8% < 10% chance): chance is the bar.
    close = controls.compare("constant_input", np.array([2.5]), np.array([2.3]), 0.01, s,
                             np.array([0.14]), np.array([0.08]), 0.01, n_val=400, unrelated=0.1)
    assert close.accuracy_gap == pytest.approx(0.04) and not close.beaten  # 4 points on 400: sampling noise
    assert controls.chance_accuracy([0, 0, 1, 1], [0, 1, 1, 1], 3) == pytest.approx(0.5 * 0.25 + 0.5 * 0.75)
    assert controls.no_signal_finding([c], 0.01, s) is None
    assert controls.no_signal_finding([close], 0.01, s).evidence["failed_controls"] == ["constant_input"]


def test_the_accuracy_bar_is_the_best_predictor_without_signal():
    """A model trained on shuffled labels gives each input cluster one label, so its validation accuracy is a draw
    over classes: the zoo's Haiku MLP on digits with shuffled training labels, cut to 125 steps by a budget, scored
    16.3% (chance 10.0%, the constant baseline 9.0%, the shuffled-label control 11.5%), 6.3 points above chance
    where sampling noise allows 6.0, and the bug went unreported. Against the best accuracy of any predictor
    without signal (here the shuffled-label control's), it is within the noise; a healthy model is far above."""
    s = controls.Settings()
    real_loss, real_acc, n = np.array([2.288]), np.array([0.163]), 449
    constant, shuffled = (np.array([2.304]), np.array([0.090])), (np.array([2.319]), np.array([0.1147]))
    chance = 0.0996

    def comparisons(unrelated, real_acc=real_acc):
        return [controls.compare(name, real_loss, loss, 0.0109, s, real_acc, acc, 0.0274, n, unrelated)
                for name, (loss, acc) in (("constant_input", constant), ("shuffled_labels", shuffled))]

    chance_only = comparisons(chance)
    assert chance_only[0].beaten_on_accuracy and chance_only[1].beaten_on_loss
    assert controls.no_signal_finding(chance_only, 0.0109, s) is None  # the rule before: missed
    found = controls.no_signal_finding(comparisons(0.1147), 0.0109, s)
    assert found is not None and found.evidence["failed_controls"] == ["constant_input"]
    assert controls.no_signal_finding(comparisons(0.1147, np.array([0.60])), 0.0109, s) is None


# ---------------------------------------------------------------------------------------------------------------
# Config and the command line.


def test_config_file_lists_exactly_the_settings():
    from harness.config import config_dir

    with open(f"{config_dir()}/diagnostics/controls/default.yaml") as f:
        assert set(yaml.safe_load(f)) == {f.name for f in dataclasses.fields(controls.Settings)}
    assert controls.Settings() == controls.Settings(steps=500, members_per_control=2)
    assert compose(["diagnostics.controls.steps=9"]).settings["controls"].steps == 9
    with pytest.raises(HarnessError, match="diagnostics.controls.margin_fraction"):
        compose(["diagnostics.controls.margin_fraction=1.5"])


@pytest.mark.slow
def test_controls_run_alone_from_the_command_line_and_wine_is_silent(tmp_path):
    proc = run_cli(["data=wine", "diagnostics.run=[controls]", f"diagnostics.controls.steps={STEPS}", "logger=none"],
                   str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [run_dir] = run_dirs(str(tmp_path))
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert list(report["diagnostics"]) == ["controls"] and report["status"] == "healthy"
    assert report["findings"] == []
    metrics = report["diagnostics"]["controls"]["metrics"]
    assert metrics["controls/signal"] is True
    assert metrics["controls/gap/constant_input"] > 3 * metrics["controls/margin/constant_input"]
