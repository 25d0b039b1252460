"""``harness train``: the configured run trained in full with the monitor inside, proven both ways.

Healthy runs stay free of findings; planted in-run failures are named with their step and location: a ``log(0)``
in a hand-written loss that goes non-finite only late in training (replayed: it started in the loss), NaN rows in
the data (replayed: the inputs), a layer frozen by a ``stop_gradient``, a model that overfits a small training set.
A run interrupted, or killed, resumes from its last checkpoint and ends bitwise where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli_env, compose, offline_runs, replace_group, wandb_records

from harness import cli
from harness.train import run as train_run

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------------------------
# Planted setups (``_target_`` factories)


def naive_ce(logits, y):
    """Cross-entropy as log(softmax): the labelled class's probability underflows to exactly 0 once the logits are
    far enough apart, late in training."""
    p = jax.nn.softmax(logits)
    return -jnp.log(jnp.take_along_axis(p, y[:, None], axis=1)[:, 0])


def relative_error(outputs, y):
    """A hand-written relative squared error, ((prediction - target) / target)^2: infinite where a target is 0."""
    return jnp.square((outputs.reshape(y.shape) - y) / y)


def targets_near_three(zero_in_validation: bool = True):
    """Regression with targets around 3 (never 0 in training); with ``zero_in_validation``, one validation target
    is exactly 0."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    y = (0.3 * x @ rng.normal(size=8) + 3.0).astype(np.float32)
    y_val = y[500:].copy()
    if zero_in_validation:
        y_val[7] = 0.0
    return {"x_train": x[:500], "y_train": y[:500], "x_val": x[500:], "y_val": y_val}


def digits_subset(n_train: int = 64, nan_rows: int = 0):
    """scikit-learn's digits: ``n_train`` training examples, 500 for validation; ``nan_rows`` training rows NaN."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    train, val = order[:n_train], order[-500:]
    x_train = x[train].copy()
    x_train[:nan_rows] = np.nan
    return {"x_train": x_train, "y_train": y[train], "x_val": x[val], "y_val": y[val], "num_classes": 10}


def frozen_first_layer(input_shape, num_outputs, seed: int = 0):
    """An MLP whose first layer sits behind a ``stop_gradient``: it never learns."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.first = nnx.Linear(input_shape[-1], 64, rngs=rngs)
            self.hidden = nnx.Linear(64, 64, rngs=rngs)
            self.out = nnx.Linear(64, num_outputs, rngs=rngs)

        def __call__(self, x):
            h = jax.lax.stop_gradient(jax.nn.relu(self.first(x)))
            return self.out(jax.nn.relu(self.hidden(h)))

    return Net(nnx.Rngs(seed))


def equinox_mlp(input_shape, num_outputs, seed: int = 0):
    import equinox as eqx

    return eqx.nn.MLP(input_shape[-1], num_outputs, 32, 2, key=jax.random.key(seed))


def train(out, *overrides):
    rc = compose(["logger=none", *overrides])
    result, report = train_run.train(rc, str(out), command=["harness", "train", *overrides], show_report=False)
    return result, report


def last_checkpoint(out) -> int:
    return max(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit())


def problems(report) -> list[dict]:
    """The findings to act on (the data checks' info notes, e.g. digits' constant border pixels, are not)."""
    return [f for f in report["findings"] if f["severity"] != "info"]


def ids(report) -> list[str]:
    return [f["id"] for f in report["findings"]]


SMALL = [*replace_group("data", "test_train.digits_subset"), "batch_size=64"]


# ----------------------------------------------------------------------------------------------------------------
# Healthy


