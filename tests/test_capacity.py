"""The capacity ladder: width masking makes a wide model compute exactly what the narrow one does (so all rungs
share one program), a model far too small for digits is train.capacity, the reference width is silent, models
without masking support train one program per rung, and a second run compiles nothing."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from helpers import compose, headline, replace_group
from reference_job import fresh

from harness.checks.training import capacity
from harness.engine import compile as programs
from harness.errors import HarnessError
from harness.models import width_mask
from harness.models.cnn import CNN
from harness.models.mlp import MLP
from harness.pipeline import build_context

STEPS = 150  # enough for the ladder's ordering to show on digits; the default budget is 500


# ---------------------------------------------------------------------------------------------------------------
# Width masking: exact equivalence with the narrow model.


def live_slice_into(small, masked, live):
    """Copy the live block of a masked MLP's parameters into an MLP of width ``live``."""
    for i, (s, m) in enumerate(zip(small.hidden, masked.hidden)):
        rows = slice(None) if i == 0 else slice(0, live)
        s.kernel[...] = m.kernel[...][rows, :live]
        s.bias[...] = m.bias[...][:live]
    small.out.kernel[...] = masked.out.kernel[...][:live]
    small.out.bias[...] = masked.out.bias[...]


@jax.jit
def masked_and_narrow(x):
    """A masked MLP (16 units, 4 live), an MLP of width 4 holding its live block, their outputs and the masked
    model's gradients; traced once (eager NNX dispatches hundreds of tiny ops)."""
    masked = MLP(rngs=nnx.Rngs(0), input_shape=(6,), num_outputs=3, width=16, depth=2, active_width=jnp.int32(4))
    small = MLP(rngs=nnx.Rngs(1), input_shape=(6,), num_outputs=3, width=4, depth=2)
    live_slice_into(small, masked, 4)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(masked)
    return masked(x), small(x), nnx.state(grads, nnx.Param), width_mask.is_masked(masked), width_mask.is_masked(small)


def test_masked_mlp_computes_the_narrow_model_and_masked_units_get_no_gradient():
    x = jax.random.normal(jax.random.key(2), (5, 6))
    out_masked, out_small, grads, masked_flag, small_flag = masked_and_narrow(x)
    np.testing.assert_allclose(out_masked, out_small, rtol=1e-5, atol=1e-6)
    hidden, out = grads["hidden"], grads["out"]
    assert np.all(hidden[0]["kernel"][...][:, 4:] == 0) and np.all(hidden[0]["bias"][...][4:] == 0)
    assert np.all(hidden[1]["kernel"][...][4:, :] == 0) and np.all(hidden[1]["kernel"][...][:, 4:] == 0)
    assert np.all(out["kernel"][...][4:] == 0)
    assert np.any(hidden[1]["kernel"][...][:4, :4] != 0)  # the live block does learn
    assert masked_flag and not small_flag


def test_masked_cnn_masks_channels():
    @jax.jit
    def grads(x):
        masked = CNN(rngs=nnx.Rngs(0), input_shape=(3, 3, 1), num_outputs=2, width=4, kernel_size=2, active_width=2)
        return nnx.state(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(masked), nnx.Param)

    g = grads(jax.random.normal(jax.random.key(1), (1, 3, 3, 1)))
    assert np.all(g["convs"][0]["kernel"][...][..., 2:] == 0) and np.all(g["convs"][1]["kernel"][...][:, :, 2:] == 0)
    assert np.all(g["convs"][1]["kernel"][...][..., 2:] == 0) and np.any(g["convs"][1]["kernel"][...][..., :2, :2] != 0)
    assert np.all(g["head"]["kernel"][...][2:] == 0) and np.any(g["head"]["kernel"][...][:2] != 0)


INITS = {"he_normal": np.sqrt(2 / 64), "glorot_uniform": np.sqrt(2 / (64 + 64))}  # std of a 64x64 kernel


@jax.jit
def live_kernels():
    """Per init: a 512-wide MLP with 64 live units (its live blocks) and a 64-wide MLP's input kernel."""
    out = {}
    for init in INITS:
        masked = MLP(rngs=nnx.Rngs(0), input_shape=(10,), num_outputs=10, width=512, init=init, active_width=64)
        narrow = MLP(rngs=nnx.Rngs(0), input_shape=(10,), num_outputs=10, width=64, init=init)
        out[init] = (masked.hidden[1].kernel[...][:64, :64], masked.out.kernel[...][:64],
                     masked.hidden[0].kernel[...][:, :64], narrow.hidden[0].kernel[...])
    return out


