"""Mixed precision: ``precision=bfloat16`` (float32 master weights, the model computing in bfloat16) and the precision
check (``train.precision``), proven both ways.

The option: in every family the forward pass runs in bfloat16 (its matmuls are bf16 in the traced program), its
outputs come back float32, parameters, gradients and BatchNorm statistics stay float32, token ids are not cast, the
outputs differ from float32's slightly, and float32 and bfloat16 never share a compiled program. A bfloat16 run of
the reference job trains as well as float32, in the checklist and in ``harness train``.

The check: silent on the healthy reference job in bfloat16 (its float32 half is the seed runs, reused); fires on a
planted bfloat16-only bug: inputs in absolute units (digits as temperatures, 290-310 K) standardized inside the model
with a one-pass variance E[x^2] - E[x]^2, which cancels to 0 or below in bfloat16 (its spacing at 9e4 is 512) and
gives NaN through the sqrt, while float32 trains. The error with ``precision=bfloat16``; a warning when training as
configured is float32 and the check is asked for; located by the replay; the cause of the training failures it makes.
"""

from __future__ import annotations

import dataclasses
import math

import families
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import compose, replace_group

from harness import pipeline
from harness.checks.base import Outcome
from harness.checks.training import precision
from harness.data import builtin
from harness.engine import compile as programs
from harness.engine.driver import SweepResult
from harness.errors import HarnessError
from harness.findings import Severity
from harness.models.adapters import ModelFactory, with_precision
from harness.models.adapters.base import cast_floating

STEPS = 200  # the reference job is at a training loss ~0.05 by then (untrained 2.39); the default budget is 500
SETTINGS = precision.Settings(steps=STEPS)
QUICK = ["logger=none", f"diagnostics.seeds.steps={STEPS}", f"diagnostics.precision.steps={STEPS}",
         "diagnostics.seeds.check_determinism=false"]


# ----------------------------------------------------------------------------------------------------------------
# Planted: a computation that only bfloat16 breaks.


def kelvin_digits(offset: float = 290.0, span: float = 20.0):
    """scikit-learn's digits as readings in absolute units: ``offset + span * pixel`` (290 to 310 "kelvin")."""
    d = builtin.digits()
    for k in ("x_train", "x_val"):
        d[k] = (offset + span * d[k]).astype(np.float32)
    return d


class Standardized(nnx.Module):
    """An MLP that standardizes each example's features itself. ``one_pass``: the variance as E[x^2] - E[x]^2 (the
    planted bug: exact enough in float32, 0 or negative in bfloat16); else as E[(x - mean)^2] (healthy)."""

    def __init__(self, *, rngs, input_shape, num_outputs, width: int = 128, one_pass: bool = True):
        self.hidden = nnx.Linear(math.prod(input_shape), width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)
        self.one_pass = one_pass

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        mean = x.mean(-1, keepdims=True)
        if self.one_pass:
            var = (x * x).mean(-1, keepdims=True) - mean * mean
        else:
            var = ((x - mean) ** 2).mean(-1, keepdims=True)
        x = (x - mean) / jnp.sqrt(var + 1e-6)
        return self.out(nnx.relu(self.hidden(x)))


def standardized(*, rngs, input_shape, num_outputs, one_pass: bool = True):
    return Standardized(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, one_pass=one_pass)


PLANTED = [*replace_group("data", "test_precision.kelvin_digits"),
           *replace_group("model", "test_precision.standardized")]


# ----------------------------------------------------------------------------------------------------------------
# The config key.


def test_precision_is_a_validated_top_level_key_that_adds_the_check():
    assert compose(["logger=none"]).precision == "float32"
    with pytest.raises(HarnessError) as err:
        compose(["logger=none", "precision=float16"])
    assert err.value.key == "precision" and "float32, bfloat16" in str(err.value) and "float16" in str(err.value)
    rc = compose(["logger=none", "precision=bfloat16"])
    assert rc.precision == "bfloat16" and "precision" in rc.diagnostics
    assert list(rc.diagnostics).index("precision") == list(rc.diagnostics).index("seeds") + 1  # checklist order
    assert "precision" not in compose(["logger=none"]).diagnostics  # float32: only when asked for
    assert "precision" in compose(["logger=none", "diagnostics.run=[precision]"]).diagnostics
    assert "precision" not in compose(["logger=none", "precision=bfloat16", "diagnostics.run=[data,model]"]).diagnostics


# ----------------------------------------------------------------------------------------------------------------
# The option: one wrapper around Model.apply, every family.


def _factory(factory, precision_, **kwargs):
    d = builtin.digits()
    return ModelFactory(factory, kwargs, (64,), 10, d["x_train"][:2], precision=precision_)


