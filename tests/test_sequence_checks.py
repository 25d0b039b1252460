"""Sequence checks (harness/checks/model/sequence.py): ``model.causal_leakage`` and ``model.padding_leakage`` on
planted mask bugs (no mask, off by one, wrong axis, a leak that starts late, a padding mask ignored or on the
query axis) and silence, with exactly zero differences, on correct models in NNX, Linen and Equinox.

The checks are called directly on a built Problem at its first init (one compile each, ~1-3 s on CPU), plus one
pipeline-level run of the model stage. Models and data: tests/sequence_models.py."""

from __future__ import annotations

import types

import jax
import numpy as np
import optax
import pytest
from helpers import compose, headline, replace_group

import sequence_models as sm
from harness import pipeline
from harness.checks.model import sequence
from harness.checks.model.settings import Settings
from harness.config import settings_from
from harness.engine import compile as programs
from harness.engine.core import Problem
from harness.errors import HarnessError
from harness.findings import FINDING_IDS, Severity, first_to_fix
from harness.losses import cross_entropy
from harness.models.adapters import ModelFactory
from harness.optim import OptimSpec
from harness.tasks import Task

LM = Task(sm.VOCAB, (sm.LENGTH,), integer_inputs=True, causal=True)
PADDED_LM = Task(sm.VOCAB, (sm.LENGTH,), integer_inputs=True, causal=True, pad_token=sm.PAD)
TAGGER = Task(2, (sm.LENGTH,), integer_inputs=True, causal=False, pad_token=sm.PAD)
LM_X = sm.lm_data()["x_train"]
RIGHT_PADDED = sm.padded_tokens(64, side="right")
LEFT_PADDED = sm.padded_tokens(64, side="left")


def check(factory, task: Task, x_train: np.ndarray, **kwargs):
    """The sequence checks on the first init of ``factory(**kwargs)``, on the first 16 training sequences."""
    model = ModelFactory(factory, kwargs, x_train.shape[1:], task.num_outputs, x_train[:8]).adapt()
    problem = Problem(model, cross_entropy, OptimSpec(optax.adam), task)
    key, example = jax.random.key(0), x_train[:8]
    init = jax.jit(model.init).lower(key, example).compile({"xla_backend_optimization_level": 0})  # compiles 4x faster
    params, rest = init(key, example)
    ctx = types.SimpleNamespace(problem=problem, arrays=types.SimpleNamespace(x_train=x_train), seed=0)
    findings, metrics = sequence.run(ctx, Settings(), params, rest, x_train[:16])
    return {f.id: f for f in findings}, metrics


# --------------------------------------------------------------------------------------------------------------
# Causal leakage


@pytest.mark.parametrize("factory,kwargs", [
    (sm.nnx_transformer, {}),  # nnx.MultiHeadAttention with nnx.make_causal_mask
    (sm.linen_transformer, {}),  # nn.MultiHeadDotProductAttention with nn.make_causal_mask
    (sm.equinox_transformer, {}),  # eqx.nn.MultiheadAttention with a tril mask
], ids=["nnx", "linen", "equinox"])
def test_correct_causal_models_are_silent_and_exact(factory, kwargs):
    findings, metrics = check(factory, LM, LM_X, **kwargs)
    assert findings == {}
    # Exact, not within a tolerance: the same compiled body on identical earlier inputs gives identical bits.
    assert metrics["model/causal_leakage/max_difference"] == 0.0
    assert metrics["model/causal_leakage/positions_checked"] == sm.LENGTH - 1


@pytest.mark.parametrize("factory,kwargs,first,leaking,pattern", [
    (sm.nnx_transformer, dict(mask="none"), 0, sm.LENGTH - 1, "reads to the end of the sequence"),
    (sm.nnx_transformer, dict(mask="off_by_one"), 0, sm.LENGTH - 1, "reads exactly the next input"),
    (sm.nnx_transformer, dict(mask="wrong_axis"), 0, sm.LENGTH - 1, "reads to the end of the sequence"),
    (sm.late_leak, dict(start=5), 5, sm.LENGTH - 1 - 5, "reads exactly the next input"),
    (sm.equinox_transformer, dict(causal=False), 0, sm.LENGTH - 1, "reads to the end of the sequence"),
], ids=["no_mask", "off_by_one", "wrong_axis", "leak_from_position_5", "equinox_no_mask"])
def test_planted_causal_bugs_fire_with_the_first_leaking_position(factory, kwargs, first, leaking, pattern):
    findings, _ = check(factory, LM, LM_X, **kwargs)
    assert set(findings) == {"model.causal_leakage"}
    f = findings["model.causal_leakage"]
    assert f.severity is Severity.ERROR
    assert f.evidence["first_leaking_position"] == first
    assert f.evidence["leaking_positions"] == leaking
    assert f.evidence["max_abs_difference"] > 1e-3 * f.evidence["output_scale"]
    assert f"position {first} changes" in f.message and pattern in f.message
    assert "make_causal_mask" in f.suggestion and "k=1" in f.suggestion
    if "next input" in pattern:
        assert set(f.evidence["inputs_ahead_read"].values()) == {1}
    assert headline(list(findings.values())) == "model.causal_leakage"


