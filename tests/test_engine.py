"""The training engine: vmap over members equals separate runs, failure stays inside its member, programs are
reused, and the traced controls (input scale, label permutation, LR ramp) do what they say."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from harness import losses
from harness.data import builtin, dataset
from harness.engine import compile as programs
from harness.engine.core import Arrays, Hparams, Problem, TrainSpec
from harness.engine.driver import train_members
from harness.models.adapters import ModelFactory
from harness.models.mlp import MLP
from harness.tasks import Task
from harness.optim import OptimSpec


@pytest.fixture(scope="module")
def digits():
    ds = dataset.from_mapping(builtin.digits())
    return ds, Arrays(*ds.training_arrays())


@pytest.fixture(scope="module")
def problem(digits):
    ds, _ = digits
    model = ModelFactory(MLP, dict(width=32, depth=1), ds.input_shape, 10, ds.x_train[:2]).adapt()
    return Problem(model, losses.cross_entropy, OptimSpec(optax.adam), Task(10, ()))


SPEC = TrainSpec(steps=40, batch_size=64, steps_per_call=20, max_members_per_call=8)


@pytest.fixture(scope="module")
def sweep(problem, digits):
    _, arrays = digits
    hp = Hparams.make(lr=[1e-3, 1e-2, 30.0, 1e-3], init_seed=[0, 1, 2, 3], data_seed=[0, 1, 2, 3])
    return train_members(problem, SPEC, hp, arrays)


def test_the_pure_core_is_the_driver_without_its_bookkeeping(problem, digits, sweep):
    """make_train's program, jitted by hand (no padding, sharding, chunk bookkeeping), trains what the driver's
    calls do: the core is a pure function of (hparams, arrays). Up to float rounding: the driver compiles at
    another XLA optimization level (harness.engine.compile), which may fuse differently."""
    from harness.engine.core import make_train
    from harness.engine.driver import prepare_arrays

    _, arrays = digits
    data, x_fit = prepare_arrays(arrays, SPEC)
    train = jax.jit(make_train(problem, SPEC))  # 40 steps in calls of 20, as the driver cuts them
    state, records, evaluation = train(sweep.hparams, data, x_fit, np.int32(20))
    close = dict(rtol=1e-4, atol=1e-5)
    stable = [0, 1, 3]  # LR 30 (member 2) is chaotic: rounding grows without bound there
    np.testing.assert_allclose(np.asarray(records.loss)[stable], sweep.loss[stable, :20], **close)
    np.testing.assert_allclose(np.asarray(evaluation[0])[stable], sweep.val_loss[stable, 0], **close)
    state, records, evaluation = train(sweep.hparams, data, x_fit, np.int32(20), state, 20)  # continued
    np.testing.assert_allclose(np.asarray(records.loss)[stable], sweep.loss[stable, 20:], **close)
    np.testing.assert_allclose(np.asarray(evaluation[0])[stable], sweep.val_loss[stable, 1], **close)
    np.testing.assert_array_equal(np.asarray(state.first_nonfinite), sweep.first_nonfinite)


def test_evaluations_inside_a_chunk_match_evaluations_between_chunks(problem, digits, sweep):
    """``eval_every``: the sweep's two 20-step chunks with an evaluation after each, as one 40-step chunk that
    evaluates after step 20 inside the program: the same curve from one compiled program."""
    _, arrays = digits
    hp = Hparams.make(lr=[1e-3, 1e-2, 30.0, 1e-3], init_seed=[0, 1, 2, 3], data_seed=[0, 1, 2, 3])
    spec = dataclasses.replace(SPEC, steps_per_call=40, eval_every=20)
    before = programs.STATS.compiles
    inside = train_members(problem, spec, hp, arrays, name="eval_inside")
    assert programs.STATS.compiles - before == 1
    assert list(inside.eval_steps) == [20, 40]
    np.testing.assert_allclose(inside.loss, sweep.loss, rtol=1e-5, atol=1e-6)
    for field in ("val_loss", "val_accuracy", "train_eval_loss"):
        np.testing.assert_allclose(getattr(inside, field), getattr(sweep, field), rtol=1e-5, atol=1e-6)
    # Uneven cadence: after steps 15 and 30 inside, and at the end (40); never twice at a chunk's end.
    uneven = train_members(problem, dataclasses.replace(spec, eval_every=15), hp, arrays, name="eval_inside")
    assert list(uneven.eval_steps) == [15, 30, 40] and uneven.val_loss.shape == (4, 3)
    np.testing.assert_allclose(uneven.val_loss[:, -1], sweep.val_loss[:, -1], rtol=1e-5, atol=1e-6)


def test_batch_evaluations_inside_a_chunk_read_only_the_fixed_batch(problem, digits):
    """``batch_eval_every``: the fixed batch's loss and accuracy inside the chunk (overfit one batch's curve),
    without the validation and fit-subset passes, which run at the chunk's end; a full cadence still wins where
    both are due."""
    _, arrays = digits
    arrays = arrays._replace(fixed_index=np.arange(16, dtype=np.int32))
    hp = Hparams.make(lr=[1e-3, 3e-3], fixed_batch=[1, 0])
    spec = dataclasses.replace(SPEC, steps_per_call=40, fixed_batch=16, batch_eval_every=10)
    out = train_members(problem, spec, hp, arrays, name="eval_batch")
    assert list(out.eval_steps) == [10, 20, 30, 40]
    assert np.isfinite(out.batch_loss).all() and np.isfinite(out.batch_accuracy).all()
    assert np.isnan(out.val_loss[:, :3]).all() and np.isnan(out.train_eval_loss[:, :3]).all()
    assert np.isfinite(out.val_loss[:, 3]).all() and np.isfinite(out.train_eval_loss[:, 3]).all()
    assert out.batch_loss[0, -1] < out.batch_loss[0, 0]  # the fixed-batch member memorizes its batch
    both = train_members(problem, dataclasses.replace(spec, eval_every=20), hp, arrays, name="eval_batch")
    assert np.isnan(both.val_loss[:, [0, 2]]).all() and np.isfinite(both.val_loss[:, [1, 3]]).all()
    np.testing.assert_array_equal(both.batch_loss, out.batch_loss)


def test_calls_group_members_by_budget_only_when_it_saves_steps():
    from harness.engine.driver import call_groups

    same = call_groups(np.full(5, 40), 2)
    assert [g.tolist() for g in same] == [[0, 1], [2, 3], [4]]
    mixed = call_groups(np.array([40, 20, 40, 20, 20, 40]), 3)  # in order: 2 calls of 40; by budget: 40 + 20
    assert [sorted(g.tolist()) for g in mixed] == [[0, 2, 5], [1, 3, 4]]
    assert [g.tolist() for g in call_groups(np.array([40, 20]), 2)] == [[0, 1]]  # one call either way


def test_members_past_their_budget_cost_nothing_and_keep_their_rows(problem, digits):
    """Members with a 20-step budget in a 40-step program, interleaved with 40-step ones: they are trained in
    calls of their own that skip their last 20 steps, their rows come back where they were asked for, and they
    match a 20-step program's members."""
    _, arrays = digits
    seeds = np.arange(4)
    hp = Hparams.make(lr=3e-3, init_seed=seeds, data_seed=seeds, steps=[-1, 20, -1, 20])
    spec = dataclasses.replace(SPEC, steps=40, steps_per_call=40, max_members_per_call=2)
    mixed = train_members(problem, spec, hp, arrays, name="budgets")
    short = train_members(problem, dataclasses.replace(spec, steps=20, steps_per_call=20),
                          hp.take(np.array([1, 3])), arrays, name="budgets_short")
    np.testing.assert_allclose(mixed.loss[[1, 3], :20], short.loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mixed.final_val_loss[[1, 3]], short.final_val_loss, rtol=1e-6, atol=1e-7)
    assert np.isnan(mixed.loss[[1, 3], 20:]).all() and np.isfinite(mixed.loss[[0, 2]]).all()
    assert mixed.loss[0, -1] < mixed.loss[1, 19]  # the long members kept training
    np.testing.assert_allclose(mixed.lr[1], 3e-3)  # the schedule is recorded for every step


