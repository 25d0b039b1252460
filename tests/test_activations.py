"""``harness train`` with ``train.activations=true``: per-step activation statistics from inside the compiled step,
and the detectors on them (:mod:`harness.monitor.activations`), proven both ways.

Planted: Adam at 0.1 kills a ReLU layer and saturates a tanh layer within steps (a run whose loss alone looks
fine to the other detectors); the same learning rate makes a transformer's attention logits grow ten-thousandfold
(no QK-normalization); a model that returns probabilities to a cross-entropy on logits (a second softmax) stalls
its loss while its logits keep growing. Healthy twins (the same models at Adam's default 1e-3, the MLP becoming
confident on digits, the char transformer learning) stay silent. Off (the default), nothing is recorded.
"""

from __future__ import annotations

import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from helpers import compose, replace_group

from harness.checks.model import capture
from harness.monitor import activations as acts
from harness.train import run as train_run

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
ACTIVATION_IDS = ("train.dead_units", "train.saturated_units", "train.attention_logits", "train.output_logits")


# ----------------------------------------------------------------------------------------------------------------
# Factories (``_target_: test_activations.x``)


def _char_lm():
    sys.path.insert(0, EXPERIMENTS)
    try:
        return importlib.import_module("char_lm")
    finally:
        sys.path.remove(EXPERIMENTS)


def char_data(num_train: int = 256, num_val: int = 64, seq_len: int = 16):
    return _char_lm().make_data(num_train=num_train, num_val=num_val, seq_len=seq_len)


def char_transformer(input_shape, num_outputs, width: int = 32, depth: int = 1, heads: int = 2, seed: int = 0):
    """experiments/char_lm.py's transformer (pre-LN, no QK-normalization), small."""
    from flax import nnx

    return _char_lm().CharTransformer(rngs=nnx.Rngs(seed), input_shape=input_shape, num_outputs=num_outputs,
                                      width=width, depth=depth, heads=heads)


