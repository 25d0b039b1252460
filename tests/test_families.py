"""Real clients: models as third-party packages ship them (``equinox.nn.MLP``, ``haiku.nets.MLP``, flaxmodels'
Linen ResNet-18), an Equinox CNN from ``equinox.nn`` layers, and Flax Linen natively and through ``nnx.bridge``,
diagnosed through the pipeline as a user's config would (tests/families.py holds the factories). Each healthy
setup is free of errors; one planted bug around each is named; BatchNorm, dropout and dead units are handled per
family; the traced-program cache works for a non-NNX family across processes.

Budgets: the non-slow runs use ``diagnostics.run=[data,model,overfit_batch]`` (or less) and share runs through
``diagnose``'s cache. Convolutional models cost more per step (the ResNet-18 especially): the Equinox CNN and the
ResNet get their model stage here and training only in the slow tests. The full
default suite per family is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import functools
import json
import math

import families
import jax
import numpy as np
import pytest
from helpers import cli_env, compose, replace_group, run_cli

from harness import pipeline
from harness.findings import Severity, first_to_fix
from harness.models.adapters import ModelFactory
from harness.models.mlp import MLP

QUICK = ("diagnostics.run=[data,model,overfit_batch]",)
# The model stage where a planted bug is looked for: without the float64 gradient check (one more compile).
MODEL_STAGE = ("diagnostics.run=[data,model]", "diagnostics.model.gradient_check=false")
EQX_MLP = tuple(replace_group("model", "equinox.nn.MLP", in_size=64, out_size=10, width_size=128, depth=2))
HAIKU_MLP = tuple(replace_group("model", "families.haiku_mlp"))
LINEN_MLP = tuple(replace_group("model", "families.linen_mlp"))
LINEN_DROPOUT_MLP = tuple(replace_group("model", "families.linen_mlp", dropout=0.5))  # dropout via `train`
BRIDGED_MLP = tuple(replace_group("model", "families.linen_through_bridge"))
EQX_CNN = (*replace_group("model", "families.EquinoxCNN"), "data=digits_image")
# flaxmodels' ResNet-18 as shipped, with random init (pretrained=None: nothing is downloaded) on 8x8x1 digits;
# normalize=False: its default normalizes with ImageNet's RGB statistics.
RESNET = (*replace_group("model", "flaxmodels.ResNet18", output="logits", pretrained="null", num_classes=10,
                         normalize="false"), "data=digits_image")
# The ResNet's model stage at a reduced budget (its float64 gradient check and 4 inits of 11M parameters would
# take a minute on CPU; the default budget runs in the slow test).
RESNET_MODEL_STAGE = ("diagnostics.run=[data,model]", "diagnostics.model.gradient_check=false",
                      "diagnostics.model.init_seeds=1", "diagnostics.model.batch_size=16")


@functools.lru_cache(maxsize=None)
def _diagnose(overrides: tuple[str, ...]):
    return pipeline.run(compose(["logger=none", *overrides]))


def diagnose(*overrides: str):
    """``harness <overrides> logger=none`` in this process; identical runs are shared between tests."""
    return _diagnose(tuple(overrides))


@pytest.fixture(scope="module", autouse=True)
def _forget_runs():
    yield
    _diagnose.cache_clear()


def problems(result):
    return [(f.id, f.severity.value, f.message) for f in result.findings if f.severity is not Severity.INFO]


def assert_healthy(result):
    assert result.internal_errors == [], [e.summary for e in result.internal_errors]
    assert [o.name for o in result.outcomes if o.skipped] == []
    assert result.status == "healthy", problems(result)
    assert problems(result) == []  # no warnings either


def finding(result, fid: str):
    [f] = [f for f in result.findings if f.id == fid]
    return f


@pytest.fixture(scope="module")
def digits_batch():
    from harness.data import builtin

    return np.asarray(builtin.digits()["x_train"][:32], np.float32)


def adapted(factory, x, **kwargs):
    return ModelFactory(factory, kwargs, x.shape[1:], 10, x[:2]).adapt()


def jitted_apply(model):
    """``model.apply`` compiled (eager NNX and Equinox calls dispatch op by op: slower than one compile)."""
    return jax.jit(model.apply, static_argnames=("train", "regularization"))


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------------------------------------------
# As shipped, healthy: the family's own parameter names.

HEALTHY = {
    "equinox.nn.MLP": (EQX_MLP, "equinox", "layers[0].weight"),
    "haiku.nets.MLP": (HAIKU_MLP, "haiku", "mlp/~/linear_0/w"),
    "linen": (LINEN_DROPOUT_MLP, "linen", "params/Dense_0/kernel"),  # with dropout: one run for both tests
    "linen-through-nnx.bridge": (BRIDGED_MLP, "nnx", "Dense_0/kernel"),  # the bridge makes it an NNX module
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_third_party_models_as_shipped_are_healthy(name):
    model, family, first_path = HEALTHY[name]
    r = diagnose(*model, *QUICK)
    assert_healthy(r)
    assert r.context.problem.model.family == family
    m = pipeline.flat_metrics(r.outcomes)
    assert m["model/family"] == family and m["model/task"] == "classification"  # what the report says it saw
    assert f"model/grad_norm/{first_path}" in m  # gradient flow per parameter, in the family's own spelling
    # The overfit test ran (through the bridge it used to crash with TraceContextError) and memorized the batch.
    assert m["overfit_batch/final_batch_accuracy"] == 1.0


def test_equinox_mlp_is_configured_as_shipped():
    """``_target_: equinox.nn.MLP`` with its own argument names: called with ``key=``, nothing else added."""
    rc = compose(["logger=none", *EQX_MLP])
    assert rc.model.target == "equinox.nn.MLP"
    assert dict(rc.model.kwargs) == {"in_size": 64, "out_size": 10, "width_size": 128, "depth": 2}
    ctx = diagnose(*EQX_MLP, *QUICK).context
    params = ctx.problem.model.flat_params(ctx.problem.model.init(jax.random.key(0), ctx.arrays.x_train[:2]).params)
    assert list(params) == ["layers[0].weight", "layers[0].bias", "layers[1].weight", "layers[1].bias",
                            "layers[2].weight", "layers[2].bias"]
    assert params["layers[0].weight"].shape == (128, 64)


def test_equinox_cnn_model_stage_is_healthy():
    """The model stage only (training: the slow test)."""
    r = diagnose(*EQX_CNN, "diagnostics.run=[data,model]")
    assert_healthy(r)
    model = r.context.problem.model
    assert model.family == "equinox" and model.convolutions  # on CPU: as matrix multiplications
    m = pipeline.flat_metrics(r.outcomes)
    assert {"model/grad_norm/conv1.weight", "model/grad_norm/head.weight"} <= set(m)
    assert m["model/batch_dependence/cross_gradient"] == 0.0  # per-example vmap: examples cannot mix


def test_flaxmodels_resnet18_model_stage_has_no_errors(monkeypatch):
    import flaxmodels.utils

    def no_download(*args, **kwargs):
        raise AssertionError("flaxmodels tried to download weights")

    monkeypatch.setattr(flaxmodels.utils, "download", no_download)
    r = diagnose(*RESNET, *RESNET_MODEL_STAGE)
    assert_healthy(r)
    model = r.context.problem.model
    assert model.family == "linen" and model.convolutions
    params, state = jax.eval_shape(model.init, jax.random.key(0), r.context.arrays.x_train[:2])  # no FLOPs
    assert list(state) == ["batch_stats"]  # BatchNorm statistics are state, not parameters
    assert "params/Conv_0/kernel" in model.flat_params(params)
    assert 11_000_000 < sum(math.prod(p.shape) for p in jax.tree.leaves(params)) < 12_000_000
    m = pipeline.flat_metrics(r.outcomes)
    assert m["model/batch_dependence/cross_gradient"] == 0.0  # inference mode: BatchNorm on running statistics
    assert any(k.startswith("model/dead_fraction/params/BasicBlock_") for k in m)  # units captured, no edits


# ----------------------------------------------------------------------------------------------------------------
# One planted bug around each: named, and the first thing to fix.


def test_equinox_mlp_with_labels_misaligned_is_no_signal():
    # Budget: the seed runs and controls at 150 steps (the reference job is far from the controls by then). The
    # permutation is a finite sample: with seed 123 (tests/test_controls.py's) eqx.nn.MLP reaches 16% validation
    # accuracy against 10% chance at 150 steps, which the accuracy rule reads as a little signal.
    r = diagnose(*EQX_MLP, *replace_group("data", "families.misaligned_digits", seed=1),
                 "diagnostics.run=[data,model,controls]", "diagnostics.controls.steps=150",
                 "diagnostics.seeds.steps=150")
    assert r.internal_errors == []
    assert first_to_fix(r.findings).id == "train.no_signal"
    assert "constant_input" in finding(r, "train.no_signal").evidence["failed_controls"]


def test_haiku_mlp_with_a_softmax_at_its_end_is_output_range():
    r = diagnose(*replace_group("model", "families.haiku_mlp", softmax="true"), *MODEL_STAGE)
    assert first_to_fix(r.findings).id == "model.output_range"
    assert "softmax is applied twice" in finding(r, "model.output_range").message


def test_equinox_cnn_with_a_softmax_at_its_end_is_output_range():
    r = diagnose(*replace_group("model", "families.equinox_softmax_cnn"), "data=digits_image", *MODEL_STAGE)
    assert first_to_fix(r.findings).id == "model.output_range"


def test_linen_with_one_based_labels_is_label_range():
    r = diagnose(*LINEN_MLP, *replace_group("data", "families.one_based_label_digits"), *MODEL_STAGE)
    assert first_to_fix(r.findings).id == "data.label_range"
    assert r.internal_errors == []


def test_linen_through_the_bridge_with_a_sign_flipped_loss_is_named():
    r = diagnose(*BRIDGED_MLP, *replace_group("loss", "planted.negated_cross_entropy", _partial_="true"),
                 "diagnostics.run=[overfit_batch]", "diagnostics.overfit_batch.steps=100")
    assert r.internal_errors == []
    f = finding(r, "train.loss_increasing")
    assert f.severity is Severity.ERROR and "sign is flipped" in f.message
    assert first_to_fix(r.findings).id == "train.loss_increasing"


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm in every family: state, not parameters; batch statistics in training, running ones in inference.

BATCHNORM = {
    "nnx": families.nnx_batchnorm_mlp,
    "linen": families.linen_batchnorm_mlp,
    "equinox": families.equinox_batchnorm_mlp,
    "haiku": families.haiku_batchnorm_mlp,
}


@pytest.mark.parametrize("family", list(BATCHNORM))
def test_batchnorm_is_no_batch_dependence_false_alarm_and_trains(family):
    r = diagnose(*replace_group("model", f"families.{BATCHNORM[family].__name__}"), *QUICK)
    assert_healthy(r)
    assert r.context.problem.model.family == family
    m = pipeline.flat_metrics(r.outcomes)
    assert m["model/batch_dependence/cross_gradient"] == 0.0
    # Evaluated in inference mode on the running statistics training updated: memorized.
    assert m["overfit_batch/final_batch_accuracy"] == 1.0


@pytest.mark.parametrize("family", list(BATCHNORM))
def test_batchnorm_state_updates_in_training_only(family, digits_batch):
    x = digits_batch
    model = adapted(BATCHNORM[family], x)
    apply = jitted_apply(model)
    params, state = jax.jit(model.init)(jax.random.key(0), x)
    assert jax.tree.leaves(state), "BatchNorm statistics must be state"
    out, trained_state = apply(params, state, x, key=jax.random.key(1), train=True)
    assert not leaves_equal(state, trained_state)  # running statistics moved
    assert jax.tree.structure(trained_state) == jax.tree.structure(state)
    eval_out, eval_state = apply(params, trained_state, x)
    assert leaves_equal(eval_state, trained_state)  # inference does not touch them
    # Inference is per example (running statistics); training normalizes with the batch's own statistics.
    np.testing.assert_allclose(apply(params, trained_state, x[:4])[0], eval_out[:4], rtol=1e-5, atol=1e-5)
    out4 = apply(params, state, x[:4], key=jax.random.key(1), train=True)[0]
    assert not np.allclose(out4, out[:4], atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Dropout in every family: off for the overfit test, stochastic in training, off in inference.

ONLY_OVERFIT = "diagnostics.run=[overfit_batch]"
DROPOUT = {  # (the run's overrides, the factory, its config)
    "nnx": (None, MLP, dict(dropout=0.5)),  # the built-in MLP's dropout: trained in tests/test_engine.py
    "linen": ((*LINEN_DROPOUT_MLP, *QUICK), families.linen_mlp, dict(dropout=0.5)),  # HEALTHY's linen run
    "equinox": ((*replace_group("model", "families.EquinoxDropoutMLP"), ONLY_OVERFIT), families.EquinoxDropoutMLP,
                {}),
    "haiku": ((*replace_group("model", "families.haiku_dropout_mlp"), ONLY_OVERFIT), families.haiku_dropout_mlp,
              {}),
}


@pytest.mark.parametrize("family", ["linen", "equinox", "haiku"])
def test_dropout_is_off_for_the_overfit_test(family):
    r = diagnose(*DROPOUT[family][0])
    assert_healthy(r)
    assert r.context.problem.model.family == family
    assert pipeline.flat_metrics(r.outcomes)["overfit_batch/final_loss"] < 0.01


@pytest.mark.parametrize("family", list(DROPOUT))
def test_dropout_is_stochastic_in_training_only(family, digits_batch):
    _, factory, kwargs = DROPOUT[family]
    x = digits_batch
    model = adapted(factory, x, **kwargs)
    apply = jitted_apply(model)
    params, state = jax.jit(model.init)(jax.random.key(0), x)

    def train(key, state, regularization=True):
        return apply(params, state, x, key=key, train=True, regularization=regularization)

    a, state_a = train(jax.random.key(1), state)
    # NNX layers draw from their own nnx.Rngs (counters in the state); the others from the step's key.
    b = train(jax.random.key(2), state_a if family == "nnx" else state)[0]
    assert not np.allclose(a, b), "dropout must draw a new mask each step"
    quiet = [train(jax.random.key(k), state, regularization=False)[0] for k in (1, 2)]
    np.testing.assert_array_equal(quiet[0], quiet[1])  # regularization off: no dropout
    np.testing.assert_allclose(quiet[0], apply(params, state, x)[0], rtol=1e-5, atol=1e-6)  # = inference


# ----------------------------------------------------------------------------------------------------------------
# Dead units, captured without model edits, named with the family's own path.

DEAD = {
    "linen": ("families.linen_dead_mlp", "params/Dense_1"),
    "haiku": ("families.haiku_dead_mlp", "linear_1"),
    "equinox": ("families.equinox_dead_mlp", "layers[1]"),
}


@pytest.mark.parametrize("family", ["linen", "haiku", "equinox"])
def test_a_dead_relu_layer_is_named_with_the_familys_path(family):
    target, layer = DEAD[family]
    r = diagnose(*replace_group("model", target), *MODEL_STAGE)
    f = finding(r, "model.dead_units")
    assert f.severity is Severity.ERROR
    assert f.evidence["layers"] == {layer: 1.0}  # only the planted layer, all of it
    # The dead layer is the cause; the zero gradients behind it (a zero bias is the family's default init, not a
    # zero-init bug) are its symptom.
    assert first_to_fix(r.findings).id == "model.dead_units"


def test_equinox_dead_layer_is_found_whatever_its_spelling():
    """The measurement itself works for Equinox (the spelling is the xfail above)."""
    r = diagnose(*replace_group("model", "families.equinox_dead_mlp"), *MODEL_STAGE)
    [(layer, fraction)] = finding(r, "model.dead_units").evidence["layers"].items()
    assert layer.replace("[", "/").rstrip("]") == "layers/1" and fraction == 1.0
    assert first_to_fix(r.findings).id == "model.dead_units"


# ----------------------------------------------------------------------------------------------------------------
# The traced-program cache across processes, for a non-NNX family.


def _twice_through_the_cli(tmp_path, model_overrides, *args):
    cache = tmp_path / "jax-cache"
    env = cli_env()
    env.pop("JAX_COMPILATION_CACHE_DIR")  # the config key decides
    reports = []
    for i in range(2):
        proc = run_cli([*model_overrides, *args, "logger=none", f"engine.compilation_cache={cache}",
                        f"hydra.run.dir={tmp_path}/run{i}"], str(tmp_path), env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads((tmp_path / f"run{i}" / "report.json").read_text()))
    return reports


def test_equinox_programs_are_reused_by_a_later_process(tmp_path):
    """Equinox modules in a program's outputs (params, BatchNorm state) survive the stored program's pickled
    output tree: the second process reuses every trace, with the same results (it crashed with '_Missing'
    object is not subscriptable before harness.models.adapters.equinox pickled Equinox's sentinel by name)."""
    first, second = _twice_through_the_cli(
        tmp_path, replace_group("model", "families.equinox_batchnorm_mlp"), "diagnostics.run=[model]",
        "diagnostics.model.gradient_check=false")
    assert first["status"] == second["status"] == "healthy"
    assert first["programs"]["traces_reused"] == 0
    assert second["programs"]["traces_reused"] == second["programs"]["compiles"] >= 1
    assert first["metrics"] == second["metrics"]


# ----------------------------------------------------------------------------------------------------------------
# Slow: the full default suite per family, training the conv models, the ResNet's default model budget.


@pytest.mark.slow
def test_equinox_mlp_full_default_suite_with_its_width_key():
    r = diagnose(*EQX_MLP, "diagnostics.capacity.width_key=width_size")
    assert r.internal_errors == []
    assert [o.name for o in r.outcomes if o.skipped] == []
    assert [f for f in r.findings if f.severity is Severity.ERROR] == [], problems(r)
    m = pipeline.flat_metrics(r.outcomes)
    assert m["capacity/configured"] == "width_size=128"
    # The MLP fits digits, so the larger rung is decided without training; smaller ones are trained up to the first
    # as good as the configured one (no masking outside the built-in models).
    assert m["capacity/rungs"] >= 4 and m["capacity/not_trained"][-1] == "width_size=256"
    assert "capacity/train_loss/width_size=8" in m


@pytest.mark.slow
@pytest.mark.parametrize("target", ["families.haiku_mlp", "families.linen_mlp", "families.linen_through_bridge"],
                         ids=["haiku", "linen", "bridge"])
def test_full_default_suite_per_family_is_healthy(target):
    # `width` must be a config key for the capacity ladder (a factory's default is not one).
    r = diagnose(*replace_group("model", target, width=128, depth=2))
    assert r.internal_errors == []
    assert [f for f in r.findings if f.severity is Severity.ERROR] == [], problems(r)
    assert [o.name for o in r.outcomes if o.skipped is None] == ["data", "model", "overfit_batch", "seeds",
                                                                 "controls", "lr_range", "capacity"]
    m = pipeline.flat_metrics(r.outcomes)
    assert m["capacity/configured"] == "width=128" and m["capacity/not_trained"][-1] == "width=256"


@pytest.mark.slow
def test_equinox_cnn_memorizes_one_batch():
    r = diagnose(*EQX_CNN, *QUICK, "diagnostics.overfit_batch.steps=200", "diagnostics.overfit_batch.lr=0.003")
    assert_healthy(r)


@pytest.mark.slow
def test_flaxmodels_resnet18_as_shipped_outputs_probabilities():
    """flaxmodels' ResNet18 defaults to ``output='softmax'``: handed to a logits loss, the softmax is applied
    twice (the reduced model budget: the default one's float64 gradient check of 11M parameters takes a minute)."""
    r = diagnose(*replace_group("model", "flaxmodels.ResNet18", pretrained="null", num_classes=10),
                 "data=digits_image", *RESNET_MODEL_STAGE)
    assert r.internal_errors == []
    assert first_to_fix(r.findings).id == "model.output_range"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["families.haiku_batchnorm_mlp", "families.linen_batchnorm_mlp"],
                         ids=["haiku", "linen"])
def test_programs_are_reused_by_a_later_process_for_every_family(tmp_path, target):
    first, second = _twice_through_the_cli(
        tmp_path, replace_group("model", target), "diagnostics.run=[model,overfit_batch]",
        "diagnostics.overfit_batch.steps=40", "diagnostics.overfit_batch.eval_every=20",
        "diagnostics.overfit_batch.lr=0.01")
    assert first["status"] == second["status"] == "healthy"
    assert second["programs"]["traces_reused"] == second["programs"]["compiles"] >= 3
    assert first["metrics"] == second["metrics"]