def test_a_chunk_that_trains_no_step_still_evaluates_its_members(problem, digits):
    """A call whose members' budgets end in its first chunk: its second chunk trains no step (no update, its
    records those of steps past the budget) and its end evaluation is that of the unchanged members, the same as
    the first chunk's and a 10-step program's. The end evaluation is made inside the chunk's loop, at its last
    trip, so this chunk makes one trip past every budget."""
    _, arrays = digits
    seeds = np.arange(2)
    hp = Hparams.make(lr=3e-3, init_seed=seeds, data_seed=seeds, steps=10)
    spec = dataclasses.replace(SPEC, steps=40, steps_per_call=20, max_members_per_call=2)
    out = train_members(problem, spec, hp, arrays, name="budget_chunks")
    alone = train_members(problem, dataclasses.replace(spec, steps=10, steps_per_call=10), hp, arrays,
                          name="budget_chunks_alone")
    assert list(out.eval_steps) == [20, 40]
    np.testing.assert_array_equal(out.val_loss[:, 1], out.val_loss[:, 0])
    np.testing.assert_array_equal(out.train_eval_loss[:, 1], out.train_eval_loss[:, 0])
    np.testing.assert_allclose(out.val_loss[:, 0], alone.final_val_loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.loss[:, :10], alone.loss, rtol=1e-6, atol=1e-7)
    assert np.isnan(out.loss[:, 10:]).all() and np.isnan(out.grad_norm[:, 10:]).all()
    np.testing.assert_allclose(out.lr, 3e-3)
    assert (out.first_nonfinite == -1).all()


