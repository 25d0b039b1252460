"""The seeds diagnostic: the seed-to-seed spread it shares, and training determinism both ways (a healthy job is
bitwise reproducible and silent; a data factory with an unseeded shuffle, or a model drawing randomness outside its
PRNG key, is train.nondeterministic)."""

import dataclasses

import jax
import numpy as np

from harness.models import adapters
import pytest
import yaml
from helpers import compose
from reference_job import fresh

from harness.checks.training import seeds
from harness.data import builtin, dataset
from harness.engine import compile as programs
from harness.engine.core import Arrays
from harness.errors import HarnessError
from harness.models.mlp import MLP

STEPS = 150  # enough for the reference job to learn (val loss well below log 10); the default budget is 500
SETTINGS = seeds.Settings(steps=STEPS)


# ---------------------------------------------------------------------------------------------------------------
# Planted bug: a data factory that reshuffles its training set with an unseeded RNG on every call.


def reshuffling_digits():
    d = builtin.digits()
    order = np.random.default_rng().permutation(len(d["y_train"]))  # unseeded: a new order on every call
    d["x_train"], d["y_train"] = d["x_train"][order], d["y_train"][order]
    return d


def with_data(ctx, factory):
    """The context's job on other data of the same shapes: same Problem, hence the same compiled programs."""
    ds = dataset.from_mapping(factory())
    return dataclasses.replace(ctx, dataset=ds, arrays=Arrays(*ds.training_arrays()),
                               reload_data=lambda: dataset.from_mapping(factory()), shared={})


@pytest.fixture(scope="module")
def reference():
    """The reference job (MLP 64-128-128-10 on digits, Adam 1e-3, batch 128) and its seeds outcome."""
    ctx = fresh()
    before = programs.STATS.compiles
    outcome = seeds.run(ctx, SETTINGS)
    return ctx, outcome, programs.STATS.compiles - before


def test_reference_is_deterministic_and_silent(reference):
    _, outcome, _ = reference
    assert outcome.findings == []
    m = outcome.metrics
    assert m["seeds/determinism/deterministic"] is True
    assert m["seeds/determinism/data_identical"] and m["seeds/determinism/init_identical"]
    assert m["seeds/determinism/first_differing_step"] == -1 and m["seeds/determinism/max_abs_loss_diff"] == 0.0


def test_spread_is_shared_as_the_noise_floor(reference):
    ctx, outcome, _ = reference
    spread = ctx.shared["seed_spread"]
    # 3 seeds asked for, rounded up to a block of 4 members (the controls' width): all four count.
    assert spread["num_seeds"] == 4 and spread["steps"] == STEPS and spread["num_finite"] == spread["num_trained"] == 4
    result = spread["result"]
    assert list(result.hparams.init_seed) == [0, 1, 2, 3] and list(result.hparams.data_seed) == [0, 1, 2, 3]
    assert spread["val_loss_mean"] == pytest.approx(np.mean(result.final_val_loss), rel=1e-6)
    assert spread["val_loss_std"] == pytest.approx(np.std(result.final_val_loss, ddof=1), rel=1e-6)
    # The reference job learns, and different seeds really differ (a zero spread would be a broken noise floor).
    assert spread["val_loss_mean"] < 1.0 < np.log(10)
    assert 0 < spread["val_loss_std"] < 0.2 * spread["val_loss_mean"]
    assert outcome.metrics["seeds/val_loss_std"] == spread["val_loss_std"]
    assert len(outcome.members) == 4 and np.shape(outcome.series["seeds/loss"]["y"]) == (4, STEPS)


def test_the_rerun_reuses_the_seed_program(reference):
    _, _, compiles = reference
    # Seed runs and determinism rerun: one program (same width and TrainSpec), compiled here unless another test
    # file of this session compiled it already; the rerun never compiles.
    assert compiles <= 1
    assert programs.STATS.by_program["seeds/rerun/train"]["compiles"] == 0


def test_a_second_run_compiles_nothing(reference):
    ctx, _, _ = reference
    before = programs.STATS.compiles
    again = seeds.run(fresh(ctx), SETTINGS)  # fresh memo: really trains again
    assert programs.STATS.compiles == before
    assert again.findings == []


