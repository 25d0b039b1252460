"""harness.causes: the report names the cause first, with the symptoms it explains under it, and severities mean
one thing everywhere (an error breaks training as configured; a warning is a pathology training survives)."""

from __future__ import annotations

import pytest

from harness.causes import EXPLAINS, TrainingEvidence, _check_acyclic, reconcile
from harness.checks.base import Outcome
from harness.findings import Severity, error, first_to_fix, info, warning

TRAINED = TrainingEvidence(("overfit_batch", "seeds", "controls", "lr_range"), "adam, lr 0.001")
NOT_TRAINED = TrainingEvidence(())


def by_id(findings):
    return {f.id: f for f in findings}


def test_unscaled_inputs_explain_the_failed_overfit_and_become_the_error_headline():
    findings = [warning("data.feature_scale", "inputs RMS 600"), error("train.overfit_batch", "could not memorize"),
                error("train.no_signal", "controls fail")]
    out = reconcile(findings, TRAINED)
    got = by_id(out)
    assert first_to_fix(out).id == "data.feature_scale"
    assert got["data.feature_scale"].severity is Severity.ERROR
    assert "train.overfit_batch" in got["data.feature_scale"].note
    assert set(got["data.feature_scale"].explains) == {"train.overfit_batch", "train.no_signal"}
    assert got["train.overfit_batch"].explained_by == "data.feature_scale"
    assert [f.id for f in out] == [f.id for f in findings]  # same findings, same order


def test_a_diverging_configured_lr_explains_the_failed_controls_and_the_lr_finding():
    findings = [error("train.overfit_batch", "x"), error("train.no_signal", "x"), error("train.divergence", "x"),
                error("train.learning_rate", "too high")]
    out = reconcile(findings, TRAINED)
    assert first_to_fix(out).id == "train.divergence"
    assert by_id(out)["train.learning_rate"].explained_by == "train.divergence"
    assert by_id(out)["train.no_signal"].explained_by == "train.divergence"


def test_vanishing_gradients_headline_a_deep_sigmoid_net_and_chains_reach_the_root():
    findings = [error("model.exploding_activations", "x"), warning("model.saturated_units", "x"),
                error("model.gradient_flow", "vanishing"), error("train.overfit_batch", "x")]
    out = reconcile(findings, TRAINED)
    assert first_to_fix(out).id == "model.exploding_activations"
    got = by_id(out)
    # The chain exploding -> saturated -> gradient_flow -> overfit ends at the one root.
    assert {got[i].explained_by for i in ("model.saturated_units", "model.gradient_flow",
                                          "train.overfit_batch")} == {"model.exploding_activations"}
    out = reconcile(findings[2:], TRAINED)
    assert first_to_fix(out).id == "model.gradient_flow"


def test_unrelated_findings_do_not_explain_each_other():
    # Class imbalance does not make one batch impossible to memorize: a real model bug stays the headline.
    findings = [warning("data.class_imbalance", "10:1"), error("train.overfit_batch", "x")]
    out = reconcile(findings, TRAINED)
    assert first_to_fix(out).id == "train.overfit_batch"
    assert by_id(out)["data.class_imbalance"].severity is Severity.WARNING
    assert by_id(out)["train.overfit_batch"].explained_by is None


def test_info_neither_explains_nor_is_explained():
    findings = [info("data.feature_scale", "tiny"), error("train.overfit_batch", "x"), info("train.capacity", "y")]
    out = reconcile(findings, TRAINED)
    assert first_to_fix(out).id == "train.overfit_batch"
    assert all(f.explained_by is None and not f.explains for f in out)


def test_an_init_pathology_training_recovers_from_is_a_warning_that_says_so():
    findings = [error("model.exploding_activations", "1e5 at layer 20"), error("model.initial_loss", "760000")]
    out = reconcile(findings, TRAINED)
    got = by_id(out)
    assert got["model.exploding_activations"].severity is Severity.WARNING
    assert "adam" in got["model.exploding_activations"].note and "SGD" in got["model.exploding_activations"].note
    assert first_to_fix(out).id == "model.exploding_activations"
    # Without training evidence (diagnostics.run=[model]) the model stage's judgement stands.
    assert by_id(reconcile(findings, NOT_TRAINED))["model.exploding_activations"].severity is Severity.ERROR
    # ... and when training failed, it is what broke it.
    failed = reconcile(findings + [error("train.overfit_batch", "x")], TRAINED)
    assert by_id(failed)["model.exploding_activations"].severity is Severity.ERROR
    assert first_to_fix(failed).id == "model.exploding_activations"