def test_result_shapes_and_eval_points(sweep):
    assert sweep.loss.shape == (4, 40)
    assert sweep.val_loss.shape == (4, 2)
    assert list(sweep.eval_steps) == [20, 40]
    assert sweep.val_accuracy.shape == (4, 2)


def test_learning_members_learn(sweep):
    # Cross-entropy starts near log(10) = 2.30; 40 Adam steps at 1e-2 get well below it.
    assert sweep.loss[1, -5:].mean() < 1.0
    assert sweep.final_val_loss[1] < sweep.loss[1, 0]


def test_diverging_member_is_contained(sweep):
    """LR 30 with Adam blows up; its neighbours must be untouched and finite."""
    bad = sweep.first_nonfinite[2] >= 0 or not np.isfinite(sweep.final_val_loss[2]) or sweep.final_val_loss[2] > 5
    assert bad
    assert np.all(sweep.first_nonfinite[[0, 1, 3]] == -1)
    assert np.all(np.isfinite(sweep.loss[[0, 1, 3]]))
    if sweep.first_nonfinite[2] >= 0:
        step = sweep.first_nonfinite[2]
        assert np.all(np.isnan(sweep.loss[2, step:]))


def test_vmapped_member_matches_run_alone(problem, digits, sweep):
    """A member trained alone agrees with the same member inside the sweep up to vmap-width float noise."""
    _, arrays = digits
    alone = train_members(problem, SPEC, Hparams.make(lr=1e-2, init_seed=1, data_seed=1), arrays)
    np.testing.assert_allclose(alone.loss[0], sweep.loss[1], rtol=2e-3, atol=2e-4)


def test_rerun_is_bitwise_identical_and_compiles_nothing(problem, digits, sweep):
    _, arrays = digits
    before = programs.STATS.compiles
    again = train_members(problem, SPEC, Hparams.make(lr=[1e-3, 1e-2, 30.0, 1e-3], init_seed=[0, 1, 2, 3],
                                                      data_seed=[0, 1, 2, 3]), arrays)
    assert programs.STATS.compiles == before
    np.testing.assert_array_equal(again.loss, sweep.loss)
    np.testing.assert_array_equal(again.val_loss, sweep.val_loss)