def test_a_healthy_run_trains_validates_checkpoints_and_reports(tmp_path):
    result, report = train(tmp_path, "train.epochs=10")
    assert report["status"] == "healthy" and problems(report) == [], report["findings"]
    m = report["diagnostics"]["train"]["metrics"]
    assert m["steps"] == m["steps_planned"] and m["epochs"] == 10 and m["first_nonfinite_step"] is None
    assert m["final_val_accuracy"] > 0.9 and m["final_val_loss"] < 0.5
    series = report["diagnostics"]["train"]["series"]
    assert len(series["train_loss"]) == m["steps"] and len(series["val_loss"]) >= 10  # about 20 validations
    assert series["train_loss"][-1] < series["train_loss"][0] / 5
    assert os.path.exists(tmp_path / "report.md") and os.path.exists(tmp_path / "plots")
    assert last_checkpoint(tmp_path) == m["steps"]
    # One program each: init, the chunk, validation, the no-input baseline (the data checks compile nothing).
    assert report["programs"]["compiles"] == 4, report["programs"]
    # Another learning rate, seed and length (at the same chunk length): the same programs (they are arguments).
    _, other = train(tmp_path / "other", "train.epochs=12", "train.eval_every=5", "optim.lr=3e-3", "seed=1")
    assert other["programs"]["compiles"] == 0, other["programs"]
    assert other["diagnostics"]["train"]["series"]["train_loss"][0] != series["train_loss"][0]  # another seed


def test_a_schedule_with_warmup_and_decay_is_applied_and_healthy(tmp_path):
    _, report = train(tmp_path, "train.steps=300", "train.schedule=warmup_cosine", "train.warmup_steps=50",
                      "optim.lr=3e-3")
    lr = np.asarray(report["diagnostics"]["train"]["series"]["train_lr"])
    assert lr[0] == 0.0 and abs(lr.max() - 3e-3) < 1e-6 and int(np.argmax(lr)) == 50 and lr[-1] < 1e-4
    assert problems(report) == [], report["findings"]


@pytest.mark.parametrize("factory", ["test_train.equinox_mlp", "zoo.models.linen_mlp", "zoo.models.haiku_mlp"])
def test_models_from_other_libraries_train_healthy(tmp_path, factory):
    _, report = train(tmp_path, "train.epochs=20", *replace_group("model", factory))
    assert report["status"] == "healthy" and problems(report) == [], report["findings"]
    assert report["diagnostics"]["train"]["metrics"]["final_val_accuracy"] > 0.85