@pytest.mark.parametrize("factory", [families.nnx_batchnorm_mlp, families.linen_batchnorm_mlp,
                                     families.equinox_batchnorm_mlp, families.haiku_mlp],
                         ids=["nnx", "linen", "equinox", "haiku"])
def test_every_family_computes_in_bfloat16_with_float32_weights_state_and_outputs(factory):
    x = jnp.asarray(builtin.digits()["x_train"][:16])
    model = _factory(factory, "bfloat16").adapt()
    f32 = with_precision(model, "float32")
    assert model.precision == "bfloat16" and f32.precision == "float32"
    key = jax.random.key(1)

    def forward(p, s):
        return model.apply(p, s, x, key=key, train=True)

    @jax.jit
    def everything():
        params, state = model.init(jax.random.key(0), x[:1])
        out, new_state = forward(params, state)
        grads = jax.grad(lambda p: forward(p, state)[0].sum())(params)
        # The float32 model on the same weights, in inference mode: close to bfloat16's, not equal.
        ref, low = (m.apply(params, state, x, key=key)[0] for m in (f32, model))
        return params, state, out, new_state, grads, ref, low

    params, state, out, new_state, grads, ref, low = everything()
    program = str(jax.make_jaxpr(forward)(params, state))
    assert "bf16[16,64]" in program and "dot_general" in program  # the first matmul runs in bfloat16
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    assert {a.dtype for a in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
    # Non-trainable state (BatchNorm statistics) stays float32 and moves.
    old = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)]
    new = [a for a in jax.tree.leaves(new_state) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert [a.dtype for a in new] == [a.dtype for a in old] and all(a.dtype == jnp.float32 for a in new)
    if factory is not families.haiku_mlp:
        assert old and any(not np.array_equal(a, b) for a, b in zip(old, new)), "the batch statistics did not move"
    gap = float(jnp.max(jnp.abs(ref - low)))
    assert 0 < gap < 0.05 * float(jnp.max(jnp.abs(ref))) + 1e-3, gap


class TokenProbe(nnx.Module):
    seen: list = []

    def __init__(self, *, rngs, input_shape, num_outputs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.head = nnx.Linear(8, num_outputs, rngs=rngs)

    def __call__(self, x):
        TokenProbe.seen.append(x.dtype)
        h = self.embed(x)
        TokenProbe.seen.append(h.dtype)
        return self.head(h)


def test_token_ids_are_not_cast_and_the_rest_is():
    x = jnp.asarray(np.arange(24).reshape(2, 12) % 10, jnp.int32)
    model = ModelFactory(lambda *, rngs, input_shape, num_outputs: TokenProbe(
        rngs=rngs, input_shape=input_shape, num_outputs=num_outputs), {}, (12,), 10, x, precision="bfloat16").adapt()
    params, state = model.init(jax.random.key(0), x)
    assert not model.convolutions  # found by tracing the model once, on first use: not what this test counts
    TokenProbe.seen.clear()
    out = model(params, state, x)
    assert TokenProbe.seen == [jnp.int32, jnp.bfloat16] and out.dtype == jnp.float32
    tree = {"ids": x, "x": jnp.ones(3), "key": jax.random.key(0), "flag": jnp.array(True)}
    cast = cast_floating(tree, jnp.bfloat16)
    assert cast["ids"].dtype == jnp.int32 and cast["x"].dtype == jnp.bfloat16 and cast["flag"].dtype == jnp.bool_


def test_float32_and_bfloat16_never_share_a_program():
    f32 = pipeline.build_context(compose(["logger=none"])).problem
    bf16 = pipeline.build_context(compose(["logger=none", "precision=bfloat16"])).problem
    assert f32 != bf16 and f32.fingerprint != bf16.fingerprint and f32.stable_key() != bf16.stable_key()
    assert bf16.model.precision == "bfloat16" and f32.model.precision == "float32"
    # The same problem at the other precision: its own fingerprint, one object per problem, and back again.
    other = bf16.at_precision("float32")
    assert other.model.precision == "float32" and other != bf16 and other is bf16.at_precision("float32")
    assert other.at_precision("bfloat16") is bf16 and bf16.at_precision("bfloat16") is bf16


# ----------------------------------------------------------------------------------------------------------------
# The check: healthy, both ways.


@pytest.fixture(scope="module")
def reference_bf16():
    """The reference job with precision=bfloat16, seeds then precision as the pipeline runs them."""
    rc = compose([*QUICK, "precision=bfloat16", "diagnostics.run=[seeds]"])
    ctx = pipeline.build_context(rc)
    before = programs.STATS.compiles
    outcomes = pipeline.run_diagnostics(rc, ctx)
    return ctx, {o.name: o for o in outcomes}, programs.STATS.compiles - before


def test_a_bfloat16_reference_job_trains_and_the_check_is_silent(reference_bf16):
    ctx, outcomes, compiles = reference_bf16
    out = outcomes["precision"]
    assert out.findings == [] and out.skipped is None and out.internal_error is None
    m = out.metrics
    assert m["precision/configured"] == "bfloat16" and m["precision/nonfinite_bfloat16"] == 0
    assert m["precision/final_train_loss_bfloat16"] < m["precision/untrained_loss"] / 10  # it trains
    # Close to float32: the gap far inside the rule's margins.
    assert abs(m["precision/loss_ratio"] - 1) < 0.1, m
    assert m["precision/loss_gap"] < SETTINGS.margin_std * m["precision/loss_gap_std_error"] + 0.01 * m[
        "precision/untrained_loss"]
    assert m["precision/loss_scale"] == "none"
    # bfloat16's runs are the seed runs (the memo), float32's one more program: two compiles in all.
    assert compiles == 2, compiles
    spec, hparams = precision.run_spec(ctx, SETTINGS)
    bf16 = ctx.train("again", spec, hparams)
    assert {np.asarray(a).dtype for a in jax.tree.leaves(bf16.params)} == {np.dtype("float32")}  # master weights


def test_the_check_is_silent_on_the_planted_model_made_healthy():
    """The same data and model with a two-pass variance: bfloat16 trains like float32."""
    rc = compose(["logger=none", "precision=bfloat16", *replace_group("data", "test_precision.kelvin_digits"),
                  *replace_group("model", "test_precision.standardized", one_pass="false")])
    out = precision.run(pipeline.build_context(rc), SETTINGS)
    assert out.findings == [], [f.message for f in out.findings]
    assert out.metrics["precision/nonfinite_bfloat16"] == 0


# ----------------------------------------------------------------------------------------------------------------
# The check: the planted bfloat16-only NaN.


@pytest.fixture(scope="module")
def planted_bf16():
    ctx = pipeline.build_context(compose(["logger=none", "precision=bfloat16", *PLANTED]))
    return ctx, precision.run(ctx, SETTINGS)


def test_a_bfloat16_only_nan_is_an_error_located_in_the_forward_pass(planted_bf16):
    _, out = planted_bf16
    [f] = out.findings
    assert f.id == "train.precision" and f.severity is Severity.ERROR
    e = f.evidence
    assert e["nonfinite_only_bfloat16"] == e["members"] == 4 and e["nonfinite_float32"] == 0
    assert e["first_nonfinite_step_bfloat16"] == 0
    assert e["replay_stage"] == "forward" and e["replay_where"].startswith("hidden") and e["float32_step_finite"]
    assert "same step in float32 is finite" in f.message and "E[x^2] - E[x]^2" in f.suggestion
    assert np.isfinite(e["final_train_loss_float32"]) and e["final_train_loss_float32"] < 0.5  # float32 trains


def test_with_float32_as_configured_the_same_bug_is_a_warning(planted_bf16):
    ctx, _ = planted_bf16
    f32_ctx = dataclasses.replace(ctx, problem=ctx.problem.at_precision("float32"), shared={})  # same programs
    before = programs.STATS.compiles
    out = precision.run(f32_ctx, SETTINGS)
    assert programs.STATS.compiles == before
    [f] = out.findings
    assert f.severity is Severity.WARNING and "unaffected" in f.message
    assert out.metrics["precision/configured"] == "float32"


def test_the_bfloat16_nan_is_the_root_cause_of_the_training_failures_it_makes():
    from harness.causes import reconcile_outcomes, root_cause
    from harness.findings import Finding, first_to_fix

    nan = Finding("train.precision", Severity.ERROR, "bf16 only", {"nonfinite_only_bfloat16": 4})
    overfit = Finding("train.overfit_batch", Severity.ERROR, "the loss went non-finite")
    plateau = Finding("train.precision", Severity.WARNING, "higher plateau", {"nonfinite_only_bfloat16": 0})
    outcomes = [Outcome("overfit_batch", [overfit]), Outcome("precision", [nan])]
    done = reconcile_outcomes(outcomes)
    assert first_to_fix(done).id == "train.precision" and done[0].explained_by == "train.precision"
    root = root_cause(done, outcomes, precision="bfloat16")
    assert root.branch == "nonfinite" and not any("precision" in alt for alt in root.open)  # named, not open
    # A higher plateau explains nothing: it is not what breaks one batch.
    done = reconcile_outcomes([Outcome("overfit_batch", [overfit]), Outcome("precision", [plateau])])
    assert done[0].explained_by is None


class StrictAdd(nnx.Module):
    """A model that adds a float32 constant with ``lax.add``, which refuses mixed dtypes: it cannot run in bfloat16."""

    def __init__(self, *, rngs, input_shape, num_outputs):
        self.out = nnx.Linear(math.prod(input_shape), num_outputs, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.out(jax.lax.add(x, jnp.zeros(x.shape[1:], jnp.float32)))


def test_a_model_that_cannot_run_in_bfloat16_is_named_not_a_crash():
    rc = compose(["logger=none", "precision=bfloat16", *replace_group("model", "test_precision.StrictAdd")])
    out = precision.run(pipeline.build_context(rc), precision.Settings(steps=20))
    [f] = out.findings
    assert f.id == "train.precision" and f.severity is Severity.ERROR and "does not run in bfloat16" in f.message
    assert "TypeError" in f.message and out.internal_error is None


# ----------------------------------------------------------------------------------------------------------------
# The rule on synthetic results (no training).


def _result(final_train, diverged=None, first=None) -> SweepResult:
    from harness.engine.core import Hparams

    n = len(final_train)
    first = np.full(n, -1) if first is None else np.asarray(first)
    loss = np.tile(np.array([[2.4, 1.0, 0.5]]), (n, 1))
    final = np.asarray(final_train, float)[:, None]
    return SweepResult(Hparams.make(init_seed=np.arange(n)), loss, loss, loss, np.array([STEPS]), final, None, final,
                       first, update_norm=np.full((n, 3), 1e-3), param_norm=np.ones((n, 3)))


def test_a_higher_plateau_needs_significance_an_effect_and_a_material_gap():
    f32 = _result([0.010, 0.011, 0.009, 0.010])

    def judge(bf16):
        return precision.findings(precision.compare(f32, _result(bf16), SETTINGS), SETTINGS, "bfloat16")

    [f] = judge([0.20, 0.18, 0.22, 0.19])  # 20x float32's, 8% of the untrained loss
    assert f.severity is Severity.WARNING and "0.198" in f.message
    assert judge([0.011, 0.010, 0.012, 0.010]) == []  # 10% higher: inside the effect size
    assert judge([0.04, 0.05, 0.04, 0.05]) == []  # 4.5x float32's but 1.5% of the untrained loss: immaterial
    assert judge([0.01, 0.40, 0.01, 0.40]) == []  # within the seeds' scatter
    [f] = precision.findings(precision.compare(f32, _result([0.20, 0.18, 0.22, 0.19]), SETTINGS), SETTINGS,
                             "float32")
    assert f.severity is Severity.INFO  # what switching would cost
    # Non-finite in both precisions is not bfloat16's.
    both = precision.compare(_result([np.nan] * 4, first=[5] * 4), _result([np.nan] * 4, first=[3] * 4), SETTINGS)
    assert precision.findings(both, SETTINGS, "bfloat16") == []


# ----------------------------------------------------------------------------------------------------------------
# harness train


def test_harness_train_computes_in_bfloat16_and_trains(tmp_path):
    from harness.train import run as train_run

    overrides = ["precision=bfloat16", "train.steps=100"]
    result, report = train_run.train(compose(["logger=none", *overrides]), str(tmp_path),
                                     command=["harness", "train", *overrides], show_report=False)
    assert result.context.problem.model.precision == "bfloat16"
    assert [f for f in report["findings"] if f["severity"] != "info"] == [], report["findings"]
    m = report["diagnostics"]["train"]["metrics"]
    assert m["steps"] == 100 and m["first_nonfinite_step"] is None and m["final_val_accuracy"] > 0.85, m
    loss = report["diagnostics"]["train"]["series"]["train_loss"]
    assert loss[-1] < loss[0] / 5
    assert report["config"]["precision"] == "bfloat16"


@pytest.mark.slow
def test_the_check_is_silent_on_a_small_transformer_in_bfloat16():
    """One pre-LN block on next-token data (tests/sequence_models.py): bfloat16 ends within 1e-4 of float32's loss
    (about 35 s here: the attention programs compile slowly)."""
    rc = compose(["logger=none", "precision=bfloat16", *replace_group("data", "sequence_models.lm_data"),
                  *replace_group("model", "sequence_models.nnx_transformer")])
    out = precision.run(pipeline.build_context(rc), SETTINGS)
    assert out.findings == [] and out.metrics["precision/nonfinite_bfloat16"] == 0
    assert abs(out.metrics["precision/loss_ratio"] - 1) < 0.05