def test_unseeded_shuffle_in_the_data_factory_is_nondeterministic(reference):
    ctx, _, _ = reference
    before = programs.STATS.compiles
    outcome = seeds.run(with_data(ctx, reshuffling_digits), SETTINGS)
    assert programs.STATS.compiles == before  # same shapes and Problem: the reference program
    [finding] = outcome.findings
    assert finding.id == "train.nondeterministic" and finding.severity.value == "error"
    assert "an unseeded shuffle" in finding.message and "first differs at step 0" in finding.message
    assert finding.evidence["first_step"] == 0 and finding.evidence["data_identical"] is False
    assert finding.evidence["max_abs_diff"] > 1e-3 and finding.evidence["params_leaves_differing"] == 6
    assert "seed" in finding.suggestion.lower()
    assert outcome.metrics["seeds/determinism/deterministic"] is False


# ---------------------------------------------------------------------------------------------------------------
# Planted bug: a model that draws initial values from numpy's global RNG (frozen into a compiled program when it
# is traced, so only building twice shows it).


class NumpyInitMLP(MLP):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        bias = self.out.bias
        bias[...] = bias[...] + np.random.normal(size=bias[...].shape).astype(np.float32)


def test_randomness_outside_the_key_is_caught_by_building_twice():
    x = np.zeros((1, 4), np.float32)
    numpy_init = adapters.ModelFactory(NumpyInitMLP, dict(width=8), (4,), 3, x).adapt()
    found = seeds.init_difference(numpy_init, x, 0)
    assert found is not None and found["leaves_differing"] == 1 and found["worst_leaf"] == "out/bias"
    [finding] = seeds.nondeterminism_findings(None, None, found, None, SETTINGS)
    assert finding.id == "train.nondeterministic" and "outside its key" in finding.message
    healthy = adapters.ModelFactory(MLP, dict(width=8), (4,), 3, x).adapt()
    assert seeds.init_difference(healthy, x, 0) is None