def test_not_causal_and_unpadded_runs_nothing():
    before = programs.STATS.compiles
    findings, metrics = check(sm.late_leak, Task(sm.VOCAB, (sm.LENGTH,), integer_inputs=True), LM_X)
    assert findings == {} and metrics == {} and programs.STATS.compiles == before


# --------------------------------------------------------------------------------------------------------------
# Padding leakage


@pytest.mark.parametrize("factory,task,x,kwargs,fires", [
    # A bidirectional tagger on right-padded data: the padding mask on the key axis is right.
    (sm.nnx_transformer, TAGGER, RIGHT_PADDED, dict(mask="none", pad_mask="keys"), False),
    (sm.nnx_transformer, TAGGER, RIGHT_PADDED, dict(mask="none", pad_mask="none"), True),
    (sm.nnx_transformer, TAGGER, RIGHT_PADDED, dict(mask="none", pad_mask="queries"), True),
    # The same through a one-hot Dense embedding (a dot_general lookup), in Linen.
    (sm.linen_transformer, TAGGER, RIGHT_PADDED, dict(causal=False, pad_mask="keys", one_hot=True), False),
    (sm.linen_transformer, TAGGER, RIGHT_PADDED, dict(causal=False, pad_mask="none", one_hot=True), True),
    # Equinox, no padding mask.
    (sm.equinox_transformer, TAGGER, RIGHT_PADDED, dict(causal=False), True),
    # A causal LM never reads right padding: a causal mask alone is correct there ...
    (sm.nnx_transformer, PADDED_LM, RIGHT_PADDED, dict(mask="causal", pad_mask="none"), False),
    # ... but reads left padding unless it is masked.
    (sm.nnx_transformer, PADDED_LM, LEFT_PADDED, dict(mask="causal", pad_mask="none"), True),
    (sm.nnx_transformer, PADDED_LM, LEFT_PADDED, dict(mask="causal", pad_mask="keys"), False),
], ids=["tagger_keys", "tagger_ignored", "tagger_query_axis", "onehot_keys", "onehot_ignored", "equinox_ignored",
        "lm_right_causal", "lm_left_causal_only", "lm_left_causal_and_keys"])
def test_padding_leakage(factory, task, x, kwargs, fires):
    findings, metrics = check(factory, task, x, **kwargs)
    # Left padding under a causal and a padding mask leaves padded queries with every key masked: they attend
    # uniformly to all keys, the future included. Their outputs are never used: no causal finding.
    assert "model.causal_leakage" not in findings
    if not fires:
        assert findings == {}
        assert metrics["model/padding_leakage/max_difference"] == 0.0
        return
    f = findings["model.padding_leakage"]
    assert f.severity is Severity.ERROR
    assert f.evidence["leaking_real_positions"] == f.evidence["real_positions_checked"] > 0
    assert f.evidence["padding"] == ("left" if x is LEFT_PADDED else "right")
    if x is LEFT_PADDED:  # the first real position of the first sequence with padding
        first_padded = x[(x == sm.PAD).any(axis=1)][0]
        assert f.evidence["first_leak"] == {"sequence": 0, "position": int(np.argmax(first_padded != sm.PAD))}
    assert "key" in f.suggestion
    assert headline(list(findings.values())) == "model.padding_leakage"


def test_padding_leak_that_follows_from_a_causal_leak_says_so():
    findings, _ = check(sm.nnx_transformer, PADDED_LM, RIGHT_PADDED, mask="none")
    assert set(findings) == {"model.causal_leakage", "model.padding_leakage"}
    assert "follows from the causal leakage" in findings["model.padding_leakage"].message
    assert headline(list(findings.values())) == "model.causal_leakage"


def test_padding_without_an_embedding_lookup_is_not_checked_and_says_so():
    findings, _ = check(sm.nnx_unembedded, TAGGER, RIGHT_PADDED)
    f = findings["model.padding_leakage"]
    assert f.severity is Severity.INFO and "not checked" in f.message


def test_unpadded_sequences_skip_the_padding_check():
    findings, metrics = check(sm.nnx_transformer, TAGGER, LM_X + 1, mask="none")  # tokens 1..V: no pad (0)
    assert findings == {} and metrics == {}


# --------------------------------------------------------------------------------------------------------------
# Pieces, settings, ids