@pytest.mark.parametrize("init", INITS)
def test_masked_init_is_distributed_like_the_narrow_model(init):
    """Variance-scaling inits: a 64-unit live block of a 512-wide layer must have the 64-wide layer's scale."""
    block, head, first, narrow_first = map(np.asarray, live_kernels()[init])
    assert block.std() == pytest.approx(INITS[init], rel=0.05)
    assert head.std() == pytest.approx(np.sqrt(1 / 64), rel=0.1)  # the LeCun head at fan-in 64
    assert first.std() == pytest.approx(narrow_first.std(), rel=0.15)  # input layer: its fan-in is unchanged


def test_the_masked_model_at_the_configured_width_is_the_configured_model():
    """Width 0 (a member's default) is every unit live with init factors of exactly 1: the member table may train
    the run's requests with the masked model (Problem.covers), bitwise as with the model as built."""
    from harness.engine.core import Hparams

    ctx = fresh()
    table = capacity.masked_problem(ctx, "width", 128, ())
    assert table.covers == ctx.problem and capacity.masked_problem(ctx, "width", 64, ()).covers is None
    hp = Hparams.make(lr=1e-3, init_seed=[0, 1], data_seed=[0, 1])
    built = ctx.train("built", ctx.spec(30), hp)
    masked = ctx.train("masked", ctx.spec(30), hp, problem=table)
    np.testing.assert_array_equal(built.loss, masked.loss)
    np.testing.assert_array_equal(built.val_loss, masked.val_loss)
    narrow = ctx.train("narrow", ctx.spec(30), Hparams.make(lr=1e-3, width=8), problem=table)
    assert narrow.final_train_loss[0] > 2 * built.final_train_loss[0]  # 8 live units learn far less in 30 steps


def test_the_smaller_rungs_join_the_member_table_unless_a_member_step_is_costly(monkeypatch):
    ctx = fresh()
    [request] = capacity.requests(ctx, capacity.Settings())
    assert request.problem.covers == ctx.problem
    assert list(request.hparams.width) == [8, 16, 32, 64] and request.spec.steps == 500
    assert capacity.requests(ctx, capacity.Settings(masking=False)) == []
    cnn = build_context(compose(["logger=none", "data=digits_image", "model=cnn"]))
    # On CPU a convolutional model's member-step costs more than a compile: its rungs train at their own widest.
    assert cnn.problem.model.convolutions and capacity.requests(cnn, capacity.Settings()) == []
    # On an accelerator its convolutions stay convolutions, a member-step is cheap, and the rungs join the table.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    [request] = capacity.requests(cnn, capacity.Settings())
    assert request.problem.covers == cnn.problem and len(request.hparams) == 4 * capacity.Settings().seeds_per_rung


def test_unknown_initializer_cannot_be_masked():
    with pytest.raises(width_mask.MaskingUnsupported):
        width_mask.fan_mode("orthogonal")
    assert issubclass(width_mask.MaskingUnsupported, TypeError)  # the ladder falls back to one program per rung


# ---------------------------------------------------------------------------------------------------------------
# The ladder and the verdict.


def test_ladder_widths():
    assert capacity.ladder_widths(128, None) == [8, 16, 32, 64, 128, 256]  # the reference ladder
    assert capacity.ladder_widths(2, None) == [2, 4, 8, 16, 32, 64]
    assert capacity.ladder_widths(3, None) == [2, 3, 4, 8, 16, 32, 64]  # the configured width is a rung
    assert capacity.ladder_widths(64, (8, 16)) == [8, 16, 64, 128]  # and something larger always is


def test_a_depth_ladder_crosses_widths_and_depths():
    """Parameter counts from shapes only (no training): 64-w-...-w-10 with ``depth`` hidden layers."""
    settings = capacity.Settings(widths=(8, 32), depths=(1, 3))
    rungs, failures = capacity.build_rungs(fresh(), settings, {"width": 128, "depth": 2})
    assert failures == []
    assert [r.label for r in rungs][:3] == ["width=8,depth=1", "width=32,depth=1", "width=128,depth=1"]
    assert len(rungs) == 4 * 3  # widths 8, 32, 128 (configured), 256 (one above) x depths 1, 2 (configured), 3

    def params(w, d):
        return 64 * w + w + (d - 1) * (w * w + w) + 10 * w + 10

    assert all(r.params == params(r.get("width"), r.get("depth")) for r in rungs)


@pytest.fixture(scope="module")
def reference():
    ctx = fresh()
    before = programs.STATS.compiles
    outcome = capacity.run(ctx, capacity.Settings(steps=STEPS))
    return ctx, outcome, programs.STATS.compiles - before


