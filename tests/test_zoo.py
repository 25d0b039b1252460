"""The planted-bug zoo (zoo/, scripts/zoo.py): every setup builds, the suite has the size and spread it promises,
and the runner scores reports the way its rates are defined. The zoo's own runs through the CLI are not tests (they
measure harness); one slow test runs the CLI on one bug end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from harness.config import FactoryConfig
from harness.findings import FINDING_IDS
from helpers import REPO_DIR as REPO
from harness.pipeline import load_dataset, make_loss, make_model_factory
from zoo import setups as zs


def _runner():
    spec = importlib.util.spec_from_file_location("zoo_runner", os.path.join(REPO, "scripts", "zoo.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_runner"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


zoo_runner = _runner()


def _factory(node: dict) -> FactoryConfig:
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "_partial_", "framework")}
    return FactoryConfig(node["_target_"], kwargs, bool(node.get("_partial_", False)))


# ----------------------------------------------------------------------------------------------------------------
# The list


def test_the_zoo_has_forty_bugs_and_ten_healthy_setups_across_four_families():
    bugs = [s for s in zs.SETUPS if s.kind == zs.BUG]
    healthy = [s for s in zs.SETUPS if s.kind == zs.HEALTHY]
    assert len(bugs) >= 40 and len(healthy) >= 10
    assert {s.family for s in bugs} == set(zs.FAMILIES)
    assert {s.family for s in healthy} == set(zs.FAMILIES)
    assert all(sum(s.family == f for s in bugs) >= 5 for f in zs.FAMILIES)
    assert {s.task for s in bugs} == set(zs.TASKS)
    assert {s.task for s in healthy} == set(zs.TASKS)


def test_every_setup_is_well_formed():
    names = [s.name for s in zs.SETUPS]
    assert len(names) == len(set(names))
    builtins = {os.path.splitext(f)[0] for g in zs.GROUPS
                for f in os.listdir(os.path.join(REPO, "harness", "conf", g))}
    for s in zs.SETUPS:
        assert s.name not in builtins, f"{s.name} shadows a built-in option"
        assert s.kind in (zs.BUG, zs.HEALTHY) and s.family in zs.FAMILIES and s.task in zs.TASKS
        assert s.description
        if s.kind == zs.BUG:
            assert s.expected and s.headline, s.name
            assert set(s.headline) <= set(s.expected), s.name
            assert set(s.expected) <= set(FINDING_IDS), (s.name, set(s.expected) - set(FINDING_IDS))
        else:
            assert not s.expected and not s.headline
        model = s.group_config("model")
        assert model.get("framework") in (s.family, "auto"), s.name
        for group in zs.GROUPS:
            assert "_target_" in s.group_config(group), (s.name, group)


def test_select_by_name_and_kind():
    assert [s.name for s in zs.select("adam_lr_3,reference")] == ["adam_lr_3", "reference"]
    assert all(s.kind == zs.HEALTHY for s in zs.select(kind="healthy"))
    assert zs.select("adam_lr_3,reference", kind="bug")[0].name == "adam_lr_3"
    with pytest.raises(KeyError):
        zs.select("no_such_setup")


# ----------------------------------------------------------------------------------------------------------------
# Every setup builds: data, task, model (through harness's adapters), loss

_DATA_CACHE: dict = {}


def _dataset(setup):
    node = setup.group_config("data")
    key = json.dumps(node, sort_keys=True)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(_factory(node))
    return _DATA_CACHE[key]


def _task_kind(task) -> str:
    return {"classification": zs.CLASSIFICATION, "regression": zs.REGRESSION, "language_model": zs.LANGUAGE_MODEL,
            "per_position_classification": zs.PER_POSITION}[task.kind]


@pytest.mark.parametrize("setup", zs.SETUPS, ids=lambda s: s.name)
def test_every_setup_builds(setup):
    dataset = _dataset(setup)
    assert _task_kind(dataset.task) == setup.task
    x_train, y_train, x_val, y_val = dataset.training_arrays()
    assert len(x_train) >= 32 and len(x_val) >= 8 and len(y_train) == len(x_train)
    model_node = setup.group_config("model")
    models = make_model_factory(_factory(model_node), dataset, framework=model_node.get("framework", "auto"))
    assert models.family() == setup.family
    model = models.adapt()
    loss_fn, _ = make_loss(_factory(setup.group_config("loss")), dataset)

    def forward(key, x, y):  # abstractly (jax.eval_shape): no compile, no FLOPs; the zoo's runs do the numbers
        params, state = model.init(key, x)
        out, _ = model.apply(params, state, x, key=key, train=False)
        return out, (loss_fn(out, y) if out.shape[:2] == y.shape[:2] or y.ndim == 1 else None)

    out, per_example = jax.eval_shape(forward, jax.random.key(0), x_train[:8], y_train[:8])
    if setup.name in ("head_missing_a_class", "tagger_channels_first_equinox"):
        assert tuple(out.shape) not in dataset.task.output_shapes(8)  # the planted shape bug
    else:
        assert tuple(out.shape) in dataset.task.output_shapes(8), (out.shape, dataset.task.output_shapes(8))
        assert per_example.shape in ((8,), (), (8, 8))


def test_the_planted_data_bugs_are_there():
    def load(name):
        return zs.data(name)

    d = load_dataset(_factory(load("digits_one_based_labels")))
    assert d.y_train.max() == d.num_classes
    d = load_dataset(_factory(load("unseeded_split")))
    again = load_dataset(_factory(load("unseeded_split")))
    assert not np.array_equal(d.x_train, again.x_train)
    d = load_dataset(_factory(load("quoted_csv_features")))
    assert np.all(d.x_train == 0) and len(np.unique(d.y_train)) == 3
    d = load_dataset(_factory(load("breast_cancer_val_near_duplicates")))
    gaps = np.min(np.abs(d.x_val[:, None, :] - d.x_train[None, :, :]).max(axis=2), axis=1)
    assert np.all(gaps < 0.01)
    d = load_dataset(_factory(load("imbalanced_blobs")))
    counts = np.bincount(d.y_train)
    assert counts.max() / counts.min() >= 30
    d = load_dataset(_factory(load("python_chars")))
    assert d.task.causal and np.array_equal(d.x_train[:, 1:], d.y_train[:, :-1])


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def _report(findings, first=None, status=None, internal=()):
    findings = [{"id": i, "severity": s, "message": ""} for i, s in findings]
    first_d = next((f for f in findings if f["id"] == first), None) if first else None
    status = status or ("internal_error" if internal else "unhealthy" if findings else "healthy")
    return {"status": status, "findings": findings, "first_to_fix": first_d,
            "internal_errors": [{"diagnostic": d, "type": "ValueError", "message": "boom"} for d in internal]}


def _setup(name, kind, expected=(), headline=()):
    return zs.Setup(name, kind, "nnx", zs.CLASSIFICATION, "fake", model="mlp", data="digits",
                    expected=tuple(expected), headline=tuple(headline))


def test_scoring_a_bug_detected_with_the_cause_first():
    s = _setup("b", zs.BUG, ("data.feature_scale", "train.overfit_batch"), ("data.feature_scale",))
    r = zoo_runner.score(s, _report([("train.overfit_batch", "error"), ("data.feature_scale", "error")],
                                    first="data.feature_scale"))
    assert r.detected and r.right_headline and r.found == ["data.feature_scale", "train.overfit_batch"]
    assert (r.errors, r.warnings, r.headline) == (2, 0, "data.feature_scale")


def test_scoring_a_symptom_headline_an_info_finding_and_a_crash():
    s = _setup("b", zs.BUG, ("data.feature_scale", "train.overfit_batch"), ("data.feature_scale",))
    symptom = zoo_runner.score(s, _report([("train.overfit_batch", "error")], first="train.overfit_batch"))
    assert symptom.detected and not symptom.right_headline
    info = zoo_runner.score(s, _report([("data.feature_scale", "info")]))
    assert not info.detected and not info.right_headline and info.headline is None
    crash = zoo_runner.score(s, _report([], internal=("model",)))
    assert crash.crashed and not crash.detected and crash.status == "internal_error"
    missing = zoo_runner.score(s, None, rc=3, failure="no report.json, exit code 3")
    assert missing.crashed and not missing.detected and missing.status == "no_report"
    timeout = zoo_runner.score(s, None, failure="timeout")
    assert timeout.status == "timeout" and timeout.crashed


def test_rates_from_fake_reports():
    bug = _setup("b1", zs.BUG, ("model.dead_units", "model.gradient_flow"), ("model.dead_units",))
    healthy = _setup("h", zs.HEALTHY)
    results = [
        zoo_runner.score(bug, _report([("model.dead_units", "error")], first="model.dead_units")),  # right
        zoo_runner.score(bug, _report([("model.gradient_flow", "warning")], first="model.gradient_flow")),  # found
        zoo_runner.score(bug, _report([("train.capacity", "error")], first="train.capacity")),  # missed
        zoo_runner.score(bug, None, rc=3),  # crashed: never a detection
        zoo_runner.score(healthy, _report([])),
        zoo_runner.score(healthy, _report([("train.capacity", "warning")], first="train.capacity")),
        zoo_runner.score(healthy, _report([("train.overfit_batch", "error")], first="train.overfit_batch")),
        zoo_runner.score(healthy, _report([("data.sampled", "info")], internal=("lr_range",))),
    ]
    for i, r in enumerate(results):
        r.name = f"r{i}"
    s = zoo_runner.rates(results)
    assert (s["bugs"], s["healthy"]) == (4, 4)
    assert s["detected"] == 2 and s["detection_rate"] == 0.5
    assert s["right_headline"] == 1 and s["right_headline_rate"] == 0.25
    assert s["false_alarms"] == 1 and s["false_alarm_rate"] == 0.25 and s["false_alarm_setups"] == ["r6"]
    assert s["healthy_with_warnings"] == 1
    assert s["internal_errors"] == 2 and s["internal_error_setups"] == ["r3", "r7"]
    assert s["missed"] == ["r2", "r3"]
    assert zoo_runner.rates([])["detection_rate"] is None
    md = zoo_runner.markdown(results, s, {"date": "2026-11-30", "command": "python scripts/zoo.py", "extra": []})
    assert "detection rate:      50%" in md and md.count("\n| r") == len(results)


def test_the_runner_writes_config_files_and_a_cli_command(tmp_path):
    s = zs.by_name()["softmax_in_loss_linen"]
    paths = zoo_runner.write_configs(s, str(tmp_path / "conf"))
    assert sorted(paths) == ["loss", "model"]  # data=digits and optim=adam are built-in options
    import yaml

    assert yaml.safe_load(open(paths["loss"])) == s.loss
    cmd = zoo_runner.command(s, str(tmp_path / "conf"), str(tmp_path / "run"), ["diagnostics.run=[data]"])
    assert cmd[1:4] == ["-m", "harness", "--config-dir"]
    assert {"model=softmax_in_loss_linen", "loss=softmax_in_loss_linen", "data=digits", "optim=adam",
            "logger=none", "diagnostics.run=[data]"} <= set(cmd)
    args, extra = zoo_runner.parse_args(["--only", "a,b", "--workers", "3", "--", "x=1", "y=2"])
    assert (args.only, args.workers, extra) == ("a,b", 3, ["x=1", "y=2"])


# ----------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_the_runner_runs_one_bug_through_the_cli(tmp_path):
    out = tmp_path / "zoo"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "zoo.py"), "--only", "nan_inputs_equinox",
                           "--out", str(out), "--workers", "1", "--markdown", str(tmp_path / "zoo.md"), "--",
                           "diagnostics.run=[data]"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.load(open(out / "zoo.json"))
    (result,) = payload["results"]
    assert result["name"] == "nan_inputs_equinox" and result["failure"] is None, result
    assert result["detected"] and result["right_headline"], result
    assert payload["rates"]["detection_rate"] == 1.0
    assert (out / "nan_inputs_equinox" / "conf" / "model" / "nan_inputs_equinox.yaml").exists()
    assert "nan_inputs_equinox" in (tmp_path / "zoo.md").read_text()