def test_members_beyond_a_call_run_in_chunks(problem, digits):
    """More members than max_members_per_call: several calls of one program, same answers as one call."""
    _, arrays = digits
    hp = Hparams.make(lr=np.full(6, 3e-3), init_seed=np.arange(6), data_seed=np.arange(6))
    one_call = train_members(problem, SPEC, hp, arrays)
    before = programs.STATS.compiles
    chunked = train_members(problem, dataclasses.replace(SPEC, max_members_per_call=2), hp, arrays)
    assert programs.STATS.compiles - before <= 2  # first call (init fused) and continuation, at the new width
    np.testing.assert_allclose(chunked.loss, one_call.loss, rtol=2e-3, atol=2e-4)


def test_constant_input_cannot_beat_real_inputs(problem, digits):
    _, arrays = digits
    hp = Hparams.make(lr=1e-2, input_scale=[1.0, 0.0])
    r = train_members(problem, dataclasses.replace(SPEC, steps=60), hp, arrays)
    # With all-zero inputs the model can only learn the class prior: about log(10) on balanced digits.
    assert r.final_val_loss[1] > 2.0
    assert r.final_val_loss[0] < 1.0


def test_shuffled_labels_do_not_generalize(problem, digits):
    _, arrays = digits
    hp = Hparams.make(lr=1e-2, label_seed=[-1, 7])
    r = train_members(problem, dataclasses.replace(SPEC, steps=60), hp, arrays)
    assert r.final_val_loss[1] > 2.0 > 1.0 > r.final_val_loss[0]


def test_lr_ramp_is_exponential(problem, digits):
    _, arrays = digits
    hp = Hparams.make(lr=1e-5, lr_growth=np.log(1e5))
    r = train_members(problem, SPEC, hp, arrays)
    np.testing.assert_allclose(r.lr[0, 0], 1e-5, rtol=1e-5)
    np.testing.assert_allclose(r.lr[0, -1], 1.0, rtol=1e-4)
    ratios = r.lr[0, 1:] / r.lr[0, :-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)


def test_return_params_gives_member_axis(problem, digits):
    _, arrays = digits
    r = train_members(problem, dataclasses.replace(SPEC, return_params=True), Hparams.make(init_seed=[0, 1, 2]),
                      arrays)
    leaves = jax.tree.leaves(r.params)
    assert leaves and all(leaf.shape[0] == 3 for leaf in leaves)
    assert not np.array_equal(leaves[0][0], leaves[0][1])  # different init seeds, different parameters


def test_dropout_models_train_and_regularization_switch_turns_it_off(digits):
    """Dropout mutates its RNG counter inside the gradient trace; with regularization off it is deterministic."""
    ds, arrays = digits
    model = ModelFactory(MLP, dict(width=32, depth=1, dropout=0.5), ds.input_shape, 10, ds.x_train[:2]).adapt()
    problem = Problem(model, losses.cross_entropy, OptimSpec(optax.adam), Task(10, ()))
    on = train_members(problem, SPEC, Hparams.make(lr=1e-2), arrays)
    off = train_members(problem, dataclasses.replace(SPEC, regularization=False), Hparams.make(lr=1e-2), arrays)
    assert np.all(np.isfinite(on.loss)) and np.all(np.isfinite(off.loss))
    # Half the units dropped makes the training loss noisier and higher than the deterministic network's.
    assert on.loss[0, -10:].mean() > off.loss[0, -10:].mean()