class CallbackInitMLP(MLP):
    """Draws from numpy's RNG when the program runs (a host callback), not when it is traced."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        bias = self.out.bias
        draw = jax.pure_callback(lambda: np.random.normal(size=bias[...].shape).astype(np.float32),
                                 jax.ShapeDtypeStruct(bias[...].shape, np.float32))
        bias[...] = bias[...] + draw


def test_builds_are_compared_by_their_traces_and_run_only_when_those_cannot_tell():
    """Two traces of a healthy build are the same program (so nothing is run); numpy drawn at trace time gives two
    programs with other constants; a host callback gives two identical programs that draw when run: that build
    is run twice, and the leaf that differs is named."""
    x = np.zeros((1, 4), np.float32)

    def traces(factory):
        model = adapters.ModelFactory(factory, dict(width=8), (4,), 3, x).adapt()
        return [jax.make_jaxpr(lambda: model.init(jax.random.key(0), x).params)() for _ in range(2)]

    assert seeds.same_program(*traces(MLP))
    assert not seeds.same_program(*traces(NumpyInitMLP))
    assert not seeds.same_program(*traces(CallbackInitMLP))
    callback = adapters.ModelFactory(CallbackInitMLP, dict(width=8), (4,), 3, x).adapt()
    found = seeds.init_difference(callback, x, 0)
    assert found is not None and found["leaves_differing"] == 1 and found["worst_leaf"] == "out/bias"


# ---------------------------------------------------------------------------------------------------------------
# The noise floor comes only from members that trained.


def hand_result(val, first_loss=2.3, first_nonfinite=None):
    from harness.engine.core import Hparams
    from harness.engine.driver import SweepResult

    val = np.asarray(val, np.float32)[:, None]
    n = len(val)
    loss = np.stack([np.full(n, first_loss, np.float32), val[:, 0]], axis=1)
    return SweepResult(hparams=Hparams.make(n=n), loss=loss, grad_norm=np.ones_like(loss), lr=np.ones_like(loss),
                       eval_steps=np.array([2]), val_loss=val, val_accuracy=None, train_eval_loss=val,
                       first_nonfinite=np.full(n, -1) if first_nonfinite is None else np.asarray(first_nonfinite))


def test_only_members_that_trained_make_the_noise_floor():
    # Two trained, one blown up (finite, far above the start), one stuck at the start, one non-finite.
    result = hand_result([0.10, 0.14, 40.0, 2.29, 0.12], first_nonfinite=[-1, -1, -1, -1, 1])
    assert list(seeds.trained_members(result)) == [True, True, False, False, False]
    noise = seeds.spread(result, 2)
    assert noise["num_trained"] == 2 and noise["num_finite"] == 4 and noise["untrained_loss"] == pytest.approx(2.3)
    assert noise["val_loss_mean"] == pytest.approx(0.12) and noise["val_loss_std"] == pytest.approx(0.02 * 2 ** 0.5)
    # optim.lr=3 on the reference job: every run blows up. No noise floor (NaN), not a floor of 140.
    broken = seeds.spread(hand_result([2.41, 2.50, 2.40, 46.7]), 500)
    assert broken["num_trained"] == 0 and np.isnan(broken["val_loss_std"]) and np.isnan(broken["val_loss_mean"])


# ---------------------------------------------------------------------------------------------------------------
# The comparisons, on hand-built arrays.


def test_first_difference_names_the_step_and_size():
    a = np.zeros((2, 5), np.float32)
    b = a.copy()
    assert seeds.first_difference(a, b) is None
    b[1, 3] = 0.25
    b[0, 4] = -1.0
    d = seeds.first_difference(a, b)
    assert d == {"first_step": 3, "abs_diff_at_first_step": 0.25, "max_abs_diff": 1.0, "members_differing": 2}


def test_nan_after_divergence_compares_equal_but_signed_zero_does_not():
    a = np.array([[1.0, np.nan]], np.float32)
    assert seeds.first_difference(a, a.copy()) is None  # a frozen member's NaNs are the same bits
    assert seeds.first_difference(np.zeros((1, 1), np.float32), -np.zeros((1, 1), np.float32)) is not None


def test_params_difference_names_the_worst_leaf():
    a = {"dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    b = jax.tree.map(np.copy, a)
    assert seeds.params_difference(a, b) is None
    b["dense"]["bias"][1] = 1e-7
    assert seeds.params_difference(a, b) == {"leaves_differing": 1, "leaves": 2,
                                             "max_abs_diff": pytest.approx(1e-7), "worst_leaf": "dense/bias"}


def test_describe_array_difference_tells_reordering_from_new_values():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.arange(6, dtype=np.int32)
    first = Arrays(x, y, x[:2], y[:2])
    assert seeds.describe_array_difference(first, Arrays(x.copy(), y.copy(), x[:2], y[:2])) is None
    order = np.array([1, 0, 2, 3, 4, 5])
    moved = seeds.describe_array_difference(first, Arrays(x[order], y[order], x[:2], y[:2]))
    assert "same examples in a different order (2 of 6 rows moved)" in moved
    noisy = x.copy()
    noisy[5, 0] += 1
    assert "differs in 1 of 6 rows" in seeds.describe_array_difference(first, Arrays(noisy, y, x[:2], y[:2]))
    assert "shape" in seeds.describe_array_difference(first, Arrays(x[:5], y[:5], x[:2], y[:2]))


# ---------------------------------------------------------------------------------------------------------------
# Config.


def test_config_file_lists_exactly_the_settings_and_budgets_come_from_the_command_line():
    from harness.config import config_dir

    with open(f"{config_dir()}/diagnostics/seeds/default.yaml") as f:
        assert set(yaml.safe_load(f)) == {f.name for f in dataclasses.fields(seeds.Settings)}
    rc = compose(["diagnostics.seeds.steps=7", "diagnostics.seeds.num_seeds=5", "diagnostics.run=[seeds]"])
    assert rc.settings["seeds"] == seeds.Settings(steps=7, num_seeds=5) and rc.diagnostics == ("seeds",)
    assert seeds.Settings() == seeds.Settings(steps=500, num_seeds=3, check_determinism=True)
    with pytest.raises(HarnessError, match="diagnostics.seeds.num_seeds"):
        compose(["diagnostics.seeds.num_seeds=1"])