def test_cut_points_cover_short_sequences_and_spread_over_long_ones():
    assert sequence.cut_points(12, 64).tolist() == list(range(11))
    cuts = sequence.cut_points(1000, 64)
    assert len(cuts) == 64 and cuts[0] == 0 and cuts[-1] == 998


def test_replacement_changes_every_token_and_keeps_it_in_range():
    x = LM_X[:4]
    replaced = sequence.replace_all(x, LM_X, seed=0)
    assert np.all(replaced != x) and replaced.min() >= LM_X.min() and replaced.max() <= LM_X.max()
    assert sequence.replace_all(np.zeros((2, 3), np.int32), np.zeros((5, 3), np.int32), seed=0) is None
    floats = np.zeros((2, 5, 3), np.float32)
    assert np.all(sequence.replace_all(floats, floats + 1, seed=0) != floats)


def test_finding_ids_and_settings():
    assert FINDING_IDS.index("model.batch_dependence") < FINDING_IDS.index("model.causal_leakage") \
        < FINDING_IDS.index("model.padding_leakage") < FINDING_IDS.index("train.overfit_batch")
    with pytest.raises(HarnessError) as err:
        settings_from(Settings, {"sequence_tolerance": 1.5}, "diagnostics.model")
    assert "diagnostics.model.sequence_tolerance" in str(err.value)
    with pytest.raises(HarnessError):
        settings_from(Settings, {"sequence_examples": 0}, "diagnostics.model")


# --------------------------------------------------------------------------------------------------------------
# Through the pipeline: the model stage of a run on a language model's data.


def test_model_stage_names_a_missing_causal_mask():
    rc = compose(["logger=none", "diagnostics.run=[model]", "diagnostics.model.gradient_check=false",
                  *replace_group("data", "sequence_models.lm_data"),
                  *replace_group("model", "sequence_models.nnx_transformer", mask="none")])
    result = pipeline.run(rc)
    assert result.context.problem.task.causal  # detected from the next-token targets, not declared
    ids = [f.id for f in result.findings if f.severity is Severity.ERROR]
    assert "model.causal_leakage" in ids and not result.internal_errors
    leak = next(f for f in result.findings if f.id == "model.causal_leakage")
    assert leak.evidence["first_leaking_position"] == 0
    metrics = pipeline.flat_metrics(result.outcomes)
    assert metrics["model/causal_leakage/leaking_positions"] == sm.LENGTH - 1
    assert first_to_fix(result.findings).id == "model.causal_leakage"  # the report's headline


def test_a_failing_padding_interpreter_costs_only_the_padding_check(monkeypatch):
    def broken(*args, **kwargs):
        raise NotImplementedError("an unforeseen primitive")

    monkeypatch.setattr(sequence, "embedding_noise_forward", broken)
    findings, metrics = check(sm.nnx_transformer, PADDED_LM, RIGHT_PADDED, mask="off_by_one")
    assert findings["model.padding_leakage"].severity is Severity.INFO
    assert "NotImplementedError: an unforeseen primitive" in findings["model.padding_leakage"].message
    assert findings["model.causal_leakage"].evidence["first_leaking_position"] == 0
    assert headline(list(findings.values())) == "model.causal_leakage"
    assert "model/padding_leakage/max_difference" not in metrics


# --------------------------------------------------------------------------------------------------------------
# The worked example (experiments/char_lm.py), small.


@pytest.fixture(scope="module")
def char_lm():
    import importlib
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    try:
        return importlib.import_module("char_lm")
    finally:
        sys.path.pop(0)


def test_char_lm_data_are_deterministic_next_character_pairs(char_lm):
    a, b = char_lm.make_data(num_train=64, num_val=16, seq_len=16), char_lm.make_data(64, 16, 16)
    assert all(np.array_equal(a[k], b[k]) for k in ("x_train", "y_train", "x_val", "y_val"))
    assert a["x_train"].shape == (64, 16) and a["x_val"].shape == (16, 16) and a["causal"] is True
    assert np.array_equal(a["y_train"][:, :-1], a["x_train"][:, 1:]) and a["x_train"].max() < a["num_classes"]


@pytest.mark.parametrize("causal", [True, False], ids=["healthy", "nomask"])
def test_char_transformer_leaks_only_without_its_mask(char_lm, causal):
    data = char_lm.make_data(num_train=64, num_val=16, seq_len=16)
    task = Task(data["num_classes"], (16,), integer_inputs=True, causal=True)
    findings, _ = check(char_lm.CharTransformer, task, data["x_train"], width=16, depth=1, heads=2, causal=causal)
    assert set(findings) == (set() if causal else {"model.causal_leakage"})
    assert headline(list(findings.values())) == (None if causal else "model.causal_leakage")