def test_reference_width_is_silent(reference):
    _, outcome, _ = reference
    assert outcome.skipped is None and outcome.findings == []
    m = outcome.metrics
    assert m["capacity/rungs"] == 6 and m["capacity/masked"] is True and m["capacity/programs"] == 1
    assert [m[f"capacity/params/width={w}"] for w in (8, 128)] == [682, 26122]  # 64-w-w-10 with biases
    assert m["capacity/train_loss/width=8"] > 2 * m["capacity/train_loss/width=128"]  # capacity does matter
    assert m["capacity/untrained_loss"] == pytest.approx(np.log(10), rel=0.1)
    # The configured rung is the 4 seed runs; 8...128 are trained, 5 rungs and 8 rows in all.
    assert m["capacity/trained"] == 5 and len(outcome.members) == 4 + 4 and outcome.plots[0].name == "capacity"


def test_the_reference_model_fits_so_no_larger_rung_is_trained(reference):
    """Cross-entropy cannot go below 0, and width 128 ends within the margin (5% of the untrained loss) of it: a
    larger model cannot beat it by the margin, so 256 is decided without training."""
    _, outcome, compiles = reference
    m = outcome.metrics
    assert m["capacity/not_trained"] == ["width=256"] and "capacity/train_loss/width=256" not in m
    assert m["capacity/train_loss/width=128"] < 0.05 * m["capacity/untrained_loss"]
    assert any("larger rungs not trained" in d for d in m["capacity/decisions"])
    # 8...64 masked at 64, and the seed runs (shared with seeds and controls in a full run; another test in this
    # process may have compiled that program already).
    assert m["capacity/programs"] == 1 and 1 <= compiles <= 2


def test_seed_runs_of_other_steps_are_not_the_configured_rung():
    """A budget may shorten the seed runs; the ladder then trains its own configured rung for its own steps."""
    from harness.checks.training import seeds

    ctx = fresh()
    seeds.run(ctx, seeds.Settings(steps=60, check_determinism=False))
    outcome = capacity.run(ctx, capacity.Settings(steps=80, widths=(64,)))
    assert not any("seed runs" in d for d in outcome.metrics.get("capacity/decisions", []))
    assert len([m for m in outcome.members if m["width"] == 128]) == 1  # seeds_per_rung, not the 4 seed runs


def test_without_a_known_floor_the_larger_rungs_are_trained():
    """A user's own cross-entropy has no floor the ladder knows until overfit one batch shares one: the larger
    rung is trained; with the shared floor (0) it is decided."""
    from harness.checks.training import overfit_batch

    def own_cross_entropy(logits, labels):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]

    base = fresh()
    problem = dataclasses.replace(base.problem, loss_fn=own_cross_entropy, fingerprint=None)
    settings = capacity.Settings(steps=300, widths=(64,))
    unknown = capacity.run(fresh(problem=problem), settings)
    assert "capacity/not_trained" not in unknown.metrics and unknown.metrics["capacity/trained"] == 3
    known = fresh(problem=problem)
    floor, _ = overfit_batch.loss_floor(known, overfit_batch.batch_arrays(known, overfit_batch.Settings())[0])
    assert floor == pytest.approx(0.0, abs=1e-3)
    known.shared["loss_floor"] = floor
    assert capacity.loss_lower_bound(known) == floor
    decided = capacity.run(known, settings)
    assert decided.metrics["capacity/not_trained"] == ["width=256"]


@pytest.mark.parametrize("widths, bands, expected", [
    ([8, 16, 32, 64, 128, 256], 2, [[8, 16, 32, 64, 128], [256]]),
    ([8, 16, 32, 64, 128, 256], 1, [[8, 16, 32, 64, 128, 256]]),
    ([8, 16, 32, 64, 128, 256], 3, [[8, 16, 32, 64], [128], [256]]),
    ([100, 120, 256], 2, [[100, 120], [256]]),
    ([200, 256], 2, [[200, 256]]),  # both within a factor 2 of the top: one band
    ([16], 4, [[16]]),
])
def test_width_bands_halve_from_the_top(widths, bands, expected):
    assert capacity.width_bands(widths, bands) == expected


@pytest.fixture(scope="module")
def too_small():
    """Planted bug: width 2 on digits (64-2-2-10)."""
    tiny = build_context(compose(["logger=none", "model.width=2"]))
    return tiny, capacity.run(tiny, capacity.Settings(steps=STEPS))


def test_a_model_far_too_small_is_train_capacity(too_small):
    _, outcome = too_small
    [finding] = outcome.findings
    assert finding.id == "train.capacity" and finding.severity.value == "warning"
    assert finding.evidence["configured"] == "width=2" and finding.evidence["configured_params"] == 166
    assert finding.evidence["configured_train_loss"] > 0.5 * np.log(10)
    assert finding.evidence["best_train_loss"] < 0.3 and "width=64" in finding.evidence["better"]
    assert "underfits" in finding.message and "Increase the model's width" in finding.suggestion
    assert outcome.metrics["capacity/programs"] == 2  # widths 2...32 masked at 32, 64 alone
    assert headline(outcome.findings, trained=True) == "train.capacity"