def tanh_relu_mlp(input_shape, num_outputs, seed: int = 0, probabilities: bool = False):
    """A tanh layer, then a ReLU layer (Glorot and He init: healthy at init). ``probabilities``: it returns
    softmax probabilities, and the cross-entropy applies softmax to them again (a planted bug)."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.squash = nnx.Linear(input_shape[-1], 128, kernel_init=nnx.initializers.glorot_normal(), rngs=rngs)
            self.rect = nnx.Linear(128, 128, kernel_init=nnx.initializers.he_normal(), rngs=rngs)
            self.out = nnx.Linear(128, num_outputs, rngs=rngs)

        def __call__(self, x):
            logits = self.out(jax.nn.relu(self.rect(jnp.tanh(self.squash(x)))))
            return jax.nn.softmax(logits) if probabilities else logits

    return Net(nnx.Rngs(seed))


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def train(out, *overrides):
    # Few validations and one checkpoint at the end: orbax saves cost more than these runs' steps.
    rc = compose(["logger=none", "train.checks=[]", "train.activations=true", "train.eval_every=50",
                  "train.checkpoint_every=100000", *overrides])
    return train_run.train(rc, str(out), command=["harness", "train", *overrides], show_report=False)[1]


def found(report) -> dict[str, dict]:
    return {f["id"]: f for f in report["findings"] if f["id"] in ACTIVATION_IDS}


MLP = replace_group("model", "test_activations.tanh_relu_mlp")
CHAR = [*replace_group("data", "test_activations.char_data"),
        *replace_group("model", "test_activations.char_transformer"), "batch_size=32"]


# ----------------------------------------------------------------------------------------------------------------
# Capture: softmax only when asked


def test_softmax_is_recorded_only_when_asked_and_the_values_are_the_same():
    params = {"q": jnp.ones((4, 4)) * 0.3, "w": jnp.ones((4, 3))}
    x = jnp.arange(8.0).reshape(2, 4) / 8

    def fn(p, x):
        h = jax.nn.relu(x @ p["q"])
        weights = jax.nn.softmax(h[:, :, None] * h[:, None, :])  # attention-like: (batch, query, key)
        return jnp.einsum("bqk,bk->bq", weights, h) @ p["w"]

    out, plain = capture.record_activations(fn, params, x)
    assert [a.kind for a in plain] == ["rectifier"]  # what the model checks see: unchanged
    for flag in (False, True):
        with jax.softmax_custom_jvp(flag):  # inlined primitives, or a custom_jvp call named _softmax
            out2, recorded = capture.record_activations(fn, params, x, softmax=True)
        assert [a.kind for a in recorded] == ["rectifier", "softmax"], flag
        np.testing.assert_allclose(out2, out, rtol=1e-6)
        h = jax.nn.relu(x @ params["q"])
        np.testing.assert_allclose(recorded[1].input, h[:, :, None] * h[:, None, :], rtol=1e-6)
    # Inside jit, and the record's statistics: a softmax head's input counts as the output logits, not attention.
    head = lambda p, x: (jax.nn.softmax(fn(p, x)), None)  # noqa: E731  (outputs, model state)
    (_, record) = jax.jit(lambda p, x: acts.forward(head, p, x, capture.slash_path))(params, x)
    layers, attention = acts.layers(head, params, x, capture.slash_path)
    assert [layer.kind for layer in layers] == ["rectifier"] and len(attention) == 1
    logits = fn(params, x)
    np.testing.assert_allclose(record.output_max, jnp.max(jnp.abs(logits)), rtol=1e-6)
    np.testing.assert_allclose(record.attention_logit[0], jnp.max(h[:, :, None] * h[:, None, :]), rtol=1e-6)


def test_the_log_survives_a_checkpoint():
    log = acts.ActivationLog([acts.Layer("a", "relu", "rectifier")], ["att"])
    record = acts.ActivationRecord(np.full((4, 1), 0.25, np.float32), np.full((4, 1), np.nan, np.float32),
                                   np.arange(4, dtype=np.float32)[:, None], np.ones(4, np.float32),
                                   np.ones(4, np.float32))
    log.add(0, 3, record)  # a chunk of 4 with 3 steps taken
    again = acts.ActivationLog(log.layers, log.attention)
    again.load(log.state())
    again.add(3, 4, record)
    s = again.series()
    assert s.steps.tolist() == [0, 1, 2, 3, 4, 5, 6] and s.attention_logit[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# Dead and saturated units


def test_units_killed_and_saturated_during_training_are_named_with_step_and_layer(tmp_path):
    report = train(tmp_path, *MLP, "train.steps=200", "optim.lr=0.1")
    f = found(report)
    dead, saturated = f["train.dead_units"], f["train.saturated_units"]
    assert dead["severity"] == "warning" and dead["evidence"]["layer"] == "rect" and dead["evidence"]["step"] < 50
    assert dead["evidence"]["layers"]["rect"] >= 0.9 and dead["evidence"]["start"]["rect"] < 0.2
    assert saturated["severity"] == "warning" and saturated["evidence"]["layer"] == "squash"
    assert saturated["evidence"]["layers"]["squash"] >= 0.75 and saturated["evidence"]["step"] < 50
    assert f"step {dead['evidence']['step']}" in dead["message"] and "rect" in dead["message"]
    series = report["diagnostics"]["train"]["series"]
    assert len(series["dead_fraction/rect"]) == 200 and len(series["saturated_fraction/squash"]) == 200
    # The loss detectors see no blow-up: the loss came down and settled, worse than its healthy twin (below).
    assert not {g["id"] for g in report["findings"]} & {"train.divergence", "train.nonfinite"}


def test_the_healthy_twin_is_silent(tmp_path):
    """The same model at Adam's 1e-3 for long enough to become confident: logits grow 10x while the loss falls."""
    report = train(tmp_path, *MLP, "train.steps=600")
    assert found(report) == {}, found(report)
    m = report["diagnostics"]["train"]["metrics"]
    assert m["final_dead_fraction/rect"] < 0.25 and m["final_saturated_fraction/squash"] < 0.25
    series = report["diagnostics"]["train"]["series"]
    assert series["output_logit_rms"][-1] > 5 * series["output_logit_rms"][0]  # confident, and silent


# ----------------------------------------------------------------------------------------------------------------
# Output logits


def test_logits_growing_under_a_stalled_loss_are_named(tmp_path):
    report = train(tmp_path, *replace_group("model", "test_activations.tanh_relu_mlp", probabilities=True),
                   "train.steps=600")
    f = found(report)["train.output_logits"]
    assert f["severity"] == "warning" and f["evidence"]["growth"] >= 2 and f["evidence"]["step"] < 300
    assert "softmax applied twice" in f["suggestion"]


# ----------------------------------------------------------------------------------------------------------------
# Attention logits


def test_attention_logit_growth_at_a_high_learning_rate_is_named(tmp_path):
    report = train(tmp_path, *CHAR, "train.steps=150", "optim.lr=0.1")
    f = found(report)["train.attention_logits"]
    assert f["severity"] == "warning" and f["evidence"]["layer"].startswith("blocks/0/attention")
    assert f["evidence"]["growth"] > 100 and f["evidence"]["step"] < 50
    assert "QK-norm" in f["suggestion"]


def test_the_char_transformer_at_its_default_learning_rate_is_silent(tmp_path):
    report = train(tmp_path, *CHAR, "train.steps=300")
    assert found(report) == {}, found(report)
    series = report["diagnostics"]["train"]["series"]
    [key] = [k for k in series if k.startswith("attention_logit_max/")]
    assert max(series[key]) < acts.ATTENTION_SATURATED


# ----------------------------------------------------------------------------------------------------------------
# Off by default


def test_off_by_default_nothing_is_recorded():
    assert compose(["logger=none"]).train.activations is False