def test_convolutional_models_train_in_the_scan_with_their_convolutions_as_matmuls():
    """On the CPU backend a model's convolutions run as matrix multiplications (harness.engine.convolution), so a
    CNN trains in the same scan as any model: one program, evaluations when due, budgets honoured, and what it
    learns is what XLA's own convolutions give (the same losses to float32 rounding)."""
    import jax.numpy as jnp

    from harness.models.cnn import CNN

    ds = dataset.from_mapping(builtin.digits(form="image"))
    arrays = Arrays(*ds.training_arrays())
    model = ModelFactory(CNN, dict(width=4, depth=1), ds.input_shape, 10, ds.x_train[:2]).adapt()
    assert model.convolutions
    problem = Problem(model, losses.cross_entropy, OptimSpec(optax.adam), Task(10, ()))
    spec = TrainSpec(steps=6, batch_size=32, steps_per_call=6, eval_every=2, max_eval_examples=64)
    hp = Hparams.make(lr=[3e-2, 3e-2], init_seed=[0, 1])
    result = train_members(problem, spec, hp, arrays, name="cnn")
    assert result.loss.shape == (2, 6) and np.all(np.isfinite(result.loss)) and list(result.eval_steps) == [2, 4, 6]
    assert programs.STATS.by_program["cnn/train"]["compiles"] == 1
    x = jnp.asarray(ds.x_train[:8])
    params, state = model.init(jax.random.key(0), x)
    traced = str(jax.make_jaxpr(lambda p: model.apply(p, state, x, train=True)[0])(params))
    assert "conv_general_dilated" not in traced and "dot_general" in traced
    native = dataclasses.replace(model, find_convolutions=None)  # XLA's own convolution
    np.testing.assert_allclose(model.apply(params, state, x)[0], native.apply(params, state, x)[0], rtol=1e-5,
                               atol=1e-6)
    reference = train_members(dataclasses.replace(problem, model=native), spec, hp, arrays, name="cnn_native")
    np.testing.assert_allclose(result.loss, reference.loss, rtol=1e-4)
    # Members past their budgets stop updating, as in every scan.
    budgeted = train_members(problem, spec, Hparams.make(lr=[3e-2, 3e-2], init_seed=[0, 1], steps=2), arrays,
                             name="cnn")
    assert np.isfinite(budgeted.loss[:, :2]).all() and np.isnan(budgeted.loss[:, 2:]).all()
    np.testing.assert_array_equal(budgeted.val_loss[:, 0], budgeted.val_loss[:, -1])  # frozen after step 2


def test_the_steps_norms_are_optaxs_tree_norms_in_one_reduction_per_leaf():
    """core.tree_norms (the gradient, update and parameter norms every step records) gives optax.tree.norm of each
    tree, for a scalar leaf, a bfloat16 leaf and under vmap, and 0 for a model without parameters."""
    from harness.engine.core import tree_norms

    trees = [{"w": jax.random.normal(jax.random.key(i), (3, 4)), "s": np.float32(i + 1),
              "h": np.full((5,), i + 1, jax.numpy.bfloat16)} for i in range(3)]
    for got, tree in zip(tree_norms(*trees), trees):
        np.testing.assert_allclose(float(got), float(optax.tree.norm(tree)), rtol=1e-6)
    stacked = [jax.tree.map(lambda x, k=k: np.stack([x, k * x]), trees[0]) for k in (1.0, 3.0)]
    got = jax.vmap(tree_norms)(*stacked)
    want = [[float(optax.tree.norm(jax.tree.map(lambda x, m=m: x[m], t))) for m in range(2)] for t in stacked]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert [float(n) for n in tree_norms({}, {})] == [0.0, 0.0]


def test_call_width_auto_is_a_few_members_per_cpu_device_and_a_count_wins():
    """``engine.max_members_per_call=auto`` (the default) resolves per backend: on CPU a few members per device
    (wider calls train a convolutional model's member-steps slower, README), and every diagnostic's spec gets it;
    an explicit count is used as given, and anything else is a one-line error naming the key."""
    from helpers import compose

    from harness.checks.base import CPU_MEMBERS_PER_DEVICE, EngineSettings
    from harness.engine import devices
    from harness.errors import HarnessError

    cfg = compose()
    assert cfg.engine.max_members_per_call == "auto"
    assert cfg.engine.members_per_call() == CPU_MEMBERS_PER_DEVICE * devices.device_count()
    assert compose(["engine.max_members_per_call=64"]).engine.members_per_call() == 64
    assert EngineSettings(max_members_per_call=5).members_per_call() == 5
    for bad in ("wide", 0):
        with pytest.raises(HarnessError, match="engine.max_members_per_call"):
            compose([f"engine.max_members_per_call={bad}"])