def test_a_second_run_compiles_nothing(too_small):
    ctx, first = too_small
    before = programs.STATS.compiles
    again = capacity.run(fresh(ctx), capacity.Settings(steps=STEPS))  # fresh memo: really trains again
    assert programs.STATS.compiles == before
    assert [f.id for f in again.findings] == ["train.capacity"]
    assert headline(again.findings, trained=True) == "train.capacity"
    assert again.metrics == first.metrics  # reruns of one program are bitwise identical


# ---------------------------------------------------------------------------------------------------------------
# A user model without masking support: one program per rung.


class PlainMLP(nnx.Module):
    """A user model with a width and no ``active_width``."""

    def __init__(self, *, rngs, input_shape, num_outputs, width=8):
        self.hidden = nnx.Linear(int(np.prod(input_shape)), width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def test_models_without_masking_train_one_program_per_rung():
    rc = compose([*replace_group("model", "test_capacity.PlainMLP", width=8),
                  *replace_group("data", "helpers.tiny_classification"), "logger=none"])
    ctx = build_context(rc)
    before = programs.STATS.compiles
    outcome = capacity.run(ctx, capacity.Settings(steps=40, widths=(16,)))
    assert programs.STATS.compiles - before == 2  # the seed runs (the configured rung) and width 16
    m = outcome.metrics
    assert m["capacity/masked"] is False and m["capacity/programs"] == 1 and m["capacity/trained"] == 2
    assert np.isfinite(m["capacity/train_loss/width=8"]) and np.isfinite(m["capacity/train_loss/width=16"])


def test_without_masking_smaller_rungs_stop_at_the_first_that_suffices():
    """Trained from the smallest up, the ladder stops at the first width within the margins of the configured
    model on both splits; the ones between are not trained (nor is 128: width 64 fits digits)."""
    ctx = build_context(compose(["logger=none", "model.width=64"]))
    outcome = capacity.run(ctx, capacity.Settings(steps=300, widths=(2, 32, 48), masking=False))
    m = outcome.metrics
    assert m["capacity/train_loss/width=2"] > 0.5  # far too small: trained, not as good
    assert m["capacity/not_trained"] == ["width=48", "width=128"] and m["capacity/sufficient_width"] == 32
    assert any("stopped at width=32" in d for d in m["capacity/decisions"])
    assert m["capacity/programs"] == 2 and outcome.findings == []


def test_a_model_without_the_width_key_is_skipped_with_the_reason():
    ctx = types.SimpleNamespace(model_config={"hidden": 3, "layers": 2})
    outcome = capacity.run(ctx, capacity.Settings())
    assert "no 'width' key (its keys: hidden, layers)" in outcome.skipped
    assert "diagnostics.capacity.width_key" in outcome.skipped


# ---------------------------------------------------------------------------------------------------------------
# Config.


def test_config_file_lists_exactly_the_settings():
    from harness.config import config_dir

    with open(f"{config_dir()}/diagnostics/capacity/default.yaml") as f:
        assert set(yaml.safe_load(f)) == {f.name for f in dataclasses.fields(capacity.Settings)}
    rc = compose(["diagnostics.capacity.widths=[4,8]", "diagnostics.capacity.steps=20"])
    assert rc.settings["capacity"].widths == (4, 8) and rc.settings["capacity"].steps == 20
    with pytest.raises(HarnessError, match="diagnostics.capacity.widths"):
        compose(["diagnostics.capacity.widths=[0,8]"])


# ---------------------------------------------------------------------------------------------------------------
# A collapsed multirun: points share the derived ladder Problem, so their requests merge into one program call.


def test_collapsed_sweep_points_merge_their_ladders():
    from harness.sweeps import collapse

    tiny = [*replace_group("data", "helpers.tiny_classification"), "model.width=8", "model.depth=1", "logger=none",
            "diagnostics.run=[capacity]", "diagnostics.capacity.steps=30", "diagnostics.capacity.widths=[4,16]"]
    rcs = [compose([*tiny, f"optim.lr={lr}"]) for lr in (1e-2, 3e-2)]
    before = programs.STATS.compiles
    results, trainer = collapse.run_points(rcs)
    # Both points' seed runs (their configured rung) are one call, and so are their masked width-4 rungs; at
    # lr 3e-2 width 8 fits the tiny set, so only the other point trains width 16.
    assert trainer.requests == 5 and trainer.merged_calls == 3
    assert programs.STATS.compiles - before == 3
    rows = [r.outcomes[0].metrics for r in results]
    assert [m["capacity/rungs"] for m in rows] == [3, 3] and [m["capacity/trained"] for m in rows] == [3, 2]
    assert rows[0]["capacity/train_loss/width=4"] != rows[1]["capacity/train_loss/width=4"]  # each its own lr