def test_a_wrong_gradient_is_never_downgraded_by_training_evidence():
    out = reconcile([error("model.gradient_check", "relative error 0.9")], TRAINED)
    assert out[0].severity is Severity.ERROR


def test_the_more_severe_of_two_causes_claims_a_shared_symptom():
    findings = [warning("data.conflicting_labels", "3%"), error("model.output_range", "probabilities"),
                error("train.overfit_batch", "x")]
    out = reconcile(findings, TRAINED)
    got = by_id(out)
    assert got["train.overfit_batch"].explained_by == "model.output_range"
    assert got["data.conflicting_labels"].severity is Severity.WARNING
    assert first_to_fix(out).id == "model.output_range"


def test_the_table_is_acyclic_and_names_known_ids():
    from harness.findings import FINDING_IDS

    for cause, symptoms in EXPLAINS.items():
        assert cause.split(":")[0] in FINDING_IDS and {s.split(":")[0] for s in symptoms} <= set(FINDING_IDS)
    with pytest.raises(AssertionError, match="cycle"):
        _check_acyclic({"a": frozenset({"b"}), "b": frozenset({"a"})})


def test_run_result_writes_reconciled_findings_back_into_outcomes():
    from harness.pipeline import RunResult

    outcomes = [Outcome("data", findings=[warning("data.feature_scale", "x")]),
                Outcome("overfit_batch", findings=[error("train.overfit_batch", "x")])]
    result = RunResult.of(outcomes, 1.0)
    assert result.status == "unhealthy"
    assert outcomes[0].findings[0].severity is Severity.ERROR
    assert outcomes[1].findings[0].explained_by == "data.feature_scale"
    assert first_to_fix(result.findings).id == "data.feature_scale"


def test_the_report_shows_the_cause_with_its_symptoms(tmp_path):
    from harness.pipeline import RunResult
    from harness.report.writer import build_report, render_markdown

    outcomes = [Outcome("data", findings=[warning("data.feature_scale", "inputs unscaled", "standardize")]),
                Outcome("overfit_batch", findings=[error("train.overfit_batch", "could not memorize")])]
    report = build_report(RunResult.of(outcomes, 1.0), config={}, command=[], environment={})
    assert report["first_to_fix"]["id"] == "data.feature_scale"
    assert report["first_to_fix"]["explains"] == ["train.overfit_batch"]
    md = render_markdown(report)
    assert "**It explains:** `train.overfit_batch`" in md
    assert "symptom of data.feature_scale" in md


def test_a_clean_run_says_what_its_budgets_could_not_rule_out():
    from harness.causes import not_ruled_out
    from harness.checks.training import seeds

    settings = {"seeds": seeds.Settings(steps=500)}
    clean = not_ruled_out([Outcome("seeds", metrics={"seeds/diverged": 0})], settings)
    assert len(clean) == 1 and "500 steps" in clean[0] and "harness train train.steps=" in clean[0]
    # A configured run that diverged is a finding, not a limit; no training at all rules nothing out.
    assert not_ruled_out([Outcome("seeds", metrics={"seeds/diverged": 2})], settings) == []
    assert "nothing about training" in not_ruled_out([Outcome("model")], settings)[0]
    # With the user's own length known (train.steps), the command names it; a suite as long as it rules it out.
    from harness.checks.training import lr_range

    longer = {**settings, "lr_range": lr_range.Settings(horizon=20000)}
    assert "your 20000 steps" in not_ruled_out([Outcome("seeds", metrics={"seeds/diverged": 0})], longer)[0]
    shorter = {**settings, "lr_range": lr_range.Settings(horizon=300)}
    assert not_ruled_out([Outcome("seeds", metrics={"seeds/diverged": 0})], shorter) == []
    # A crashed or skipped diagnostic is no evidence.
    crashed = Outcome("seeds", skipped="crashed: X")
    assert "nothing about training" in not_ruled_out([crashed], settings)[0]