def test_a_convolutional_model_trains_in_the_same_compiled_chunk(tmp_path):
    """The built-in CNN on digits images: its convolutions run as matrix multiplications on CPU
    (harness.engine.convolution), so it trains through the same four programs as any model, activation statistics
    included, with no step loop on the host."""
    _, report = train(tmp_path, "train.epochs=3", "data=digits_image", "model=cnn", "train.activations=true")
    assert report["status"] == "healthy" and problems(report) == [], report["findings"]
    m = report["diagnostics"]["train"]["metrics"]
    val = report["diagnostics"]["train"]["series"]["val_loss"]
    assert m["steps"] == m["steps_planned"] and val[-1] < val[0]  # 30 steps at Adam's 1e-3: learning, slowly
    assert report["programs"]["compiles"] == 4, report["programs"]
    assert report["programs"]["by_program"]["train/chunk"]["compiles"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Planted in-run failures


@pytest.mark.parametrize("zero", [True, False])
def test_a_loss_that_overflows_only_on_held_out_examples_is_named_and_located(tmp_path, zero):
    """A relative error divides by the target: one validation target of 0 makes the validation loss inf at every
    evaluation while every training loss is finite. An error, replayed on the validation set to the loss (one
    example of 100), the root cause; the run trains to its end. The same data without that target: no such
    finding."""
    _, report = train(tmp_path, *replace_group("data", "test_train.targets_near_three", zero_in_validation=zero),
                      "train.steps=300", "loss._target_=test_train.relative_error", "+loss._partial_=true")
    m = report["diagnostics"]["train"]["metrics"]
    found = [f for f in report["findings"] if f["id"] == "train.nonfinite"]
    assert m["first_nonfinite_step"] is None and m["steps"] == 300
    if not zero:
        assert found == [] and report["status"] == "healthy", report["findings"]
        return
    [f] = found
    assert f["severity"] == "error" and f["evidence"]["split"] == "validation" and f["evidence"]["origin"] == "loss"
    assert f["evidence"]["nonfinite_validations"] == f["evidence"]["validations"] > 0
    assert "1 of 100" in f["evidence"]["origin_detail"] and "validation set" in f["message"]
    assert report["root_cause"]["id"] == "train.nonfinite" and report["status"] == "unhealthy"


def test_log0_in_a_hand_written_loss_stops_cleanly_late_and_is_located_in_the_loss(tmp_path):
    """log(softmax) at Adam 0.1 on 64 examples reaches log(0) late. Where it first does depends on the trajectory,
    which another CPU's rounding changes: on some machines a training batch (the run stops there, its checkpoint
    the last finite state), on others only held-out examples, while every training loss stays finite (the
    validation loss goes inf: the same bug, located by a replay on the validation set). Either way, one error,
    located in the loss, and the root cause."""
    _, report = train(tmp_path, *SMALL, "train.steps=4000", "optim.lr=0.1", "loss._target_=test_train.naive_ce",
                      "+loss._partial_=true")
    m = report["diagnostics"]["train"]["metrics"]
    bad = m["first_nonfinite_step"]
    [f] = [f for f in report["findings"] if f["id"] == "train.nonfinite"]
    step = f["evidence"]["step"]
    assert f["severity"] == "error" and step > 100 and f"step {step}" in f["message"]
    assert f["evidence"]["origin"] == "loss" and "log_softmax" in f["suggestion"]
    if bad is not None:
        assert step == bad and m["steps"] == bad + 1 < 4000  # late, and the run stopped there
        assert last_checkpoint(tmp_path) == bad + 1  # the checkpoint holds the last finite state
    else:
        assert f["evidence"]["split"] == "validation" and m["steps"] == 4000 and "validation set" in f["message"]
    assert report["first_to_fix"]["id"] == "train.nonfinite" and report["status"] == "unhealthy"
    # One root cause in the decision tree: NaN -> the loss's log(0); the data and the precision ruled out.
    cause = report["root_cause"]
    assert cause["id"] == "train.nonfinite" and cause["branch"] == "nonfinite" and cause["step"] == step
    assert any(r.startswith("the data:") for r in cause["ruled_out"])
    assert any(r.startswith("the numerical precision:") for r in cause["ruled_out"])
    assert cause["fixes"][0] == f["suggestion"]
    # The same run with a numerically safe loss trains through.
    _, healthy = train(tmp_path / "stable", *SMALL, "train.steps=1000", "optim.lr=0.1")
    assert "train.nonfinite" not in ids(healthy)


def test_a_learning_rate_that_diverges_after_its_warmup_is_named_with_a_value_that_trains(tmp_path):
    """SGD with momentum warmed up to 2.0 over 400 steps: the loss falls, then blows up once the rate passes what
    the network tolerates. The turn is named, the learning rate there, and a tenth of it, which trains."""
    warmup = ["optim=sgd", "train.schedule=warmup_constant", "train.warmup_steps=400", "train.steps=1000"]
    _, report = train(tmp_path, *warmup, "optim.lr=2.0")
    [f] = [f for f in report["findings"] if f["id"] == "train.divergence"]
    assert f["severity"] == "error" and 0 < f["evidence"]["step"] < 400
    suggested = f["evidence"]["suggested_lr"]
    assert suggested < f["evidence"]["lr_at_turn"] < 2.0
    cause = report["root_cause"]
    assert cause["id"] == "train.divergence" and cause["branch"] == "optimisation"
    # What the blow-up left behind (spikes on the way, dead ReLUs after it) is explained by it, not a cause.
    assert all(g["explained_by"] == "train.divergence" for g in report["findings"]
               if g["id"] in ("train.grad_spike", "train.loss_spike", "train.update_ratio"))
    _, fixed = train(tmp_path / "fixed", *warmup, f"optim.lr={suggested:.4g}")
    assert problems(fixed) == [], fixed["findings"]


def test_a_learning_rate_far_too_low_underfits_and_the_plateau_names_the_cause(tmp_path):
    """Adam at 1e-6: after 300 steps the loss has barely left the loss of a model that ignores its inputs (the
    label prior's, fitted by harness train). Underfitting, explained by the plateau, whose suggested rate trains."""
    _, report = train(tmp_path, "train.steps=300", "optim.lr=1e-6")
    found = {f["id"]: f for f in report["findings"]}
    under = found["train.underfitting"]
    assert 2.0 < under["evidence"]["baseline_loss"] < 2.4  # ln 10 = 2.30: ten balanced digit classes
    assert under["evidence"]["gap_closed"] < 0.1 and under["explained_by"] == "train.plateau"
    assert report["root_cause"]["id"] == "train.plateau"
    _, fixed = train(tmp_path / "fixed", "train.steps=300",
                     f"optim.lr={found['train.plateau']['evidence']['suggested_lr']:.3g}")
    assert problems(fixed) == [], fixed["findings"]


def test_nan_rows_in_the_data_are_a_data_finding_before_training(tmp_path):
    """``train.checks`` (default: the data checks) run first, in the same report: the NaN rows are named there,
    and training runs on the finite rows (as the checklist does) instead of going non-finite at their batch."""
    _, report = train(tmp_path, *replace_group("data", "test_train.digits_subset", n_train=512, nan_rows=3),
                      "train.steps=50", "batch_size=64")
    assert "data.nonfinite" in ids(report) and "train.nonfinite" not in ids(report)
    assert report["first_to_fix"]["id"] == "data.nonfinite"
    assert report["diagnostics"]["train"]["metrics"]["steps"] == 50


def test_replay_locates_nonfinite_inputs_and_activations():
    """The replay's stages, each planted: NaN inputs; an activation fed by an overflowing layer; a log(0) loss;
    a non-finite derivative of a finite value (sqrt at 0)."""
    from harness.monitor.replay import locate

    params = {"w": jnp.ones((4, 3)), "v": jnp.ones((3, 2))}
    x, y = np.ones((5, 4), np.float32), np.zeros(5, np.int32)

    def apply(p, x):
        return jnp.tanh(x @ p["w"]) @ p["v"]

    def ce(out, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1)[:, 0]

    bad_x = x.copy()
    bad_x[2, 1] = np.nan
    assert locate(apply, ce, params, bad_x, y).stage == "inputs"
    assert locate(apply, ce, {**params, "w": params["w"].at[0, 0].set(np.inf)}, x, y).stage == "parameters"
    # Finite weights whose products overflow: tanh hides it (tanh(inf) = 1), the layer's output does not.
    origin = locate(apply, ce, {**params, "w": params["w"] * 1e38}, x, y)
    assert origin.stage == "forward" and origin.detail["layer"] == "w" and not origin.detail["layer_output_finite"]
    # The labelled class's logit 6e4 below the other's: softmax gives it exactly 0.
    origin = locate(apply, naive_ce, {**params, "v": params["v"] * jnp.array([1e4, -1e4])}, x, y + 1)
    assert origin.stage == "loss" and origin.detail["nonfinite_examples"] == 5

    def sqrt_model(p, x):  # sqrt at 0: a finite value with an infinite derivative
        return jnp.sqrt((x @ p["w"]) * 0.0)[:, :2] + p["v"].sum()

    origin = locate(sqrt_model, ce, params, x, y)
    assert origin.stage == "backward" and "w" in origin.detail["leaves"]
    assert locate(apply, ce, params, x, y).stage == "none"


def test_a_frozen_layer_is_named(tmp_path):
    _, report = train(tmp_path, "train.epochs=5", *replace_group("model", "test_train.frozen_first_layer"))
    [f] = [f for f in report["findings"] if f["id"] == "train.update_ratio"]
    assert f["evidence"]["no_gradient"] == ["first/bias", "first/kernel"], f["evidence"]
    # Its healthy twin (every layer learning: the reference MLP) is test_a_healthy_run_..., silent.


def test_overfitting_a_small_training_set_names_the_turn(tmp_path):
    _, report = train(tmp_path, *SMALL, "train.steps=2000", "optim.lr=3e-3")
    [f] = [f for f in report["findings"] if f["id"] == "train.overfitting"]
    assert 0 < f["evidence"]["step"] < 1000
    # With ten times the data, the same run does not overfit.
    _, more = train(tmp_path / "more", *replace_group("data", "test_train.digits_subset", n_train=1200),
                    "batch_size=64", "train.steps=2000", "optim.lr=3e-3")
    assert "train.overfitting" not in ids(more), more["findings"]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: interrupted and killed runs resume bitwise


CADENCE = ["train.steps=120", "train.log_every=20", "train.eval_every=40", "train.checkpoint_every=40"]


def test_an_interrupted_run_resumes_from_its_checkpoint_bitwise(tmp_path, monkeypatch):
    _, whole = train(tmp_path / "whole", *CADENCE)
    real_run = train_run.Job.run
    calls = {"chunk": 0}

    def interrupt_on_fourth_chunk(self, name, fn, *args, **kwargs):
        if name == "chunk":
            calls["chunk"] += 1
            if calls["chunk"] == 4:
                raise KeyboardInterrupt
        return real_run(self, name, fn, *args, **kwargs)

    monkeypatch.setattr(train_run.Job, "run", interrupt_on_fourth_chunk)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", *CADENCE)
    cut = json.load(open(tmp_path / "cut" / "report.json"))  # the report of the steps done is written
    assert cut["diagnostics"]["train"]["metrics"]["steps"] == 60 and cut["diagnostics"]["train"]["metrics"]["interrupted"]
    monkeypatch.setattr(train_run.Job, "run", real_run)
    _, resumed = train(tmp_path / "cut", *CADENCE)
    m = resumed["diagnostics"]["train"]["metrics"]
    assert m["resumed_from_step"] == 60 and m["steps"] == 120
    for key in ("train_loss", "val_loss", "val_step"):
        assert resumed["diagnostics"]["train"]["series"][key] == whole["diagnostics"]["train"]["series"][key], key
    # harness reproduce trains the resumed run again from scratch and gets every number bitwise.
    from harness.sweeps.reproduce import reproduce

    again = reproduce(str(tmp_path / "cut"), out_dir=str(tmp_path / "again"), mode="bitwise")
    assert again.matched, again.mismatches


def test_a_killed_process_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "harness", "train", "logger=none", f"output_dir={out}", "train.steps=3000",
            "train.log_every=50", "train.eval_every=100", "train.checkpoint_every=100"]
    proc = subprocess.Popen(args, cwd=str(tmp_path), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isdir(out / "checkpoints") and any(
            d.isdigit() and int(d) >= 200 for d in os.listdir(out / "checkpoints"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out / "report.json")  # killed: nothing after the checkpoints
    done = subprocess.run(args, cwd=str(tmp_path), env=cli_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.load(open(out / "report.json"))
    m = report["diagnostics"]["train"]["metrics"]
    assert m["resumed_from_step"] >= 200 and m["steps"] == 3000
    assert len(report["diagnostics"]["train"]["series"]["train_loss"]) == 3000  # nothing lost


def test_resuming_another_run_is_a_clear_error(tmp_path):
    train(tmp_path, "train.steps=20")
    code = _cli(["train", "logger=none", f"output_dir={tmp_path}", "train.steps=40", "optim.lr=0.5"])
    assert code == cli.EXIT_BAD_INPUT


# ----------------------------------------------------------------------------------------------------------------
# The command: bad input, W&B


def _cli(argv):
    # In-process, Hydra must not reconfigure logging (test_cli.NO_HYDRA_LOGGING: it would close pytest's streams).
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "engine.compilation_cache=null", "hydra/job_logging=none", "hydra/hydra_logging=none"])
    return exit_.value.code


@pytest.mark.parametrize("overrides, fragment", [
    ([], "train.steps: harness train needs the run's length"),
    (["train.steps=10", "train.schedule=sawtooth"], "train.schedule: must be one of"),
    (["train.steps=10", "train.log_every=0"], "train.log_every: must be positive"),
    (["train.steps=10", "train.epochs=2"], "train.epochs: give train.steps or train.epochs"),
])
def test_bad_train_settings_are_one_line_errors(tmp_path, capsys, overrides, fragment):
    code = _cli(["train", "logger=none", f"output_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and fragment in err and "Traceback" not in err, err


def test_wandb_gets_the_live_history_and_the_report_in_one_run(tmp_path):
    code = _cli(["train", "logger=wandb", f"output_dir={tmp_path}", "train.steps=100", "train.log_every=20"])
    assert code == 0
    [run_dir] = offline_runs(str(tmp_path))
    records = wandb_records(run_dir)
    history = [r for r in records if r.get("_type") == "history" or "train/loss" in json.dumps(r)]
    assert history, records[:3]
    text = json.dumps(records)
    assert "train/loss" in text and "val/loss" in text and "findings" in text and "root_cause" in text