def test_inputs_without_information_explain_the_duplicates_they_create():
    findings = [error("data.leakage", "every val row is in train"), error("data.conflicting_labels", "x"),
                error("data.constant_features", "all features constant"), error("train.no_signal", "x")]
    out = reconcile(findings, TRAINED)
    assert first_to_fix(out).id == "data.constant_features"
    assert {f.explained_by for f in out if f.id != "data.constant_features"} == {"data.constant_features"}


def test_zero_initialized_hidden_layers_are_the_cause_of_the_dead_units_they_make():
    zero_init = error("model.gradient_flow", "all zero at init", zero_initialized=["hidden/0/kernel"])
    out = reconcile([zero_init, warning("model.dead_units", "every unit dead"), error("train.overfit_batch", "x")],
                    TRAINED)
    assert first_to_fix(out).id == "model.gradient_flow"
    assert by_id(out)["model.dead_units"].explained_by == "model.gradient_flow"
    # A gradient that merely vanishes behind dead units is their symptom.
    vanishing = warning("model.gradient_flow", "vanishing")
    out = reconcile([vanishing, error("model.dead_units", "every unit dead")], TRAINED)
    assert first_to_fix(out).id == "model.dead_units"


# ----------------------------------------------------------------------------------------------------------------
# One root cause in the seeds' decision tree (harness.causes.root_cause)


def _cause(outcomes):
    from harness.pipeline import RunResult

    return RunResult.of(outcomes, 1.0).root_cause


def test_the_root_cause_of_a_checklist_run_rules_out_what_ran_clean():
    """Cannot fit one batch, the model checks clean: the data's scale is the cause, the model is ruled out, the
    loss and labels (no overfit/controls evidence of their own here) stay open, and fixes come cause first."""
    outcomes = [Outcome("data", findings=[warning("data.feature_scale", "inputs unscaled", "Standardize.")]),
                Outcome("model"), Outcome("overfit_batch", findings=[error("train.overfit_batch", "x")])]
    cause = _cause(outcomes).to_dict()
    assert cause["id"] == "data.feature_scale" and cause["branch"] == "fit"
    assert any(r.startswith("the model: the model checks ran") for r in cause["ruled_out"])
    assert cause["fixes"][0] == "Standardize." and "it explains train.overfit_batch" in cause["supported_by"]
    # The same failure without the model stage having run: the model stays open.
    cause = _cause([outcomes[0], outcomes[2]]).to_dict()
    assert "the model" in cause["not_ruled_out"]


def test_a_nan_in_a_watched_run_names_the_replayed_stage_and_rules_out_the_rest():
    nan = error("train.nonfinite", "non-finite at step 552", "Use log_softmax.", step=552, origin="loss",
                origin_detail="1 of 64 examples", grad_norm_growth_before=1.2)
    cause = _cause([Outcome("data"), Outcome("train", findings=[nan])]).to_dict()
    assert cause["branch"] == "nonfinite" and cause["step"] == 552 and cause["not_ruled_out"] == []
    assert {r.split(":")[0] for r in cause["ruled_out"]} == {"the data", "the learning rate",
                                                            "the numerical precision"}
    # A gradient norm that grew before the failure, and spikes on the way: the learning rate stays open.
    grown = error("train.nonfinite", "x", "Use log_softmax.", step=552, origin="loss", grad_norm_growth_before=40.0)
    cause = _cause([Outcome("data"), Outcome("train", findings=[grown, warning("train.grad_spike", "x", step=500)])])
    assert any(o.startswith("the learning rate") for o in cause.open)
    assert len(cause.fixes) == 2 and "learning rate" in cause.fixes[1]


def test_overfitting_is_a_validation_problem_and_a_clean_run_has_no_root_cause():
    cause = _cause([Outcome("data"), Outcome("train", findings=[warning("train.overfitting", "x", step=300)])])
    assert cause.branch == "validation" and cause.to_dict()["step"] == 300
    assert any(r.startswith("a mismatch between the splits") for r in cause.ruled_out)
    assert _cause([Outcome("data"), Outcome("train", findings=[info("data.constant_features", "x")])]) is None
